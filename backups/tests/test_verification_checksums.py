"""The verdict by checksums: S3's composite checksum against the declared parts, and the metadata.

moto computes the composite SHA-256 of a multipart upload made with
ChecksumAlgorithm=SHA256 from the parts' bytes (as S3 does), and returns it
from GetObjectAttributes; it checks no part's checksum on arrival and does
not return ObjectParts. So the refusal of a part count that differs uses
botocore's Stubber for GetObjectAttributes (the answer AWS documents:
ChecksumSHA256 without "-N", ChecksumType COMPOSITE, ObjectParts'
TotalPartsCount), every other call going to moto.
"""

import base64
import hashlib
import io
import random

import boto3
import pytest
from botocore.stub import Stubber
from reclo_agent import vhd

from backups.models import Backup
from reclo_site.cloud import storage

from . import vhds
from .conftest import START

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024
PART = 5 * MiB


def multipart(key: str, data: bytes, *, checksums: bool = True) -> list[str]:
    """Store `data` as a multipart upload of 5 MiB parts; the parts' hex SHA-256s."""
    s3 = boto3.client("s3", region_name="us-east-1")
    extra = {"ChecksumAlgorithm": "SHA256"} if checksums else {}
    upload_id = s3.create_multipart_upload(Bucket=storage.bucket_name(), Key=key, **extra)["UploadId"]
    parts, digests = [], []
    for number, at in enumerate(range(0, len(data), PART), start=1):
        body = data[at : at + PART]
        resp = s3.upload_part(Bucket=storage.bucket_name(), Key=key, UploadId=upload_id, PartNumber=number,
                              Body=body, **extra)  # fmt: skip
        part = {"PartNumber": number, "ETag": resp["ETag"]}
        if checksums:
            part["ChecksumSHA256"] = resp["ChecksumSHA256"]
        parts.append(part)
        digests.append(hashlib.sha256(body).hexdigest())
    s3.complete_multipart_upload(Bucket=storage.bucket_name(), Key=key, UploadId=upload_id,
                                 MultipartUpload={"Parts": parts})  # fmt: skip
    return digests


SIZE = 16 * MiB


def random_disk(seed: int) -> bytes:
    """Random (incompressible) but for one zero block: its restore point takes three 5 MiB parts."""
    disk = bytearray(random.Random(seed).randbytes(SIZE))
    disk[2 * MiB : 4 * MiB] = bytes(2 * MiB)
    return bytes(disk)


@pytest.fixture
def stored():
    """A full restore point of three parts."""
    data, info = vhds.full(random_disk(3))
    assert 2 * PART < len(data) <= 3 * PART
    return data, info


@pytest.fixture
def complete(api, aws, on_commit):
    def do(data: bytes, *, checksums: bool = True, declare=None):
        started = api.post("/api/v1/backups/uploads", {**START, "kind": "full", "virtual_size": SIZE}, format="json")
        started = started.json()
        digests = multipart(started["key"], data, checksums=checksums)
        body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "part_sha256": digests if declare is None else declare(digests)}  # fmt: skip
        with on_commit():
            response = api.post(f"/api/v1/backups/uploads/{started['upload_id']}/complete", body, format="json")
        assert response.status_code == 202, response.json()
        return Backup.objects.get(pk=started["upload_id"])

    return do


@pytest.fixture
def no_full_read(monkeypatch):
    """Fail if the verifier decompresses every frame (the whole-object read)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the whole object was read")

    monkeypatch.setattr(vhd, "check_seekable", refuse)


def test_declared_part_checksums_verify_without_reading_the_whole_object(complete, stored, no_full_read):
    data, info = stored
    backup = complete(data)
    assert backup.status == "verified", backup.failure
    assert backup.vhd_unique_id == info.unique_id and backup.part_checksum.endswith("-3")


def test_a_part_that_is_not_the_declared_one_fails_the_backup(complete, stored, no_full_read):
    data, _ = stored
    backup = complete(data, declare=lambda digests: [digests[0], "ab" * 32, *digests[2:]])
    assert backup.status == "failed"
    assert "declared part checksums" in backup.failure


def test_a_missing_part_fails_the_backup(complete, stored, no_full_read):
    data, _ = stored
    backup = complete(data, declare=lambda digests: digests[:2])
    assert backup.status == "failed" and "checksum" in backup.failure


def test_an_object_without_checksums_is_read_whole(complete, stored):
    data, info = stored
    backup = complete(data, checksums=False)
    assert backup.status == "verified", backup.failure


def test_the_structure_is_still_checked(complete, no_full_read):
    out = io.BytesIO()
    vhd.compress_seekable(io.BytesIO(random_disk(4)), out)
    backup = complete(out.getvalue())  # the checksums are right, but it is a raw disk, not a VHD
    assert backup.status == "failed" and "Not a valid restore point" in backup.failure


def test_malformed_part_checksums_are_refused(api, aws):
    started = api.post("/api/v1/backups/uploads", {**START, "kind": "full"}, format="json").json()
    for bad in (["xyz"], "abc", [1, 2], []):
        response = api.post(f"/api/v1/backups/uploads/{started['upload_id']}/complete",
                            {"file_size": 10, "sha256": "a" * 64, "part_sha256": bad}, format="json")  # fmt: skip
        assert (response.status_code, response.json()["error"]) == (400, 104), bad


class _Mixed:
    """The storage client: GetObjectAttributes from the stubbed client, everything else from moto."""

    def __init__(self, real, stubbed):
        self._real, self._stubbed = real, stubbed

    def __getattr__(self, name):
        return getattr(self._stubbed if name == "get_object_attributes" else self._real, name)


def test_a_part_count_in_storage_that_differs_fails_the_backup(complete, stored, monkeypatch, no_full_read):
    data, _ = stored
    digests = [hashlib.sha256(data[at : at + PART]).digest() for at in range(0, len(data), PART)]
    composite = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    stubbed = boto3.client("s3", region_name="us-east-1")
    stubber = Stubber(stubbed)
    # What AWS answers: the composite without its "-N", and the part count apart (here 4, not 3).
    stubber.add_response(
        "get_object_attributes",
        {
            "Checksum": {"ChecksumSHA256": composite, "ChecksumType": "COMPOSITE"},
            "ObjectParts": {"TotalPartsCount": 4},
            "ObjectSize": len(data),
            "ETag": "",
        },  # fmt: skip
    )
    stubber.activate()
    real = storage.client

    def client(service):
        return _Mixed(real(service), stubbed) if service == "s3" else real(service)

    monkeypatch.setattr(storage, "client", client)
    backup = complete(data)
    assert backup.status == "failed"
    assert "4 parts in storage; 3 were declared" in backup.failure
    stubber.assert_no_pending_responses()
