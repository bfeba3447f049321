"""A real browser clicks "Test failover", watches the drill pass, opens the screenshot and downloads the PDF.

The drill really runs: the good test disk, stored as the agent stores it,
boots in the local QEMU sandbox; a thread plays the Celery worker.
"""

import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connection

from reclo_site import testing, testing_disks
from recovery import engine
from recovery.models import Drill
from tests.browser import chromium_page

from .factories import ServerFactory
from .test_drills import store_chain

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")


@pytest.fixture
def worker(monkeypatch, settings):
    """The Celery worker, played by a thread: enqueued drill steps run there in order."""
    path = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    settings.RECLO_DRILL_DIR = path
    settings.RECLO_DRILL_TIME_LIMIT = 300
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker")
    stop = threading.Event()

    def run(run_id, step, pipeline):
        if stop.is_set():
            return
        try:
            engine.run_step(run_id, step, pipeline=pipeline)
        finally:
            connection.close()

    monkeypatch.setattr(
        engine, "enqueue", lambda rid, step, countdown=None, pipeline=None: pool.submit(run, rid, step, pipeline)
    )
    yield
    stop.set()
    pool.shutdown(wait=True)
    shutil.rmtree(path, ignore_errors=True)


def test_test_failover_passes_and_leaves_a_screenshot_and_a_report(live_server, user, aws, password, worker, tmp_path):
    testing.require_tool("qemu-system-x86_64")
    testing.require_tool("pdftoppm")
    disks = testing_disks.test_disks()
    from backups.tests import vhds

    server = ServerFactory(user=user, name="front-desk")
    store_chain(user, server, [vhds.full(disks.good.read_bytes())])
    with chromium_page() as page:
        page.goto(f"{live_server.url}/accounts/login/")
        page.fill("#id_email", user.email)
        page.fill("#id_password", password)
        page.click("button[type=submit]")
        page.goto(f"{live_server.url}/servers/{server.pk}/")
        page.click("[data-testid=test-failover]")
        page.wait_for_url("**/recovery/drills/**")
        status = page.locator("[data-testid=drill-status]")
        status.wait_for()
        # The page follows the drill by itself (static/js/drill.js); a TCG boot takes a minute or two.
        page.wait_for_function(
            "() => ['Passed', 'Failed'].includes(document.querySelector('[data-testid=drill-status]')?.textContent)",
            timeout=400_000,
        )
        assert status.text_content() == "Passed", page.locator("[data-testid=drill-error]").all_text_contents()
        assert page.locator("[data-testid=drill-check]").count() >= 2
        assert "Measured RTO" in page.locator("[data-testid=drill-rto]").text_content()
        # The verdict's sections came in place without a reload: their image loads after them.
        page.wait_for_function("() => document.querySelector('[data-testid=drill-screenshot] img')?.naturalWidth > 0")
        page.screenshot(path=str(tmp_path / "drill-page.png"), full_page=True)
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "drill-page.png", Path(SHOTS) / "drill-page.png")

        page.click("[data-testid=drill-screenshot]")
        page.wait_for_url("**/screenshot.png")
        png = page.request.get(page.url).body()
        assert png.startswith(b"\x89PNG")
        (tmp_path / "guest.png").write_bytes(png)
        page.go_back()

        with page.expect_download() as download:
            page.click("[data-testid=drill-pdf]")
        pdf = tmp_path / "report.pdf"
        download.value.save_as(pdf)
        # The server page now shows the last drill and the restore point boot-verified.
        page.goto(f"{live_server.url}/servers/{server.pk}/")
        assert "measured RTO" in page.locator("[data-testid=last-drill]").text_content()
        assert page.locator("[data-testid=boot-verified]").count() == 1
        if SHOTS:
            page.screenshot(path=str(Path(SHOTS) / "drill-server-page.png"), full_page=True)
    assert pdf.read_bytes().startswith(b"%PDF")
    subprocess.run(
        ["pdftoppm", "-png", "-r", "60", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "report")], check=True
    )
    rendered = sorted(tmp_path.glob("report*.png"))
    assert rendered and rendered[0].stat().st_size > 5000
    if SHOTS:
        shutil.copy(tmp_path / "guest.png", Path(SHOTS) / "drill-guest.png")
        shutil.copy(rendered[0], Path(SHOTS) / "drill-report.png")
    drill = Drill.objects.get(server=server)
    assert drill.trigger == "portal" and drill.torn_down is not None


# What the page's live region said, in order: a MutationObserver keeps every text written to it
# (installed through the DevTools protocol, so the page's CSP does not apply to it).
RECORD_ANNOUNCEMENTS = """() => {
    window.reclo_loaded_once = true;
    window.reclo_said = [];
    const region = document.getElementById('drill-announce');
    new MutationObserver(() => window.reclo_said.push(region.textContent))
        .observe(region, {childList: true, characterData: true, subtree: true});
}"""


def _running_drill(backup) -> Drill:
    drill = Drill.objects.create(
        user=backup.user, server=backup.server, server_name=backup.server.name, backup=backup,
        backup_ref=backup.pk, backup_created=backup.date_created, trigger=Drill.Trigger.PORTAL,
    )  # fmt: skip
    for n, name in enumerate(("preparing", "booting", "checking")):
        drill.steps.create(name=name, position=n)
    return drill


