"""A drill's evidence: its facts as JSON and as a PDF (reportlab) an auditor can file.

`drill_facts` is the one description both are made from: the server, the
restore point and its age at the drill, the trigger, each step's times in
UTC and in the owner's zone, the measured RTO, every check with its
evidence, the console excerpt, the resources made and removed, and the cost.
"""

import io
import json
import zoneinfo
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Image, Paragraph, Preformatted, SimpleDocTemplate, Spacer, Table, TableStyle

from reclo_site import cloud
from reclo_site.cloud import storage

from . import drill_cost
from .drills import DRILL_STEPS
from .models import Drill

UTC = zoneinfo.ZoneInfo("UTC")


def owner_zone(drill: Drill) -> zoneinfo.ZoneInfo:
    """The owner's time zone (User.time_zone; the portal's TIME_ZONE for an account without one)."""
    name = getattr(drill.user, "time_zone", "") or settings.TIME_ZONE
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return UTC


def _both(when: datetime | None, zone) -> dict | None:
    if when is None:
        return None
    return {"utc": when.astimezone(UTC).isoformat(), "local": when.astimezone(zone).isoformat(), "zone": str(zone)}


def drill_facts(drill: Drill) -> dict:
    """Everything the report says, as JSON-ready values."""
    zone = owner_zone(drill)
    steps = [
        {
            "name": s.name,
            "title": DRILL_STEPS.title(s.name),
            "status": s.status,
            "started": _both(s.started, zone),
            "finished": _both(s.finished, zone),
            "detail": s.detail,
            "error": s.error,
        }
        for s in drill.steps.all()
    ]
    booted = next((s.outputs for s in drill.steps.all() if s.name == "booting"), None) or {}
    return {
        "drill_id": str(drill.pk),
        "server": drill.server_name,
        "restore_point": str(drill.backup_ref),
        "restore_point_taken": _both(drill.backup_created, zone),
        "restore_point_age_hours": round(drill.restore_point_age.total_seconds() / 3600, 1),
        "trigger": drill.get_trigger_display(),
        "sandbox": drill.sandbox,
        "status": drill.status,
        "started": _both(drill.created, zone),
        "finished": _both(drill.finished, zone),
        "rto_seconds": None if drill.rto_seconds is None else round(drill.rto_seconds, 1),
        "steps": steps,
        "checks": drill.checks,
        # What the sandbox could not check, and why (the aws one cannot probe a port: nothing reaches it).
        "not_checked": (booted.get("verdict") or {}).get("details", {}).get("not_checked", ""),
        "error": drill.error,
        "console_excerpt": drill.console_excerpt,
        "resources": drill.resources,
        "cost": _cost(drill),
    }


def _cost(drill: Drill) -> dict:
    """What the drill cost: nothing in the local sandbox, an estimate with its parts in the aws one."""
    if drill.sandbox == Drill.Sandbox.LOCAL:
        # The local sandbox runs on ReClo's own worker: nothing is billed.
        return {
            "amount": "0.00",
            "currency": "USD",
            "estimated": False,
            "parts": [],
            "note": "Local sandbox on ReClo's worker: no cloud charges.",
        }
    estimate = drill_cost.estimate(drill_cost.drill_usage(drill))
    return {
        "amount": str(estimate.total),
        "currency": "USD",
        "estimated": True,
        "parts": [{"what": p.what, "usd": None if p.usd is None else str(p.usd)} for p in estimate.parts],
        "note": f"{estimate.text()}, at AWS's us-east-1 list prices. AWS's bill is the measure: "
        f"everything the drill made carries the tag reclo:drill=drill-{drill.pk}.",
    }


def screenshot_bytes(drill: Drill) -> bytes | None:
    """The stored screenshot PNG (the locked version, when it was locked), or None."""
    if not drill.screenshot_key:
        return None
    stored = (drill.evidence or {}).get("screenshot.png") or {}
    version = stored.get("version_id") if stored.get("key") == drill.screenshot_key else None
    try:
        with storage.ObjectReader(drill.screenshot_key, version_id=version or None) as reader:
            return reader.read()
    except cloud.ObjectNotFound:
        return None


