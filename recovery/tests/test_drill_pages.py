"""Where people look: the drill page, the server page's last drill and each restore point's verdict,
the dashboard's warning, the Test failover button, the screenshot and the PDF."""

import io
import json
import uuid
from datetime import UTC, timedelta

import pytest
from django.utils import timezone
from PIL import Image

from reclo_site.cloud import storage
from reclo_site.localtime import when
from recovery import drill_report
from recovery.models import Drill

pytestmark = pytest.mark.django_db


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 3), "navy").save(out, "PNG")
    return out.getvalue()


PNG = _png()


def finished_drill(backup, *, passed: bool, screenshot: bool = False, **fields) -> Drill:
    now = timezone.now()
    drill = Drill.objects.create(
        user=backup.user, server=backup.server, server_name=backup.server.name, backup=backup,
        backup_ref=backup.pk, backup_created=backup.date_created,
        status="passed" if passed else "failed", finished=now, torn_down=now,
        error="" if passed else "Kernel panic - not syncing: VFS: Unable to mount root fs",
        rto_seconds=42.0 if passed else None,
        checks=[{"name": "reached a login prompt or the system's ready line", "passed": passed,
                 "detail": "login: after 20 s" if passed else "Kernel panic after 3 s"}],
        console_excerpt="reclo-test: ready\nlogin:" if passed else "Kernel panic - not syncing",
        **fields,
    )  # fmt: skip
    for n, name in enumerate(("preparing", "booting", "checking")):
        drill.steps.create(name=name, position=n, status="done", started=now, finished=now)
    if screenshot:
        key = f"drills/{backup.user_id}/{drill.pk}/screenshot.png"
        storage.put_object(key, PNG)
        Drill.objects.filter(pk=drill.pk).update(screenshot_key=key)
        drill.refresh_from_db()
    return drill


def test_the_drill_page_shows_steps_checks_console_and_screenshot(owner, chain):
    drill = finished_drill(chain[0][-1], passed=True, screenshot=True)
    page = owner.get(f"/recovery/drills/{drill.pk}/").content.decode()
    assert "Passed" in page and "Measured RTO: 42 s" in page
    assert page.count('data-testid="drill-step"') == 3 and "login: after 20 s" in page
    assert "reclo-test: ready" in page and "screenshot.png" in page
    shot = owner.get(f"/recovery/drills/{drill.pk}/screenshot.png")
    assert (shot.status_code, shot["Content-Type"], shot.content) == (200, "image/png", PNG)
    pdf = owner.get(f"/recovery/drills/{drill.pk}/report.pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")


def test_the_drill_page_gives_when_each_resource_was_removed_in_the_owners_zone(owner, chain, user):
    user.time_zone = "Asia/Kolkata"  # UTC+05:30 all year
    user.save(update_fields=["time_zone"])
    resources = [
        {"what": "QEMU guest", "created": "2026-03-02T09:00:00+00:00", "removed": "2026-03-02T09:05:07+00:00"},
        {"what": "the disk image", "created": "2026-03-02T09:00:00+00:00", "removed": None},
    ]
    drill = finished_drill(chain[0][-1], passed=True, resources=resources)
    page = owner.get(f"/recovery/drills/{drill.pk}/").content.decode()
    assert "QEMU guest · removed 2 Mar 2026, 14:35:07 IST" in page
    assert "the disk image · <strong>still there</strong>" in page


def test_another_tenants_drill_pages_are_404(outsider, chain):
    drill = finished_drill(chain[0][-1], passed=True, screenshot=True)
    for url in ("", "screenshot.png", "report.pdf"):
        assert outsider.get(f"/recovery/drills/{drill.pk}/{url}").status_code == 404, url
    assert outsider.post(f"/recovery/servers/{drill.server_id}/drill/").status_code == 404


def test_the_status_json_gives_the_owner_the_steps_and_the_verdict(owner, chain, user):
    from recovery import drill_services

    drill = drill_services.drill_start(user=user, backup_id=chain[0][-1].pk, trigger=Drill.Trigger.PORTAL)
    response = owner.get(f"/recovery/drills/{drill.pk}/status.json")
    assert (response.status_code, response["Cache-Control"]) == (200, "no-store")
    data = response.json()
    assert (data["status"], data["status_label"], data["active"], data["passed"]) == ("queued", "Queued", True, False)
    assert [(s["name"], s["title"], s["status"], s["started"]) for s in data["steps"]] == [
        ("preparing", "Preparing the disk", "pending", ""),
        ("booting", "Booting in the sandbox", "pending", ""),
        ("checking", "Checking the server", "pending", ""),
    ]
    page = owner.get(f"/recovery/drills/{drill.pk}/").content.decode()
    # The page polls it with its script; without JavaScript a plain link refreshes it, nothing reloads by itself.
    assert "js/drill.js" in page and f'data-status-url="/recovery/drills/{drill.pk}/status.json"' in page
    assert 'http-equiv="refresh"' not in page and f'<a href="/recovery/drills/{drill.pk}/">Refresh</a>' in page
    assert 'aria-live="polite" id="drill-announce"' in page

    done = finished_drill(chain[0][-1], passed=True)
    data = owner.get(f"/recovery/drills/{done.pk}/status.json").json()
    assert (data["status_label"], data["active"], data["passed"], data["rto_seconds"]) == ("Passed", False, True, 42)
    assert data["steps"][0]["finished"] == when(done.steps.get(name="preparing").finished, UTC, seconds=True)
    page = owner.get(f"/recovery/drills/{done.pk}/").content.decode()
    assert "js/drill.js" not in page and "data-status-url" not in page and ">Refresh</a>" not in page


