"""The servers API: list, detail, settings, enrollment keys, enrolling, revoking a server."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiToken, AuditEvent
from accounts.tokens import hash_token
from backups.models import EnrollmentKey, Server

from .factories import BackupFactory, ServerFactory

pytestmark = pytest.mark.django_db

ENROLL = "/api/v1/enroll"


def enrollment(api, server="front-desk"):
    return api.post(f"/api/v1/servers/{server}/enrollment", format="json")


def enroll(key, hostname=None, client=None):
    body = {"key": key} if hostname is None else {"key": key, "hostname": hostname}
    return (client or APIClient()).post(ENROLL, body, format="json")


def as_token(token):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    assert response.json()["error"] == code, response.json()


class TestEnrollmentKey:
    def test_a_new_name_creates_the_server_and_a_one_time_key(self, api, user, settings):
        settings.SITE_URL = "https://reclo.example.com"
        response = enrollment(api)
        assert response.status_code == 201
        body = response.json()
        server = Server.objects.get(user=user, name="front-desk")
        assert body["server"] == "front-desk"
        assert len(body["key"]) == 32 and body["key"].isalnum()
        assert body["install_command"] == (
            f"curl -fsSL https://reclo.example.com/agent/install.sh | sudo sh -s -- --key {body['key']}"
        )
        assert body["enroll_command"] == f"reclo-agent enroll --portal https://reclo.example.com --key {body['key']}"
        row = EnrollmentKey.objects.get(server=server)
        # Stored hashed, never as given.
        assert row.key_hash == hash_token(body["key"]) and body["key"] not in str(vars(row))
        expires = timezone.datetime.fromisoformat(body["expires"].replace("Z", "+00:00"))
        assert timedelta(hours=23, minutes=59) < expires - timezone.now() <= timedelta(hours=24)
        assert AuditEvent.objects.filter(user=user, kind="enrollment.created").exists()

    def test_an_existing_server_gets_a_key_and_older_keys_stop_working(self, api, user):
        ServerFactory(user=user, name="front-desk")
        first = enrollment(api).json()["key"]
        second = enrollment(api).json()["key"]
        assert Server.objects.filter(user=user).count() == 1
        assert_error(enroll(first), 401, 212)
        assert enroll(second).status_code == 201

    @pytest.mark.parametrize("name", ["a/b", "..x", "-lead", "x" * 64, "*"])
    def test_a_bad_server_name_is_malformed(self, api, name):
        response = api.post(f"/api/v1/servers/{name}/enrollment", format="json")
        assert response.status_code in (400, 404)
        if response.status_code == 400:
            assert response.json()["error"] == 104 and "server" in response.json()["fields"]
        assert not Server.objects.exists()

    def test_it_needs_a_valid_token(self, anon_api, api, user):
        assert_error(anon_api.post("/api/v1/servers/front-desk/enrollment"), 401, 102)
        token = ApiToken.objects.get(user=user)
        token.revoked_at = timezone.now()
        token.save()
        assert_error(enrollment(api), 401, 102)
        assert not Server.objects.exists()

    def test_an_outsiders_key_makes_the_outsiders_own_server(self, api, other_api, user, other_user):
        ServerFactory(user=user, name="front-desk")
        key = enrollment(other_api).json()["key"]
        body = enroll(key).json()
        token = ApiToken.objects.get(key_hash=hash_token(body["token"]))
        assert token.user == other_user and token.server.user == other_user
        assert not ApiToken.objects.filter(user=user, server__isnull=False).exists()


class TestEnroll:
    def test_a_key_becomes_a_server_credential_once(self, api, user):
        key = enrollment(api).json()["key"]
        response = enroll(key, hostname="frontdesk.clinic.local")
        assert response.status_code == 201
        body = response.json()
        assert body["server"] == "front-desk"
        assert len(body["token"]) == 32 and body["token_expires"].endswith("Z")
        token = ApiToken.objects.get(key_hash=hash_token(body["token"]))
        assert (token.user, token.server.name) == (user, "front-desk")
        assert Server.objects.get(name="front-desk").hostname == "frontdesk.clinic.local"
        assert AuditEvent.objects.filter(user=user, kind="server.enrolled").exists()
        # The same key again: used.
        assert_error(enroll(key), 401, 212)

    def test_an_expired_key_is_refused(self, api):
        key = enrollment(api).json()["key"]
        EnrollmentKey.objects.update(expires=timezone.now() - timedelta(seconds=1))
        assert_error(enroll(key), 401, 212)
        assert not ApiToken.objects.filter(server__isnull=False).exists()

    @pytest.mark.parametrize("key", ["A" * 32, "short", "x" * 33, "ü" * 32])
    def test_an_unknown_key_is_refused(self, key):
        assert_error(enroll(key), 401, 212)

    @pytest.mark.parametrize(
        "body",
        [[], "key", {"key": 123}, {}, {"key": "A" * 32, "hostname": 5}, {"key": "A" * 32, "hostname": "x" * 256}],
    )
    def test_a_malformed_body_is_refused(self, body):
        assert_error(APIClient().post(ENROLL, body, format="json"), 400, 104)

    def test_not_json_is_refused(self):
        response = APIClient().post(ENROLL, "key=abc", content_type="application/json")
        assert_error(response, 400, 104)

    def test_guessing_is_throttled_per_address(self, api, settings):
        settings.ENROLL_FAILURES_PER_ADDRESS = 3
        key = enrollment(api).json()["key"]
        for _ in range(3):
            assert_error(enroll("B" * 32), 401, 212)
        response = enroll(key)
        assert_error(response, 429, 103)
        assert int(response["Retry-After"]) > 0
        # The good key was not spent by the refused attempt.
        assert EnrollmentKey.objects.get().used_at is None

    def test_a_token_header_is_not_needed_and_not_used(self, api, other_api):
        key = enrollment(api).json()["key"]
        response = enroll(key, client=other_api)
        assert response.status_code == 201


@pytest.fixture
def server_token(api, user):
    """A live server credential of the owner's server `front-desk`."""
    key = enrollment(api).json()["key"]
    return enroll(key, hostname="frontdesk").json()["token"]


