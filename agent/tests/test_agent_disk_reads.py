"""Backups of a mounted disk hold what the disk holds (issue 10's regression test).

A real disk (MBR + ext4) on a loop device with its partition mounted, files
written and synced between backups. Buffered reads of the whole-disk device
return what the previous backup read (its page cache is not the
partition's), so without O_DIRECT the incrementals miss the new files and
the restore point differs from the disk. Each round freezes the file
system, backs up, then reads the disk after ``blockdev --flushbufs`` while
still frozen: the restore point must equal those bytes.
"""

import logging
import os
import random
import subprocess

import pytest
from agent_helpers import FakePortal
from disk_images import PART_START, attached_disk, frozen, read_disk_frozen, write_synced
from moto import mock_aws
from reclo_agent import source as source_module
from reclo_agent.backup import BackupOptions, BackupRun
from reclo_agent.progress import Reporter
from reclo_agent.restore import restore

MiB = 1024 * 1024
QUIET = Reporter(quiet=True)


@pytest.fixture
def portal():
    with mock_aws():
        yield FakePortal()


def _backup(portal, state, device):
    options = BackupOptions(device, "srv1", "loopdisk", poll_interval=0.01)
    return BackupRun(portal, state, options, QUIET).run()


def _debugfs_cat(image_bytes: bytes, tmp_path, name: str) -> bytes:
    """A file's content from the ext4 partition of a restored disk image."""
    part = tmp_path / "restored.part"
    part.write_bytes(image_bytes[PART_START:])
    out = subprocess.run(["debugfs", "-R", f"cat /{name}", str(part)], capture_output=True, check=True, timeout=60)
    check = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    return out.stdout


@pytest.mark.parametrize("mode", ["direct", "fallback"])
def test_incrementals_of_a_mounted_disk_hold_the_files_written_between_backups(
    portal, tmp_path, monkeypatch, caplog, mode
):
    if mode == "fallback":
        # A device that refuses O_DIRECT: the cache is dropped before each pass instead.
        monkeypatch.setattr(source_module.Source, "_try_direct", lambda self: "Invalid argument")
    rnd = random.Random(10)
    state = tmp_path / "state"
    with attached_disk(tmp_path, {"hello.txt": b"first file\n"}) as disk:
        first = _backup(portal, state, disk.device)
        assert (first.kind, first.status) == ("full", "verified")
        for round_ in (1, 2):
            payload = rnd.randbytes(6 * MiB)
            write_synced(disk.mount / f"new-{round_}.bin", payload)
            write_synced(disk.mount / "hello.txt", f"rewritten in round {round_}\n".encode())
            with frozen(disk.mount):
                with caplog.at_level(logging.INFO, logger="reclo_agent"):
                    result = _backup(portal, state, disk.device)
                expected = read_disk_frozen(disk.device)
            assert (result.kind, result.status) == ("incremental", "verified")
            # The new file's 6 MiB and its metadata are changed pages.
            assert result.changed_bytes >= len(payload)
            out = tmp_path / f"restored-{round_}.img"
            restore(portal, result.backup_id, str(out), QUIET)
            restored = out.read_bytes()
            assert len(restored) == len(expected)
            assert restored == expected, "the restore point differs from the frozen disk"
            assert _debugfs_cat(restored, tmp_path, f"new-{round_}.bin") == payload
            assert _debugfs_cat(restored, tmp_path, "hello.txt") == f"rewritten in round {round_}\n".encode()
    refused = [r for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(refused) == (3 if mode == "fallback" else 0)  # one line for each of the three runs


def test_a_partition_device_reads_current_data_too(tmp_path):
    """The partition's own device: what a file system wrote since the last read is read."""
    with attached_disk(tmp_path, {}) as disk:
        with source_module.Source(disk.partition) as src:
            assert src.read_mode == source_module.DIRECT
            before = b"".join(data for _, data in src.blocks(2 * MiB))
        # Warm the whole-disk and partition caches the way a buffered reader would.
        with open(disk.device, "rb") as f:
            f.read()
        write_synced(disk.mount / "late.bin", os.urandom(3 * MiB))
        with frozen(disk.mount):
            with source_module.Source(disk.partition) as src:
                after = b"".join(data for _, data in src.blocks(2 * MiB))
            expected = read_disk_frozen(disk.partition)
        assert after != before
        assert after == expected
        with frozen(disk.mount), source_module.Source(disk.device) as whole:
            # (A new freeze rewrites the superblock: read the disk again.)
            disk_now = read_disk_frozen(disk.device)
            assert whole.read_at(0, whole.size) == disk_now
            # Unaligned ranges work under O_DIRECT too.
            assert whole.read_at(PART_START + 1000, 3000) == disk_now[PART_START + 1000 : PART_START + 4000]
            assert whole.read_at(whole.size - 700, 5000) == disk_now[-700:]