def put_evidence(drill: Drill, name: str, body: bytes) -> dict:
    """Store one piece of a drill's evidence beside the account's backups, locked like a restore point.

    The version written is locked in COMPLIANCE mode for the account's lock
    period (`backups.services.lock_period`, as verification locks restore
    points), so nobody, the portal's own credentials included, can delete
    it or change it before then: a later write of the key only adds a
    version, and `Drill.evidence` names the locked one. Returns
    {key, version_id, etag, locked_until} and records it on the drill.
    """
    from backups.services import lock_period

    from .drill_steps import evidence_key

    key = evidence_key(drill, name)
    written = storage.put_object(key, body, metadata={"drill": str(drill.pk)})
    until = storage.lock_version(key, written["version_id"], timezone.now() + lock_period(drill.user))
    record = {"key": key, **written, "locked_until": until.isoformat()}
    with transaction.atomic():
        row = Drill.objects.select_for_update().get(pk=drill.pk)
        row.evidence = {**row.evidence, name: record}
        row.save(update_fields=["evidence"])
    drill.evidence = {**(drill.evidence or {}), name: record}
    return record


def _when(value: dict | None) -> str:
    if not value:
        return "-"
    utc = datetime.fromisoformat(value["utc"]).strftime("%Y-%m-%d %H:%M:%S UTC")
    local = datetime.fromisoformat(value["local"]).strftime("%H:%M:%S")
    return f"{utc} ({local} {value['zone']})"


def render_pdf(drill: Drill, facts: dict | None = None) -> bytes:
    """The drill's report as a PDF."""
    facts = facts or drill_facts(drill)
    styles = getSampleStyleSheet()
    out = io.BytesIO()
    doc = SimpleDocTemplate(out, pagesize=A4, title=f"ReClo drill {facts['drill_id']}", author="ReClo")
    verdict = "PASSED" if facts["status"] == Drill.Status.PASSED else facts["status"].upper()
    story = [
        Paragraph(f"Contingency test (drill) of {facts['server']}: {verdict}", styles["Title"]),
        _grid(
            [
                ["Server", facts["server"]],
                ["Restore point", facts["restore_point"]],
                ["Taken", _when(facts["restore_point_taken"])],
                ["Age at the drill", f"{facts['restore_point_age_hours']} hours"],
                ["Trigger", facts["trigger"]],
                ["Sandbox", facts["sandbox"]],
                ["Started", _when(facts["started"])],
                ["Finished", _when(facts["finished"])],
                [
                    "Measured RTO",
                    "-" if facts["rto_seconds"] is None else f"{facts['rto_seconds']} s (click to answer)",
                ],
                [
                    "Cost",
                    # An estimate names its amount and parts in its note.
                    facts["cost"]["note"]
                    if facts["cost"].get("estimated") or facts["cost"]["amount"] is None
                    else f"{facts['cost']['amount']} {facts['cost']['currency']}: {facts['cost']['note']}",
                ],
            ]
            + ([["Reason", facts["error"]]] if facts["error"] else []),
            styles,
        ),
        Spacer(1, 4 * mm),
        Paragraph("Steps", styles["Heading2"]),
        _grid(
            [["Step", "Status", "Started", "Finished"]]
            + [[s["title"], s["status"], _when(s["started"]), _when(s["finished"])] for s in facts["steps"]],
            styles,
            header=True,
        ),
        Paragraph("Checks", styles["Heading2"]),
        _grid(
            [["Check", "Result", "Evidence"]]
            + [[c["name"], "passed" if c["passed"] else "FAILED", c["detail"]] for c in facts["checks"]]
            + ([["Not checked", "-", facts["not_checked"]]] if facts.get("not_checked") else []),
            styles,
            header=True,
        ),
        Paragraph("Resources created and removed", styles["Heading2"]),
        _grid(
            [["Resource", "Created", "Removed"]]
            + [
                [r["what"], _stamp(r.get("created")), _stamp(r.get("removed")) or "STILL THERE"]
                for r in facts["resources"]
            ],
            styles,
            header=True,
        ),
        Paragraph("Console excerpt", styles["Heading2"]),
        Preformatted(facts["console_excerpt"][-3000:] or "(nothing on the console)", styles["Code"], maxLineLength=95),
    ]
    png = screenshot_bytes(drill)
    if png:
        story.append(Paragraph("Screen at the verdict", styles["Heading2"]))
        try:
            image = Image(io.BytesIO(png))
            scale = min(1.0, (170 * mm) / image.imageWidth)
            image.drawWidth, image.drawHeight = image.imageWidth * scale, image.imageHeight * scale
            story.append(image)
        except OSError:  # a damaged image must not cost the auditor the rest of the report
            story.append(Paragraph("(the stored screenshot could not be read)", styles["BodyText"]))
    doc.build(story)
    return out.getvalue()


