"""Tenant isolation: every URL the router knows, walked as an outsider with the owner's ids.

Each answers 404 (or 403/405), and nothing of the owner's changes. A new URL
whose parameters the walker cannot fill fails the test, so every endpoint
added later is covered too.
"""

import io
import json
from datetime import timedelta

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from PIL import Image as PILImage
from rest_framework.test import APIClient

from accounts.models import ApiToken, AuditEvent
from backups.models import Backup, Server
from backups.tests.factories import BackupFactory
from reclo_site import testing
from reclo_site.cloud import storage
from recovery import devices as vpn_devices
from recovery import services as recovery_services
from recovery.models import Drill, Failback, Instance, Recovery, StagedSnapshot, VpnGateway
from recovery.tests.factories import MiB, ServerFactory, backup_chain, drive_recovery, saved

pytestmark = pytest.mark.django_db

METHODS = ("get", "post", "put", "patch", "delete")
# Django's admin is for staff only and guarded by its own login; not a tenant surface.
SKIPPED_NAMESPACES = {"admin"}
# Routes that name an object by a name the caller chooses and create the
# caller's own on first use (an enrollment key for "front-desk" makes the
# outsider's own front-desk): the outsider gets 201 for their own server.
# backups/tests/test_api_servers.py checks it leaves the owner's alone.
CREATES_OWN = {"api:server-enrollment"}
# The reset link's uid and token are themselves the credential (Django's reset
# token), not ids of the owner's data; accounts/tests/test_password.py covers it.
SKIPPED_ROUTES = {"accounts:password-reset-confirm"}


def walk(patterns=None, prefix="", namespace=""):
    """(route name with namespace, parameter names) of every named URL."""
    for entry in patterns if patterns is not None else get_resolver().url_patterns:
        if isinstance(entry, URLResolver):
            ns = entry.namespace or ""
            full = f"{namespace}:{ns}" if namespace and ns else (ns or namespace)
            if ns in SKIPPED_NAMESPACES:
                continue
            yield from walk(entry.url_patterns, prefix + str(entry.pattern), full)
        elif isinstance(entry, URLPattern) and entry.name:
            name = f"{namespace}:{entry.name}" if namespace else entry.name
            if name in SKIPPED_ROUTES:
                continue
            yield name, sorted(entry.pattern.converters) or sorted(entry.pattern.regex.groupindex)


@pytest.fixture
def owner_data(aws, user, token):
    """One of everything the owner can have: a real chain, a finished failover, a pending upload."""
    server = ServerFactory(user=user, name="front-desk")
    backups, _disk = backup_chain(user=user, server=server, size=8 * MiB, incrementals=1)
    recovery = drive_recovery(recovery_services.recovery_start(user=user, backup_id=backups[-1].pk).pk)
    instance = Instance.objects.get(recovery=recovery)
    # With live upload credentials: an expired upload answers 404 to its owner too.
    pending = BackupFactory(server=server, disk="sdb", status=Backup.Status.PENDING, verified_at=None, file_size=None,
                            credentials_expire=timezone.now() + timedelta(hours=1))  # fmt: skip
    drill = finished_drill(backups[-1])
    return {
        "server_id": server.pk,
        "server": server.name,
        "backup_id": backups[-1].pk,
        "upload_id": pending.pk,
        "recovery_id": instance.recovery_id,
        "instance_id": instance.instance_id,
        "token_id": ApiToken.objects.get(user=user).pk,
        "drill_id": drill.pk,
        "failback_id": saved(instance, at=timezone.now()).pk,
        "device_id": vpn_devices.device_create(user=user, name="Reception PC").pk,
    }


def finished_drill(backup) -> Drill:
    """A passed drill of `backup` with a stored screenshot (every drill route has something to show)."""
    now = timezone.now()
    drill = Drill.objects.create(
        user=backup.user, server=backup.server, server_name=backup.server.name, backup=backup,
        backup_ref=backup.pk, backup_created=backup.date_created, status="passed", finished=now, torn_down=now,
        screenshot_key=f"drills/{backup.user_id}/{backup.pk}/screenshot.png",
    )  # fmt: skip
    out = io.BytesIO()
    PILImage.new("RGB", (4, 3)).save(out, "PNG")
    storage.put_object(drill.screenshot_key, out.getvalue())
    return drill


