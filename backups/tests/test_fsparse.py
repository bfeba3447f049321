"""The sandboxed file system reader over real images: partitions, listings, bytes, limits, damage.

The images are real ext4, XFS, FAT32 and NTFS file systems in GPT and MBR
tables (reclo_site.testing_fsimages), read here from a local file through
the same child process and socket protocol the worker uses.
"""

import io
import os
import zipfile

import pytest

from backups.services import files
from reclo_site.errors import Code, ServiceError
from reclo_site.testing_fsimages import DELETED, LAYOUT, exfat_disk, expected_files, fs_disks


class LocalDisk:
    def __init__(self, path):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by the fixture
        self.size = os.path.getsize(path)
        self.reads = 0

    def read(self, offset, length):
        self.reads += 1
        self._f.seek(offset)
        return self._f.read(length)


@pytest.fixture(scope="module")
def disks():
    return fs_disks()


def ask(disk, command):
    heads, data = [], []
    files.sandbox_run(disk, command, on_head=heads.append, on_data=data.append if command["op"] == "read" else None)
    return heads[0], b"".join(data)


def walk(disk, partition, path="/"):
    out = {}
    head, _ = ask(disk, {"op": "list", "partition": partition, "path": path})
    for e in head["entries"]:
        child = (path.rstrip("/") + "/" + e["name"]).lstrip("/")
        if e["type"] == "dir":
            out.update(walk(disk, partition, "/" + child))
        else:
            out[child] = e
    return out


@pytest.mark.parametrize("table", ["gpt", "mbr"])
def test_partitions_are_found_with_their_file_systems(disks, table):
    head, _ = ask(LocalDisk(disks[f"{table}-1"]), {"op": "partitions"})
    assert [(p["partition"], p["filesystem"]) for p in head["partitions"]] == sorted(LAYOUT[table].items())
    assert all(p["size"] > 1024 * 1024 for p in head["partitions"])
    assert head["limits"]["network_isolated"] is True  # root here: an empty network namespace


@pytest.mark.parametrize(("table", "partition"), [("gpt", 1), ("gpt", 2), ("mbr", 1), ("mbr", 2)])
@pytest.mark.parametrize("version", [1, 2])
def test_every_file_reads_back_its_bytes(disks, table, partition, version):
    disk = LocalDisk(disks[f"{table}-{version}"])
    fs = LAYOUT[table][partition]
    want = expected_files(version, fs)
    found = walk(disk, partition)
    assert set(found) == set(want)
    assert (DELETED in found) == (version == 1)
    for path, data in want.items():
        assert found[path]["size"] == len(data)
        head, got = ask(disk, {"op": "read", "partition": partition, "path": "/" + path})
        assert got == data, path
        assert head["kind"] == "file" and head["size"] == len(data)


def test_modes_and_times_where_the_file_system_has_them(disks):
    disk = LocalDisk(disks["gpt-1"])
    ext4 = {e["name"]: e for e in ask(disk, {"op": "list", "partition": 1, "path": "/docs"})[0]["entries"]}
    assert ext4["scan.bin"]["mode"] == 0o600 and ext4["old"]["mode"] == 0o750
    assert _epoch(ext4["scan.bin"]["modified"]) == 1_650_000_000 and ext4["scan.bin"]["modified"].endswith("Z")
    xfs = {e["name"]: e for e in ask(disk, {"op": "list", "partition": 2, "path": "/docs"})[0]["entries"]}
    assert xfs["scan.bin"]["mode"] == 0o600
    listing = ask(LocalDisk(disks["mbr-1"]), {"op": "list", "partition": 1, "path": "/docs"})[0]
    fat = {e["name"]: e for e in listing["entries"]}
    assert fat["scan.bin"]["mode"] is None  # FAT has no Unix modes
    assert abs(_epoch(fat["scan.bin"]["modified"]) - 1_650_000_000) <= 2  # FAT keeps 2-second times


def _epoch(iso):
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize(("table", "partition"), [("gpt", 1), ("mbr", 2)])
def test_a_folder_comes_as_a_zip_of_everything_under_it(disks, table, partition):
    disk = LocalDisk(disks[f"{table}-1"])
    head, data = ask(disk, {"op": "read", "partition": partition, "path": "/docs"})
    assert head["kind"] == "zip"
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = {i.filename for i in zf.infolist() if not i.is_dir()}
        want = {p.removeprefix("docs/"): d for p, d in expected_files(1).items() if p.startswith("docs/")}
        assert names == set(want)
        for name, body in want.items():
            assert zf.read(name) == body


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ({"op": "list", "partition": 3, "path": "/"}, Code.NO_SUCH_PATH),
        ({"op": "list", "partition": 1, "path": "/nothing/here"}, Code.NO_SUCH_PATH),
        ({"op": "list", "partition": 1, "path": "/readme.txt"}, Code.NO_SUCH_PATH),
        ({"op": "read", "partition": 1, "path": "/missing.txt"}, Code.NO_SUCH_PATH),
    ],
)
def test_what_is_not_there_answers_314(disks, command, code):
    with pytest.raises(ServiceError) as caught:
        ask(LocalDisk(disks["gpt-1"]), command)
    assert caught.value.code == code


def test_dot_dot_stays_inside_the_partition(disks):
    head, _ = ask(LocalDisk(disks["gpt-1"]), {"op": "list", "partition": 1, "path": "/docs/../../.."})
    assert "readme.txt" in {e["name"] for e in head["entries"]}


def test_a_damaged_or_unknown_file_system_answers_315(disks, tmp_path):
    damaged = tmp_path / "damaged.img"
    data = bytearray(disks["mbr-1"].read_bytes())
    # Overwrite the NTFS partition's first megabyte: boot sector and the start of the MFT.
    start = 83968 * 512
    data[start : start + 1024 * 1024] = os.urandom(1024 * 1024)
    damaged.write_bytes(bytes(data))
    head, _ = ask(LocalDisk(damaged), {"op": "partitions"})
    assert head["partitions"][1]["filesystem"] == "unknown"
    with pytest.raises(ServiceError) as caught:
        ask(LocalDisk(damaged), {"op": "list", "partition": 2, "path": "/"})
    assert caught.value.code == Code.FILESYSTEM_UNREADABLE


def test_a_reader_over_its_time_is_stopped_with_315(disks, monkeypatch):
    class Slow(LocalDisk):
        def read(self, offset, length):
            import time

            time.sleep(0.5)
            return super().read(offset, length)

    with pytest.raises(ServiceError) as caught:
        files.sandbox_run(Slow(disks["gpt-1"]), {"op": "partitions"}, on_head=lambda h: None, wall=1)
    assert caught.value.code == Code.FILESYSTEM_UNREADABLE


def test_the_child_has_no_credentials_in_its_environment(disks, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "portal-secret")
    head, _ = ask(LocalDisk(disks["gpt-1"]), {"op": "partitions"})
    assert head["limits"]["memory_limit"] == 1024 * 1024 * 1024


def test_exfat_reads_back_every_file(tmp_path):
    disk = LocalDisk(exfat_disk())
    head, _ = ask(disk, {"op": "partitions"})
    assert [(p["partition"], p["filesystem"]) for p in head["partitions"]] == [(1, "exfat")]
    want = expected_files(1)
    found = walk(disk, 1)
    assert set(found) == set(want)
    for path, data in want.items():
        assert ask(disk, {"op": "read", "partition": 1, "path": "/" + path})[1] == data, path
    assert abs(_epoch(found["docs/scan.bin"]["modified"]) - 1_650_000_000) <= 2
