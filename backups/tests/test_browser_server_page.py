"""A real browser on a server's page: each restore point's consistency, the crash warning, the preflight."""

import os

import pytest
from django.urls import reverse

from tests.browser import chromium_page

from .factories import BackupFactory, ServerFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")

PREFLIGHT = {
    "ok": False,
    "boot_mode": "bios",
    "kernel": "6.1.0-57-amd64",
    "checks": [
        {"name": "nvme", "status": "fail", "detail": "the NVMe driver is neither built in nor in its initramfs",
         "fix": "Debian/Ubuntu: add the line `nvme` to /etc/initramfs-tools/modules and run `update-initramfs -u`."},
        {"name": "ena", "status": "pass", "detail": "the ENA network driver is in the initramfs", "fix": ""},
        {"name": "fstab", "status": "pass", "detail": "/etc/fstab names its disks by UUID or LABEL", "fix": ""},
        {"name": "boot_mode", "status": "pass", "detail": "the server boots by BIOS", "fix": ""},
        {"name": "boot_loader", "status": "pass", "detail": "GRUB in the boot sector of /dev/sda", "fix": ""},
    ],
}  # fmt: skip


def test_the_server_page_shows_consistency_a_crash_warning_and_the_preflight(live_server, user, password, api):
    server = ServerFactory(user=user, name="frontdesk")
    full = BackupFactory(server=server, consistency="frozen")
    BackupFactory(server=server, kind="incremental", parent=full, consistency="crash")
    assert api.post("/api/v1/servers/frontdesk/status", {"preflight": PREFLIGHT}, format="json").status_code == 200
    with chromium_page() as page:
        page.goto(f"{live_server.url}/accounts/login/")
        page.fill("#id_email", user.email)
        page.fill("#id_password", password)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        page.goto(live_server.url + reverse("backups:server-detail", args=[server.pk]))
        badges = page.locator("[data-testid=consistency]").all_inner_texts()
        assert sorted(badges) == ["crash-consistent (in use)", "frozen file systems"]
        warning = page.locator("[data-testid=crash-warning]")
        assert warning.is_visible() and "crash-consistent" in warning.inner_text()
        checks = page.locator("[data-testid=preflight-check]")
        assert checks.count() == 5
        assert "Fix: Debian/Ubuntu: add the line" in checks.nth(0).inner_text()
        assert "Fix:" not in checks.nth(1).inner_text()
        assert "needs fixing" in page.locator("[data-testid=preflight]").inner_text()
        if SHOTS:
            os.makedirs(SHOTS, exist_ok=True)
            page.screenshot(path=os.path.join(SHOTS, "server-consistency-preflight.png"), full_page=True)
