"""Transfer pieces: credential renewal, the bandwidth limit, part sizes, the S3 object stream."""

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from reclo_agent.errors import TokenRejected, UsageError
from reclo_agent.s3 import S3Access
from reclo_agent.s3stream import ObjectStream
from reclo_agent.throttle import ThrottledBody, TokenBucket, parse_rate
from reclo_agent.uploader import MAX_PARTS, MIN_PART_SIZE, choose_part_size, in_flight_for

MiB = 1024 * 1024


def creds(expires: datetime) -> dict:
    return {"AccessKeyId": "testing", "SecretAccessKey": "testing", "SessionToken": "testing",
            "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def test_credentials_are_renewed_before_they_expire_not_after():
    clock = Clock()
    start = datetime.fromtimestamp(clock.now, UTC)
    issued = []

    def refresh():
        issued.append(1)
        return creds(datetime.fromtimestamp(clock.now, UTC) + timedelta(hours=12))

    grant = {"bucket": "b", "region": "us-east-1", "endpoint_url": None,
             "credentials": creds(start + timedelta(hours=12))}  # fmt: skip
    access = S3Access(grant, refresh, clock=clock)
    first = access.client()
    clock.now += 11 * 3600  # an hour left: still fine
    assert access.client() is first and issued == []
    clock.now += 55 * 60  # five minutes left: inside the 10-minute margin
    second = access.client()
    assert second is not first and issued == [1]
    assert access.client() is second  # fresh for another 12 hours


def test_one_hour_upload_credentials_are_renewed_ten_minutes_before_they_expire():
    # The portal's default for uploads (RECLO_UPLOAD_CREDENTIALS_TTL): 1 hour.
    clock = Clock()
    start = datetime.fromtimestamp(clock.now, UTC)
    issued = []

    def refresh():
        issued.append(1)
        return creds(datetime.fromtimestamp(clock.now, UTC) + timedelta(hours=1))

    grant = {"bucket": "b", "region": "us-east-1", "endpoint_url": None,
             "credentials": creds(start + timedelta(hours=1))}  # fmt: skip
    access = S3Access(grant, refresh, clock=clock)
    first = access.client()
    clock.now += 49 * 60
    assert access.client() is first and issued == []
    clock.now += 2 * 60  # nine minutes left
    assert access.client() is not first and issued == [1]


def test_an_expired_token_error_renews_once_and_retries():
    calls = []
    grant = {"bucket": "b", "region": "us-east-1", "endpoint_url": None,
             "credentials": creds(datetime.now(UTC) + timedelta(hours=12))}  # fmt: skip
    access = S3Access(grant, lambda: creds(datetime.now(UTC) + timedelta(hours=12)))

    class FakeClient:
        def head_object(self, **kw):
            calls.append(kw)
            if len(calls) == 1:
                raise ClientError({"Error": {"Code": "ExpiredToken", "Message": "expired"}}, "HeadObject")
            return {"ok": True}

    access._client = FakeClient()
    access._set = lambda c: setattr(access, "_client", FakeClient())
    assert access.call("head_object", Key="k") == {"ok": True}
    assert len(calls) == 2


def test_access_denied_is_an_auth_error_with_advice():
    grant = {"bucket": "b", "region": "us-east-1", "endpoint_url": None,
             "credentials": creds(datetime.now(UTC) + timedelta(hours=1))}  # fmt: skip
    access = S3Access(grant)

    class Denied:
        def put_object(self, **kw):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")

    access._client = Denied()
    with pytest.raises(TokenRejected, match="log in again"):
        access.call("put_object", Key="k", Body=b"")


def test_parse_rate():
    assert parse_rate("10M") == 10 * MiB
    assert parse_rate("512k") == 512 * 1024
    assert parse_rate("1.5MiB/s") == int(1.5 * MiB)
    assert parse_rate("2000000") == 2_000_000
    for bad in ("fast", "10 furlongs", "1k"):
        with pytest.raises(UsageError):
            parse_rate(bad)


def test_token_bucket_holds_the_average_rate():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(1 * MiB, burst=64 * 1024, clock=lambda: now[0], sleep=sleep)
    body = ThrottledBody(bytes(4 * MiB), bucket)
    while body.read(8192):
        pass
    # 4 MiB at 1 MiB/s, less the initial burst.
    assert now[0] == pytest.approx(4 - 64 / 1024, rel=0.02)
    body.seek(0)
    assert len(body.read()) == 4 * MiB  # seekable, for botocore's retries


def test_part_sizes_fit_s3s_limits_and_memory():
    assert choose_part_size(100 * MiB) == 8 * MiB
    size = choose_part_size(2040 * 1024 * MiB)  # the largest VHD disk, incompressible
    assert size % MiB == 0 and 2040 * 1024 * MiB / size < MAX_PARTS
    assert choose_part_size(1) >= MIN_PART_SIZE
    assert in_flight_for(8 * MiB) == 4
    assert in_flight_for(size) == 1  # a huge part: one in flight keeps memory bounded


@pytest.fixture
def bucket():
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="stream-test")
        grant = {"bucket": "stream-test", "region": "us-east-1", "endpoint_url": None,
                 "credentials": creds(datetime.now(UTC) + timedelta(hours=1))}  # fmt: skip
        yield s3, S3Access(grant)