def _step(drill, name, status, detail=""):
    from django.utils import timezone

    fields = {"status": status, "detail": detail}
    if status == "running":
        fields["started"] = timezone.now()
    if status in ("done", "failed"):
        fields["finished"] = timezone.now()
    drill.steps.filter(name=name).update(**fields)


def _said(page) -> list[str]:
    return [s for s in page.evaluate("() => window.reclo_said") if s]


def test_the_drill_page_says_each_step_and_the_verdict_in_its_live_region_without_reloading(
    live_server, user, password, chain, tmp_path
):
    """The steps advance (written here as the worker would); the page polls, updates in place and announces."""
    from django.utils import timezone

    from tests import axe
    from tests.browser import shot, sign_in

    backups, _ = chain
    drill = _running_drill(backups[-1])
    status_calls: list[str] = []
    with chromium_page() as page:
        sign_in(page, live_server.url, user.email, password)
        page.on("request", lambda r: status_calls.append(r.url) if r.url.endswith("/status.json") else None)
        page.goto(f"{live_server.url}/recovery/drills/{drill.pk}/")
        page.evaluate(RECORD_ANNOUNCEMENTS)
        page.wait_for_function("() => window.reclo_said !== undefined")
        assert page.locator("[data-testid=drill-status]").text_content() == "Queued"
        assert "updates by itself" in page.locator("#drill-live-note").text_content()  # the script took over

        Drill.objects.filter(pk=drill.pk).update(status="preparing")
        _step(drill, "preparing", "running", "Read 3 blocks of the disk.")
        page.wait_for_function("() => window.reclo_said.includes('Preparing the disk: running.')")
        assert page.locator("[data-testid=drill-status]").text_content() == "Preparing"
        # A detail that changes on every poll is shown, but not said again.
        _step(drill, "preparing", "running", "Read 40 blocks of the disk.")
        page.locator("tr[data-step=preparing] .step-detail", has_text="Read 40 blocks").wait_for()
        assert _said(page) == ["Preparing the disk: running."]
        problems = axe.violations(page, axe.fetch().read_text())
        shot(page, "drill-running")
        page.screenshot(path=str(tmp_path / "drill-running.png"), full_page=True)

        _step(drill, "preparing", "done", "Read 1 restore point(s); 8 MiB of data.")
        _step(drill, "booting", "running")
        Drill.objects.filter(pk=drill.pk).update(status="booting")
        page.wait_for_function("() => window.reclo_said.length >= 2")
        assert _said(page)[1] == "Preparing the disk: done. Booting in the sandbox: running."
        assert page.locator("tr[data-step=preparing] .step-finished").text_content() != "–"

        _step(drill, "booting", "done", "The sandbox gave its verdict.")
        _step(drill, "checking", "done", "Every check passed.")
        Drill.objects.filter(pk=drill.pk).update(
            status="passed", finished=timezone.now(), rto_seconds=41.6,
            checks=[{"name": "reached a login prompt", "passed": True, "detail": "login: after 20 s"}],
        )  # fmt: skip
        page.wait_for_function("() => window.reclo_said.length >= 3")
        assert _said(page)[2] == (
            "Booting in the sandbox: done. Checking the server: done. Test failover passed. Measured RTO: 42 s."
        )
        assert page.locator("[data-testid=drill-status]").text_content() == "Passed"
        # The finished page's sections come in place: the checks, the RTO, the report.
        page.locator("[data-testid=drill-check]").wait_for()
        assert "Measured RTO: 42 s" in page.locator("[data-testid=drill-rto]").text_content()
        assert page.locator("[data-testid=drill-pdf]").is_visible()
        assert page.locator("#drill-live-note").count() == 0
        polls = len(status_calls)
        page.wait_for_timeout(5000)  # more than two polling intervals
        assert len(status_calls) == polls, "the page still polls a finished drill"
        assert page.evaluate("() => window.reclo_loaded_once === true"), "the page reloaded"
        problems += axe.violations(page, axe.fetch().read_text())
        shot(page, "drill-passed-in-place")
        page.screenshot(path=str(tmp_path / "drill-passed.png"), full_page=True)
    assert not problems, problems
    assert len(status_calls) >= 3


def test_a_failed_drill_says_why_in_the_live_region(live_server, user, password, chain):
    from django.utils import timezone

    from tests.browser import sign_in

    backups, _ = chain
    drill = _running_drill(backups[-1])
    Drill.objects.filter(pk=drill.pk).update(status="booting")
    _step(drill, "preparing", "done")
    _step(drill, "booting", "running")
    with chromium_page() as page:
        sign_in(page, live_server.url, user.email, password)
        page.goto(f"{live_server.url}/recovery/drills/{drill.pk}/")
        page.evaluate(RECORD_ANNOUNCEMENTS)
        error = "Kernel panic - not syncing: VFS: Unable to mount root fs"
        _step(drill, "booting", "failed", error)
        Drill.objects.filter(pk=drill.pk).update(status="failed", finished=timezone.now(), error=error)
        page.wait_for_function("() => window.reclo_said.some(s => s.includes('Test failover failed'))")
        assert _said(page)[-1] == f"Booting in the sandbox: failed. Test failover failed: {error}"
        page.locator("[data-testid=drill-error]").wait_for()
        assert page.locator("[data-testid=drill-status]").text_content() == "Failed"
