"""The S3 side of the cloud adapter that backups use, against moto."""

import hashlib
import os
from datetime import UTC, datetime, timedelta

import pytest

from reclo_site import cloud
from reclo_site.cloud import clients, storage

MiB = 1024 * 1024


def test_the_bucket_is_private_encrypted_and_drops_abandoned_uploads(aws):
    storage.ensure_bucket()  # a second time: idempotent
    s3 = clients.client("s3")
    block = s3.get_public_access_block(Bucket="reclo-test")["PublicAccessBlockConfiguration"]
    assert block == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    rules = s3.get_bucket_encryption(Bucket="reclo-test")["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    ownership = s3.get_bucket_ownership_controls(Bucket="reclo-test")["OwnershipControls"]["Rules"]
    assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    (lifecycle,) = s3.get_bucket_lifecycle_configuration(Bucket="reclo-test")["Rules"]
    assert lifecycle["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
    assert lifecycle["Filter"] == {"Prefix": "backups/"}


def test_objects_are_stored_encrypted(aws):
    storage.put_object("backups/1/x", b"data")
    assert clients.client("s3").head_object(Bucket="reclo-test", Key="backups/1/x")["ServerSideEncryption"] == "AES256"


@pytest.fixture
def blob(aws):
    data = os.urandom(5 * MiB + 123)
    storage.put_object("backups/1/blob", data)
    return data


def test_the_reader_seeks_and_reads_ranges(blob):
    with storage.ObjectReader("backups/1/blob", chunk_size=MiB) as reader:
        assert reader.seek(-9, 2) == len(blob) - 9
        assert reader.read(100) == blob[-9:]
        reader.seek(MiB - 5)
        assert reader.read(10) == blob[MiB - 5 : MiB + 5]
        assert reader.read(0) == b""
        reader.seek(0)
        assert reader.read() == blob


def test_it_hashes_what_it_reads_in_order_and_fetches_only_the_rest(blob):
    with storage.ObjectReader("backups/1/blob", chunk_size=MiB, sha256=True) as reader:
        reader.seek(-100, 2)
        reader.read(100)  # the last chunk first, as the seek table is read
        reader.seek(0)
        reader.read(2 * MiB + 10)
        before = reader.requests
        assert reader.sha256_hexdigest() == hashlib.sha256(blob).hexdigest()
        assert reader.requests == before + 1  # one streamed GET for the unread middle and the end


def test_a_reader_keeps_reading_the_version_it_opened(blob):
    with storage.ObjectReader("backups/1/blob", chunk_size=MiB) as reader:
        reader.read(10)
        storage.put_object("backups/1/blob", b"replaced")
        reader.seek(3 * MiB)
        assert reader.read(MiB) == blob[3 * MiB : 4 * MiB]


def test_a_reader_pinned_to_a_version_never_sees_what_was_written_later(blob):
    first = storage.head_object("backups/1/blob")
    storage.put_object("backups/1/blob", b"replaced")
    with storage.ObjectReader("backups/1/blob", version_id=first["version_id"], etag=first["etag"]) as reader:
        assert reader.read() == blob


def test_a_reader_pinned_to_an_etag_refuses_another_object(blob):
    first = storage.head_object("backups/1/blob")
    storage.put_object("backups/1/blob", b"replaced")
    with pytest.raises(storage.ObjectChanged, match="not the version that was verified"):
        storage.ObjectReader("backups/1/blob", etag=first["etag"])


def test_reading_an_object_that_changes_midway_fails_without_versions(blob):
    with storage.ObjectReader("backups/1/blob", chunk_size=MiB) as reader:
        reader.version_id = ""  # as on an unversioned bucket: only the ETag pins it
        reader.read(10)
        storage.put_object("backups/1/blob", b"replaced")
        reader.seek(3 * MiB)
        with pytest.raises(storage.ObjectChanged):
            reader.read(10)


def test_opening_a_missing_object_is_object_not_found(aws):
    with pytest.raises(cloud.ObjectNotFound):
        storage.ObjectReader("backups/1/missing")


def test_the_writer_sends_parts_and_completes(aws):
    data = os.urandom(11 * MiB)
    with storage.ObjectWriter("backups/1/out", part_size=5 * MiB) as writer:
        for start in range(0, len(data), 1_000_000):
            writer.write(data[start : start + 1_000_000])
    with storage.ObjectReader("backups/1/out") as reader:
        assert reader.read() == data
    assert writer.size == len(data)


def test_a_failed_write_leaves_no_object_and_no_upload(aws):
    with pytest.raises(RuntimeError), storage.ObjectWriter("backups/1/out", part_size=5 * MiB) as writer:
        writer.write(os.urandom(6 * MiB))
        raise RuntimeError("the merge broke")
    with pytest.raises(cloud.ObjectNotFound):
        storage.head_object("backups/1/out")
    assert storage.multipart_uploads(prefix="backups/") == []


def test_the_part_size_grows_so_huge_objects_fit_in_10000_parts(aws):
    writer = storage.ObjectWriter("backups/1/big", expected_size=4 * 1024**4)
    assert writer.part_size * 9900 >= 4 * 1024**4
    writer._sent = 2500  # parts handed out so far
    assert writer._next_part_size() == writer.part_size * 4
    writer.abort()


def test_stale_multipart_uploads_are_listed_and_aborted(aws):
    s3 = clients.client("s3")
    upload_id = s3.create_multipart_upload(Bucket="reclo-test", Key="backups/1/a")["UploadId"]
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert storage.multipart_uploads(prefix="backups/", initiated_before=later) == [("backups/1/a", upload_id)]
    # (moto reports every upload as initiated in 2010, so "too young" cannot be shown here.)
    assert storage.multipart_uploads(prefix="backups/", initiated_before=datetime(2000, 1, 1, tzinfo=UTC)) == []
    assert storage.multipart_uploads(prefix="backups/1/a", key="backups/1/a") == [("backups/1/a", upload_id)]
    storage.abort_multipart_upload("backups/1/a", upload_id)
    storage.abort_multipart_upload("backups/1/a", upload_id)  # already gone: fine
    assert storage.multipart_uploads(prefix="backups/") == []


def test_delete_objects_deletes_in_batches(aws):
    keys = [f"backups/1/k{n}" for n in range(3)]
    for key in keys:
        storage.put_object(key, b"x")
    storage.delete_objects(keys + ["backups/1/never-existed"])
    for key in keys:
        with pytest.raises(cloud.ObjectNotFound):
            storage.head_object(key)
