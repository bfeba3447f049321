"""The drill's step handlers, each `(StepContext) -> Done | Wait`, and its teardown (`DRILL.on_exit`).

- preparing: the chain up to the restore point, read through the chain
  reader from the stored objects (ranged GETs, never a write), into a
  sparse raw file in the drill's work folder.
- booting: the sandbox boots that file (`recovery.sandbox`), one blocking
  call bounded by RECLO_DRILL_TIME_LIMIT, run in a thread while this one
  renews the lease; if the drill was cancelled meanwhile (a failover of the
  server started), the guest is stopped at once.
- checking: the verdict is recorded (checks, RTO, console excerpt) and the
  screenshot and console log are stored with the account's backups; a
  failed check fails the drill with the console as the reason.
- teardown: stops a guest still running under the drill's label, removes
  the work folder, records what was removed, and tells the owner of a
  failed drill. Idempotent: it runs after every end, and again if a crash
  interrupted it.
"""

import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone
from reclo_agent.vhd import VHDError, open_chain, open_seekable

from backups import chains
from reclo_site import cloud
from reclo_site.cloud import storage
from reclo_site.errors import Code

from . import drill_report
from .engine import LostClaim, StepContext
from .models import Drill
from .pipeline import Done, StepFailed
from .sandbox import BootRequest, LocalSandbox, SandboxError, materialise_chain

log = logging.getLogger(__name__)

DRILLS_PREFIX = "drills/"


def work_dir(drill_id) -> Path:
    """The drill's disk and evidence while it runs (removed by the teardown)."""
    return Path(settings.RECLO_DRILL_DIR) / str(drill_id)


def evidence_key(drill: Drill, name: str) -> str:
    """Where a drill's evidence is stored: beside the account's backups, one folder per drill."""
    return f"{DRILLS_PREFIX}{drill.user_id}/{drill.pk}/{name}"


def sandbox_label(drill_id) -> str:
    return f"drill-{drill_id}"


def make_sandbox(name: str):
    """The sandbox called `name`; SandboxError (code 411) for one that is not available."""
    if name == Drill.Sandbox.LOCAL:
        return LocalSandbox(Path(settings.RECLO_DRILL_DIR) / "sandbox")
    raise SandboxError(f"The {name} sandbox is not available on this portal.")


# --- preparing --------------------------------------------------------------------------------


def prepare(ctx: StepContext) -> Done:
    """Materialise the restore point's chain into a sparse raw file (the stored objects are only read)."""
    drill = ctx.run
    if drill.backup is None:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "The restore point was deleted before the drill could start.")
    try:
        chain = chains.restorable_chain(drill.backup)
    except chains.ChainError as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, str(exc)) from exc
    folder = work_dir(drill.pk)
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "disk.raw"
    # A half-written file of a killed try is simply written again.
    raw.unlink(missing_ok=True)
    ctx.save(disk=str(raw))
    _note(drill, f"work folder {folder}", created=True)
    started = timezone.now()
    try:
        # Each layer at exactly the version that was verified (a changed object is refused).
        reader = open_chain([open_seekable(storage.ObjectReader(b.key, **b.pinned)) for b in chain])
        if reader.virtual_size != drill.backup.virtual_size:
            raise StepFailed(Code.SANDBOX_FAILED, "The chain's disk size does not match the restore point.")
        written = materialise_chain(_Beating(reader, ctx), raw)
    except LostClaim:
        # Cancelled or taken over: the partial disk must not outlive the teardown.
        raw.unlink(missing_ok=True)
        raise
    except cloud.ObjectNotFound as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "A restore point of the chain is missing from storage.") from exc
    except storage.ObjectChanged as exc:
        raise StepFailed(
            Code.SANDBOX_FAILED, f"A restore point of the chain is not the version that was verified: {exc}"
        ) from exc
    except VHDError as exc:
        raise StepFailed(Code.SANDBOX_FAILED, f"A restore point of the chain is damaged: {exc}") from exc
    seconds = (timezone.now() - started).total_seconds()
    return Done(
        {"disk": str(raw), "bytes_written": written, "layers": len(chain), "seconds": seconds},
        f"Read {len(chain)} restore point(s); {written // (1024 * 1024)} MiB of data.",
    )


