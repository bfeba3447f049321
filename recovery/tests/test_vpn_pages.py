"""The VPN devices page: a browser adds a device, downloads its file and scans its QR code."""

import subprocess
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from reclo_site import testing
from recovery import devices, networks
from recovery.models import RecoveryNetwork, VpnDevice, VpnGateway
from tests.browser import chromium_page

from .factories import recovered_instance
from .test_browser import log_in, shot

pytestmark = pytest.mark.django_db


def _gateway_up(user):
    net = RecoveryNetwork.objects.create(user=user, ready=True)
    gateway = networks._gateway_row(net)
    VpnGateway.objects.filter(pk=gateway.pk).update(state=VpnGateway.State.READY, public_ip="203.0.113.9")


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_add_a_device_download_its_file_and_scan_its_qr_code(live_server, user, password, tmp_path):
    zbarimg = testing.require_tool("zbarimg")
    _gateway_up(user)
    with chromium_page() as page:
        log_in(page, live_server, password)
        page.goto(live_server.url + reverse("recovery:vpn-devices"))
        page.fill("#device-name", "Reception PC")
        page.click("[data-testid=add-device-submit]")
        page.wait_for_selector("[data-testid=device]")
        assert page.locator("[data-testid=last-handshake]").inner_text() == "never"
        with page.expect_download() as info:
            page.click("[data-testid=device-download]")
        path = tmp_path / "device.conf"
        info.value.save_as(path)
        downloaded = path.read_text()
        assert info.value.suggested_filename == "reclo-Reception.conf"
        qr = page.locator("[data-testid=device-qr]")
        qr.scroll_into_view_if_needed()
        page.wait_for_function("document.querySelector('[data-testid=device-qr]').naturalWidth > 0")
        qr.screenshot(path=str(tmp_path / "qr.png"))
        for text in ("Windows", "macOS", "iPhone", "Android"):
            assert text in page.content()
        shot(page, "vpn-devices")
    device = VpnDevice.objects.get(user=user)
    assert downloaded == devices.device_config(device=device)
    scanned = subprocess.run([zbarimg, "--raw", "-q", str(tmp_path / "qr.png")], capture_output=True, text=True)
    assert scanned.returncode == 0, scanned.stderr
    assert scanned.stdout.rstrip("\n") == downloaded.rstrip("\n")


def test_revoking_asks_first_then_revokes(owner, user):
    device = devices.device_create(user=user, name="Old laptop")
    url = reverse("recovery:vpn-device-revoke", args=[device.pk])
    page = owner.get(url)
    assert page.status_code == 200 and b"Revoke Old laptop?" in page.content
    assert VpnDevice.objects.filter(pk=device.pk).exists()
    assert owner.post(url).status_code == 302
    assert not VpnDevice.objects.filter(pk=device.pk).exists()


def test_the_page_shows_only_the_owners_devices_and_refuses_others(owner, user, other_user):
    _gateway_up(user)
    mine = devices.device_create(user=user, name="Reception PC")
    theirs = devices.device_create(user=other_user, name="Bob's phone")
    page = owner.get(reverse("recovery:vpn-devices")).content.decode()
    assert "Reception PC" in page and "Bob" not in page
    for name in ("recovery:vpn-device-config", "recovery:vpn-device-qr", "recovery:vpn-device-revoke"):
        assert owner.get(reverse(name, args=[theirs.pk])).status_code == 404
    assert owner.get(reverse("recovery:vpn-device-config", args=[mine.pk])).status_code == 200
    assert owner.post(reverse("recovery:vpn-device-revoke", args=[theirs.pk])).status_code == 404
    assert VpnDevice.objects.filter(pk=theirs.pk).exists()


def test_an_empty_name_gets_a_friendly_message(owner):
    page = owner.post(reverse("recovery:vpn-devices"), {"name": "  "})
    assert page.status_code == 200 and "Give the device a name" in page.content.decode()
    assert not VpnDevice.objects.exists()


def test_the_page_needs_a_login(client):
    assert client.get(reverse("recovery:vpn-devices")).status_code == 302


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_browser_sees_vpn_down_and_sets_the_dns(aws, live_server, user, password):
    _gateway_up(user)
    devices.device_create(user=user, name="Reception PC")
    silent_since = timezone.now() - timedelta(minutes=12)
    VpnGateway.objects.filter(network__user=user).update(last_report=silent_since)
    with chromium_page() as page:
        log_in(page, live_server, password)
        page.goto(live_server.url + reverse("recovery:vpn-devices"))
        status = page.locator("[data-testid=vpn-status]")
        assert status.get_attribute("role") == "alert"
        assert status.locator("h2").inner_text() == "VPN down"
        assert (
            page.locator("[data-testid=vpn-status-message]")
            .inner_text()
            .startswith("VPN down: the VPN gateway has not reported to ReClo since")
        )
        assert page.locator("[data-testid=dns-now]").inner_text() == "the recovered server's address, once one runs"
        shot(page, "vpn-down")
        page.select_option("#dns-mode", "custom")
        page.fill("#dns-custom", "10.213.1.10, practice.local")
        page.click("[data-testid=dns-submit]")
        page.wait_for_selector("[data-testid=dns-now]")
        assert page.locator("[data-testid=dns-now]").inner_text() == "10.213.1.10, practice.local"
        assert "Saved: the VPN files now use DNS 10.213.1.10, practice.local." in page.content()
        page.fill("#dns-custom", "practice.local")
        page.click("[data-testid=dns-submit]")
        assert page.locator("[role=alert].error").inner_text().startswith("Give at least one DNS server address")
        shot(page, "vpn-dns-error")
        # The recovery page of a recovered server says it too.
        instance = recovered_instance(user=user)
        page.goto(live_server.url + reverse("recovery:detail", args=[instance.recovery_id]))
        down = page.locator("[data-testid=vpn-down]")
        assert down.get_attribute("role") == "alert" and down.inner_text().startswith("VPN down:")
        shot(page, "recovery-vpn-down")
    device = VpnDevice.objects.get(user=user)
    assert "DNS = 10.213.1.10, practice.local\n" in devices.device_config(device=device)
