"""Block maps and the one pass: which pages changed, which blocks to store, which sectors."""

import random

import pytest
from reclo_agent.blockmap import DIGEST_SIZE, MapMeta, MapStore, changed_pages, page_digests
from reclo_agent.scan import Scan
from reclo_agent.source import Source
from reclo_agent.vhd import set_runs

MiB = 1024 * 1024
BLOCK = 2 * MiB
SECTOR = 512


def scan(src, pending, **kwargs) -> tuple[Scan, dict]:
    """Run the pass; the pass and its stored blocks by index."""
    run = Scan(src, pending, **kwargs)
    return run, {block.index: block for block in run if block.store}


def write(path, data) -> str:
    path.write_bytes(bytes(data))
    return str(path)


def random_disk(size: int, seed: int = 1) -> bytearray:
    rnd = random.Random(seed)
    disk = bytearray(size)
    for at in range(0, size, 64 * 1024):
        if rnd.random() < 0.6:
            disk[at : at + 64 * 1024] = rnd.randbytes(min(64 * 1024, size - at))
    return disk


def test_page_digests_are_16_bytes_per_page_and_the_last_page_may_be_short():
    data = bytes(range(256)) * 40  # 10240 bytes: two whole 4 KiB pages and 2 KiB
    digests = page_digests(data, 4096)
    assert len(digests) == 3 * DIGEST_SIZE
    assert digests[:16] != digests[16:32] or data[:4096] == data[4096:8192]
    assert changed_pages(digests, digests) == []


def test_changed_pages_names_exactly_the_differing_pages():
    old = page_digests(bytes(64 * 1024), 4096)
    data = bytearray(64 * 1024)
    data[4096 * 3 + 17] = 1
    data[4096 * 15] = 9
    assert changed_pages(old, page_digests(data, 4096)) == [3, 15]


def test_full_scan_stores_every_non_zero_block(tmp_path):
    disk = bytearray(5 * BLOCK)
    disk[BLOCK + 100] = 1  # block 1
    disk[4 * BLOCK + 3 * SECTOR] = 7  # block 4
    with Source(write(tmp_path / "d.img", disk)) as src:
        plan, stored = scan(src, tmp_path / "map.pending", page_size=4096)
    assert plan.kind == "full"
    assert list(stored) == [1, 4]
    assert plan.zero_blocks == 3
    assert stored[1].sectors is None  # full: all sectors of a stored block
    assert (tmp_path / "map.pending").stat().st_size == 5 * BLOCK // 4096 * DIGEST_SIZE


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_incremental_scan_sets_only_the_changed_pages_sectors(tmp_path, page_size):
    size = 3 * BLOCK + 7 * SECTOR  # odd size: a short last block and a short last page
    old = random_disk(size)
    with Source(write(tmp_path / "old.img", old)) as src:
        scan(src, tmp_path / "old.map", page_size=page_size)
    new = bytearray(old)
    new[100] ^= 0xFF  # page 0 of block 0
    new[BLOCK + 5 * page_size + 1] ^= 0xFF  # page 5 of block 1
    new[BLOCK + 5 * page_size + 2] ^= 0xFF  # same page
    new[size - 1] ^= 0xFF  # the last, short page of the short last block
    with Source(write(tmp_path / "new.img", new)) as src:
        plan, stored = scan(src, tmp_path / "new.map", page_size=page_size, old_map=tmp_path / "old.map")
    assert plan.kind == "incremental"
    assert list(stored) == [0, 1, 3]
    spp = page_size // SECTOR
    nbits = BLOCK // SECTOR
    assert set_runs(stored[0].sectors, nbits) == [(0, spp)]
    assert set_runs(stored[1].sectors, nbits) == [(5 * spp, spp)]
    assert set_runs(stored[3].sectors, nbits) == [(0, 7)]  # only the 7 sectors the disk has
    assert plan.changed_bytes == 2 * page_size + 7 * SECTOR


def test_adjacent_changed_pages_merge_into_one_run(tmp_path):
    old = random_disk(BLOCK)
    with Source(write(tmp_path / "old.img", old)) as src:
        scan(src, tmp_path / "old.map", page_size=4096)
    new = bytearray(old)
    for page in (10, 11, 12, 40):
        new[page * 4096] ^= 1
    with Source(write(tmp_path / "new.img", new)) as src:
        _, stored = scan(src, tmp_path / "new.map", page_size=4096, old_map=tmp_path / "old.map")
    assert set_runs(stored[0].sectors, BLOCK // SECTOR) == [(80, 24), (320, 8)]


def test_an_unchanged_disk_stores_no_block(tmp_path):
    disk = random_disk(2 * BLOCK)
    with Source(write(tmp_path / "d.img", disk)) as src:
        scan(src, tmp_path / "a.map", page_size=4096)
        plan, stored = scan(src, tmp_path / "b.map", page_size=4096, old_map=tmp_path / "a.map")
    assert stored == {}
    assert plan.changed_bytes == 0


def test_commit_replaces_the_map_and_a_crash_leaves_a_consistent_one(tmp_path):
    store = MapStore(tmp_path)
    meta = MapMeta("srv", "sda", 4096 * 4, 4096, "b1", "00000000-0000-0000-0000-000000000001", 5, "f1.vhd")
    pending = store.pending_path("srv", "sda", "next")
    pending.write_bytes(b"a" * 4 * DIGEST_SIZE)
    store.commit(pending, meta)
    loaded, why = store.load("srv", "sda")
    assert why == "" and loaded.backup_id == "b1"
    assert store.digests_path(loaded).read_bytes() == b"a" * 64

    pending = store.pending_path("srv", "sda", "next")
    pending.write_bytes(b"b" * 4 * DIGEST_SIZE)
    meta2 = MapMeta("srv", "sda", 4096 * 4, 4096, "b2", "00000000-0000-0000-0000-000000000002", 6, "f2.vhd")
    store.commit(pending, meta2)
    loaded, _ = store.load("srv", "sda")
    assert loaded.backup_id == "b2"
    assert sorted(p.name for p in (tmp_path / "maps" / "srv").iterdir()) == ["sda.b2.map", "sda.json"]


def test_a_truncated_or_missing_map_is_unusable_with_a_reason(tmp_path):
    store = MapStore(tmp_path)
    assert store.load("srv", "sda")[0] is None
    meta = MapMeta("srv", "sda", 4096 * 4, 4096, "b1", "00000000-0000-0000-0000-000000000001", 5, "f1.vhd")
    pending = store.pending_path("srv", "sda", "next")
    pending.write_bytes(b"a" * 64)
    store.commit(pending, meta)
    store.digests_path(store.load("srv", "sda")[0]).write_bytes(b"short")
    loaded, why = store.load("srv", "sda")
    assert loaded is None and "truncated" in why
