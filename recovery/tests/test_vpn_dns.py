"""The DNS line of the office's VPN files: the recovered server by default, the owner's choice, or none."""

import pytest
from django.urls import reverse

from recovery import devices, networks
from recovery.models import Instance, RecoveryNetwork, VpnGateway

from .factories import recovered_instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def device(user):
    net, _ = RecoveryNetwork.objects.get_or_create(user=user, defaults={"ready": True})
    gw = networks._gateway_row(net)
    VpnGateway.objects.filter(pk=gw.pk).update(state=VpnGateway.State.READY, public_ip="203.0.113.9")
    return devices.device_create(user=user, name="Reception PC")


def dns_line(device) -> str | None:
    lines = [line for line in devices.device_config(device=device).splitlines() if line.startswith("DNS")]
    assert len(lines) <= 1
    return lines[0] if lines else None


def test_by_default_the_recovered_servers_address_is_the_dns(aws, user, other_user, device):
    assert dns_line(device) is None  # no server recovered yet: no DNS line rather than a dead one
    recovered_instance(user=other_user)  # another tenant's server is never mine
    assert dns_line(device) is None
    instance = recovered_instance(user=user)
    assert instance.private_ip
    assert dns_line(device) == f"DNS = {instance.private_ip}"
    Instance.objects.filter(pk=instance.pk).update(state=Instance.State.TERMINATED)
    assert dns_line(device) is None


def test_the_owner_sets_addresses_and_search_domains_on_the_vpn_page(owner, user, device):
    response = owner.post(reverse("recovery:vpn-dns"), {"mode": "custom", "custom": "10.213.1.10  practice.local,"})
    assert response.status_code == 302
    assert dns_line(device) == "DNS = 10.213.1.10, practice.local"
    page = owner.get(reverse("recovery:vpn-devices")).content.decode()
    assert "Saved: the VPN files now use DNS 10.213.1.10, practice.local." in page
    assert 'value="10.213.1.10, practice.local"' in page
    # Switching off keeps what was typed, for next time.
    owner.post(reverse("recovery:vpn-dns"), {"mode": "none", "custom": ""})
    assert dns_line(device) is None
    assert RecoveryNetwork.objects.get(user=user).vpn_dns == "10.213.1.10, practice.local"
    owner.post(reverse("recovery:vpn-dns"), {"mode": "server"})
    assert RecoveryNetwork.objects.get(user=user).vpn_dns_mode == "server"


@pytest.mark.parametrize(
    ("custom", "says"),
    [
        ("", "Give at least one DNS server address"),
        ("practice.local", "Give at least one DNS server address"),
        ("10.213.1.10, bad_name!", "\u201cbad_name!\u201d is neither an IP address nor a domain name."),
        ("10.213.1.300", "\u201c10.213.1.300\u201d is neither an IP address nor a domain name."),
        ("10.0.0.1 " * 40, "That is too long for one DNS line."),
    ],
)
def test_wrong_entries_get_a_plain_message_and_change_nothing(owner, user, device, custom, says):
    response = owner.post(reverse("recovery:vpn-dns"), {"mode": "custom", "custom": custom})
    assert response.status_code == 200
    assert says in response.content.decode()
    assert RecoveryNetwork.objects.get(user=user).vpn_dns_mode == "server"


def test_an_unknown_mode_is_refused(owner, user, device):
    response = owner.post(reverse("recovery:vpn-dns"), {"mode": "everything"})
    assert response.status_code == 200 and "Choose one of the DNS options." in response.content.decode()


def test_the_setting_can_be_made_before_the_first_failover(owner, user):
    assert not RecoveryNetwork.objects.filter(user=user).exists()
    owner.post(reverse("recovery:vpn-dns"), {"mode": "custom", "custom": "192.168.1.2"})
    net = RecoveryNetwork.objects.get(user=user)
    assert (net.vpn_dns_mode, net.vpn_dns, net.ready, net.vpc_id) == ("custom", "192.168.1.2", False, "")


def test_the_dns_form_needs_a_login_and_a_post(client, owner):
    assert client.post(reverse("recovery:vpn-dns"), {"mode": "none"}).status_code == 302
    assert owner.get(reverse("recovery:vpn-dns")).status_code == 405


def test_the_api_lists_the_dns_line(api, owner, device):
    owner.post(reverse("recovery:vpn-dns"), {"mode": "custom", "custom": "10.213.1.10"})
    assert api.get("/api/v1/vpn/devices").json()["dns"] == {"mode": "custom", "entries": "10.213.1.10"}
