"""Redis, the Celery broker, restarted during a failover.

A real worker process runs the failover against moto's server while the
test kills Redis and starts it again on the same port. Redis keeps nothing
on disk here (no RDB, no AOF, as a cache-sized instance often runs), so
every queued message, delayed task and unacknowledged delivery is gone
after the restart: only the beat reconciler (`failovers_reconcile`, sent
by the test as beat would send it) can pick the failover up again. It must
end `ready` with exactly one of everything in the cloud.

The machine's shared Redis is never touched: each test starts its own
redis-server on a free loopback port, and both the worker and this
process's Celery publisher use it.
"""

import os
import subprocess
import time
from contextlib import contextmanager
from datetime import timedelta

import kombu.pools
import pytest
import redis
from django.db import connection
from moto.moto_api._internal.models import moto_api_backend

from reclo_site import testing
from reclo_site.celery import app as celery_app
from recovery import services, tasks
from recovery.models import Instance, Recovery, RecoveryStep, VpnGateway
from recovery.tests.cloud_inventory import inventory
from recovery.tests.factories import MiB, ServerFactory, backup_chain, slow_snapshot_writes

pytestmark = pytest.mark.django_db(transaction=True)

STALE_SECONDS = 3
ONE_OF_EACH = {"servers": 1, "gateways": 1, "images": 1, "snapshots": 1, "addresses": 2, "vpcs": 1}


class OwnRedis:
    """A redis-server of this test's own, on a loopback port, that keeps nothing on disk."""

    def __init__(self, binary: str):
        self.binary = binary
        self.port = testing.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        testing.wait_until(self._answers, timeout=10, interval=0.05, what=f"redis-server on port {self.port}")

    def crash(self) -> None:
        """SIGKILL: no clean shutdown, connections cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def _answers(self) -> bool:
        try:
            return self.client().ping()
        except redis.RedisError:
            return False


@pytest.fixture
def own_redis():
    testing.require_services()
    server = OwnRedis(testing.require_tool("redis-server"))
    server.start()
    yield server
    server.crash()


@pytest.fixture
def moto_server(settings, monkeypatch):
    """moto's server mode on a free loopback port, with slow EBS block writes, so a step can be caught mid-way."""
    slow_snapshot_writes(monkeypatch)
    with testing.moto_server(settings) as endpoint:
        yield endpoint


def reset_moto() -> None:
    """Empty moto's cloud: its backends live in this process, shared by every server it starts."""
    moto_api_backend.reset()  # what POST /moto-api/reset does


def _forget_broker_connections() -> None:
    # Celery makes its connection and producer pools from broker_url on first
    # use and keeps them, and kombu keeps them per URL as well: close and drop
    # them all (as Celery does after a fork), so the next publish uses the URL
    # now set and none is left pointing at a Redis that is gone.
    kombu.pools.reset()
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@contextmanager
def publishing_to(url: str, queue: str):
    """This process's Celery publisher sends to `url`, on `queue`, for real (not eagerly)."""
    conf = celery_app.conf
    saved = (conf.broker_url, conf.task_default_queue, conf.task_always_eager)
    conf.broker_url, conf.task_default_queue, conf.task_always_eager = url, queue, False
    _forget_broker_connections()
    try:
        yield
    finally:
        conf.broker_url, conf.task_default_queue, conf.task_always_eager = saved
        _forget_broker_connections()


@pytest.fixture
def failover_env(own_redis, moto_server, settings):
    """The worker's environment, and this process publishing to the same Redis and queue."""
    assert connection.vendor == "postgresql"
    settings.RECLO_RECOVERY_STALE_AFTER = timedelta(seconds=STALE_SECONDS)
    queue = f"test-faults-redis-{os.getpid()}"
    env = {
        "DATABASE_URL": testing.test_database_url(connection),
        "REDIS_URL": own_redis.url,
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "AWS_ENDPOINT_URL": moto_server,
        "RECLO_BUCKET": settings.RECLO_BUCKET,
        "RECLO_RECOVERY_STALE_SECONDS": str(STALE_SECONDS),
    }
    with publishing_to(own_redis.url, queue):
        yield env, queue