class TestServers:
    def test_the_list_shows_each_server_with_its_figures(self, api, user, server_token):
        BackupFactory(server=Server.objects.get(name="front-desk"), disk="sda")
        ServerFactory(user=user, name="archive")
        response = api.get("/api/v1/servers")
        assert response.status_code == 200
        servers = {s["server"]: s for s in response.json()["servers"]}
        assert list(servers) == ["archive", "front-desk"]
        desk = servers["front-desk"]
        assert {
            "server", "disks", "last_backup", "health", "schedule", "consistency", "bootability",
            "warm_standby", "drill_every_days", "last_drill",
        } <= set(desk)  # fmt: skip
        assert [d["disk"] for d in desk["disks"]] == ["sda"]
        assert (desk["health"], desk["health_detail"]) == ("amber", "no schedule installed")  # no report yet
        assert desk["last_backup"].endswith("Z")
        assert (desk["warm_standby"], desk["drill_every_days"], desk["enrolled_agents"]) == (False, None, 1)
        assert desk["hostname"] == "frontdesk"
        assert servers["archive"]["health"] == "red" and servers["archive"]["last_backup"] is None

    def test_the_list_reports_the_agents_status_and_the_newest_points_consistency(self, api, user):
        server = ServerFactory(user=user, name="front-desk")
        (fresh,) = api.get("/api/v1/servers").json()["servers"]
        assert (fresh["schedule"], fresh["consistency"], fresh["bootability"]) == (None, None, None)
        older = BackupFactory(server=server, disk="sda", consistency="frozen")
        BackupFactory(server=server, disk="sda", consistency="crash", parent=older, kind="incremental",
                      date_created=older.date_created + timedelta(hours=1))  # fmt: skip
        checks = [{"name": "nvme", "status": "pass", "detail": "built in"}]
        body = {"schedule": "1h", "agent_version": "1.2.3", "preflight": {"checks": checks}}
        report = api.post("/api/v1/servers/front-desk/status", body, format="json")
        assert report.status_code == 200, report.content
        (desk,) = api.get("/api/v1/servers").json()["servers"]
        assert desk["consistency"] == "crash"
        assert desk["schedule"]["every"] == "1h" and desk["schedule"]["reported"].endswith("Z")
        assert desk["bootability"]["preflight"]["ok"] is True
        assert [c["name"] for c in desk["bootability"]["preflight"]["checks"]] == ["nvme"]

    def test_the_list_shows_nothing_of_another_tenant(self, other_api, server_token):
        assert other_api.get("/api/v1/servers").json()["servers"] == []

    def test_detail(self, api, user):
        ServerFactory(user=user, name="front-desk")
        response = api.get("/api/v1/servers/front-desk")
        assert response.status_code == 200
        assert response.json()["server"]["server"] == "front-desk"

    def test_another_tenants_server_is_not_found(self, api, other_api, user):
        ServerFactory(user=user, name="front-desk")
        assert_error(other_api.get("/api/v1/servers/front-desk"), 404, 105)
        assert_error(other_api.patch("/api/v1/servers/front-desk", {"warm_standby": True}, format="json"), 404, 105)
        assert_error(other_api.delete("/api/v1/servers/front-desk/credentials"), 404, 105)
        assert Server.objects.get(name="front-desk").warm_standby is False

    def test_bad_tokens_are_refused(self, anon_api, user):
        ServerFactory(user=user, name="front-desk")
        for method, url in [
            ("get", "/api/v1/servers"),
            ("get", "/api/v1/servers/front-desk"),
            ("patch", "/api/v1/servers/front-desk"),
            ("delete", "/api/v1/servers/front-desk/credentials"),
        ]:
            assert_error(getattr(anon_api, method)(url), 401, 102)
            bad = as_token("Z" * 32)
            assert_error(getattr(bad, method)(url), 401, 102)


