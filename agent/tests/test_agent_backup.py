"""Backups against the fake portal over moto: kinds, incrementals, verdicts, restores."""

import io

import pytest
from agent_helpers import FakePortal, make_image, scatter_writes
from moto import mock_aws
from reclo_agent.backup import BackupOptions, BackupRun
from reclo_agent.blockmap import MapStore
from reclo_agent.errors import DiskError, UsageError, VerificationFailed
from reclo_agent.progress import Reporter
from reclo_agent.restore import restore
from reclo_agent.state import UploadState
from reclo_agent.vhd import VHDReader, open_chain, set_runs

MiB = 1024 * 1024
BLOCK = 2 * MiB
QUIET = Reporter(quiet=True)


@pytest.fixture
def portal():
    with mock_aws():
        yield FakePortal()


@pytest.fixture
def disk(tmp_path):
    """``disk.write(data)`` replaces the image; ``disk.path`` is its path."""

    class Disk:
        path = str(tmp_path / "disk.img")

        def write(self, data) -> None:
            with open(self.path, "wb") as f:
                f.write(bytes(data))

    return Disk()


def backup(portal, state, source, **kw):
    options = BackupOptions(source, kw.pop("server", "srv1"), kw.pop("disk", "sda"), poll_interval=0.01, **kw)
    return BackupRun(portal, state, options, QUIET).run()


