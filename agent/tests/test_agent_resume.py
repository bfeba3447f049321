"""Resuming an upload after the agent was killed: only the missing parts are sent.

A kill is simulated by failing the run after some parts (from inside the
upload threads, as a dying process would stop them); the state folder is
then exactly what a killed process leaves. The end-to-end test at the
repository root does the same with a real SIGKILL.
"""

import signal
import threading

import boto3
import pytest
from agent_helpers import BUCKET, FakePortal, make_image, scatter_writes
from botocore.stub import Stubber
from moto import mock_aws
from moto.s3.exceptions import NoSuchUpload
from moto.s3.models import S3Backend
from reclo_agent import s3 as s3_module
from reclo_agent.backup import BackupOptions, BackupRun
from reclo_agent.blockmap import MapStore
from reclo_agent.progress import Reporter
from reclo_agent.restore import restore
from reclo_agent.state import PartRecord, UploadState

MiB = 1024 * 1024
PART = 256 * 1024
QUIET = Reporter(quiet=True)


class Killed(Exception):
    """Stands for SIGKILL: the run stops where it is."""


@pytest.fixture
def portal(monkeypatch):
    # Small parts keep the test fast; S3 itself needs 5 MiB but moto lets us lower it.
    monkeypatch.setattr("moto.s3.models.S3_UPLOAD_PART_MIN_SIZE", 1024)
    with mock_aws():
        yield FakePortal()


def run(portal, state, source, **kw):
    options = BackupOptions(source, "srv1", "sda", poll_interval=0.01, part_size=PART, **kw)
    return BackupRun(portal, state, options, QUIET).run()


def kill_after_parts(monkeypatch, n: int) -> list[int]:
    """Make upload_part fail after ``n`` successful calls; returns the part numbers sent."""
    sent: list[int] = []
    real_call = s3_module.S3Access.call

    def call(self, operation, **kwargs):
        if operation == "upload_part":
            if len(sent) >= n:
                raise Killed()
            sent.append(kwargs["PartNumber"])
        return real_call(self, operation, **kwargs)

    monkeypatch.setattr(s3_module.S3Access, "call", call)
    return sent


def count_parts(monkeypatch) -> list[int]:
    sent: list[int] = []
    real_call = s3_module.S3Access.call

    def call(self, operation, **kwargs):
        if operation == "upload_part":
            sent.append(kwargs["PartNumber"])
        return real_call(self, operation, **kwargs)

    monkeypatch.setattr(s3_module.S3Access, "call", call)
    return sent


def no_such_upload_as_s3_answers(monkeypatch) -> None:
    """S3 answers UploadPart and CompleteMultipartUpload of an unknown upload with 404 NoSuchUpload.

    moto (5.2) raises a KeyError there instead; make it answer as S3 does.
    """
    for name in ("upload_part", "complete_multipart_upload"):
        real = getattr(S3Backend, name)

        def checked(self, bucket_name, multipart_id, *args, _real=real, **kwargs):
            if multipart_id not in self.get_bucket(bucket_name).multiparts:
                raise NoSuchUpload(upload_id=multipart_id)
            return _real(self, bucket_name, multipart_id, *args, **kwargs)

        monkeypatch.setattr(S3Backend, name, checked)


def journal(state, server="srv1", disk="sda") -> dict[int, PartRecord]:
    return UploadState.load(state, server, disk).parts


def kill_after(portal, monkeypatch, state, source, parts: int) -> None:
    """Run the backup, killed after `parts` parts, with one part in flight at a time; then undo the kill."""
    kill_after_parts(monkeypatch, parts)
    with pytest.raises(Killed):
        run(portal, state, str(source), max_in_flight=1)
    monkeypatch.undo()
    monkeypatch.setattr("moto.s3.models.S3_UPLOAD_PART_MIN_SIZE", 1024)


def assert_restores(portal, backup_id, tmp_path, image) -> None:
    """The restore point, restored, is exactly `image`."""
    restore(portal, backup_id, str(tmp_path / "out.img"), QUIET)
    assert (tmp_path / "out.img").read_bytes() == bytes(image)


