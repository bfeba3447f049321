"""VPN devices (the contract's "VPN devices") and the gateway's peer-sync endpoint."""

import uuid

import pytest

from recovery import devices, networks, vpn
from recovery.models import RecoveryNetwork, VpnDevice, VpnGateway

pytestmark = pytest.mark.django_db


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    assert response.json()["error"] == code and response.json()["message"]


@pytest.fixture
def gateway(user):
    """The account's gateway, up at 203.0.113.9 (rows only: the cloud side is tested in test_steps)."""
    net = RecoveryNetwork.objects.create(user=user, ready=True)
    gw = networks._gateway_row(net)
    VpnGateway.objects.filter(pk=gw.pk).update(state=VpnGateway.State.READY, public_ip="203.0.113.9")
    gw.refresh_from_db()
    return gw


def agent_token(gw) -> str:
    return vpn.decrypt(gw.agent_token_enc)


def test_each_device_gets_its_own_key_and_address(api):
    one = api.post("/api/v1/vpn/devices", {"name": "Reception PC"}, format="json")
    two = api.post("/api/v1/vpn/devices", {"name": "Dr. Smith's laptop"}, format="json")
    assert one.status_code == two.status_code == 201
    a, b = one.json()["device"], two.json()["device"]
    assert (a["name"], a["address"], a["last_handshake"]) == ("Reception PC", "10.214.0.2", None)
    assert b["address"] == "10.214.0.3"
    keys = set(VpnDevice.objects.values_list("public_key", flat=True))
    assert len(keys) == 2
    listed = api.get("/api/v1/vpn/devices").json()["devices"]
    assert [d["device_id"] for d in listed] == [a["device_id"], b["device_id"]]
    assert set(listed[0]) == {"device_id", "name", "address", "created", "last_handshake"}


def test_a_device_config_is_plain_text_with_its_own_key(api, gateway):
    device = api.post("/api/v1/vpn/devices", {"name": "Reception PC"}, format="json").json()["device"]
    response = api.get(f"/api/v1/vpn/devices/{device['device_id']}/config")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Cache-Control"] == "no-store"
    assert response["Content-Disposition"] == 'attachment; filename="reclo-Reception.conf"'
    text = response.content.decode()
    row = VpnDevice.objects.get(pk=device["device_id"])
    private = text.split("PrivateKey = ")[1].split()[0]
    assert vpn.public_key_of(private) == row.public_key
    assert f"Address = {row.address}/32\n" in text and "AllowedIPs = 10.213.1.0/24\n" in text
    assert f"PublicKey = {gateway.gateway_public_key}\n" in text and "Endpoint = 203.0.113.9:51820\n" in text
    assert "MTU = 1420\n" in text
    assert api.get(f"/api/v1/vpn/devices/{device['device_id']}/config").content == response.content


def test_the_dns_entry_the_owner_set_is_in_the_config(api, gateway, user):
    RecoveryNetwork.objects.filter(user=user).update(vpn_dns_mode="custom", vpn_dns="10.213.1.10")
    device = devices.device_create(user=user, name="PC")
    assert "DNS = 10.213.1.10\n" in api.get(f"/api/v1/vpn/devices/{device.pk}/config").content.decode()


def test_a_config_waits_for_the_gateway(api, user):
    device = devices.device_create(user=user, name="PC")
    assert_error(api.get(f"/api/v1/vpn/devices/{device.pk}/config"), 409, 406)


def test_revoking_a_device_removes_it(api, user):
    keep = devices.device_create(user=user, name="Keep")
    gone = devices.device_create(user=user, name="Gone")
    response = api.delete(f"/api/v1/vpn/devices/{gone.pk}")
    assert response.status_code == 200 and response.json()["message"]
    assert [d["name"] for d in api.get("/api/v1/vpn/devices").json()["devices"]] == ["Keep"]
    assert_error(api.get(f"/api/v1/vpn/devices/{gone.pk}/config"), 404, 412)
    assert_error(api.delete(f"/api/v1/vpn/devices/{gone.pk}"), 404, 412)
    # Its address is free again for the next device.
    assert devices.device_create(user=user, name="New").address == gone.address
    assert VpnDevice.objects.filter(pk=keep.pk).exists()


def test_another_tenants_devices_answer_404_412(api, other_api, user):
    device = devices.device_create(user=user, name="PC")
    assert_error(other_api.get(f"/api/v1/vpn/devices/{device.pk}/config"), 404, 412)
    assert_error(other_api.delete(f"/api/v1/vpn/devices/{device.pk}"), 404, 412)
    assert other_api.get("/api/v1/vpn/devices").json()["devices"] == []
    assert VpnDevice.objects.filter(pk=device.pk).exists()
    for bad in (uuid.uuid4(), "not-a-uuid"):
        assert_error(api.get(f"/api/v1/vpn/devices/{bad}/config"), 404, 412)


