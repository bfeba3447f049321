"""The worker's verification of uploads, with real VHDs made by the agent package."""

import hashlib
import io
import os

import pytest
from reclo_agent import vhd

from backups import services
from backups.models import Backup
from reclo_site import cloud
from reclo_site.cloud import clients, storage

from . import vhds

pytestmark = pytest.mark.django_db


def object_gone(key: str) -> bool:
    try:
        storage.head_object(key)
    except cloud.ObjectNotFound:
        return True
    return False


@pytest.fixture
def base(upload):
    """A verified full restore point uploaded through the API, with its disk image and VHD info."""
    raw = vhds.raw_disk(1)
    data, info = vhds.full(raw)
    response = upload(data)
    assert response.json()["backup"]["status"] == "verifying"  # as answered, before the worker ran
    backup = Backup.objects.get()
    assert backup.status == "verified", backup.failure
    return backup, raw, info


def test_a_valid_full_backup_is_verified(base):
    backup, _, info = base
    assert backup.vhd_unique_id == info.unique_id
    assert backup.verified_at is not None and backup.failure == ""


def test_a_valid_incremental_on_it_is_verified(upload, base):
    parent, raw, info = base
    data, child_info = vhds.incremental(raw, vhds.changed(raw, 2), info)
    response = upload(data, kind="incremental", parent_id=parent.pk, file_name="sda-2.vhd.zst")
    backup = Backup.objects.get(pk=response.json()["backup"]["backup_id"])
    assert (backup.status, backup.parent, backup.vhd_unique_id) == ("verified", parent, child_info.unique_id)


def test_a_wrong_sha256_fails_and_the_object_is_deleted(upload):
    data, _ = vhds.full(vhds.raw_disk(1))
    upload(data, sha256="0" * 64)
    backup = Backup.objects.get()
    assert backup.status == "failed"
    assert "SHA-256" in backup.failure and hashlib.sha256(data).hexdigest() in backup.failure
    assert object_gone(backup.key)


def test_a_wrong_size_fails_at_once(upload):
    data, _ = vhds.full(vhds.raw_disk(1))
    response = upload(data, file_size=len(data) - 1)
    assert (response.status_code, response.json()["error"]) == (422, 307)
    backup = Backup.objects.get()
    assert backup.status == "failed" and object_gone(backup.key)


@pytest.mark.parametrize(
    ("what", "make"),
    [
        ("random bytes", lambda: os.urandom(50_000)),
        ("seekable zstd of a raw disk", lambda: _seekable(bytes(vhds.raw_disk(1)))),
        ("an uncompressed VHD", lambda: _uncompressed_vhd()),
        ("a VHD with a broken footer checksum", lambda: _seekable(_broken_footer())),
    ],
)
def test_a_file_that_is_not_a_valid_vhd_fails(upload, what, make):
    upload(make())
    backup = Backup.objects.get()
    assert backup.status == "failed", what
    assert backup.failure.startswith("Not a valid restore point"), backup.failure
    assert object_gone(backup.key)


def _seekable(raw: bytes) -> bytes:
    out = io.BytesIO()
    vhd.compress_seekable(io.BytesIO(raw), out)
    return out.getvalue()


def _uncompressed_vhd() -> bytes:
    out = io.BytesIO()
    vhd.write_dynamic_from_raw(io.BytesIO(bytes(vhds.raw_disk(1))), out)
    return out.getvalue()


def _broken_footer() -> bytes:
    data = bytearray(_uncompressed_vhd())
    data[-512 + 64] ^= 0xFF  # the footer's checksum
    return bytes(data)


def test_a_decompression_bomb_is_refused_before_it_is_read(upload):
    vhd_bytes = _uncompressed_vhd()
    padding = services.verification.max_vhd_size(vhds.DISK_SIZE)  # zeros, before the final footer
    upload(_seekable(vhd_bytes[:-512] + bytes(padding) + vhd_bytes[-512:]))
    backup = Backup.objects.get()
    assert backup.status == "failed" and "far more than" in backup.failure


