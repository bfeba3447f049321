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
        # The page reloads itself while the drill runs; a TCG boot takes a minute or two.
        page.wait_for_function(
            "() => ['Passed', 'Failed'].includes(document.querySelector('[data-testid=drill-status]')?.textContent)",
            timeout=400_000,
        )
        assert status.text_content() == "Passed", page.locator("[data-testid=drill-error]").all_text_contents()
        assert page.locator("[data-testid=drill-check]").count() >= 2
        assert "Measured RTO" in page.locator("[data-testid=drill-rto]").text_content()
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