def test_first_backup_is_full_and_restores_byte_identical(portal, disk, tmp_path):
    image = make_image(8 * MiB + 3 * 512)
    disk.write(image)
    result = backup(portal, tmp_path / "state", disk.path)
    assert (result.kind, result.status) == ("full", "verified")
    assert "no block map" in result.full_reason
    vhd = VHDReader(io.BytesIO(portal.stored_vhd(result.backup_id)))
    assert vhd.info.disk_type == "dynamic"
    assert vhd.virtual_size == len(image)
    # All-zero blocks are not stored.
    zero_blocks = sum(1 for at in range(0, len(image), BLOCK) if not any(image[at : at + BLOCK]))
    assert vhd.allocated_count == -(-len(image) // BLOCK) - zero_blocks
    meta, _ = MapStore(tmp_path / "state").load("srv1", "sda")
    assert meta.backup_id == result.backup_id
    assert UploadState.load(tmp_path / "state", "srv1", "sda") is None

    restore(portal, result.backup_id, str(tmp_path / "out.img"), QUIET)
    assert (tmp_path / "out.img").read_bytes() == bytes(image)


def test_incremental_holds_only_the_changed_sectors(portal, disk, tmp_path):
    image = make_image(12 * MiB)
    disk.write(image)
    full = backup(portal, tmp_path / "state", disk.path)
    changed, changed_bytes = scatter_writes(image, 30)
    disk.write(changed)
    inc = backup(portal, tmp_path / "state", disk.path)
    assert inc.kind == "incremental"
    assert portal.backups[inc.backup_id]["parent_id"] == full.backup_id
    assert inc.changed_bytes == changed_bytes

    top = VHDReader(io.BytesIO(portal.stored_vhd(inc.backup_id)))
    assert top.info.disk_type == "differencing"
    assert top.info.parent_unique_id == portal.vhd_ids[full.backup_id]
    # Exactly the sectors of the rewritten pages are set, block by block.
    expected: dict[int, set] = {}
    for at in range(0, len(image), 4096):
        if image[at : at + 4096] != changed[at : at + 4096]:
            index, within = divmod(at, BLOCK)
            expected.setdefault(index, set()).update(range(within // 512, within // 512 + 8))
    got = {}
    for index in range(top.block_count):
        bm = top.read_bitmap(index)
        if bm is not None:
            got[index] = {s for start, n in set_runs(bm, BLOCK // 512) for s in range(start, start + n)}
    assert got == expected
    # Unchanged sectors are zero-filled, so the upload costs about the changed bytes.
    assert inc.file_size < 1.5 * changed_bytes + 64 * 1024

    chain = open_chain([io.BytesIO(portal.stored_vhd(full.backup_id)), io.BytesIO(portal.stored_vhd(inc.backup_id))])
    assert chain.read(0, len(changed)) == bytes(changed)
    restore(portal, inc.backup_id, str(tmp_path / "out.img"), QUIET)
    assert (tmp_path / "out.img").read_bytes() == bytes(changed)
    restore(portal, full.backup_id, str(tmp_path / "out0.img"), QUIET)
    assert (tmp_path / "out0.img").read_bytes() == bytes(image)


def test_a_three_deep_chain_restores_every_point(portal, disk, tmp_path):
    versions = [make_image(6 * MiB, seed=5)]
    versions.append(scatter_writes(versions[-1], 20, seed=6)[0])
    versions.append(scatter_writes(versions[-1], 20, seed=7)[0])
    ids = []
    for version in versions:
        disk.write(version)
        ids.append(backup(portal, tmp_path / "state", disk.path).backup_id)
    assert [portal.backups[i]["kind"] for i in ids] == ["full", "incremental", "incremental"]
    for backup_id, version in zip(ids, versions, strict=True):
        out = tmp_path / f"{backup_id}.img"
        result = restore(portal, backup_id, str(out), QUIET)
        assert out.read_bytes() == bytes(version)
    assert result.layers == 3


def test_full_when_asked_when_the_size_changed_or_the_map_is_gone(portal, disk, tmp_path):
    state = tmp_path / "state"
    image = make_image(4 * MiB)
    disk.write(image)
    backup(portal, state, disk.path)
    assert backup(portal, state, disk.path, full=True).kind == "full"
    disk.write(image + bytes(BLOCK))
    result = backup(portal, state, disk.path)
    assert result.kind == "full" and "size changed" in result.full_reason
    MapStore(state).forget("srv1", "sda")
    result = backup(portal, state, disk.path)
    assert result.kind == "full" and "no block map" in result.full_reason
    assert backup(portal, state, disk.path, page_size=16384).kind == "full"


def test_full_when_the_parent_is_no_longer_the_portals_newest_verified(portal, disk, tmp_path):
    state = tmp_path / "state"
    disk.write(make_image(4 * MiB))
    first = backup(portal, state, disk.path)
    portal.backups[first.backup_id]["status"] = "failed"  # e.g. the weekly scrub found it damaged
    result = backup(portal, state, disk.path)
    assert result.kind == "full"
    assert "no verified restore point" in result.full_reason

    # Another agent made a newer restore point of the same disk.
    other = backup(portal, tmp_path / "other-state", disk.path)
    result = backup(portal, state, disk.path)
    assert result.kind == "full" and other.backup_id in result.full_reason


def test_other_disks_and_servers_have_their_own_chains(portal, disk, tmp_path):
    state = tmp_path / "state"
    disk.write(make_image(4 * MiB))
    backup(portal, state, disk.path, disk="sda")
    assert backup(portal, state, disk.path, disk="sdb").kind == "full"
    assert backup(portal, state, disk.path, server="srv2").kind == "full"
    assert backup(portal, state, disk.path, disk="sda").kind == "incremental"


def test_a_failed_verification_leaves_the_map_for_the_next_incremental(portal, disk, tmp_path):
    state = tmp_path / "state"
    image = make_image(4 * MiB)
    disk.write(image)
    first = backup(portal, state, disk.path)
    disk.write(scatter_writes(image, 5)[0])
    portal.verify_hook = lambda b: "the VHD is damaged (test)"
    with pytest.raises(VerificationFailed, match="damaged") as excinfo:
        backup(portal, state, disk.path)
    assert excinfo.value.exit_code == 7
    meta, _ = MapStore(state).load("srv1", "sda")
    assert meta.backup_id == first.backup_id
    assert UploadState.load(state, "srv1", "sda") is None
    assert not list((state / "maps" / "srv1").glob("*.pending"))
    portal.verify_hook = None
    result = backup(portal, state, disk.path)
    assert result.kind == "incremental" and portal.backups[result.backup_id]["parent_id"] == first.backup_id


def test_a_refused_chain_falls_back_to_a_full_backup(portal, disk, tmp_path):
    state = tmp_path / "state"
    disk.write(make_image(4 * MiB))
    first = backup(portal, state, disk.path)
    # The portal still lists the parent as verified, but refuses the chain (312) at upload time.
    real_create = portal.create_upload

    def racing_create(**fields):
        if fields["kind"] == "incremental":
            portal.backups[first.backup_id]["status"] = "failed"
        return real_create(**fields)

    portal.create_upload = racing_create
    result = backup(portal, state, disk.path)
    assert result.kind == "full"
    assert "refused the chain" in result.full_reason


def test_credentials_near_expiry_are_renewed_during_the_upload(disk, tmp_path):
    from datetime import timedelta

    with mock_aws():
        portal = FakePortal(credentials_ttl=timedelta(seconds=1))
        disk.write(make_image(4 * MiB))
        result = backup(portal, tmp_path / "state", disk.path)
    assert result.status == "verified"
    assert portal.credential_calls >= 1


def test_the_upload_never_replaces_an_object_already_at_its_key(portal, disk, tmp_path):
    # The agent completes its upload with If-None-Match: * (its credentials'
    # policy denies any other write on real S3), so an object already stored
    # at the key is never replaced: here one appears between grant and
    # completion, and it stays; the portal then finds it is not the agent's.
    create = portal.create_upload

    def create_then_occupy(**fields):
        grant = create(**fields)
        portal.s3.put_object(Bucket="reclo-agent-test", Key=grant["key"], Body=b"already here")
        return grant

    portal.create_upload = create_then_occupy
    disk.write(make_image(4 * MiB))
    with pytest.raises(VerificationFailed):
        backup(portal, tmp_path / "state", disk.path)
    (stored,) = [b for b in portal.backups.values()]
    assert portal.s3.get_object(Bucket="reclo-agent-test", Key=stored["_key"])["Body"].read() == b"already here"


def test_unreadable_or_odd_sources_are_disk_errors(portal, tmp_path):
    with pytest.raises(DiskError, match="no such file"):
        backup(portal, tmp_path / "state", str(tmp_path / "missing.img"))
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(DiskError, match="512-byte sectors"):
        backup(portal, tmp_path / "state", str(odd))
    with pytest.raises(UsageError, match="neither a block device"):
        backup(portal, tmp_path / "state", str(tmp_path))


def test_restore_refuses_to_overwrite_without_force_and_checks_sha256(portal, disk, tmp_path):
    disk.write(make_image(4 * MiB))
    result = backup(portal, tmp_path / "state", disk.path)
    target = tmp_path / "target.img"
    target.write_bytes(b"precious")
    with pytest.raises(UsageError, match="--force"):
        restore(portal, result.backup_id, str(target), QUIET)
    assert target.read_bytes() == b"precious"
    restore(portal, result.backup_id, str(target), QUIET, force=True)
    assert target.read_bytes() == open(disk.path, "rb").read()

    # Damage the stored object's recorded checksum: the restore must fail loudly.
    portal.backups[result.backup_id]["sha256"] = "0" * 64
    with pytest.raises(VerificationFailed, match="SHA-256"):
        restore(portal, result.backup_id, str(tmp_path / "again.img"), QUIET)


def test_restore_of_a_corrupt_object_fails_verification(portal, disk, tmp_path):
    disk.write(make_image(4 * MiB))
    result = backup(portal, tmp_path / "state", disk.path)
    data = bytearray(portal.object_bytes(result.backup_id))
    data[len(data) // 2] ^= 0xFF
    b = portal.backups[result.backup_id]
    portal.s3.put_object(Bucket="reclo-agent-test", Key=b["_key"], Body=bytes(data))
    with pytest.raises(VerificationFailed):
        restore(portal, result.backup_id, str(tmp_path / "out.img"), QUIET)


def test_an_io_error_on_the_source_says_the_disk_may_be_failing(portal, disk, tmp_path, monkeypatch):
    import errno
    import os

    disk.write(make_image(4 * MiB))
    real_pread = os.pread

    def failing_pread(fd, n, offset):
        if offset >= BLOCK:
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", failing_pread)
    with pytest.raises(DiskError, match="I/O error at byte 2097152") as excinfo:
        backup(portal, tmp_path / "state", disk.path)
    assert excinfo.value.exit_code == 5
    assert "failing" in str(excinfo.value)


def test_restore_checks_free_space_first(portal, disk, tmp_path, monkeypatch):
    import os
    from types import SimpleNamespace

    from reclo_agent.errors import NoSpace

    disk.write(make_image(4 * MiB))
    result = backup(portal, tmp_path / "state", disk.path)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: SimpleNamespace(f_bavail=10, f_frsize=4096))
    with pytest.raises(NoSpace, match="Not enough space") as excinfo:
        restore(portal, result.backup_id, str(tmp_path / "out.img"), QUIET)
    assert excinfo.value.exit_code == 6
