"""Restore points nobody can change or wipe: pinned versions, Object Lock, deletion under lock.

Each attack of issue 11 is a test here: the object written over after
verification (the restore must write the verified disk), a delete or
overwrite with the portal's own credentials, a deletion while a failover
runs. moto enforces Object Lock (in real time, so a lock set now cannot be
made to end inside a test: rows that must look expired get a past
`locked_until` and objects that were never locked).
"""

import hashlib
from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from reclo_agent import restore as agent_restore
from reclo_agent.errors import VerificationFailed
from reclo_agent.progress import Reporter

from accounts.models import AuditEvent
from backups import services
from backups.models import AccountLimits, Backup
from reclo_site import cloud
from reclo_site.cloud import clients, storage
from recovery.models import Recovery

from . import vhds

pytestmark = pytest.mark.django_db

LIST = "/api/v1/backups"


class PortalThroughApi:
    """The agent's portal client, answered by the real API view (in-process, moto behind it)."""

    def __init__(self, api):
        self.api = api

    def download(self, backup_id):
        response = self.api.post(f"{LIST}/{backup_id}/download")
        assert response.status_code == 200, response.json()
        return response.json()


@pytest.fixture
def verified(upload):
    """A full restore point uploaded through the API and verified (so locked); (backup, raw disk)."""
    raw = vhds.raw_disk(5)
    data, _ = vhds.full(raw)
    response = upload(data)
    assert response.status_code == 202, response.json()
    backup = Backup.objects.get(pk=response.json()["backup"]["backup_id"])
    assert backup.status == "verified", backup.failure
    return backup, bytes(raw)


def forged_over(backup):
    """Write another valid VHD over the restore point's key, as its upload credentials could."""
    data, _ = vhds.full(vhds.raw_disk(77))
    storage.put_object(backup.key, data)
    return data


def restore_to(api, backup, path):
    agent_restore.restore(PortalThroughApi(api), str(backup.pk), str(path), Reporter(quiet=True))
    return path.read_bytes()


# --- pinned versions --------------------------------------------------------------------------


def test_verification_records_the_version_and_etag_it_read(verified):
    backup, _ = verified
    stored = storage.head_object(backup.key)
    assert backup.version_id and backup.version_id == stored["version_id"]
    assert backup.etag == stored["etag"]


def test_the_download_chain_names_the_verified_version(api, verified):
    backup, _ = verified
    (entry,) = api.post(f"{LIST}/{backup.pk}/download").json()["chain"]
    assert (entry["version_id"], entry["etag"]) == (backup.version_id, backup.etag)


def test_a_restore_after_the_object_was_written_over_writes_the_verified_disk(api, verified, tmp_path):
    backup, raw = verified
    forged_over(backup)
    assert restore_to(api, backup, tmp_path / "disk.img") == raw


def test_a_restore_refuses_an_object_changed_under_its_etag_pin(api, verified, tmp_path):
    backup, _ = verified
    Backup.objects.filter(pk=backup.pk).update(version_id="")  # as verified on an unversioned bucket
    forged_over(backup)
    with pytest.raises(VerificationFailed, match="not the version the portal verified"):
        restore_to(api, backup, tmp_path / "disk.img")


# --- Object Lock ------------------------------------------------------------------------------


def test_setup_makes_the_bucket_versioned_with_object_lock(aws):
    s3 = clients.client("s3")
    assert s3.get_bucket_versioning(Bucket="reclo-test")["Status"] == "Enabled"
    config = s3.get_object_lock_configuration(Bucket="reclo-test")["ObjectLockConfiguration"]
    assert config["ObjectLockEnabled"] == "Enabled"
    storage.ensure_bucket()  # idempotent, also on a bucket that holds objects now


def test_a_verified_version_is_locked_in_compliance_mode_for_the_accounts_period(verified):
    backup, _ = verified
    stored = storage.head_object(backup.key, version_id=backup.version_id)
    assert stored["lock_mode"] == "COMPLIANCE"
    assert stored["locked_until"] == backup.locked_until
    assert timedelta(days=29, hours=23) < backup.locked_until - timezone.now() <= timedelta(days=30)


def test_the_lock_period_is_an_account_setting(user, upload, settings):
    settings.RECLO_LOCK_DAYS = 9
    assert services.lock_period(user) == timedelta(days=9)
    AccountLimits.objects.create(user=user, lock_days=60)
    data, _ = vhds.full(vhds.raw_disk(6))
    backup = Backup.objects.get(pk=upload(data).json()["backup"]["backup_id"])
    assert timedelta(days=59, hours=23) < backup.locked_until - timezone.now() <= timedelta(days=60)


