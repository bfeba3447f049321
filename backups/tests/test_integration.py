"""End to end with real services: PostgreSQL, Redis, a Celery worker process, moto's server mode."""

import hashlib
import os

import pytest
from django.db import connection

from backups.models import Backup
from reclo_site import cloud, testing
from reclo_site.celery import app as celery_app
from reclo_site.cloud import storage

from . import vhds
from .conftest import START

pytestmark = pytest.mark.integration


@pytest.fixture
def own_queue():
    """A queue of our own, so a worker of someone else's test run never takes our tasks."""
    queue = f"test-backups-{os.getpid()}"
    previous = (celery_app.conf.task_always_eager, celery_app.conf.task_default_queue)
    celery_app.conf.task_always_eager = False
    celery_app.conf.task_default_queue = queue
    yield queue
    celery_app.conf.task_always_eager, celery_app.conf.task_default_queue = previous


@pytest.fixture
def services_up():
    testing.require_services()


@pytest.mark.usefixtures("services_up")
def test_a_real_worker_verifies_uploads_end_to_end(transactional_db, user, api, moto_server, own_queue):
    assert connection.vendor == "postgresql"
    env = {
        "DATABASE_URL": testing.test_database_url(connection),
        "REDIS_URL": os.environ["REDIS_URL"],
        "AWS_ENDPOINT_URL": moto_server,
        "RECLO_BUCKET": storage.bucket_name(),
        # What the worker enqueues itself (retention) stays on our queue too.
        "CELERY_TASK_DEFAULT_QUEUE": own_queue,
    }

    def upload(data: bytes) -> str:
        started = api.post("/api/v1/backups/uploads", {**START, "kind": "full"}, format="json")
        assert started.status_code == 201, started.json()
        assert started.json()["endpoint_url"] == moto_server
        storage.put_object(started.json()["key"], data)
        body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        done = api.post(f"/api/v1/backups/uploads/{started.json()['upload_id']}/complete", body, format="json")
        assert done.status_code == 202 and done.json()["backup"]["status"] == "verifying"
        return started.json()["upload_id"]

    good, _ = vhds.full(vhds.raw_disk(1))
    with testing.celery_worker(env, queues=own_queue):
        good_id = upload(good)
        bad_id = upload(os.urandom(4096))

        def settled():
            statuses = dict(Backup.objects.filter(pk__in=[good_id, bad_id]).values_list("pk", "status"))
            return all(s in ("verified", "failed") for s in statuses.values()) and statuses

        testing.wait_until(settled, timeout=90, what="the worker's verdicts")

    verified, failed = Backup.objects.get(pk=good_id), Backup.objects.get(pk=bad_id)
    assert verified.status == "verified", verified.failure
    assert verified.vhd_unique_id is not None and verified.sha256 == hashlib.sha256(good).hexdigest()
    assert failed.status == "failed" and failed.failure.startswith("Not a valid restore point")
    with pytest.raises(cloud.ObjectNotFound):
        storage.head_object(failed.key)
    assert api.get(f"/api/v1/backups/{good_id}").json()["backup"]["status"] == "verified"
