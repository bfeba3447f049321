"""S3 throttling and 5xx during uploads, verification and consolidation.

The faults are made on moto's side of the wire (`S3Faults` answers chosen
S3 operations with SlowDown / 503 / 500 before moto sees them), so the
portal's real boto3 clients, botocore's own retries, our error
translation, Celery's retries and the failover engine's backoff all run as
they would against AWS. Each test ends with the operation completed or
cleanly failed with a reason, nothing half-made (no stray objects or
multipart uploads, no half-written rows) and nothing lost.

The in-process tests run on SQLite too; the one with a real worker needs
PostgreSQL and Redis and is marked `integration`.
"""

import functools
import hashlib
import os
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from botocore.retries.standard import ExponentialBackoff, RetryQuotaChecker
from django.db import connection
from django.utils import timezone
from moto.s3.responses import S3Response

from backups import services as backup_services
from backups import tasks as backup_tasks
from backups.models import Backup
from backups.tests import vhds
from reclo_site import cloud, testing
from reclo_site.celery import app as celery_app
from reclo_site.cloud import storage
from recovery import engine, services
from recovery.models import Recovery, RecoveryStep
from recovery.tests.cloud_inventory import inventory
from recovery.tests.factories import MiB, ServerFactory, backup_chain, drive_recovery

ONE_OF_EACH = {"servers": 1, "gateways": 1, "images": 1, "snapshots": 1, "addresses": 2, "vpcs": 1}
NOTHING = {"servers": 0, "gateways": 0, "images": 0, "snapshots": 0, "addresses": 0, "vpcs": 0}
# botocore counts retries: "max_attempts": 4 in the adapter's config is five tries in all.
SDK_TRIES = 5
START = {"server": "fileserver", "disk": "sda", "file_name": "sda-1.vhd.zst", "virtual_size": vhds.DISK_SIZE}


# --- The fault injector ----------------------------------------------------------------------


@dataclass
class Rule:
    operation: str
    key_contains: str
    times: int | None  # None: until cleared
    status: int
    code: str


class S3Faults:
    """Answers chosen S3 object operations with an error, in front of moto.

    `fail("UploadPart", times=4, status=500, code="InternalError")` makes the
    next four UploadPart calls answer a 500 as S3 does; `seen` and
    `injected` count requests per operation (botocore's own retries
    included), so a test can tell the SDK retried, and how often.
    """

    def __init__(self):
        self.rules: list[Rule] = []
        self.seen: Counter = Counter()
        self.injected: Counter = Counter()
        self._lock = threading.Lock()

    def fail(self, operation: str, *, times: int | None = None, status: int = 503, code: str = "SlowDown",
             key_contains: str = "") -> None:  # fmt: skip
        with self._lock:
            self.rules.append(Rule(operation, key_contains, times, status, code))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    @staticmethod
    def operation(method: str, query: dict) -> str:
        if method == "HEAD":
            return "HeadObject"
        if method == "GET":
            return "ListParts" if "uploadId" in query else "GetObject"
        if method == "PUT":
            return "UploadPart" if "partNumber" in query else "PutObject"
        if method == "POST":
            return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
        if method == "DELETE":
            return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
        return method

    def take(self, method: str, full_url: str) -> tuple[int, dict, str] | None:
        url = urlparse(full_url)
        operation = self.operation(method, parse_qs(url.query, keep_blank_values=True))
        path = unquote(url.path)
        with self._lock:
            self.seen[operation] += 1
            for rule in self.rules:
                if rule.operation == operation and rule.key_contains in path and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    self.injected[operation] += 1
                    body = (
                        '<?xml version="1.0" encoding="UTF-8"?>\n'
                        f"<Error><Code>{rule.code}</Code><Message>Injected by the fault test.</Message>"
                        "<RequestId>FAULT</RequestId></Error>"
                    )
                    return rule.status, {"Content-Type": "application/xml"}, body
        return None


@pytest.fixture
def s3_faults(monkeypatch):
    """Faults in front of moto's S3 object operations (in-process mock and the threaded server alike)."""
    faults = S3Faults()
    real = S3Response.key_response

    def key_response(self, request, full_url, headers):
        fault = faults.take(request.method, full_url)
        if fault is None:
            return real(self, request, full_url, headers)
        if hasattr(request, "get_data"):
            request.get_data()  # read the body, as S3 would, so the connection stays usable
        return fault

    monkeypatch.setattr(S3Response, "key_response", key_response)
    return faults