@pytest.mark.parametrize("size", [0, 1000, 3 * MiB + 17, 9 * MiB])
def test_object_stream_reads_in_order_and_hashes_everything(bucket, size):
    s3, access = bucket
    data = os.urandom(size)
    s3.put_object(Bucket="stream-test", Key="obj", Body=data)
    with ThreadPoolExecutor(4) as pool:
        stream = ObjectStream(access, "obj", size, pool, chunk_size=MiB, ahead=3, tail_size=64 * 1024)
        got = io.BytesIO()
        stream.seek(max(0, size - 100))  # the tail first, as the seek table reader does
        tail = stream.read(100)
        stream.seek(0)
        while chunk := stream.read(300_000):
            got.write(chunk)
        assert got.getvalue() == data
        assert tail == data[-100:]
        assert stream.sha256_hexdigest() == hashlib.sha256(data).hexdigest()
        assert stream.direct_reads == 0


def test_object_stream_skipping_and_going_back_stays_correct(bucket):
    s3, access = bucket
    data = os.urandom(6 * MiB)
    s3.put_object(Bucket="stream-test", Key="obj", Body=data)
    with ThreadPoolExecutor(4) as pool:
        stream = ObjectStream(access, "obj", len(data), pool, chunk_size=MiB, ahead=2, tail_size=1024)
        stream.seek(int(2.5 * MiB))  # skip ahead within the window
        assert stream.read(10) == data[int(2.5 * MiB) : int(2.5 * MiB) + 10]
        stream.seek(100)  # behind the stream: a read of its own
        assert stream.read(10) == data[100:110]
        assert stream.direct_reads == 1
        # Never-read parts are still fetched for the checksum.
        assert stream.sha256_hexdigest() == hashlib.sha256(data).hexdigest()


def test_object_stream_spans_are_views_within_a_chunk_and_copies_across_or_in_the_tail(bucket):
    s3, access = bucket
    data = os.urandom(5 * MiB + 123)
    s3.put_object(Bucket="stream-test", Key="obj", Body=data)
    with ThreadPoolExecutor(4) as pool:
        stream = ObjectStream(access, "obj", len(data), pool, chunk_size=MiB, ahead=2, tail_size=4096)
        inside = stream.read_span(10, 1000)
        assert isinstance(inside, memoryview) and inside == data[10:1010]
        across = stream.read_span(MiB - 50, 100)  # the end of chunk 0 and the start of chunk 1
        assert isinstance(across, bytes) and across == data[MiB - 50 : MiB + 50]
        assert stream.tell() == MiB + 50
        later = stream.read_span(3 * MiB + 7, 2000)  # skipped ahead within the read-ahead window
        assert bytes(later) == data[3 * MiB + 7 : 3 * MiB + 2007]
        tail = stream.read_span(len(data) - 100, 100)
        assert tail == data[-100:]
        assert stream.read_span(200, 10) == data[200:210]  # behind the stream: a read of its own
        assert stream.direct_reads == 1
        assert stream.sha256_hexdigest() == hashlib.sha256(data).hexdigest()