def test_a_killed_upload_resumes_and_sends_only_the_missing_parts(portal, tmp_path, monkeypatch):
    image = make_image(6 * MiB, seed=3)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    state = tmp_path / "state"

    sent_before = kill_after_parts(monkeypatch, 4)
    with pytest.raises(Killed):
        run(portal, state, str(source), max_in_flight=1)
    assert sent_before == [1, 2, 3, 4]
    done = journal(state)
    assert sorted(done) == [1, 2, 3, 4]
    record = UploadState.load(state, "srv1", "sda")
    assert record.record.phase == "uploading" and record.record.multipart_id
    assert "SecretAccessKey" not in record.json_path.read_text()  # credentials are never stored
    monkeypatch.undo()
    monkeypatch.setattr("moto.s3.models.S3_UPLOAD_PART_MIN_SIZE", 1024)

    sent_after = count_parts(monkeypatch)
    result = run(portal, state, str(source))
    assert result.status == "verified" and result.resumed
    assert result.skipped_parts == 4
    assert set(sent_after).isdisjoint({1, 2, 3, 4})
    assert result.sent_parts == len(sent_after) and len(sent_after) > 0
    # Same upload, not a new one.
    assert result.backup_id == portal.uploads[record.record.upload_id]
    assert len(portal.backups) == 1
    assert_restores(portal, result.backup_id, tmp_path, image)


def test_a_part_sent_but_never_journaled_is_sent_again(portal, tmp_path, monkeypatch):
    image = make_image(4 * MiB, seed=4)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    state = tmp_path / "state"
    real_record = UploadState.record_part

    def record(self, rec):
        if rec.number == 3:  # killed between S3's answer and the journal write
            raise Killed()
        real_record(self, rec)

    monkeypatch.setattr(UploadState, "record_part", record)
    with pytest.raises(Killed):
        run(portal, state, str(source), max_in_flight=1)
    assert sorted(journal(state)) == [1, 2]
    monkeypatch.setattr(UploadState, "record_part", real_record)

    # The agent cannot list the parts S3 holds, so it goes by its journal:
    # part 3 goes again under the same number, replacing the copy S3 has.
    sent_after = count_parts(monkeypatch)
    result = run(portal, state, str(source))
    assert result.status == "verified" and result.resumed
    assert result.skipped_parts == 2
    assert 3 in sent_after and set(sent_after).isdisjoint({1, 2})
    assert_restores(portal, result.backup_id, tmp_path, image)


def test_a_multipart_upload_gone_from_storage_is_made_anew(portal, tmp_path, monkeypatch):
    image = make_image(4 * MiB, seed=5)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    state = tmp_path / "state"
    kill_after(portal, monkeypatch, state, source, 2)
    assert sorted(journal(state)) == [1, 2]
    record = UploadState.load(state, "srv1", "sda")
    # A lifecycle rule (AbortIncompleteMultipartUpload) or a clean-up got there first.
    portal.s3.abort_multipart_upload(Bucket=BUCKET, Key=record.record.key, UploadId=record.record.multipart_id)

    no_such_upload_as_s3_answers(monkeypatch)
    sent_after = count_parts(monkeypatch)
    result = run(portal, state, str(source))
    assert result.status == "verified" and result.resumed
    assert result.skipped_parts == 0
    assert {1, 2} <= set(sent_after)  # journaled, but gone with the upload: sent again
    assert result.backup_id == portal.uploads[record.record.upload_id]  # the same portal upload
    assert_restores(portal, result.backup_id, tmp_path, image)


def test_a_multipart_upload_gone_before_its_complete_is_made_anew(portal, tmp_path, monkeypatch, caplog):
    image = make_image(4 * MiB, seed=7)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    state = tmp_path / "state"
    real_call = s3_module.S3Access.call

    def killed_at_complete(self, operation, **kwargs):
        if operation == "complete_multipart_upload":
            raise Killed()
        return real_call(self, operation, **kwargs)

    monkeypatch.setattr(s3_module.S3Access, "call", killed_at_complete)
    with pytest.raises(Killed):
        run(portal, state, str(source))
    monkeypatch.setattr(s3_module.S3Access, "call", real_call)
    record = UploadState.load(state, "srv1", "sda")
    every_part = sorted(journal(state))
    portal.s3.abort_multipart_upload(Bucket=BUCKET, Key=record.record.key, UploadId=record.record.multipart_id)
    no_such_upload_as_s3_answers(monkeypatch)

    # Every part is journaled, so nothing is sent until CompleteMultipartUpload says the upload is gone.
    sent_after = count_parts(monkeypatch)
    with caplog.at_level("INFO", logger="reclo_agent.backup"):
        result = run(portal, state, str(source))
    assert "is gone from storage" in caplog.text
    assert result.status == "verified" and result.skipped_parts == 0
    assert sorted(sent_after) == every_part
    assert_restores(portal, result.backup_id, tmp_path, image)