@pytest.fixture
def quick_sdk_retries(monkeypatch):
    """botocore still makes all its tries, without sleeping between them (this process only).

    Nor does it spend its retry quota: that is kept per client, clients are
    long-lived, and the faults of one test would drain it for the next (a
    client whose quota ran out stops retrying).
    """
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0)
    monkeypatch.setattr(RetryQuotaChecker, "acquire_retry_quota", lambda self, context: True)


def multipart_uploads() -> list:
    return storage.multipart_uploads(prefix="")


def keys(prefix: str) -> list[str]:
    from reclo_site.cloud.clients import client

    listed = client("s3").list_objects_v2(Bucket=storage.bucket_name(), Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def start_upload(api, data: bytes) -> str:
    started = api.post("/api/v1/backups/uploads", {**START, "kind": "full"}, format="json")
    assert started.status_code == 201, started.json()
    storage.put_object(started.json()["key"], data)
    return started.json()["upload_id"]


def complete(api, upload_id: str, data: bytes):
    body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return api.post(f"/api/v1/backups/uploads/{upload_id}/complete", body, format="json")


# --- Upload complete: the HEAD check -----------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("quick_sdk_retries")
def test_throttling_the_sdk_absorbs_does_not_reach_the_agent(api, aws, s3_faults, django_capture_on_commit_callbacks):
    data, _ = vhds.full(vhds.raw_disk(1))
    upload_id = start_upload(api, data)
    s3_faults.fail("HeadObject", times=SDK_TRIES - 1)

    with django_capture_on_commit_callbacks(execute=True):
        response = complete(api, upload_id, data)

    assert response.status_code == 202, response.json()
    assert s3_faults.injected["HeadObject"] == SDK_TRIES - 1
    assert Backup.objects.get(pk=upload_id).status == "verified"


@pytest.mark.django_db
@pytest.mark.usefixtures("quick_sdk_retries")
@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")])
def test_a_head_check_that_stays_throttled_answers_304_and_a_later_complete_succeeds(
    api, aws, s3_faults, django_capture_on_commit_callbacks, status, code
):
    data, _ = vhds.full(vhds.raw_disk(1))
    upload_id = start_upload(api, data)
    s3_faults.fail("HeadObject", times=SDK_TRIES, status=status, code=code)

    with django_capture_on_commit_callbacks(execute=True) as enqueued:
        refused = complete(api, upload_id, data)

    assert refused.status_code == 502
    assert refused.json() == {"error": 304, "message": "Could not check the upload in storage; try again shortly."}
    assert s3_faults.injected["HeadObject"] == SDK_TRIES  # every attempt botocore made
    assert enqueued == []  # no verification was sent
    # Nothing half-written: the upload is still pending, as before the call.
    pending = Backup.objects.get(pk=upload_id)
    assert (pending.status, pending.completed_at, pending.file_size, pending.sha256) == ("pending", None, None, "")
    assert storage.head_object(pending.key)["size"] == len(data)  # the agent's object is untouched

    with django_capture_on_commit_callbacks(execute=True):
        retried = complete(api, upload_id, data)
    assert retried.status_code == 202, retried.json()
    assert retried.json()["backup"]["status"] == "verifying"
    verified = Backup.objects.get(pk=upload_id)
    assert verified.status == "verified", verified.failure
    assert verified.sha256 == hashlib.sha256(data).hexdigest()
    assert Backup.objects.count() == 1


# --- Verification in the worker ---------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.usefixtures("quick_sdk_retries")
def test_verification_retries_on_throttled_reads_and_ends_verified(
    api, aws, s3_faults, django_capture_on_commit_callbacks
):
    data, _ = vhds.full(vhds.raw_disk(2))
    upload_id = start_upload(api, data)
    # One ranged read fails on every try botocore makes: the task sees
    # CloudUnavailable and Celery retries it (eager here: at once, and
    # only without propagation does eager Celery run the retry at all).
    s3_faults.fail("GetObject", times=SDK_TRIES)
    celery_app.conf.task_eager_propagates = False

    with django_capture_on_commit_callbacks(execute=True):
        response = complete(api, upload_id, data)

    assert response.status_code == 202, response.json()
    assert s3_faults.injected["GetObject"] == SDK_TRIES
    # complete, then the object reader of each of the two tries, then the lock looking at the verified version
    assert s3_faults.seen["HeadObject"] == 4
    backup = Backup.objects.get(pk=upload_id)
    assert backup.status == "verified", backup.failure
    assert storage.head_object(backup.key)["size"] == len(data)


@pytest.mark.django_db
@pytest.mark.usefixtures("quick_sdk_retries")
def test_verification_past_its_retry_budget_stays_verifying_and_the_clean_up_job_finishes_it(
    api, aws, s3_faults, django_capture_on_commit_callbacks, settings
):
    data, _ = vhds.full(vhds.raw_disk(3))
    upload_id = start_upload(api, data)
    with django_capture_on_commit_callbacks(execute=False):  # the worker's run comes below
        assert complete(api, upload_id, data).status_code == 202
    s3_faults.fail("GetObject")  # an outage longer than the task's retries

    celery_app.conf.task_eager_propagates = False
    result = backup_tasks.backup_verify.apply(args=[str(upload_id)])

    assert result.failed() and isinstance(result.result, cloud.CloudUnavailable)
    assert s3_faults.seen["HeadObject"] == 1 + backup_tasks.RETRY_CLOUD["max_retries"] + 1
    # Nothing lost: not failed (it is not the backup's fault), the object kept.
    backup = Backup.objects.get(pk=upload_id)
    assert (backup.status, backup.failure) == ("verifying", "")
    assert storage.head_object(backup.key)["size"] == len(data)

    s3_faults.clear()
    counts = backup_services.uploads_clean_up(now=timezone.now() + timedelta(hours=4))
    assert counts["requeued"] == 1
    backup.refresh_from_db()
    assert backup.status == "verified", backup.failure


# --- Consolidation in the failover --------------------------------------------------------------


@pytest.mark.usefixtures("aws", "quick_sdk_retries")
@pytest.mark.parametrize("writer", [storage.ObjectWriter, functools.partial(storage.ObjectWriter, in_flight=3)])
@pytest.mark.parametrize("operation", ["UploadPart", "CompleteMultipartUpload"])
def test_a_writer_whose_last_part_or_completion_fails_leaves_no_parts(s3_faults, writer, operation):
    s3_faults.fail(operation, status=500, code="InternalError")
    with pytest.raises(cloud.CloudUnavailable), writer("images/1/x.vhd") as out:
        out.write(b"the last and only part goes up on leaving the block")
    assert s3_faults.injected[operation] == SDK_TRIES
    assert multipart_uploads() == []
    assert keys("images/") == []


@pytest.fixture
def chain(aws, user):
    return backup_chain(user=user, server=ServerFactory(user=user), size=8 * MiB, incrementals=2)


@pytest.mark.django_db
@pytest.mark.usefixtures("quick_sdk_retries")
@pytest.mark.parametrize(
    ("operation", "status", "code"),
    [
        ("GetObject", 503, "ServiceUnavailable"),  # reading a layer of the chain
        ("UploadPart", 500, "InternalError"),  # writing the merged disk
        ("CompleteMultipartUpload", 503, "SlowDown"),
    ],
)
def test_consolidation_retries_on_5xx_and_writes_one_merged_disk(user, chain, s3_faults, operation, status, code):
    # Only VM Import needs the merged disk in S3 (EBS direct writes the chain straight into the
    # snapshot); moto has no VM Import, so this follows the failover up to the end of consolidating.
    backups, top = chain
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="vm_import")
    s3_faults.fail(operation, times=SDK_TRIES, status=status, code=code)

    recovery = drive_recovery(recovery.pk)

    step = RecoveryStep.objects.get(recovery=recovery, name="consolidating")
    assert (step.status, step.attempts, step.retries) == ("done", 2, 0)
    assert s3_faults.injected[operation] == SDK_TRIES
    # Nothing half-made: one merged disk, no parts left over.
    assert keys("images/") == [step.outputs["image_key"]]
    assert multipart_uploads() == []
    # Nothing lost: the chain is as it was.
    assert [b.status for b in Backup.objects.order_by("date_created")] == ["verified"] * 3
    assert all(storage.head_object(b.key)["size"] == b.file_size for b in backups)