def test_the_status_json_is_the_owners_only(owner, outsider, chain, client):
    drill = finished_drill(chain[0][-1], passed=False)
    url = f"/recovery/drills/{drill.pk}/status.json"
    assert outsider.get(url).status_code == 404  # owner and outsider share the client: the outsider is signed in
    assert outsider.get(f"/recovery/drills/{uuid.uuid4()}/status.json").status_code == 404
    client.logout()
    anonymous = client.get(url)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/accounts/login/")
    assert client.post(url).status_code == 302  # sign-in first; then GET only
    client.force_login(drill.user)
    assert client.post(url).status_code == 405
    assert client.get(url).json()["error"] == drill.error


def test_restore_points_show_boot_verified_or_the_drill_failure(owner, chain):
    backups, _ = chain
    finished_drill(backups[0], passed=False)
    passed = finished_drill(backups[-1], passed=True, screenshot=True)
    page = owner.get(f"/servers/{backups[0].server_id}/").content.decode()
    assert page.count('data-testid="boot-verified"') == 1
    assert f"boot-verified on {when(passed.finished, UTC)}" in page  # the owner's zone: UTC here
    assert page.count('data-testid="drill-failed"') == 1 and "VFS: Unable to mount root fs" in page
    assert "measured RTO <strong>42 s</strong>" in page  # the last drill, with its screenshot
    assert f"/recovery/drills/{passed.pk}/screenshot.png" in page


def test_test_failover_drills_the_newest_verified_restore_point(owner, chain):
    backups, _ = chain
    response = owner.post(f"/recovery/servers/{backups[0].server_id}/drill/")
    drill = Drill.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/recovery/drills/{drill.pk}/"
    assert (drill.backup_ref, drill.trigger, drill.status) == (backups[-1].pk, "portal", "queued")
    again = owner.post(f"/recovery/servers/{backups[0].server_id}/drill/", follow=True)
    assert "already running" in again.content.decode() and Drill.objects.count() == 1


def test_the_dashboard_warns_without_a_passing_drill_in_twice_the_interval(owner, chain):
    backups, _ = chain
    server = backups[0].server
    assert 'data-testid="drill-overdue"' not in owner.get("/").content.decode()  # a new server
    type(server).objects.filter(pk=server.pk).update(created=timezone.now() - timedelta(days=30))
    assert "No test failover has passed yet" in owner.get("/").content.decode()
    old = finished_drill(backups[-1], passed=True)
    Drill.objects.filter(pk=old.pk).update(finished=timezone.now() - timedelta(days=15))
    assert "No test failover has passed since" in owner.get("/").content.decode()
    finished_drill(backups[-1], passed=True)
    assert 'data-testid="drill-overdue"' not in owner.get("/").content.decode()


def test_the_report_facts_have_every_step_in_utc_and_the_owners_zone(chain):
    drill = finished_drill(chain[0][-1], passed=True)
    facts = drill_report.drill_facts(drill)
    assert [s["name"] for s in facts["steps"]] == ["preparing", "booting", "checking"]
    assert set(facts["steps"][0]["started"]) == {"utc", "local", "zone"}
    assert facts["rto_seconds"] == 42.0 and facts["restore_point_age_hours"] >= 0
    assert facts["checks"][0]["passed"] is True and facts["cost"]["amount"] == "0.00"


def test_the_contingency_report_lists_the_drills_of_the_dates_as_a_page_and_a_pdf(owner, chain):
    backups, _ = chain
    finished_drill(backups[-1], passed=True)
    failed = finished_drill(backups[0], passed=False)
    old = finished_drill(backups[0], passed=True)
    Drill.objects.filter(pk=old.pk).update(created=timezone.now() - timedelta(days=200))
    page = owner.get("/recovery/drills/report/").content.decode()
    assert page.count('data-testid="contingency-row"') == 2 and "1 passed" in page
    assert f"Investigate: {failed.error}" in page
    today = timezone.now().date()
    ranged = owner.get("/recovery/drills/report/", {"from": str(today - timedelta(days=365)), "to": str(today)})
    assert ranged.content.decode().count('data-testid="contingency-row"') == 3
    bad = owner.get("/recovery/drills/report/", {"from": "yesterday"}).content.decode()
    assert "Give the dates as YYYY-MM-DD" in bad
    pdf = owner.get("/recovery/drills/report/", {"format": "pdf"})
    assert pdf["Content-Type"] == "application/pdf" and pdf.content.startswith(b"%PDF")