def snapshot(user) -> str:
    """Everything of the owner's that an outsider might change, as one comparable string."""
    rows = {
        "servers": list(Server.objects.filter(user=user).order_by("pk").values()),
        "backups": list(Backup.objects.filter(user=user).order_by("pk").values()),
        "recoveries": list(Recovery.objects.filter(user=user).order_by("pk").values()),
        "instances": list(Instance.objects.filter(user=user).order_by("pk").values()),
        "drills": list(Drill.objects.filter(user=user).order_by("pk").values()),
        "failbacks": list(Failback.objects.filter(user=user).order_by("pk").values()),
        "staged": list(StagedSnapshot.objects.filter(user=user).order_by("pk").values()),
        "gateways": list(VpnGateway.objects.filter(network__user=user).order_by("pk").values()),
        "tokens": list(ApiToken.objects.filter(user=user).order_by("pk").values("pk", "revoked_at", "expires")),
        "audit": AuditEvent.objects.filter(user=user).count(),
    }
    return json.dumps(rows, default=str, sort_keys=True)


def kwargs_for(params, ids):
    """Every way to fill a URL's parameters with the owner's ids; fails on an unknown parameter."""
    unknown = [p for p in params if p not in ids and p != "action"]
    assert not unknown, f"the isolation walker does not know how to fill {unknown}: teach it"
    base = {p: ids[p] for p in params if p != "action"}
    if "action" in params:
        return [{**base, "action": action} for action in ("start", "stop", "terminate")]
    return [base]


def request(client, method, url):
    return getattr(client, method)(url, data="{}" if method != "get" else None, content_type="application/json")


def test_an_outsider_reaches_nothing_of_the_owners(owner_data, user, other_user, client):
    outsider_api = APIClient()
    outsider_api.credentials(HTTP_AUTHORIZATION=f"Token {testing.token_for(other_user)}")
    client.force_login(other_user)
    before = snapshot(user)

    routes = list(walk())
    with_ids = [(name, params) for name, params in routes if params]
    assert len(with_ids) >= 15, with_ids  # the walker really found the tenant routes
    checked = 0
    for name, params in with_ids:
        if name in CREATES_OWN:
            continue
        for kwargs in kwargs_for(params, owner_data):
            url = reverse(name, kwargs=kwargs)
            http = outsider_api if url.startswith("/api/") else client
            for method in METHODS:
                response = request(http, method, url)
                assert response.status_code in (403, 404, 405), f"{method.upper()} {url} -> {response.status_code}"
                if url.startswith("/api/"):
                    assert response["Content-Type"].startswith("application/json"), url
                checked += 1
    assert snapshot(user) == before, "an outsider's request changed the owner's data"

    # Lists show the outsider nothing of the owner's.
    # Small integers (server 1) would match anything; the uuids and cloud ids are telling.
    secrets = [str(v) for v in owner_data.values() if len(str(v)) >= 8]
    for name, params in routes:
        if params or name.startswith(("api:schema", "api:docs")) or name in ("healthz",):
            continue
        url = reverse(name)
        http = outsider_api if url.startswith("/api/") else client
        response = http.get(url)
        # The agent bundle is a file streamed from disk.
        raw = b"".join(response.streaming_content) if response.streaming else response.content
        body = raw.decode(errors="replace")
        leaked = [s for s in secrets if s in body]
        assert not leaked, f"GET {url} shows the owner's {leaked}"
    assert checked > 80


def test_the_walker_uses_ids_that_reach_the_owners_objects(owner_data, user, token, client):
    """Without this, a walker with wrong ids would pass vacuously."""
    owner_api = APIClient()
    owner_api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    client.force_login(user)
    pending = {}
    for name, params in walk():
        if params:
            for kwargs in kwargs_for(params, owner_data):
                pending[reverse(name, kwargs=kwargs)] = True
    # GET first, then the writing methods, so a delete does not hide a later route.
    for method in METHODS:
        for url in [u for u, missing in pending.items() if missing]:
            http = owner_api if url.startswith("/api/") else client
            if request(http, method, url).status_code not in (404, 405):
                pending[url] = False
    unreached = [u for u, missing in pending.items() if missing]
    assert not unreached, f"the owner could not reach these with the walker's ids: {unreached}"
