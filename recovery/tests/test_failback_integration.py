"""A failback through Redis and real worker processes, against moto's server: SIGKILL one mid-copy.

moto's server runs in this process (`testing.moto_server`), so the
`moto_cloud_disk.CloudDisk` extension patched in here is what the workers
see too. Needs PostgreSQL and Redis (DATABASE_URL, REDIS_URL); skipped
locally without them, required in CI.
"""

import os
import signal
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from moto.ebs.models import EBSBackend
from reclo_agent import restore as agent_restore
from reclo_agent.progress import Reporter

from backups.models import Backup
from reclo_site import testing
from reclo_site.celery import app as celery_app
from recovery import failback_services, services, tasks
from recovery.models import Failback, FailbackStep, Instance

from .factories import MiB, ServerFactory, backup_chain
from .moto_cloud_disk import EBS_BLOCK, CloudDisk
from .test_failback import PortalThroughApi

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 3


class HeldReads:
    """GetSnapshotBlock calls after the first `after` wait (in moto) until `release()`: the kill cannot come late."""

    def __init__(self, after: int):
        self.after = after
        self.count = 0
        self._lock = threading.Lock()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def install(self, monkeypatch) -> None:
        real = EBSBackend.get_snapshot_block

        def held(backend, *args, **kwargs):
            with self._lock:
                self.count += 1
                wait = self.count > self.after
            if wait:
                self._released.wait(timeout=120)
            return real(backend, *args, **kwargs)

        monkeypatch.setattr(EBSBackend, "get_snapshot_block", held)


def test_a_worker_killed_mid_copy_is_taken_over_without_a_second_snapshot(settings, user, api, tmp_path, monkeypatch):
    testing.require_services()
    assert connection.vendor == "postgresql"
    settings.RECLO_RECOVERY_STALE_AFTER = timedelta(seconds=STALE_SECONDS)
    with testing.moto_server(settings) as endpoint, CloudDisk() as disk:
        backups, top = backup_chain(user=user, server=ServerFactory(user=user), size=16 * MiB, incrementals=1)
        # The failover runs here (eager tasks): only the failback is the workers'.
        recovery = services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="ebs_direct")
        recovery.refresh_from_db()
        assert recovery.status == "ready", recovery.error
        instance = Instance.objects.get(recovery=recovery)
        worked = bytearray(top)
        for n in range(0, len(top), 3 * EBS_BLOCK):  # the office worked all over the disk
            disk.write(instance.instance_id, n + 100, b"cloud work " * 50)
            worked[n + 100 : n + 100 + 550] = b"cloud work " * 50

        reads = HeldReads(after=4)
        reads.install(monkeypatch)
        env = {
            "DATABASE_URL": testing.test_database_url(connection),
            "REDIS_URL": os.environ["REDIS_URL"],
            "AWS_ENDPOINT_URL": endpoint,
            "RECLO_BUCKET": settings.RECLO_BUCKET,
            "RECLO_RECOVERY_STALE_SECONDS": str(STALE_SECONDS),
        }
        celery_app.conf.task_always_eager = False

        def copying() -> FailbackStep:
            return FailbackStep.objects.get(failback__user=user, name="copying")

        with testing.celery_worker(env) as first:
            failback = failback_services.failback_start(user=user, recovery=recovery)
            testing.wait_until(
                lambda: copying().status == "running" and reads.count > reads.after,
                timeout=90,
                interval=0.05,
                what="the copy to start reading blocks",
            )
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        assert Failback.objects.get(pk=failback.pk).status == "copying"
        assert not Backup.objects.filter(pk=failback.backup_ref).exists()
        reads.release()  # the dead worker's held requests end here, before the next worker starts
        time.sleep(1)

        with testing.celery_worker(env):

            def ready_or_nudge():
                status = Failback.objects.get(pk=failback.pk).status
                if status not in Failback.FINISHED:
                    tasks.failbacks_reconcile.delay()  # beat's reconciler, a little more often
                return status in Failback.FINISHED

            testing.wait_until(ready_or_nudge, timeout=120, interval=STALE_SECONDS, what="the failback to finish")

        failback.refresh_from_db()
        assert failback.status == "ready", failback.error
        assert copying().attempts >= 2
        assert len(disk.snapshots_of_volumes) == 1  # the second worker copied from the first's snapshot
        assert failback.snapshot_id == disk.snapshots_of_volumes[0]
        assert Backup.objects.get(pk=failback.backup_ref).status == "verified"
        celery_app.conf.task_always_eager = True
        target = tmp_path / "disk.img"
        agent_restore.restore(PortalThroughApi(api), str(failback.backup_ref), str(target), Reporter(quiet=True))
        assert target.read_bytes() == bytes(worked)