def test_the_contingency_report_shows_only_the_tenants_own_drills(outsider, chain):
    finished_drill(chain[0][-1], passed=True)
    assert 'data-testid="contingency-row"' not in outsider.get("/recovery/drills/report/").content.decode()


def test_drill_tasks_run_on_the_failover_queue_not_the_uploads_one():
    from reclo_site.queues import route_task

    assert route_task("recovery.tasks.drill_step_run", (), {}, {}) == {"queue": "recovery"}
    assert route_task("recovery.tasks.drills_reconcile", (), {}, {}) == {"queue": "recovery"}


def test_the_backup_object_says_bootable_from_its_newest_drill_and_the_api_gives_the_report(api, chain):
    backups, _ = chain
    top = backups[-1]
    assert api.get(f"/api/v1/backups/{top.pk}").json()["backup"]["bootable"] is None
    passed = finished_drill(top, passed=True, screenshot=True)
    body = api.get(f"/api/v1/backups/{top.pk}").json()["backup"]["bootable"]
    assert (body["verified"], body["drill_id"]) == (True, str(passed.pk)) and body["at"].startswith(
        f"{passed.finished:%Y-%m-%dT%H:%M:%S}"
    )
    listed = {b["backup_id"]: b["bootable"] for b in api.get("/api/v1/backups").json()["backups"]}
    assert listed[str(top.pk)]["drill_id"] == str(passed.pk) and listed[str(backups[0].pk)] is None
    drill = api.get(f"/api/v1/drills/{passed.pk}").json()["drill"]
    assert drill["rto_seconds"] == 42.0 and drill["screenshot_url"].endswith(
        f"/recovery/drills/{passed.pk}/screenshot.png"
    )
    assert drill["report_url"].endswith(f"/api/v1/drills/{passed.pk}/report")
    report = api.get(f"/api/v1/drills/{passed.pk}/report")
    assert (report.status_code, report["Content-Type"]) == (200, "application/pdf") and report.content[:4] == b"%PDF"
    # A newer failed drill takes the badge away.
    finished_drill(top, passed=False)
    assert api.get(f"/api/v1/backups/{top.pk}").json()["backup"]["bootable"] is None


def test_the_evidence_is_stored_under_the_restore_points_lock_and_the_portal_cannot_remove_it(chain, settings):
    from reclo_site.cloud import clients

    settings.RECLO_LOCK_DAYS = 12
    drill = finished_drill(chain[0][-1], passed=True)
    # As the checking step and the teardown store them.
    drill_report.put_evidence(drill, "screenshot.png", PNG)
    Drill.objects.filter(pk=drill.pk).update(screenshot_key=drill.evidence["screenshot.png"]["key"])
    drill_report.store_evidence(Drill.objects.get(pk=drill.pk))
    drill.refresh_from_db()
    assert set(drill.evidence) == {"screenshot.png", "report.pdf", "report.json"}
    assert drill.report_key == drill.evidence["report.pdf"]["key"] == f"drills/{drill.user_id}/{drill.pk}/report.pdf"
    s3 = clients.client("s3")
    for stored in drill.evidence.values():
        head = storage.head_object(stored["key"], version_id=stored["version_id"])
        assert head["lock_mode"] == "COMPLIANCE"  # as verification locks restore points
        assert timedelta(days=11, hours=23) < head["locked_until"] - timezone.now() <= timedelta(days=12)
        with storage.ObjectReader(stored["key"], version_id=stored["version_id"]) as reader:
            original = reader.read()
        # The portal's own credentials can neither delete it...
        with pytest.raises(storage.ObjectLocked):
            storage.delete_object(stored["key"])
        with pytest.raises(Exception, match="AccessDenied"):
            s3.delete_object(
                Bucket=settings.RECLO_BUCKET,
                Key=stored["key"],
                VersionId=stored["version_id"],
                BypassGovernanceRetention=True,
            )
        # ...nor change it: a write only adds a version, the locked one reads as it was.
        storage.put_object(stored["key"], b"forged")
        with storage.ObjectReader(stored["key"], version_id=stored["version_id"]) as reader:
            assert reader.read() == original
    facts = json.loads(_stored(drill.evidence["report.json"]))
    assert facts["drill_id"] == str(drill.pk) and facts["rto_seconds"] == 42.0
    assert _stored(drill.evidence["report.pdf"]).startswith(b"%PDF")
    # The pages serve the locked screenshot, not what was written over it.
    assert drill_report.screenshot_bytes(drill) == PNG
    # Stored once: the teardown running again adds no versions.
    versions = s3.list_object_versions(Bucket=settings.RECLO_BUCKET, Prefix=drill.report_key)["Versions"]
    drill_report.store_evidence(drill)
    assert s3.list_object_versions(Bucket=settings.RECLO_BUCKET, Prefix=drill.report_key)["Versions"] == versions


def _stored(record: dict) -> bytes:
    with storage.ObjectReader(record["key"], version_id=record["version_id"]) as reader:
        return reader.read()