class _Beating:
    """A chain reader whose block iteration renews the step's lease as it goes."""

    def __init__(self, reader, ctx: StepContext):
        self._reader = reader
        self._ctx = ctx

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def iter_blocks(self):
        for n, item in enumerate(self._reader.iter_blocks()):
            self._ctx.heartbeat(f"Read {n + 1} blocks of the disk.")
            yield item


# --- booting ----------------------------------------------------------------------------------


def boot(ctx: StepContext) -> Done:
    """Boot the prepared disk in the sandbox and keep the verdict for the checking step."""
    drill = ctx.run
    disk = Path(ctx.previous("preparing")["disk"])
    if not disk.is_file():
        # The worker that prepared it is gone with its folder (another machine, or a teardown).
        raise StepFailed(Code.SANDBOX_FAILED, "The prepared disk is gone; start the drill again.")
    evidence = work_dir(drill.pk) / "evidence"
    request = BootRequest(
        evidence_dir=evidence,
        boot_mode="bios",  # restore points carry no boot mode yet: every stored disk so far is MBR
        probe_port=drill.probe_port,
        time_limit=settings.RECLO_DRILL_TIME_LIMIT,
        label=sandbox_label(drill.pk),
    )
    try:
        sandbox = make_sandbox(drill.sandbox)
    except SandboxError as exc:
        raise StepFailed(Code.SANDBOX_FAILED, str(exc)) from exc
    _note(drill, f"{drill.sandbox} sandbox guest {request.label}", created=True)
    outcome: dict = {}

    def go():
        try:
            outcome["verdict"] = sandbox.run(disk, request)
        except SandboxError as exc:
            outcome["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported as the step's failure below
            log.exception("drill %s: the sandbox crashed", drill.pk)
            outcome["error"] = f"The sandbox crashed ({exc.__class__.__name__})."

    thread = threading.Thread(target=go, name=request.label, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(1.0)
            ctx.heartbeat("The restore point is booting in the sandbox.")
    except LostClaim:
        # Cancelled (a failover of this server) or taken over: the guest must not live on.
        stop_guest(drill.pk)
        thread.join(30)
        raise
    if "error" in outcome:
        raise StepFailed(Code.SANDBOX_FAILED, outcome["error"])
    verdict = outcome["verdict"]
    facts = verdict.as_dict()
    return Done({"verdict": facts}, "The sandbox gave its verdict." if verdict.passed else verdict.reason[:200])


def stop_guest(drill_id) -> list[str]:
    """Stop a sandbox guest still running for this drill on this machine; what was stopped, in words.

    The local sandbox writes each run's QEMU process into its run folder's
    `lease.json` under the request's label; the process group is killed (the
    sandbox's own `finally` then removes the folder, and `reap` does for a
    dead worker).
    """
    stopped = []
    root = Path(settings.RECLO_DRILL_DIR) / "sandbox"
    for lease_file in root.glob("run-*/lease.json"):
        try:
            lease = json.loads(lease_file.read_text())
        except (OSError, ValueError):
            continue
        if lease.get("label") != sandbox_label(drill_id) or not lease.get("qemu_pid"):
            continue
        try:
            os.killpg(lease["qemu_pid"], signal.SIGKILL)
            stopped.append(f"QEMU process {lease['qemu_pid']}")
        except ProcessLookupError:
            pass
    return stopped


# --- checking ---------------------------------------------------------------------------------


def check(ctx: StepContext) -> Done:
    """Record the verdict and store the evidence; fail the drill on a failed check."""
    drill = ctx.run
    facts = ctx.previous("booting")["verdict"]
    evidence = work_dir(drill.pk) / "evidence"
    screenshot_key = ""
    shot = facts.get("screenshot_path")
    if shot and Path(shot).is_file():
        screenshot_key = evidence_key(drill, "screenshot.png")
        storage.put_object(screenshot_key, Path(shot).read_bytes(), metadata={"drill": str(drill.pk)})
    console = Path(facts["console_path"]) if facts.get("console_path") else evidence / "console.log"
    if console.is_file():
        storage.put_object(evidence_key(drill, "console.log"), console.read_bytes(), metadata={"drill": str(drill.pk)})
    rto = None
    if facts["passed"] and facts.get("answered_after") is not None:
        boot_row = ctx.pipeline.step_rows_of(drill.pk).get(name="booting")
        # The click to "server answers": queueing and preparing, then power-on to the answer.
        powered_on = boot_row.started.timestamp() + facts["timings"].get("prepare", 0.0)
        rto = powered_on + facts["answered_after"] - drill.created.timestamp()
    Drill.objects.filter(pk=drill.pk).update(
        checks=facts["checks"],
        console_excerpt=facts["console_excerpt"][:8000],
        screenshot_key=screenshot_key,
        rto_seconds=rto,
    )
    if not facts["passed"]:
        raise StepFailed(Code.SANDBOX_FAILED, facts["reason"] or "A check failed.")
    return Done({"rto_seconds": rto}, "Every check passed.")


# --- teardown (on every exit) -----------------------------------------------------------------


def teardown(drill_id, status: str) -> None:
    """Remove whatever the drill left (guest, disk, work folder) and tell the owner of a failure. Idempotent."""
    removed = stop_guest(drill_id)
    folder = work_dir(drill_id)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(f"work folder {folder}")
    now = timezone.now()
    with transaction.atomic():
        drill = Drill.objects.select_for_update().select_related("user").get(pk=drill_id)
        first_time = drill.torn_down is None
        resources = list(drill.resources)
        for item in resources:
            item["removed"] = item.get("removed") or now.isoformat()
        for text in removed:
            if not any(r["what"] == text for r in resources):
                resources.append({"what": text, "created": None, "removed": now.isoformat()})
        drill.resources = resources
        drill.torn_down = drill.torn_down or now
        drill.save(update_fields=["resources", "torn_down"])
    log.info("drill %s (%s) torn down: %s", drill_id, status, ", ".join(removed) or "nothing left")
    try:
        drill_report.store_evidence(Drill.objects.select_related("user").get(pk=drill_id))
    except (cloud.CloudUnavailable, cloud.CloudPermanentError) as exc:
        # The report is made from the database again when it is asked for.
        log.warning("drill %s: could not store its report (%s)", drill_id, exc)
    if first_time and status == Drill.Status.FAILED:
        notify_failure(drill)


def notify_failure(drill: Drill) -> None:
    """Email the owner that a drill failed and why (from templates/recovery/email/drill_failed.txt)."""
    if not drill.user.email:
        return
    context = {"drill": drill, "portal_url": settings.SITE_URL.rstrip("/")}
    subject = f"ReClo: the drill of {drill.server_name} failed"
    body = render_to_string("recovery/email/drill_failed.txt", context)
    try:
        send_mail(subject, body, None, [drill.user.email])
    except OSError as exc:  # the mail server is down: the page and the dashboard still show it
        log.warning("drill %s: could not email the owner (%s)", drill.pk, exc)


def _note(drill: Drill, what: str, *, created: bool) -> None:
    """Add a resource the drill made to its record (once), so the teardown and the report list it."""
    with transaction.atomic():
        row = Drill.objects.select_for_update().get(pk=drill.pk)
        if any(r["what"] == what for r in row.resources):
            return
        row.resources = [*row.resources, {"what": what, "created": timezone.now().isoformat(), "removed": None}]
        row.save(update_fields=["resources"])