def test_the_portals_own_credentials_cannot_delete_a_locked_version(verified):
    backup, raw = verified
    with pytest.raises(storage.ObjectLocked):
        storage.delete_object(backup.key)
    # Not even with the governance bypass header: the lock is in compliance mode.
    s3 = clients.client("s3")
    with pytest.raises(Exception, match="AccessDenied"):
        s3.delete_object(
            Bucket="reclo-test", Key=backup.key, VersionId=backup.version_id, BypassGovernanceRetention=True
        )
    with storage.ObjectReader(backup.key, **backup.pinned) as reader:
        assert hashlib.sha256(reader.read()).hexdigest() == backup.sha256


def test_an_overwrite_with_the_portals_credentials_leaves_the_locked_version_as_it_was(verified):
    backup, _ = verified
    forged = forged_over(backup)
    assert storage.head_object(backup.key)["etag"] != backup.etag  # the key now shows the forgery...
    with storage.ObjectReader(backup.key, **backup.pinned) as reader:  # ...the verified version is intact
        data = reader.read()
    assert data != forged and hashlib.sha256(data).hexdigest() == backup.sha256


def test_the_lock_is_only_ever_extended(verified):
    # Real S3 refuses to shorten a compliance lock; moto would allow it, so the adapter never asks.
    backup, _ = verified
    sooner = backup.locked_until - timedelta(days=10)
    assert storage.lock_version(backup.key, backup.version_id, sooner) == backup.locked_until
    assert storage.head_object(backup.key, version_id=backup.version_id)["locked_until"] == backup.locked_until


# --- deleting under lock ----------------------------------------------------------------------


def test_deleting_a_locked_restore_point_hides_it_and_keeps_the_object(api, verified):
    backup, _ = verified
    response = api.delete(f"{LIST}/{backup.pk}")
    assert response.status_code == 202
    body = response.json()
    until = datetime.fromisoformat(body["locked_until"].replace("Z", "+00:00"))
    assert abs(until - backup.locked_until) < timedelta(seconds=1)
    assert body["scheduled"] == [str(backup.pk)] and "locked until" in body["message"]
    assert api.get(f"{LIST}/{backup.pk}").status_code == 404
    assert api.get(LIST).json()["backups"] == []
    assert api.post(f"{LIST}/{backup.pk}/download").status_code == 404
    assert storage.head_object(backup.key, version_id=backup.version_id)["size"] == backup.file_size
    assert api.delete(f"{LIST}/{backup.pk}").status_code == 202  # idempotent


def test_undelete_brings_it_back_until_the_lock_ends(api, verified):
    backup, _ = verified
    api.delete(f"{LIST}/{backup.pk}")
    response = api.post(f"{LIST}/{backup.pk}/undelete")
    assert response.status_code == 200
    assert response.json()["backup"]["status"] == "verified"
    assert api.get(f"{LIST}/{backup.pk}").status_code == 200
    assert api.post(f"{LIST}/{backup.pk}/undelete").status_code == 200  # idempotent


def test_undelete_after_the_lock_ended_answers_316(api, verified):
    backup, _ = verified
    api.delete(f"{LIST}/{backup.pk}")
    Backup.objects.filter(pk=backup.pk).update(locked_until=timezone.now() - timedelta(minutes=1))
    response = api.post(f"{LIST}/{backup.pk}/undelete")
    assert (response.status_code, response.json()["error"]) == (409, 316)


def test_the_purge_removes_what_is_due_and_only_that(disk, api, user):
    due = disk.full(seed=1)
    kept = disk.full(seed=2)
    past, future = timezone.now() - timedelta(minutes=1), timezone.now() + timedelta(days=3)
    Backup.objects.filter(pk=due.pk).update(deleted_at=timezone.now(), locked_until=past)
    Backup.objects.filter(pk=kept.pk).update(deleted_at=timezone.now(), locked_until=future)
    assert services.backups_purge() == 1
    assert services.backups_purge() == 0  # idempotent
    assert set(Backup.objects.values_list("pk", flat=True)) == {kept.pk}
    with pytest.raises(cloud.ObjectNotFound):
        storage.head_object(due.key)
    assert storage.head_object(kept.key)
    assert AuditEvent.objects.filter(details__backup_id=str(due.pk), details__purged=True).exists()
    response = api.post(f"{LIST}/{due.pk}/undelete")
    assert (response.status_code, response.json()["error"]) == (409, 316)


