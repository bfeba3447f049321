"""A verification worker killed mid-check: its pool process, or the whole worker.

Real prefork workers against the real Redis (on a queue of this test run's
own) and moto's server mode in this process, whose S3 GETs are slowed so
the test can catch a verification in the middle of reading its object.

- A SIGKILLed pool process is replaced by the worker, idle or busy; the
  task it was running comes back at once (acks late, rejected when the
  worker is lost) and is taken over once the dead process's heartbeat is
  stale; the next task runs on the new process.
- A worker killed as a whole leaves its delivery unacknowledged in Redis;
  another worker gets it back after the visibility timeout (a few seconds
  here, minutes in production) and finishes the verification.
"""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import kombu.pools
import pytest
from django.db import connection
from django.utils import timezone
from moto.s3.responses import S3Response

from accounts.models import ApiToken
from backups.models import Backup
from backups.tests import vhds
from backups.tests.conftest import START
from reclo_site import devstack, testing
from reclo_site.celery import app as celery_app
from reclo_site.cloud import storage

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 2


class SlowGets:
    """Makes moto's next `count` GetObject calls take `delay` seconds each (this process hosts moto)."""

    def __init__(self):
        self.left = 0
        self.delay = 0.0
        self.lock = threading.Lock()

    def next(self, count: int, delay: float) -> None:
        with self.lock:
            self.left, self.delay = count, delay

    def take(self) -> float:
        with self.lock:
            if self.left <= 0:
                return 0.0
            self.left -= 1
            return self.delay


@pytest.fixture
def slow_gets(monkeypatch):
    # The GetObject request's handler, not the backend's get_object: moto's
    # PutObject and HeadObject call that too, and a slowed PUT of the test's
    # own upload would let the verification run at full speed (and be over
    # before the test kills it).
    slow = SlowGets()
    real = S3Response.get_object

    def get_object(self):
        time.sleep(slow.take())
        return real(self)

    monkeypatch.setattr(S3Response, "get_object", get_object)
    return slow


@pytest.fixture
def worker_env(settings, slow_gets):
    """The workers' environment: this test's database, Redis, queue and moto; heartbeats stale in seconds."""
    testing.require_services()
    assert connection.vendor == "postgresql"
    queue = f"test-faults-worker-{os.getpid()}"
    previous = (celery_app.conf.task_always_eager, celery_app.conf.task_default_queue)
    celery_app.conf.task_always_eager = False
    celery_app.conf.task_default_queue = queue
    with testing.moto_server(settings) as endpoint:
        yield {
            "DATABASE_URL": testing.test_database_url(connection),
            "REDIS_URL": os.environ["REDIS_URL"],
            "AWS_ENDPOINT_URL": endpoint,
            "RECLO_BUCKET": settings.RECLO_BUCKET,
            "CELERY_TASK_DEFAULT_QUEUE": queue,
            "RECLO_VERIFY_STALE_SECONDS": str(STALE_SECONDS),
        }
    celery_app.conf.task_always_eager, celery_app.conf.task_default_queue = previous


