"""A failover through Redis and real worker processes, against moto's server: SIGKILL one mid-step.

Needs PostgreSQL and Redis (DATABASE_URL, REDIS_URL); skipped locally
without them, required in CI.
"""

import os
import signal
import time
from datetime import timedelta

import pytest
from django.db import connection

from reclo_site import testing
from reclo_site.celery import app as celery_app
from reclo_site.cloud import imaging
from recovery import services, tasks
from recovery.models import Instance, Recovery, RecoveryStep, VpnGateway

from .cloud_inventory import inventory
from .factories import MiB, ServerFactory, backup_chain, slow_snapshot_writes

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 3


@pytest.fixture
def writes(monkeypatch):
    # A slow cloud: each block write takes a little while, so a worker can be killed mid-write.
    return slow_snapshot_writes(monkeypatch)


@pytest.fixture
def moto_server(settings, writes):
    """moto's server mode on a free loopback port: the AWS both this process and the workers see."""
    with testing.moto_server(settings) as endpoint:
        yield endpoint


def test_a_worker_killed_mid_step_is_taken_over_and_nothing_is_made_twice(moto_server, writes, user, settings):
    testing.require_services()
    assert connection.vendor == "postgresql"
    settings.RECLO_RECOVERY_STALE_AFTER = timedelta(seconds=STALE_SECONDS)
    backups, top = backup_chain(user=user, server=ServerFactory(user=user), size=48 * MiB, incrementals=3)
    env = {
        "DATABASE_URL": testing.test_database_url(connection),
        "REDIS_URL": os.environ["REDIS_URL"],
        "AWS_ENDPOINT_URL": moto_server,
        "RECLO_BUCKET": settings.RECLO_BUCKET,
        "RECLO_RECOVERY_STALE_SECONDS": str(STALE_SECONDS),
    }
    celery_app.conf.task_always_eager = False

    def importing() -> dict:
        return RecoveryStep.objects.get(recovery__user=user, name="importing").__dict__

    # Kill the worker while it writes the disk into the snapshot: the
    # snapshot exists, its id is saved, the blocks are half written and a
    # checkpoint says which. moto holds the writes after the first 20 until
    # then, so the kill cannot come too late.
    writes.hold_after(20)
    with testing.celery_worker(env) as first:
        recovery = services.recovery_start(user=user, backup_id=backups[-1].pk)
        testing.wait_until(
            lambda: importing()["outputs"].get("snapshot_id") and writes.passed() >= 20,
            timeout=90,
            interval=0.05,
            what="the import to start writing blocks",
        )
        testing.wait_until(
            lambda: any(span[2] > span[0] for span in importing()["outputs"].get("spans", [])),
            timeout=60,
            what="a checkpoint of the blocks written",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    killed_at = importing()
    assert killed_at["status"] == "running" and not killed_at["outputs"].get("blocks_written")
    writes.release()  # the dead worker's held requests end here, before the next worker starts
    time.sleep(1)
    before_takeover = writes.passed()

    with testing.celery_worker(env):
        # Beat's reconciler, run a little more often than once a minute.
        def ready_or_nudge():
            status = Recovery.objects.get(pk=recovery.pk).status
            if status not in Recovery.FINISHED:
                tasks.failovers_reconcile.delay()
            return status in Recovery.FINISHED

        testing.wait_until(ready_or_nudge, timeout=120, interval=STALE_SECONDS, what="the failover to finish")

    recovery.refresh_from_db()
    assert recovery.status == "ready", recovery.error
    step = recovery.steps.get(name="importing")
    assert step.attempts >= 2 and step.outputs["snapshot_id"] == killed_at["outputs"]["snapshot_id"]
    assert inventory() == {
        "servers": 1, "gateways": 1, "images": 1, "snapshots": 1, "addresses": 2, "vpcs": 1,
    }  # fmt: skip
    assert Instance.objects.filter(recovery=recovery).count() == 1
    assert VpnGateway.objects.count() == 1
    # The snapshot the second worker finished holds the disk.
    assert imaging.snapshot_state(step.outputs["snapshot_id"])[0] == "completed"
    disk = bytearray(len(top))
    for index, data in imaging.snapshot_blocks(step.outputs["snapshot_id"]):
        disk[index * imaging.EBS_BLOCK_SIZE : (index + 1) * imaging.EBS_BLOCK_SIZE] = data
    assert bytes(disk) == top  # merged straight from the chain, across the kill
    # The second worker carried on from the checkpoints: nothing below them was written again.
    per = 2 * MiB // imaging.EBS_BLOCK_SIZE
    spans = killed_at["outputs"]["spans"]
    again = writes.indices[before_takeover:]
    assert again
    for index in again:
        first_block, end, next_block, _ = next(span for span in spans if span[0] <= index // per < span[1])
        assert index // per >= next_block, (index, spans)
    assert step.outputs["changed_blocks"] == sum(
        1 for n in range(0, len(top), imaging.EBS_BLOCK_SIZE) if any(top[n : n + imaging.EBS_BLOCK_SIZE])
    )