@pytest.mark.django_db
@pytest.mark.usefixtures("quick_sdk_retries")
def test_consolidation_fails_cleanly_with_a_reason_after_its_retry_budget(user, chain, s3_faults):
    backups, _ = chain
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="vm_import")
    s3_faults.fail("UploadPart", status=500, code="InternalError")  # an outage that outlasts the budget

    recovery = drive_recovery(recovery.pk)

    assert (recovery.status, recovery.error_code) == ("failed", 403)
    assert recovery.error.startswith(f"The cloud stayed unavailable after {engine.MAX_RETRIES} retries")
    assert "InternalError" in recovery.error
    step = RecoveryStep.objects.get(recovery=recovery, name="consolidating")
    assert (step.status, step.attempts) == ("failed", engine.MAX_RETRIES + 1)
    assert list(recovery.steps.exclude(name="consolidating").values_list("status", flat=True)) == ["pending"] * 3
    # Nothing half-made: no merged disk, no parts, nothing in EC2, no lease held.
    assert keys("images/") == []
    assert multipart_uploads() == []
    assert inventory() == NOTHING
    assert (recovery.lease_token, recovery.lease_until, recovery.due_at) == (None, None, None)
    # Nothing lost: the chain is intact, and a new failover once S3 is back works.
    assert [b.status for b in Backup.objects.all()] == ["verified"] * 3
    s3_faults.clear()
    again = drive_recovery(services.recovery_start(user=user, backup_id=backups[-1].pk).pk)
    assert again.status == "ready", again.error
    assert Recovery.objects.filter(status="ready").count() == 1