def test_a_multipart_upload_is_made_anew_only_once(portal, tmp_path, monkeypatch):
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(4 * MiB, seed=6)))
    state = tmp_path / "state"
    kill_after(portal, monkeypatch, state, source, 2)
    created: list[str] = []
    real_call = s3_module.S3Access.call

    def call(self, operation, **kwargs):
        if operation == "upload_part":  # every multipart upload vanishes at once
            raise s3_module.StorageError("Cloud storage failed upload_part: NoSuchUpload", "NoSuchUpload")
        if operation == "create_multipart_upload":
            created.append(operation)
        return real_call(self, operation, **kwargs)

    monkeypatch.setattr(s3_module.S3Access, "call", call)
    with pytest.raises(s3_module.StorageError) as caught:
        run(portal, state, str(source))
    assert caught.value.code == "NoSuchUpload"
    assert len(created) == 1


def test_a_disk_that_changed_before_the_rerun_still_gives_a_correct_backup(portal, tmp_path, monkeypatch):
    image = make_image(6 * MiB, seed=8)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    state = tmp_path / "state"
    kill_after(portal, monkeypatch, state, source, 3)

    changed, _ = scatter_writes(image, 10, seed=9)
    changed[100] ^= 0xFF  # inside part 1 for sure
    source.write_bytes(bytes(changed))
    sent_after = count_parts(monkeypatch)
    result = run(portal, state, str(source))
    assert result.status == "verified"
    assert 1 in sent_after  # its bytes changed, so it went again
    assert_restores(portal, result.backup_id, tmp_path, changed)


def test_a_run_killed_while_waiting_for_the_verdict_finishes_without_uploading(portal, tmp_path, monkeypatch):
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(4 * MiB)))
    state = tmp_path / "state"
    real_get = portal.get_backup
    real_complete = portal.complete_upload

    def complete_but_verifying(upload_id, **kw):
        backup = real_complete(upload_id, **kw)
        portal.backups[backup["backup_id"]]["status"] = "verifying"  # the worker has not decided yet
        return {**backup, "status": "verifying"}

    def killed(backup_id):
        raise Killed()

    portal.complete_upload = complete_but_verifying
    portal.get_backup = killed
    with pytest.raises(Killed):
        run(portal, state, str(source))
    record = UploadState.load(state, "srv1", "sda")
    assert record.record.phase == "completed"
    assert MapStore(state).load("srv1", "sda")[0] is None  # not committed before the verdict

    portal.get_backup = real_get
    portal.backups[record.record.backup_id]["status"] = "verified"
    sent_after = count_parts(monkeypatch)
    result = run(portal, state, str(source))
    assert result.backup_id == record.record.backup_id and result.status == "verified"
    assert sent_after == []
    assert MapStore(state).load("srv1", "sda")[0].backup_id == result.backup_id


def test_an_expired_upload_starts_over(portal, tmp_path, monkeypatch):
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(4 * MiB)))
    state = tmp_path / "state"
    kill_after(portal, monkeypatch, state, source, 2)
    old_upload = UploadState.load(state, "srv1", "sda").record.upload_id
    portal.backups[portal.uploads[old_upload]]["status"] = "failed"  # the clean-up job dropped it

    result = run(portal, state, str(source))
    assert result.status == "verified"
    assert result.backup_id != portal.uploads[old_upload]
    assert result.skipped_parts == 0


