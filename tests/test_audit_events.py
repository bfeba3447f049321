"""The audit log records the backup and recovery events with user, address and request id."""

import json

import pytest

from accounts.models import AuditEvent
from recovery.tests.factories import MiB, ServerFactory, backup_chain, recovered_instance

pytestmark = pytest.mark.django_db

ADDRESS = {"REMOTE_ADDR": "198.51.100.23", "HTTP_X_REQUEST_ID": "req-audit-0001"}


@pytest.fixture(autouse=True)
def _proxy_sets_request_ids(settings):
    """As behind nginx setting X-Request-ID: the header is the request id."""
    settings.RECLO_TRUST_REQUEST_ID = True


def events(user, kind):
    return list(AuditEvent.objects.filter(user=user, kind=kind))


def test_upload_credentials_issued_are_recorded(api, user, aws):
    body = {"server": "front-desk", "disk": "sda", "file_name": "sda.vhd.zst", "virtual_size": 8 * MiB, "kind": "full"}
    response = api.post("/api/v1/backups/uploads", body, format="json", **ADDRESS)
    assert response.status_code == 201
    (event,) = events(user, "upload.credentials")
    assert (event.address, event.request_id) == ("198.51.100.23", "req-audit-0001")
    assert event.details["backup_id"] == response.json()["upload_id"]
    assert event.details["object_key"] == response.json()["key"]
    # The credentials themselves never reach the log.
    stored = json.dumps(event.details)
    assert response.json()["credentials"]["SecretAccessKey"] not in stored
    assert response.json()["credentials"]["SessionToken"] not in stored


def test_deleted_backups_are_recorded(api, user, aws):
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user), size=8 * MiB, incrementals=1)
    assert api.delete(f"/api/v1/backups/{backups[0].pk}?cascade=true", **ADDRESS).status_code == 200
    deleted = events(user, "backup.deleted")
    assert {e.details["backup_id"] for e in deleted} == {str(b.pk) for b in backups}
    assert all(e.address == "198.51.100.23" for e in deleted)


def test_failover_started_is_recorded(api, user, aws):
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user), size=8 * MiB, incrementals=0)
    response = api.post("/api/v1/recoveries", {"backup_id": str(backups[-1].pk)}, format="json", **ADDRESS)
    assert response.status_code == 202
    (event,) = events(user, "failover.started")
    assert event.details["recovery_id"] == response.json()["recovery_id"]
    assert event.request_id == "req-audit-0001"


def test_instance_stopped_started_and_terminated_are_recorded(api, user, aws):
    instance = recovered_instance(user=user)
    url = f"/api/v1/instances/{instance.instance_id}"
    assert api.post(f"{url}/stop", **ADDRESS).status_code == 202
    from recovery.models import Instance

    Instance.objects.filter(pk=instance.pk).update(state="stopped")  # moto settles at once; skip the watcher
    assert api.post(f"{url}/start", **ADDRESS).status_code == 202
    Instance.objects.filter(pk=instance.pk).update(state="running")
    assert api.delete(url, **ADDRESS).status_code == 202
    kinds = [e.kind for e in AuditEvent.objects.filter(user=user, kind__startswith="instance.").order_by("id")]
    assert kinds == ["instance.stopped", "instance.started", "instance.terminated"]
    assert {e.details["instance_id"] for e in events(user, "instance.stopped")} == {instance.instance_id}


def test_an_outsiders_attempts_leave_no_event_on_the_owners_account(other_api, user, aws):
    instance = recovered_instance(user=user)
    other_api.post(f"/api/v1/instances/{instance.instance_id}/stop")
    other_api.delete(f"/api/v1/instances/{instance.instance_id}")
    assert not AuditEvent.objects.filter(user=user, kind__startswith="instance.").exists()
