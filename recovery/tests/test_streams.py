"""The failover's S3 streams: one GET per scan, bounded ranges, broken streams resumed, background part uploads."""

import os

import pytest
from botocore.exceptions import ResponseStreamingError

from reclo_site.cloud import CloudUnavailable, ObjectNotFound, clients, storage, streams

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


def recorded_ranges(monkeypatch) -> list[str]:
    """The Range of every GetObject the adapter sends from now on."""
    s3 = clients.client("s3")
    real = s3.get_object
    ranges = []

    def recording(**kwargs):
        ranges.append(kwargs["Range"])
        return real(**kwargs)

    monkeypatch.setattr(s3, "get_object", recording)
    return ranges


def test_a_bounded_reader_asks_for_no_more_than_its_end(stored, monkeypatch):
    ranges = recorded_ranges(monkeypatch)
    reader = streams.SequentialObjectReader("images/1/test.vhd", end=MiB)
    reader.seek(1000)
    assert reader.read(5000) == stored[1000:6000]
    reader.seek(MiB - 10)  # a short skip forward: the same GET
    assert reader.read(20) == stored[MiB - 10 : MiB]  # a short read: the range ends there
    assert reader.read(10) == stored[MiB : MiB + 10]  # past the end: a GET of the rest
    assert ranges == [f"bytes=1000-{MiB - 1}", f"bytes={MiB}-{len(stored) - 1}"]


class Breaking:
    """A response body whose connection drops after `after` bytes."""

    def __init__(self, body, after: int):
        self._body, self._left = body, after

    def read(self, n=None):
        if self._left <= 0:
            raise ResponseStreamingError(error="Connection broken: IncompleteRead")
        data = self._body.read(min(n, self._left))
        self._left -= len(data)
        return data

    def close(self):
        self._body.close()


def test_a_stream_that_breaks_is_reopened_where_it_broke(stored, monkeypatch):
    s3 = clients.client("s3")
    real = s3.get_object
    ranges = []

    def breaking_once(**kwargs):
        ranges.append(kwargs["Range"])
        resp = real(**kwargs)
        if len(ranges) == 1:
            resp["Body"] = Breaking(resp["Body"], after=MiB + 5)
        return resp

    monkeypatch.setattr(s3, "get_object", breaking_once)
    reader = streams.SequentialObjectReader("images/1/test.vhd")
    data = b"".join(iter(lambda: reader.read(64 * 1024), b""))
    assert data == stored
    assert len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").split("-")[0])
    assert MiB - 64 * 1024 <= resumed_at <= MiB + 5  # where it broke, not from the start


def test_a_stream_that_keeps_breaking_gives_up_as_unavailable(stored, monkeypatch):
    s3 = clients.client("s3")
    real = s3.get_object

    def always_breaking(**kwargs):
        resp = real(**kwargs)
        resp["Body"] = Breaking(resp["Body"], after=0)
        return resp

    monkeypatch.setattr(s3, "get_object", always_breaking)
    reader = streams.SequentialObjectReader("images/1/test.vhd", retries=2)
    with pytest.raises(CloudUnavailable):
        reader.read(10)