def test_full_requested_abandons_an_unfinished_incremental(portal, tmp_path, monkeypatch):
    image = make_image(4 * MiB)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    state = tmp_path / "state"
    run(portal, state, str(source))
    source.write_bytes(bytes(scatter_writes(image, 200)[0]))
    kill_after(portal, monkeypatch, state, source, 1)
    assert UploadState.load(state, "srv1", "sda").record.kind == "incremental"
    result = run(portal, state, str(source), full=True)
    assert result.kind == "full" and result.skipped_parts == 0


def test_ctrl_c_does_not_wait_for_the_parts_in_flight(portal, tmp_path, monkeypatch):
    """Ctrl-C while a part is stuck on a slow link: the run ends at once, and the resume sends that part."""
    image = make_image(6 * MiB, seed=8)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    state = tmp_path / "state"
    stuck, release = threading.Event(), threading.Event()
    real_call = s3_module.S3Access.call

    def call(self, operation, **kwargs):
        if operation == "upload_part" and kwargs["PartNumber"] == 3:
            stuck.set()
            release.wait(60)  # a link that never answers (until the test lets go)
            raise Killed()
        return real_call(self, operation, **kwargs)

    def ctrl_c() -> None:  # the terminal's Ctrl-C: SIGINT to the main thread, once the part is stuck
        if stuck.wait(60):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(s3_module.S3Access, "call", call)
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run(portal, state, str(source), max_in_flight=2)
        # The run returned while part 3 was still in flight: nobody waited for it.
        assert not release.is_set() and stuck.is_set()
        assert 3 not in journal(state)
    finally:
        release.set()
    monkeypatch.undo()
    monkeypatch.setattr("moto.s3.models.S3_UPLOAD_PART_MIN_SIZE", 1024)
    sent = count_parts(monkeypatch)
    result = run(portal, state, str(source))
    assert result.status == "verified" and 3 in sent
    assert_restores(portal, result.backup_id, tmp_path, image)


def test_the_progress_counts_what_storage_acknowledged(portal, tmp_path, monkeypatch):
    """The bar reaches a disk position only once the parts holding it are acknowledged."""
    image = make_image(6 * MiB, seed=9)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    seen = []
    real_call = s3_module.S3Access.call

    class Watched(Reporter):
        def task(self, description, total):
            task = super().task(description, total)
            if description == "backing up":
                self.watched = task
            return task

    reporter = Watched(quiet=True)

    def call(self, operation, **kwargs):
        if operation == "upload_part":
            seen.append(reporter.watched.done)  # before this part is acknowledged
        return real_call(self, operation, **kwargs)

    monkeypatch.setattr(s3_module.S3Access, "call", call)
    options = BackupOptions(str(source), "srv1", "sda", poll_interval=0.01, part_size=PART, max_in_flight=1)
    result = BackupRun(portal, tmp_path / "state", options, reporter).run()
    assert result.status == "verified"
    assert seen[0] == 0  # nothing counted before the first part is acknowledged, though blocks were read
    assert seen == sorted(seen) and seen[-1] < len(image)
    assert reporter.watched.done == len(image)


def test_a_part_storage_refuses_fails_the_run_and_is_not_journaled(portal, tmp_path, monkeypatch):
    """S3 refuses a part whose bytes do not match its ChecksumSHA256 (BadDigest); moto checks no
    checksums, so S3's answer comes from botocore's Stubber (as the AWS documentation gives it)."""
    image = bytearray(2 * MiB)
    image[4096:8192] = b"a page of data " * 273 + b"x"  # compresses to one part
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    stubbed = boto3.client("s3", region_name="us-east-1")
    stubber = Stubber(stubbed)
    stubber.add_client_error(
        "upload_part", "BadDigest", "The SHA256 you specified did not match the calculated checksum.", 400
    )
    stubber.activate()
    real_client = s3_module.S3Access.client

    class Mixed:
        """UploadPart answered by the stub, everything else by moto."""

        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(stubbed if name == "upload_part" else self._real, name)

    monkeypatch.setattr(s3_module.S3Access, "client", lambda self: Mixed(real_client(self)))
    with pytest.raises(s3_module.StorageError) as caught:
        run(portal, tmp_path / "state", str(source))
    assert caught.value.code == "BadDigest"
    assert journal(tmp_path / "state") == {}
    stubber.assert_no_pending_responses()