def test_a_header_declaring_absurdly_many_blocks_is_refused_from_the_header(upload, settings):
    """128 GiB of 4 KiB blocks in a few KB: refused before its 128 MiB BAT is read."""
    data = vhds.crafted_empty(128 * 1024**3, 4096)
    assert len(data) < 16 * 1024
    upload(data, virtual_size=128 * 1024**3)
    backup = Backup.objects.get()
    assert backup.status == "failed"
    assert "declares 33554432 blocks of 4096 bytes: more than the 4194304 allowed" in backup.failure


def test_the_largest_disk_at_the_agents_block_size_is_verified(upload):
    """The limit leaves real declarations alone: an empty 2040 GiB disk of 2 MiB blocks."""
    data = vhds.crafted_empty(2040 * 1024**3, vhds.BLOCK)
    upload(data, virtual_size=2040 * 1024**3)
    backup = Backup.objects.get()
    assert backup.status == "verified", backup.failure


def test_a_full_that_is_a_differencing_vhd_fails(upload, base):
    _, raw, info = base
    data, _ = vhds.incremental(raw, vhds.changed(raw, 2), info)
    upload(data, kind="full", file_name="sda-2.vhd.zst")
    failed = Backup.objects.get(status="failed")
    assert "must be a dynamic VHD" in failed.failure


def test_a_differencing_vhd_whose_parent_id_does_not_match_fails(upload, base):
    parent, raw, _ = base
    _, stranger = vhds.full(raw)  # the same disk, but another VHD: another unique id
    data, _ = vhds.incremental(raw, vhds.changed(raw, 2), stranger)
    upload(data, kind="incremental", parent_id=parent.pk)
    failed = Backup.objects.get(status="failed")
    assert "does not match the parent backup's VHD id" in failed.failure
    assert object_gone(failed.key)


def test_a_virtual_size_that_differs_from_the_declared_one_fails(upload):
    data, _ = vhds.full(vhds.raw_disk(1, size=4 * vhds.BLOCK))
    upload(data)  # declared: three blocks
    assert "virtual size" in Backup.objects.get().failure


def test_an_object_gone_before_the_worker_reads_it_fails(api, aws, django_capture_on_commit_callbacks):
    data, _ = vhds.full(vhds.raw_disk(1))
    response = api.post("/api/v1/backups/uploads", {**_start(), "kind": "full"}, format="json").json()
    storage.put_object(response["key"], data)
    with django_capture_on_commit_callbacks() as callbacks:
        body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        api.post(f"/api/v1/backups/uploads/{response['upload_id']}/complete", body, format="json")
    storage.delete_object(response["key"])
    for callback in callbacks:
        callback()
    backup = Backup.objects.get()
    assert (backup.status, backup.failure) == ("failed", "The object is not in storage.")


def _start():
    from .conftest import START

    return START


def test_a_second_complete_returns_the_verdict(api, upload):
    data, _ = vhds.full(vhds.raw_disk(1))
    first = upload(data)
    backup = Backup.objects.get()
    again = api.post(f"/api/v1/backups/uploads/{backup.pk}/complete", {}, format="json")
    assert again.status_code == 202
    assert again.json()["backup"]["status"] == "verified"
    assert again.json()["backup"]["backup_id"] == first.json()["backup"]["backup_id"]
    assert again.json()["message"] == "The backup is verified."


def test_a_second_complete_of_a_failed_backup_reports_the_failure(api, upload):
    upload(os.urandom(1000))
    backup = Backup.objects.get()
    again = api.post(f"/api/v1/backups/uploads/{backup.pk}/complete", {}, format="json").json()["backup"]
    assert again["status"] == "failed" and again["failure"].startswith("Not a valid restore point")


