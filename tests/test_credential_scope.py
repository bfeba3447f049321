"""A server credential, walked over every API route: only its own server's agent calls pass.

The agent of a server holds a server credential (from enrollment). Ransomware
on that server holds it too, so everything but what the agent needs answers
403 with code 106: deleting, failovers, instances, VPN, drills, tokens, other
servers, enrollment. The walker visits every route the URL resolver knows
(also routes added later, with any parameter), so a new endpoint that
forgets to refuse server credentials fails here.
"""

import uuid
from datetime import timedelta

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiToken
from backups.models import Backup, Server
from backups.services import enrollment_key_create, server_enroll
from backups.tests.factories import BackupFactory
from reclo_site import testing

pytestmark = pytest.mark.django_db

METHODS = ("get", "post", "put", "patch", "delete")
# Routes that take no token at all (a credential changes nothing there).
PUBLIC = {"api:register", "api:login", "api:enroll", "api:schema", "api:docs",
          # The gateway's own credential only (`Authorization: Gateway ...`); a user's or
          # server's Token is refused there (recovery/tests/test_vpn_devices.py).
          "api:vpn-gateway-peers"}  # fmt: skip
# What the agent of a server may do, by route pattern and method: the
# contract's list (its backups, its uploads, its chains, its status) plus
# renewing and revoking its own credential (so an enrolled agent outlives
# the 60-day token lifetime without a password on the server), and browsing
# and taking back files of its own restore points (reclo-agent restore-files).
ALLOWED = {
    ("backups", "get"),
    ("backups/<uuid:backup_id>", "get"),
    ("backups/uploads", "post"),
    ("backups/uploads/<uuid:upload_id>/credentials", "post"),
    ("backups/uploads/<uuid:upload_id>/complete", "post"),
    ("backups/<uuid:backup_id>/download", "post"),
    ("backups/<uuid:backup_id>/files", "get"),
    ("backups/<uuid:backup_id>/files/content", "get"),
    ("servers/<str:server>/status", "post"),
    ("token/renew", "post"),
    ("logout", "post"),
}


def api_routes(patterns=None, prefix="", namespace=""):
    """(name, pattern relative to /api/v1/, converters) of every named API route."""
    for entry in patterns if patterns is not None else get_resolver().url_patterns:
        if isinstance(entry, URLResolver):
            ns = entry.namespace or ""
            full = f"{namespace}:{ns}" if namespace and ns else (ns or namespace)
            yield from api_routes(entry.url_patterns, prefix + str(entry.pattern), full)
        elif isinstance(entry, URLPattern) and entry.name and namespace == "api":
            pattern = (prefix + str(entry.pattern)).removeprefix("api/v1/")
            yield f"{namespace}:{entry.name}", pattern, entry.pattern.converters


def credential(user, server: str) -> str:
    key = enrollment_key_create(user=user, server=server).key
    return server_enroll(key=key, hostname="test")[2]