def test_every_device_route_needs_a_token(anon_api, user):
    device = devices.device_create(user=user, name="PC")
    one = f"/api/v1/vpn/devices/{device.pk}"
    calls = [("get", "/api/v1/vpn/devices"), ("post", "/api/v1/vpn/devices"),
             ("get", f"{one}/config"), ("delete", one)]  # fmt: skip
    for method, url in calls:
        assert_error(getattr(anon_api, method)(url), 401, 102)
    anon_api.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    for method, url in calls:
        assert_error(getattr(anon_api, method)(url), 401, 102)
    assert VpnDevice.objects.filter(pk=device.pk).exists()


@pytest.mark.parametrize(
    "body", [{}, {"name": ""}, {"name": "   "}, {"name": 5}, {"name": "x" * 64}, ["Reception PC"], "name"]
)
def test_a_malformed_device_answers_400_104(api, body):
    assert_error(api.post("/api/v1/vpn/devices", body, format="json"), 400, 104)
    assert not VpnDevice.objects.exists()


# --- the gateway's peer sync ------------------------------------------------------------------------


def sync(client, token, report=""):
    return client.post("/api/v1/vpn/gateway/peers", report, content_type="text/plain",
                       HTTP_AUTHORIZATION=f"Gateway {token}")  # fmt: skip


def test_the_gateway_gets_the_current_peers_and_reports_handshakes(anon_api, gateway, user, other_user):
    pc = devices.device_create(user=user, name="Reception PC")
    phone = devices.device_create(user=user, name="Phone")
    stranger = devices.device_create(user=other_user, name="Not yours")
    response = sync(anon_api, agent_token(gateway), f"{pc.public_key}\t1700000000\n{phone.public_key}\t0\n"
                    f"{stranger.public_key}\t1700000000\n")  # fmt: skip
    assert response.status_code == 200 and response["Content-Type"] == "text/plain"
    text = response.content.decode()
    assert text.count("[Peer]") == 2 and stranger.public_key not in text
    assert f"PublicKey = {pc.public_key}\nAllowedIPs = {pc.address}/32\n" in text
    gateway.refresh_from_db()
    assert gateway.last_report is not None
    pc.refresh_from_db(), phone.refresh_from_db(), stranger.refresh_from_db()
    assert pc.last_handshake.timestamp() == 1700000000
    assert phone.last_handshake is None and stranger.last_handshake is None
    devices.device_revoke(device=phone)
    assert phone.public_key not in sync(anon_api, agent_token(gateway)).content.decode()


def test_the_devices_list_shows_the_last_handshake(api, anon_api, gateway, user):
    pc = devices.device_create(user=user, name="Reception PC")
    sync(anon_api, agent_token(gateway), f"{pc.public_key}\t1700000000\n")
    assert api.get("/api/v1/vpn/devices").json()["devices"][0]["last_handshake"] == "2023-11-14T22:13:20Z"


def test_the_gateway_credential_opens_nothing_else(anon_api, api, gateway, user):
    token = agent_token(gateway)
    device = devices.device_create(user=user, name="PC")
    for scheme in ("Gateway", "Token"):
        anon_api.credentials(HTTP_AUTHORIZATION=f"{scheme} {token}")
        assert_error(anon_api.get("/api/v1/vpn/devices"), 401, 102)
        assert_error(anon_api.get(f"/api/v1/vpn/devices/{device.pk}/config"), 401, 102)


def test_the_peer_sync_refuses_bad_credentials(anon_api, api, gateway, token):
    assert_error(sync(anon_api, "wrong"), 401, 102)
    assert_error(anon_api.post("/api/v1/vpn/gateway/peers", "", content_type="text/plain"), 401, 102)
    # An owner's token is not a gateway credential.
    assert_error(sync(anon_api, token), 401, 102)
    VpnGateway.objects.filter(pk=gateway.pk).update(state=VpnGateway.State.RELEASED)
    assert_error(sync(anon_api, agent_token(gateway)), 401, 102)
    gateway.refresh_from_db()
    assert gateway.last_report is None


def test_a_malformed_report_answers_400_104(anon_api, gateway):
    response = anon_api.post("/api/v1/vpn/gateway/peers", "é".encode("latin-1"), content_type="text/plain",
                             HTTP_AUTHORIZATION=f"Gateway {agent_token(gateway)}")  # fmt: skip
    assert_error(response, 400, 104)
    # Lines that are not `<key>\t<unix time>` are ignored, not an error.
    assert sync(anon_api, agent_token(gateway), "garbage\nkey\tnot-a-number\n").status_code == 200