def _stamp(iso: str | None) -> str:
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _grid(rows: list[list[str]], styles, *, header: bool = False) -> Table:
    body = styles["BodyText"]
    cells = [[Paragraph(_escape(str(cell)), body) for cell in row] for row in rows]
    table = Table(cells, hAlign="LEFT", colWidths=None if header else [40 * mm, 130 * mm])
    style = [("GRID", (0, 0), (-1, -1), 0.25, colors.grey), ("VALIGN", (0, 0), (-1, -1), "TOP")]
    if header:
        style.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8eef5")))
    table.setStyle(TableStyle(style))
    return table


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def store_evidence(drill: Drill) -> str:
    """Write the drill's PDF and JSON beside the account's backups, each locked (`put_evidence`); the PDF's key.

    Once both are stored this does nothing: a teardown that runs again must
    not add versions, and the locked ones are the record.
    """
    stored = drill.evidence or {}
    if "report.pdf" in stored and "report.json" in stored:
        return stored["report.pdf"]["key"]
    facts = drill_facts(drill)
    pdf = put_evidence(drill, "report.pdf", render_pdf(drill, facts))
    put_evidence(drill, "report.json", json.dumps(facts, indent=2).encode())
    Drill.objects.filter(pk=drill.pk).update(report_key=pdf["key"])
    return pdf["key"]


def contingency_rows(drills) -> list[dict]:
    """One line per drill for the contingency test report: method, date, result, follow-up."""
    rows = []
    for drill in drills:
        rows.append(
            {
                "drill": drill,
                "server": drill.server_name,
                "date": drill.created,
                "method": f"Test failover in the {drill.sandbox} sandbox ({drill.get_trigger_display().lower()})",
                "restore_point": drill.backup_created,
                "result": "passed" if drill.passed else "failed",
                "rto_seconds": drill.rto_seconds,
                "follow_up": "" if drill.passed else f"Investigate: {drill.error}",
            }
        )
    return rows


def render_contingency_pdf(*, user, start, end, rows: list[dict]) -> bytes:
    """The contingency test report over [start, end) as a PDF: every drill, its method, date, result."""
    styles = getSampleStyleSheet()
    out = io.BytesIO()
    doc = SimpleDocTemplate(out, pagesize=A4, title="ReClo contingency test report", author="ReClo")
    passed = sum(1 for r in rows if r["result"] == "passed")
    story = [
        Paragraph("Contingency plan tests (drills)", styles["Title"]),
        Paragraph(
            _escape(
                f"Account {user.username}, {start:%Y-%m-%d} to {end:%Y-%m-%d} (UTC): {len(rows)} drill(s), "
                f"{passed} passed, {len(rows) - passed} failed. Each drill booted one restore point in an "
                "isolated sandbox with no route to the office or the internet, checked it and removed it."
            ),
            styles["BodyText"],
        ),
        Spacer(1, 4 * mm),
        _grid(
            [["Date (UTC)", "Server", "Restore point of", "Result", "RTO", "Follow-up"]]
            + [
                [
                    f"{r['date']:%Y-%m-%d %H:%M}",
                    r["server"],
                    f"{r['restore_point']:%Y-%m-%d %H:%M}",
                    r["result"],
                    "-" if r["rto_seconds"] is None else f"{r['rto_seconds']:.0f} s",
                    r["follow_up"][:300],
                ]
                for r in rows
            ],
            styles,
            header=True,
        ),
    ]
    doc.build(story)
    return out.getvalue()