def upload(api, seed: int) -> str:
    """A real full restore point, uploaded and completed through the API (the worker verifies it)."""
    data, _ = vhds.full(vhds.raw_disk(seed))
    started = api.post("/api/v1/backups/uploads", {**START, "kind": "full"}, format="json")
    assert started.status_code == 201, started.json()
    storage.put_object(started.json()["key"], data)
    body = {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    done = api.post(f"/api/v1/backups/uploads/{started.json()['upload_id']}/complete", body, format="json")
    assert done.status_code == 202, done.json()
    return started.json()["upload_id"]


def reading(backup_id) -> bool:
    """A worker has claimed the verification and is reading the object."""
    return Backup.objects.filter(pk=backup_id, read_heartbeat__isnull=False).exists()


def verified(backup_id, timeout: float) -> Backup:
    testing.wait_until(
        lambda: Backup.objects.get(pk=backup_id).status != "verifying", timeout=timeout, what="the verdict"
    )
    backup = Backup.objects.get(pk=backup_id)
    assert backup.status == "verified", backup.failure
    return backup


def pool_processes(worker) -> list[int]:
    """Pids of a worker's live pool processes.

    Zombies are left out: a killed process stays listed until the worker
    reaps it, which a loaded machine delays. Every thread's children, in
    case a pool forks from a thread of its own (billiard's threaded pool).
    """
    pids = []
    for task in Path(f"/proc/{worker.pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        for pid in children:
            if _state(int(pid)) not in ("Z", "X", None):
                pids.append(int(pid))
    return sorted(pids)


def _state(pid: int) -> str | None:
    """A process's state letter from /proc (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def test_a_sigkilled_pool_process_is_replaced_and_its_verification_taken_over(worker_env, api, slow_gets):
    with testing.celery_worker(worker_env, concurrency=1) as worker:
        # Killed while idle (the OOM killer does not wait for a task to end):
        # with Redis the prefork pool gives each process a pipe of its own,
        # so the replacement is not stuck behind a lock the dead one held.
        # (Once it has run a task: a pool process lost while the worker still
        # starts up is, for Celery, a worker that cannot start.)
        verified(upload(api, seed=5), timeout=60)
        (idle,) = pool_processes(worker)
        os.kill(idle, signal.SIGKILL)
        verified(upload(api, seed=4), timeout=120)

        slow_gets.next(1, 6.0)
        first = upload(api, seed=1)
        testing.wait_until(lambda: reading(first), timeout=120, interval=0.05, what="the verification to start")
        (victim,) = pool_processes(worker)
        os.kill(victim, signal.SIGKILL)

        # The worker lives on with a new pool process, and the killed one's
        # verification is finished there (taken over once its claim is stale).
        verified(first, timeout=60)
        assert worker.poll() is None
        testing.wait_until(lambda: len(pool_processes(worker)) == 1, timeout=30, what="one live pool process")
        (replacement,) = pool_processes(worker)
        assert replacement != victim

        # And the next task runs.
        second = upload(api, seed=2)
        verified(second, timeout=120)


def test_a_killed_workers_verification_is_redelivered_after_the_visibility_timeout(worker_env, api, slow_gets):
    env = {**worker_env, "CELERY_VISIBILITY_TIMEOUT": "3"}
    with testing.celery_worker(env) as first_worker:
        slow_gets.next(1, 30.0)
        backup_id = upload(api, seed=3)
        testing.wait_until(lambda: reading(backup_id), timeout=120, interval=0.05, what="the verification to start")
        os.killpg(first_worker.pid, signal.SIGKILL)
        first_worker.wait(timeout=10)
    assert Backup.objects.get(pk=backup_id).status == "verifying"  # unacknowledged in Redis, not lost

    with testing.celery_worker(env):
        verified(backup_id, timeout=60)


# --- make run's workers (the file-system broker) ----------------------------------------------


@contextmanager
def filesystem_broker(folder: Path):
    """This process publishes through kombu's file-system transport in `folder`, as `make run`'s portal does."""
    conf = celery_app.conf
    for sub in ("queue", "processed", "control"):
        (folder / "broker" / sub).mkdir(parents=True, exist_ok=True)
    saved = (conf.broker_url, conf.broker_transport_options, conf.task_always_eager)
    conf.broker_url = "filesystem://"
    conf.broker_transport_options = {
        "data_folder_in": str(folder / "broker" / "queue"),
        "data_folder_out": str(folder / "broker" / "queue"),
        "processed_folder": str(folder / "broker" / "processed"),
        "store_processed": False,
        "control_folder": str(folder / "broker" / "control"),
    }
    conf.task_always_eager = False
    _forget_broker_connections()
    try:
        yield
    finally:
        conf.broker_url, conf.broker_transport_options, conf.task_always_eager = saved
        _forget_broker_connections()


def _forget_broker_connections() -> None:
    kombu.pools.reset()
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def test_make_runs_worker_keeps_running_tasks_after_the_oom_killer_takes_a_process_of_it(tmp_path, user):
    """With a prefork pool this worker wedged: the blocking pool's shared read lock died with the process."""
    testing.require_services()
    queue = f"test-devstack-{os.getpid()}"
    env = {
        "DATABASE_URL": testing.test_database_url(connection),
        "REDIS_URL": "",
        "CELERY_BROKER_URL": "filesystem://",
        "RECLO_VAR_DIR": str(tmp_path),
        "CELERY_TASK_DEFAULT_QUEUE": queue,
    }
    ((_, command), _) = devstack.worker_commands([sys.executable, "-m", "celery", "-A", "reclo_site"], env)
    old = ApiToken.objects.filter(user=user)
    testing.token_for(user)
    old.update(expires=timezone.now() - timedelta(days=1))
    proc_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "worker.log"
    with filesystem_broker(tmp_path), open(log, "wb") as out:
        worker = subprocess.Popen(command, cwd=testing.ROOT, env=proc_env, start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            testing.wait_until(lambda: b" ready." in log.read_bytes(), timeout=60, what="the worker to start")
            time.sleep(2)  # its pool processes idle, waiting for work
            for pid in pool_processes(worker):  # the OOM killer's pick; none when there is no pool process
                os.kill(pid, signal.SIGKILL)
            time.sleep(1)
            celery_app.send_task("accounts.tasks.tokens_expire", queue=queue)
            testing.wait_until(
                lambda: not old.filter(revoked_at__isnull=True).exists(), timeout=30, what="the task to run"
            )
            assert worker.poll() is None
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