def test_of_two_incrementals_on_one_parent_only_the_first_verified_stands(api, aws, base, on_commit):
    parent, raw, info = base
    started = []
    for seed in (2, 3):
        data, _ = vhds.incremental(raw, vhds.changed(raw, seed), info)
        body = {**_start(), "kind": "incremental", "parent_id": str(parent.pk)}
        response = api.post("/api/v1/backups/uploads", body, format="json").json()
        storage.put_object(response["key"], data)
        started.append((response, data))
    for response, data in started:
        with on_commit():
            body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            api.post(f"/api/v1/backups/uploads/{response['upload_id']}/complete", body, format="json")
    first, second = (Backup.objects.get(pk=r["upload_id"]) for r, _ in started)
    assert first.status == "verified"
    assert second.status == "failed" and "verified first" in second.failure


def test_a_storage_outage_leaves_the_backup_verifying_for_a_retry(api, aws, monkeypatch):
    data, _ = vhds.full(vhds.raw_disk(1))
    response = api.post("/api/v1/backups/uploads", {**_start(), "kind": "full"}, format="json").json()
    storage.put_object(response["key"], data)
    Backup.objects.filter(pk=response["upload_id"]).update(
        status="verifying", file_size=len(data), sha256=hashlib.sha256(data).hexdigest()
    )

    def outage(key, **kwargs):
        raise cloud.CloudUnavailable("read: SlowDown", "SlowDown")

    monkeypatch.setattr(storage, "ObjectReader", outage)
    with pytest.raises(cloud.CloudUnavailable):
        services.backup_verify(backup_id=response["upload_id"])
    assert Backup.objects.get().status == "verifying"


def test_verifying_twice_does_nothing_the_second_time(base):
    backup, _, _ = base
    assert services.backup_verify(backup_id=backup.pk).status == "verified"


class TestStorageClass:
    """An agent that picks GLACIER (or any class but STANDARD) gets a verdict, never an endless `verifying`."""

    def started(self, api, data: bytes, storage_class: str) -> dict:
        response = api.post("/api/v1/backups/uploads", {**_start(), "kind": "full"}, format="json").json()
        # What the agent's own client would do with StorageClass=...: moto stores the class as S3 does.
        clients.client("s3").put_object(
            Bucket=storage.bucket_name(), Key=response["key"], Body=data, StorageClass=storage_class
        )
        return response

    @pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE", "STANDARD_IA"])
    def test_complete_refuses_it_at_once_with_307(self, api, aws, storage_class):
        data, _ = vhds.full(vhds.raw_disk(1))
        started = self.started(api, data, storage_class)
        body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        response = api.post(f"/api/v1/backups/uploads/{started['upload_id']}/complete", body, format="json")
        assert (response.status_code, response.json()["error"]) == (422, 307)
        assert storage_class in response.json()["message"] and "STANDARD" in response.json()["message"]
        backup = Backup.objects.get()
        assert backup.status == "failed" and storage_class in backup.failure
        assert object_gone(backup.key)

    def test_the_verifier_fails_it_with_the_reason_instead_of_retrying_forever(self, api, aws):
        # The class changed after complete looked (or complete ran before this check existed).
        data, _ = vhds.full(vhds.raw_disk(1))
        started = self.started(api, data, "GLACIER")
        Backup.objects.filter(pk=started["upload_id"]).update(
            status="verifying", file_size=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
        backup = services.backup_verify(backup_id=started["upload_id"])
        assert backup.status == "failed"
        assert backup.failure.startswith("The object was stored in the GLACIER storage class")

    def test_a_standard_object_is_verified(self, api, aws, on_commit):
        data, _ = vhds.full(vhds.raw_disk(1))
        started = self.started(api, data, "STANDARD")
        body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        with on_commit():
            api.post(f"/api/v1/backups/uploads/{started['upload_id']}/complete", body, format="json")
        assert Backup.objects.get().status == "verified"

    def test_reading_an_archived_object_is_object_archived(self, aws):
        s3 = clients.client("s3")
        s3.put_object(Bucket=storage.bucket_name(), Key="cold", Body=b"x" * 100, StorageClass="GLACIER")
        reader = storage.ObjectReader("cold")
        assert reader.storage_class == "GLACIER"
        with pytest.raises(cloud.ObjectArchived) as caught:
            reader.read(10)
        assert caught.value.storage_class == "GLACIER"
