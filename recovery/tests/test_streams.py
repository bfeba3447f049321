"""The failover's S3 streams: one GET per scan, background part uploads."""

import os

import pytest

from reclo_site.cloud import ObjectNotFound, storage, streams

MiB = 1024 * 1024


@pytest.fixture
def stored(aws):
    data = os.urandom(3 * MiB + 123)
    storage.put_object("images/1/test.vhd", data)
    return data


def test_a_front_to_back_scan_costs_one_request(stored):
    reader = streams.SequentialObjectReader("images/1/test.vhd")
    chunks = []
    while chunk := reader.read(100_000):
        chunks.append(chunk)
    assert b"".join(chunks) == stored
    assert reader.requests == 1


def test_short_skips_read_through_and_jumps_back_reopen(stored):
    reader = streams.SequentialObjectReader("images/1/test.vhd", skip_limit=MiB)
    reader.seek(10)
    assert reader.read(10) == stored[10:20]
    reader.seek(500_000, 1)  # forward, within the skip limit: same stream
    assert reader.read(5) == stored[500_020:500_025]
    assert reader.requests == 1
    reader.seek(-9, 2)  # far forward: a new GET
    assert reader.read(100) == stored[-9:]
    reader.seek(0)  # back: a new GET
    assert reader.read(4) == stored[:4]
    assert reader.requests == 3
    assert reader.read(0) == b"" and reader.tell() == 4


def test_an_object_overwritten_while_read_is_read_at_the_version_opened(stored):
    reader = streams.SequentialObjectReader("images/1/test.vhd")
    storage.put_object("images/1/test.vhd", b"something else")
    assert reader.read(10) == stored[:10]


def test_an_object_pinned_to_its_etag_only_is_refused_once_overwritten(stored):
    reader = streams.SequentialObjectReader("images/1/test.vhd")
    reader.version_id = ""  # as on an unversioned bucket
    storage.put_object("images/1/test.vhd", b"something else")
    with pytest.raises(storage.ObjectChanged):
        reader.read(10)


def test_the_parallel_writer_uploads_parts_in_order(aws):
    data = os.urandom(23 * MiB + 7)
    with storage.ObjectWriter("images/1/out.vhd", part_size=5 * MiB, in_flight=3) as out:
        for at in range(0, len(data), 1_000_003):
            out.write(data[at : at + 1_000_003])
    reader = streams.SequentialObjectReader("images/1/out.vhd")
    assert reader.read() == data
    assert out.size == len(data)


def test_a_failed_write_leaves_no_object_and_no_upload(aws):
    with (
        pytest.raises(RuntimeError),
        storage.ObjectWriter("images/1/failed.vhd", part_size=5 * MiB, in_flight=3) as out,
    ):
        out.write(os.urandom(11 * MiB))
        raise RuntimeError("merge failed")
    with pytest.raises(ObjectNotFound):
        storage.head_object("images/1/failed.vhd")
    assert storage.multipart_uploads(prefix="images/1/failed.vhd") == []


def test_an_empty_object_can_be_written(aws):
    with storage.ObjectWriter("images/1/empty", in_flight=3):
        pass
    assert storage.head_object("images/1/empty")["size"] == 0
