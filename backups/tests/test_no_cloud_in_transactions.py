"""No AWS call happens inside a database transaction, in any backup flow.

Every client the adapter builds gets a hook that fails the call if the
database connection is inside an atomic block. `transactional_db` so that
the test itself is not one big transaction.
"""

import hashlib
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from backups import services
from backups.models import Backup
from reclo_site.cloud import clients, credentials, storage

from . import vhds
from .conftest import START


class CloudInTransaction(AssertionError):
    pass


@pytest.fixture
def watched(monkeypatch):
    calls = []

    def client(service, **kwargs):
        made = clients.client(service, **kwargs)

        def check(model, **_):
            calls.append(model.name)
            if connection.in_atomic_block:
                raise CloudInTransaction(f"{service}.{model.name} called inside a database transaction")

        made.meta.events.register("before-call.*.*", check)
        return made

    monkeypatch.setattr(storage, "client", client)
    monkeypatch.setattr(credentials, "client", client)
    return calls


def test_no_flow_calls_aws_inside_a_transaction(transactional_db, user, api, aws, watched, settings):
    settings.RECLO_RETENTION_KEEP = 1

    def upload(data, **extra):
        started = api.post("/api/v1/backups/uploads", {**START, **extra}, format="json").json()
        api.post(f"/api/v1/backups/uploads/{started['upload_id']}/credentials")
        storage.put_object(started["key"], data)
        body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        response = api.post(f"/api/v1/backups/uploads/{started['upload_id']}/complete", body, format="json")
        assert response.status_code == 202, response.json()
        return Backup.objects.get(pk=started["upload_id"])

    raw = vhds.raw_disk(1)
    data, info = vhds.full(raw)
    full = upload(data, kind="full")
    assert full.status == "verified", full.failure  # verified after commit (eager task)
    new = vhds.changed(raw, 2)
    data, _ = vhds.incremental(raw, new, info)
    child = upload(data, kind="incremental", parent_id=str(full.pk))
    child.refresh_from_db()
    assert (child.status, child.kind) == ("verified", "full")  # retention merged the full into it

    assert api.post(f"/api/v1/backups/{child.pk}/download").status_code == 200
    services.backup_scrub(backup_id=child.pk)
    services.uploads_clean_up()
    services.objects_purge()
    # Locked: hidden and scheduled, undeleted, hidden again; the purge once the row says the lock ended
    # (moto's lock, in real time, still refuses: the row stays for the next run).
    assert api.delete(f"/api/v1/backups/{child.pk}").status_code == 202
    assert api.post(f"/api/v1/backups/{child.pk}/undelete").status_code == 200
    assert api.delete(f"/api/v1/backups/{child.pk}").status_code == 202
    Backup.objects.filter(pk=child.pk).update(locked_until=timezone.now() - timedelta(seconds=1))
    assert services.backups_purge() == 0
    expected = {"GetFederationToken", "HeadObject", "GetObject", "CreateMultipartUpload", "PutObjectRetention"}
    assert expected | {"ListObjectVersions", "DeleteObjects"} <= set(watched)


def test_the_watch_catches_a_call_inside_a_transaction(transactional_db, aws, watched):
    from django.db import transaction

    with pytest.raises(CloudInTransaction), transaction.atomic():
        storage.put_object("backups/1/x", b"x")
