"""A real browser fails a server over, follows the progress live and downloads the VPN config."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection
from django.urls import reverse

from recovery import engine
from recovery.models import Instance, Recovery
from tests.browser import chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")
STEP_PAUSE = 0.8  # seconds per step, so the page has progress to show


def shot(page, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"recovery-{name}.png"), full_page=True)


@pytest.fixture
def worker(monkeypatch):
    """The Celery worker, played by a thread: enqueued steps run there after their countdown."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker")
    stop = threading.Event()

    def run(recovery_id, step, countdown):
        if stop.wait(STEP_PAUSE + min(countdown or 0, 1)):
            return
        try:
            engine.run_step(recovery_id, step)
        finally:
            connection.close()

    monkeypatch.setattr(
        engine, "enqueue", lambda rid, step, countdown=None, pipeline=None: pool.submit(run, rid, step, countdown)
    )
    yield
    stop.set()
    pool.shutdown(wait=True)


def log_in(page, live_server, password):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_email", "alice@example.com")
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def test_fail_over_follow_the_progress_and_download_the_vpn_config(
    live_server, chain, server, password, worker, tmp_path
):
    with chromium_page() as page:
        log_in(page, live_server, password)
        page.goto(live_server.url + reverse("recovery:failover-start", args=[server.pk]))
        assert page.locator("select#id_backup").input_value() == str(chain[0][-1].pk)  # newest verified
        page.click("[data-testid=size-t3\\.large]")
        shot(page, "failover-form")
        page.click("[data-testid=confirm-failover]")
        assert page.locator(".field-errors").inner_text() == "Tick the box to confirm the failover."
        page.click("[data-testid=size-t3\\.large]")
        page.check("#id_confirm")
        page.click("[data-testid=confirm-failover]")

        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.wait_for_selector("text=Failover of front-desk")
        recovery = Recovery.objects.get()
        assert recovery.instance_type == "t3.large"
        url = page.url
        # Progress shows up without reloading: a step turns done while the URL stays put.
        page.wait_for_selector("[data-testid=step-consolidating].done, [data-testid=step-consolidating].skipped")
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1 and page.url == url
        shot(page, "progress")
        page.wait_for_selector("[data-testid=ready]", timeout=60_000)
        shot(page, "ready")
        instance = Instance.objects.get(recovery=recovery)
        assert page.locator("[data-testid=private-ip]").inner_text() == instance.private_ip
        qr = page.locator("[data-testid=vpn-qr]")
        for _ in range(50):  # the QR code loads (wait_for_function would need the 'unsafe-eval' our CSP forbids)
            if qr.evaluate("img => img.complete && img.naturalWidth > 0"):
                break
            time.sleep(0.1)
        assert qr.evaluate("img => img.naturalWidth") > 0

        with page.expect_download() as download_info:
            page.click("[data-testid=vpn-download]")
        download = download_info.value
        assert download.suggested_filename == "reclo-front-des.conf"
        config = tmp_path / "vpn.conf"
        download.save_as(config)
        text = config.read_text()
        assert "[Interface]" in text and "AllowedIPs = 10.213.1.0/24" in text

        page.click("nav >> text=Recovery")
        page.wait_for_selector(f"[data-instance={instance.instance_id}]")
        shot(page, "instances")
        page.click(f"[data-instance={instance.instance_id}] [data-testid=action-stop]")
        shot(page, "confirm-stop")
        page.click("[data-testid=confirm-action]")
        page.wait_for_selector("text=The server is stopping.")
        assert page.locator("[data-testid=instance-state]").inner_text() in ("stopping", "stopped")
        Instance.objects.filter(pk=instance.pk).update(state="stopped")  # as instances_sync would record
        page.reload()
        assert "terminated on" in page.locator(f"[data-instance={instance.instance_id}]").inner_text()
        shot(page, "instances-stopped")
        page.click(f"[data-instance={instance.instance_id}] [data-testid=action-terminate]")
        # Nothing was brought home: the work in the cloud goes only with the server's name typed.
        page.fill("[data-testid=confirm-name]", instance.recovery.server_name)
        page.click("[data-testid=confirm-action]")
        page.wait_for_selector("text=The server is terminated.")
        assert Instance.objects.get(pk=instance.pk).state == "terminated"
        assert errors == []  # no script blocked by the CSP, no failed request
        # The ORM calls above ran in Playwright's event-loop context, on a
        # connection of their own: close it, or the test database stays in use.
        connection.close()