def client_with(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


@pytest.fixture
def world(aws, user, other_user):
    """The owner's servers front-desk (with the credential) and archive, and the outsider's server."""
    desk_token = credential(user, "front-desk")
    desk = Server.objects.get(user=user, name="front-desk")
    archive = Server.objects.create(user=user, name="archive")
    theirs = Server.objects.create(user=other_user, name="front-desk")

    def objects(server):
        backup = BackupFactory(server=server)
        upload = BackupFactory(
            server=server, disk="sdb", status=Backup.Status.PENDING, verified_at=None, file_size=None,
            credentials_expire=timezone.now() + timedelta(hours=1),
        )  # fmt: skip
        return {"server": server.name, "backup_id": backup.pk, "upload_id": upload.pk}

    return {
        "token": desk_token,
        "own": objects(desk),
        "archive": objects(archive),
        "theirs": objects(theirs),
    }


def fill(converters: dict, ids: dict) -> dict:
    """URL parameters: the given ids where the route names them, any well-formed value elsewhere."""
    values = {}
    for name, converter in converters.items():
        if name in ids:
            values[name] = ids[name]
        else:
            kind = type(converter).__name__
            values[name] = {"UUIDConverter": uuid.uuid4(), "IntConverter": 1}.get(kind, "front-desk")
    return values


def call(client, method, url, body=None):
    return getattr(client, method)(url, data=body if body is not None else {}, format="json")


def body_for(pattern: str, ids: dict) -> dict:
    if pattern == "backups/uploads":
        return {"server": ids["server"], "disk": "sdc", "file_name": "sdc.vhd.zst", "virtual_size": 1 << 20,
                "kind": "full"}  # fmt: skip
    return {}


def test_everything_but_the_agents_calls_answers_106(world):
    agent = client_with(world["token"])
    routes = [r for r in api_routes() if r[0] not in PUBLIC]
    assert len(routes) >= 18, routes
    refused = reached = 0
    for name, pattern, converters in routes:
        url = reverse(name, kwargs=fill(converters, world["own"]))
        for method in METHODS:
            if (pattern, method) in ALLOWED:
                continue  # reached below, with bodies that make sense
            response = call(agent, method, url)
            assert response.status_code == 403, f"{method.upper()} {url} -> {response.status_code}"
            assert response.json()["error"] == 106, f"{method.upper()} {url} -> {response.json()}"
            refused += 1
    assert refused > 80
    # The agent's own calls get through to the view (whatever the view then says).
    for name, pattern, converters in routes:
        for method in METHODS:
            if (pattern, method) in ALLOWED and pattern != "logout":
                url = reverse(name, kwargs=fill(converters, world["own"]))
                response = call(agent, method, url, body_for(pattern, world["own"]))
                assert response.status_code != 403, f"{method.upper()} {url} -> {response.json()}"
                reached += 1
    assert reached >= 7
    assert client_with(world["token"]).post("/api/v1/logout").status_code == 200


def test_the_agents_calls_on_another_server_of_the_tenant_answer_106(world):
    agent = client_with(world["token"])
    for name, pattern, converters in api_routes():
        for method in METHODS:
            if (pattern, method) not in ALLOWED or pattern in ("logout", "token/renew"):
                continue
            url = reverse(name, kwargs=fill(converters, world["archive"]))
            response = call(agent, method, url, body_for(pattern, world["archive"]))
            if pattern == "backups":
                response = agent.get(url, {"server": "archive"})
            assert response.status_code == 403, f"{method.upper()} {url} -> {response.status_code}"
            assert response.json()["error"] == 106


def test_another_tenants_objects_stay_not_found(world):
    agent = client_with(world["token"])
    theirs = world["theirs"]
    for url, method in [
        (f"/api/v1/backups/{theirs['backup_id']}", "get"),
        (f"/api/v1/backups/uploads/{theirs['upload_id']}/credentials", "post"),
        (f"/api/v1/backups/uploads/{theirs['upload_id']}/complete", "post"),
        (f"/api/v1/backups/{theirs['backup_id']}/download", "post"),
        (f"/api/v1/backups/{theirs['backup_id']}/files", "get"),
        (f"/api/v1/backups/{theirs['backup_id']}/files/content?partition=1", "get"),
    ]:
        response = call(agent, method, url)
        assert response.status_code == 404, f"{method.upper()} {url} -> {response.status_code}"
    assert not Backup.objects.filter(pk=theirs["upload_id"], status="verifying").exists()


def test_the_list_shows_only_its_own_servers_backups(world):
    response = client_with(world["token"]).get("/api/v1/backups")
    assert response.status_code == 200
    ids = {b["backup_id"] for b in response.json()["backups"]}
    assert ids == {str(world["own"]["backup_id"]), str(world["own"]["upload_id"])}


def test_a_revoked_credential_answers_102_everywhere(world, user):
    ApiToken.objects.filter(server__isnull=False).update(revoked_at=timezone.now())
    agent = client_with(world["token"])
    for name, _pattern, converters in api_routes():
        if name in PUBLIC:
            continue
        url = reverse(name, kwargs=fill(converters, world["own"]))
        response = call(agent, "post", url)
        assert (response.status_code, response.json()["error"]) == (401, 102), url


def test_the_owners_token_is_not_limited(world, user):
    owner = client_with(testing.token_for(user))
    assert owner.get("/api/v1/backups", {"server": "archive"}).status_code == 200
    assert owner.delete(f"/api/v1/backups/{world['archive']['backup_id']}").status_code == 200