@pytest.mark.django_db
@pytest.mark.usefixtures("quick_sdk_retries")
def test_parts_that_an_outage_kept_from_being_aborted_are_aborted_by_the_clean_up_job(user, chain, s3_faults):
    backups, _ = chain
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="vm_import")
    # S3 refuses writes and aborts alike, for longer than the failover's budget.
    s3_faults.fail("UploadPart", status=503, code="ServiceUnavailable")
    s3_faults.fail("AbortMultipartUpload", status=503, code="ServiceUnavailable")

    recovery = drive_recovery(recovery.pk)
    assert recovery.status == "failed"
    left = multipart_uploads()
    assert left and all(key.startswith("images/") for key, _ in left)

    s3_faults.clear()
    # The hourly job, once those uploads are older than any live writer's.
    backup_services.uploads_clean_up(now=timezone.now() + timedelta(days=1))
    assert multipart_uploads() == []
    assert keys("images/") == []


# --- The same through a real worker ----------------------------------------------------------------


@pytest.fixture
def moto_server(settings):
    """moto's server mode on a free loopback port: the S3 both this process and the worker reach."""
    with testing.moto_server(settings) as endpoint:
        yield endpoint


@pytest.fixture
def services_up():
    testing.require_services()


@pytest.mark.integration
def test_a_real_worker_retries_a_throttled_verification_and_ends_verified(
    services_up, transactional_db, api, moto_server, s3_faults, settings
):
    assert connection.vendor == "postgresql"
    queue = f"test-faults-storage-{os.getpid()}"
    env = {
        "DATABASE_URL": testing.test_database_url(connection),
        "REDIS_URL": os.environ["REDIS_URL"],
        "AWS_ENDPOINT_URL": moto_server,
        "RECLO_BUCKET": settings.RECLO_BUCKET,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
    }
    celery_app.conf.task_always_eager = False
    previous_queue = celery_app.conf.task_default_queue
    celery_app.conf.task_default_queue = queue
    try:
        data, _ = vhds.full(vhds.raw_disk(4))
        upload_id = start_upload(api, data)
        # Every attempt of the worker's first ranged read is throttled: the
        # task retries through the broker (a countdown message) and wins.
        s3_faults.fail("GetObject", times=SDK_TRIES)
        with testing.celery_worker(env, queues=queue):
            response = complete(api, upload_id, data)
            assert response.status_code == 202, response.json()
            testing.wait_until(
                lambda: Backup.objects.get(pk=upload_id).status != "verifying",
                timeout=90,
                what="the worker's verdict",
            )
    finally:
        celery_app.conf.task_default_queue = previous_queue

    backup = Backup.objects.get(pk=upload_id)
    assert backup.status == "verified", backup.failure
    assert s3_faults.injected["GetObject"] == SDK_TRIES
    assert s3_faults.seen["HeadObject"] >= 3  # complete, then the reader of each of the worker's two tries
    assert storage.head_object(backup.key)["size"] == len(data)