def step(recovery, name: str) -> RecoveryStep:
    return RecoveryStep.objects.get(recovery_id=recovery.pk, name=name)


def status_of(recovery) -> str:
    return Recovery.objects.values_list("status", flat=True).get(pk=recovery.pk)


def finish_with_the_reconciler(recovery, timeout: float = 120) -> Recovery:
    """Send beat's reconciler (a little more often than once a minute) until the failover is over."""

    def over_or_nudge():
        if status_of(recovery) in Recovery.FINISHED:
            return True
        tasks.failovers_reconcile.delay()
        return False

    testing.wait_until(over_or_nudge, timeout=timeout, interval=STALE_SECONDS, what="the failover to finish")
    return Recovery.objects.get(pk=recovery.pk)


def assert_made_once(recovery) -> None:
    assert recovery.status == "ready", recovery.error
    assert inventory() == ONE_OF_EACH
    assert Instance.objects.filter(recovery=recovery).count() == 1
    assert VpnGateway.objects.count() == 1
    assert list(recovery.steps.values_list("status", flat=True)) == ["done"] * len(Recovery.STEPS)


@pytest.mark.integration
def test_a_failover_survives_a_redis_restart_mid_pipeline(failover_env, own_redis, user):
    env, queue = failover_env
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user), size=48 * MiB, incrementals=2)

    with testing.celery_worker(env):  # its queue and the failover queue that goes with it
        recovery = services.recovery_start(user=user, backup_id=backups[-1].pk)
        # Crash Redis while the worker writes the disk into the snapshot:
        # the step's own delivery is unacknowledged, and the message that
        # would start the next step has not been sent yet.
        testing.wait_until(
            lambda: step(recovery, "importing").status == "running" and step(recovery, "importing").outputs,
            timeout=90,
            interval=0.05,
            what="the import to start writing blocks",
        )
        own_redis.crash()
        # The worker finishes the step without Redis (it needs only the
        # database and the cloud); sending the next step then fails.
        testing.wait_until(
            lambda: status_of(recovery) != "importing", timeout=60, what="the import to finish with Redis down"
        )
        time.sleep(2)  # past the worker's publish retries (well under a second)
        own_redis.start()

        # Nothing survived, and nothing moves the failover on by itself.
        assert own_redis.client().llen(queue) == 0
        time.sleep(STALE_SECONDS)
        assert status_of(recovery) == "launching"
        assert step(recovery, "launching").attempts == 0

        recovery = finish_with_the_reconciler(recovery)

    assert_made_once(recovery)
    assert step(recovery, "importing").attempts == 1  # the work done while Redis was down was kept


@pytest.mark.integration
def test_a_failover_started_while_redis_is_down_is_accepted_and_runs_once_it_is_back(
    failover_env, own_redis, user, api
):
    env, queue = failover_env
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user), size=8 * MiB, incrementals=1)
    own_redis.crash()

    response = api.post("/api/v1/recoveries", {"backup_id": str(backups[-1].pk)}, format="json")

    # Accepted: the failover is recorded, and beat sends what the broker missed.
    assert response.status_code == 202, response.json()
    recovery = Recovery.objects.get(pk=response.json()["recovery_id"])
    assert recovery.status == "queued"

    own_redis.start()
    with testing.celery_worker(env):  # its queue and the failover queue that goes with it
        recovery = finish_with_the_reconciler(recovery)

    assert_made_once(recovery)
    assert Recovery.objects.count() == 1


def test_the_api_accepts_a_failover_while_the_broker_is_unreachable(user, api):
    """The same without services (SQLite, no Redis): the answer does not depend on the broker."""
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user), size=4 * MiB, incrementals=0, upload=False)

    with publishing_to(f"redis://127.0.0.1:{testing.free_port()}/0", "test-faults-nowhere"):
        response = api.post("/api/v1/recoveries", {"backup_id": str(backups[0].pk)}, format="json")

    assert response.status_code == 202, response.json()
    recovery = Recovery.objects.get()
    assert (recovery.status, recovery.due_at is not None) == ("queued", True)
    assert recovery.steps.count() == len(Recovery.STEPS)
