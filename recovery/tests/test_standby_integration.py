"""Warm standby through Redis and real worker processes, against moto's server: SIGKILL one mid-staging.

Needs PostgreSQL and Redis (DATABASE_URL, REDIS_URL); skipped locally
without them, required in CI. moto's server runs in this process, so the
documented extension `moto_ebs_parents` (AWS's ParentSnapshotId
semantics) and the slowed block writes apply to what the workers send.
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
from recovery import staging, standby_tasks
from recovery.models import StagedSnapshot

from .factories import MiB, ServerFactory, backup_chain, slow_snapshot_writes
from .moto_ebs_parents import ebs_parents

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STALE_SECONDS = 3


@pytest.fixture
def writes(monkeypatch):
    # A slow cloud: each block write takes a little while, so a worker can be killed mid-write.
    return slow_snapshot_writes(monkeypatch)


@pytest.fixture
def moto_server(settings, writes):
    with testing.moto_server(settings) as endpoint, ebs_parents():
        yield endpoint


def test_a_worker_killed_mid_staging_is_taken_over_in_the_same_snapshot(moto_server, writes, user, settings):
    testing.require_services()
    assert connection.vendor == "postgresql"
    settings.RECLO_STANDBY_STALE_AFTER = timedelta(seconds=STALE_SECONDS)
    server = ServerFactory(user=user, warm_standby=True)
    backups, top = backup_chain(user=user, server=server, size=48 * MiB, incrementals=0)
    full = backups[0]
    env = {
        "DATABASE_URL": testing.test_database_url(connection),
        "REDIS_URL": os.environ["REDIS_URL"],
        "AWS_ENDPOINT_URL": moto_server,
        "RECLO_BUCKET": settings.RECLO_BUCKET,
        "RECLO_STANDBY_STALE_SECONDS": str(STALE_SECONDS),
    }
    celery_app.conf.task_always_eager = False

    def row() -> StagedSnapshot | None:
        return StagedSnapshot.objects.filter(backup=full).first()

    # Killed while it writes the full's blocks: the snapshot exists, its id is
    # recorded, a checkpoint says what is written. moto holds the writes after
    # the first 20 until then, so the kill cannot come too late.
    writes.hold_after(20)
    with testing.celery_worker(env) as first:
        standby_tasks.standby_stage.delay(server.pk)
        testing.wait_until(
            lambda: (r := row()) and r.snapshot_id and writes.passed() >= 20,
            timeout=90,
            interval=0.05,
            what="the staging to start writing blocks",
        )
        testing.wait_until(
            lambda: any(span[2] > span[0] for span in (row().spans or [])),  # type: ignore[union-attr]
            timeout=60,
            what="a checkpoint of the blocks written",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    killed_at = row()
    assert killed_at is not None and killed_at.state == "writing"
    writes.release()  # the dead worker's held requests end here, before the next worker starts
    time.sleep(1)
    before_takeover = writes.passed()

    with testing.celery_worker(env):
        # Beat's reconciler, run more often than every 5 minutes.
        def completed_or_nudge():
            done = row().state == "completed"  # type: ignore[union-attr]
            if not done:
                standby_tasks.standby_reconcile.delay()
            return done

        testing.wait_until(completed_or_nudge, timeout=120, interval=STALE_SECONDS, what="the staging to finish")

    staged = row()
    assert staged is not None
    assert staged.snapshot_id == killed_at.snapshot_id and staged.attempts >= 2
    # No second snapshot was started for the restore point.
    assert [s["snapshot_id"] for s in imaging.find_snapshots({staging.TAG: str(full.pk)})] == [staged.snapshot_id]
    disk = bytearray(len(top))
    for index, data in imaging.snapshot_blocks(staged.snapshot_id):
        disk[index * imaging.EBS_BLOCK_SIZE : (index + 1) * imaging.EBS_BLOCK_SIZE] = data
    assert bytes(disk) == top
    # The second worker carried on from the checkpoints: nothing below them was written again.
    per = 2 * MiB // imaging.EBS_BLOCK_SIZE
    again = writes.indices[before_takeover:]
    assert again
    for index in again:
        _first, _end, next_block, _ = next(s for s in killed_at.spans if s[0] <= index // per < s[1])
        assert index // per >= next_block, (index, killed_at.spans)