class TestSettings:
    def test_the_owner_changes_the_settings(self, api, user):
        ServerFactory(user=user, name="front-desk")
        body = {"warm_standby": True, "drill_every_days": 7, "drill_probe_port": 3389}
        response = api.patch("/api/v1/servers/front-desk", body, format="json")
        assert response.status_code == 200
        server = response.json()["server"]
        assert (server["warm_standby"], server["drill_every_days"], server["drill_probe_port"]) == (True, 7, 3389)
        row = Server.objects.get(name="front-desk")
        assert (row.warm_standby, row.drill_every_days, row.drill_probe_port) == (True, 7, 3389)

    def test_only_given_fields_change_and_null_clears(self, api, user):
        ServerFactory(user=user, name="front-desk", warm_standby=True, drill_every_days=7)
        response = api.patch("/api/v1/servers/front-desk", {"drill_every_days": None}, format="json")
        assert response.status_code == 200
        row = Server.objects.get(name="front-desk")
        assert (row.warm_standby, row.drill_every_days) == (True, None)

    @pytest.mark.parametrize(
        "body",
        [
            {"warm_standby": "yes"},
            {"warm_standby": 1},
            {"warm_standby": None},
            {"drill_every_days": 0},
            {"drill_every_days": 366},
            {"drill_every_days": "7"},
            {"drill_every_days": 1.5},
            {"drill_every_days": True},
            {"drill_probe_port": 0},
            {"drill_probe_port": 65536},
        ],
    )
    def test_bad_values_are_malformed(self, api, user, body):
        ServerFactory(user=user, name="front-desk")
        response = api.patch("/api/v1/servers/front-desk", body, format="json")
        assert_error(response, 400, 104)
        assert set(response.json()["fields"]) == set(body)
        row = Server.objects.get(name="front-desk")
        assert (row.warm_standby, row.drill_every_days, row.drill_probe_port) == (False, None, None)

    def test_a_body_that_is_not_an_object_is_malformed(self, api, user):
        ServerFactory(user=user, name="front-desk")
        assert_error(api.patch("/api/v1/servers/front-desk", [1], format="json"), 400, 104)
        response = api.patch("/api/v1/servers/front-desk", "{", content_type="application/json")
        assert_error(response, 400, 104)


class TestRevoke:
    def test_every_credential_of_the_server_stops_at_once(self, api, user, server_token):
        second = enroll(enrollment(api).json()["key"]).json()["token"]
        pending_key = enrollment(api).json()["key"]
        other_server_token = enroll(enrollment(api, "archive").json()["key"]).json()["token"]
        assert as_token(server_token).get("/api/v1/backups").status_code == 200

        response = api.delete("/api/v1/servers/front-desk/credentials")
        assert response.status_code == 200 and response.json()["revoked"] == 2
        for token in (server_token, second):
            assert_error(as_token(token).get("/api/v1/backups"), 401, 102)
        # An unused key of the revoked server cannot mint a new credential either.
        assert_error(enroll(pending_key), 401, 212)
        # The owner's own token and the other server's credential keep working.
        assert api.get("/api/v1/servers").status_code == 200
        assert as_token(other_server_token).get("/api/v1/backups").status_code == 200
        assert AuditEvent.objects.filter(user=user, kind="server.revoked").exists()
        # Idempotent.
        assert api.delete("/api/v1/servers/front-desk/credentials").json()["revoked"] == 0

    def test_an_unknown_server_is_not_found(self, api):
        assert_error(api.delete("/api/v1/servers/nope/credentials"), 404, 105)