def test_the_purge_removes_a_hidden_chain_newest_first_in_bounded_batches(disk, monkeypatch):
    from backups.services import lifecycle

    chain = [disk.full(), disk.incremental(2), disk.incremental(3)]
    Backup.objects.update(deleted_at=timezone.now(), locked_until=timezone.now() - timedelta(minutes=1))
    monkeypatch.setattr(lifecycle, "PURGE_BATCH", 2)
    assert services.backups_purge() == 2
    assert list(Backup.objects.values_list("pk", flat=True)) == [chain[0].pk]
    assert services.backups_purge() == 1
    assert not Backup.objects.exists()


def test_undelete_of_another_tenants_restore_point_is_404(other_api, api, verified):
    backup, _ = verified
    api.delete(f"{LIST}/{backup.pk}")
    response = other_api.post(f"{LIST}/{backup.pk}/undelete")
    assert (response.status_code, response.json()["error"]) == (404, 309)


def test_undelete_needs_a_valid_token(anon_api, verified):
    backup, _ = verified
    response = anon_api.post(f"{LIST}/{backup.pk}/undelete", HTTP_AUTHORIZATION="Token " + "x" * 32)
    assert (response.status_code, response.json()["error"]) == (401, 102)


def test_undelete_of_an_id_that_is_not_a_uuid_is_404(api, aws):
    assert api.post(f"{LIST}/not-a-uuid/undelete").status_code == 404


def test_an_incremental_does_not_build_on_a_hidden_restore_point(api, verified):
    backup, _ = verified
    api.delete(f"{LIST}/{backup.pk}")
    body = {"server": "fileserver", "disk": "sda", "file_name": "x.vhd.zst", "virtual_size": vhds.DISK_SIZE}
    response = api.post(f"{LIST}/uploads", {**body, "kind": "incremental", "parent_id": str(backup.pk)}, format="json")
    assert (response.status_code, response.json()["error"]) == (409, 312)


# --- in use by a failover ---------------------------------------------------------------------


def test_a_restore_point_a_running_failover_uses_cannot_be_deleted(api, disk, user):
    full = disk.full()
    top = disk.incremental(2)
    Recovery.objects.create(user=user, server=disk.server, server_name=disk.server.name, backup=top,
                            backup_ref=top.pk, disk="sda", virtual_size=top.virtual_size, instance_type="t3.medium",
                            import_method="ebs_direct", status="consolidating")  # fmt: skip
    for target in (top, full):
        response = api.delete(f"{LIST}/{target.pk}?cascade=true")
        assert (response.status_code, response.json()["error"]) == (409, 311)
        assert "failover of fileserver" in response.json()["message"]
    assert Backup.objects.filter(status="verified").count() == 2
    Recovery.objects.update(status="ready")
    assert api.delete(f"{LIST}/{top.pk}").status_code == 200


def test_retention_leaves_a_full_a_running_failover_uses(disk, user, settings):
    settings.RECLO_RETENTION_KEEP = 1
    full = disk.full()
    disk.incremental(2)
    Recovery.objects.create(user=user, server=disk.server, server_name=disk.server.name, backup=full,
                            backup_ref=full.pk, disk="sda", virtual_size=full.virtual_size, instance_type="t3.medium",
                            import_method="ebs_direct", status="importing")  # fmt: skip
    assert services.retention_apply(server_id=disk.server.pk, disk="sda") == ""
    assert Backup.objects.filter(pk=full.pk, status="verified").exists()
    Recovery.objects.update(status="ready")
    assert services.retention_apply(server_id=disk.server.pk, disk="sda") == "merged"


def test_a_delete_that_races_the_lock_removes_the_row_and_leaves_the_object_to_the_purge(api, verified):
    from backups.models import ObjectDeletion

    backup, _ = verified
    Backup.objects.filter(pk=backup.pk).update(locked_until=None)  # as read before the verdict was saved
    assert api.delete(f"{LIST}/{backup.pk}").status_code == 200
    assert not Backup.objects.filter(pk=backup.pk).exists()
    assert ObjectDeletion.objects.get(key=backup.key).not_before > timezone.now()
    assert storage.head_object(backup.key, version_id=backup.version_id)  # S3 still keeps it
