"""Celery tasks of the backups app: each takes ids and calls one service.

Every task is idempotent (Celery may deliver twice; the worker settings ack
late). Only the cloud adapter's transient errors are retried, with backoff
and a cap; anything else fails at once with its reason in the log.
"""

import logging
import random

from celery import shared_task
from kombu.exceptions import OperationalError as BrokerError

from reclo_site.cloud import CloudUnavailable

from . import services

log = logging.getLogger(__name__)

# Reading or merging a large restore point takes a while. A task running
# past the broker's visibility timeout (minutes, settings) is delivered to a
# second worker too; each of these holds a claim its first worker renews
# (verification and scrub: a heartbeat; merge: its claim), so the second
# copy does nothing.
LONG_TASK = {"soft_time_limit": 3 * 60 * 60, "time_limit": 3 * 60 * 60 + 300}
RETRY_CLOUD = {
    "autoretry_for": (CloudUnavailable,),
    "retry_backoff": 30,
    # Under the broker's visibility timeout: a retry waiting longer would be
    # redelivered (harmless, the tasks are idempotent, but wasted).
    "retry_backoff_max": 5 * 60,
    "retry_jitter": True,
    "max_retries": 8,
}


def enqueue(task, *args) -> None:
    """Send a task; a broker outage is logged, not raised.

    Used from transaction.on_commit, where the request has already
    succeeded: the beat jobs pick up whatever was not sent (a `verifying`
    backup is re-enqueued by verifications_requeue, retention runs again after
    the next verified backup).
    """
    try:
        task.delay(*args)
    except (BrokerError, OSError):
        log.exception("could not enqueue %s%r", task.name, args)


def standby_enqueue(server_id: int) -> None:
    """Bring a server's warm standby in step (`recovery.standby_tasks.standby_stage`); beat covers a lost message."""
    from recovery.standby_tasks import standby_stage  # recovery depends on backups, not the other way round

    enqueue(standby_stage, server_id)


@shared_task(bind=True, **RETRY_CLOUD, **LONG_TASK)
def backup_verify(self, backup_id: str) -> str | None:
    """Verify a completed upload (idempotent: only a `verifying` backup no worker is on is read).

    While the tenant has its share of verifications running, or a worker
    holds this one, the task comes back after a wait (other tenants' tasks
    run meanwhile); a dead worker's claim is stale by then.
    """
    try:
        backup = services.backup_verify(backup_id=backup_id)
    except services.VerificationDeferred as exc:
        services.verification_deferred(backup_id=backup_id)
        if self.request.is_eager:
            return "deferred"  # tests: no broker to come back through; the beat job re-queues it
        raise self.retry(exc=exc, countdown=exc.retry_in + random.randint(0, 10), max_retries=None) from exc
    return backup.status if backup else None


@shared_task(**RETRY_CLOUD, **LONG_TASK)
def retention_apply(server_id: int, disk: str) -> str:
    """One retention step for a disk; sends itself again while there is more to do."""
    step = services.retention_apply(server_id=server_id, disk=disk)
    if step:
        enqueue(retention_apply, server_id, disk)
    return step


@shared_task(**RETRY_CLOUD, **LONG_TASK)
def backup_scrub(backup_id: str) -> str:
    """Re-read one verified restore point (idempotent)."""
    return services.backup_scrub(backup_id=backup_id)


@shared_task
def backups_scrub() -> int:
    """Beat, weekly: fan a sample of stored restore points out to backup_scrub."""
    ids = services.backups_scrub_pick()
    for backup_id in ids:
        enqueue(backup_scrub, str(backup_id))
    return len(ids)


@shared_task
def uploads_clean_up() -> dict:
    """Beat, hourly: stale pending uploads, stale multipart uploads, lost verifications."""
    counts = services.uploads_clean_up()
    if any(counts.values()):
        log.info("upload clean-up: %s", counts)
    return counts


@shared_task
def verifications_requeue() -> int:
    """Beat, every 2 minutes: re-enqueue verifications no live worker is on."""
    return services.verifications_requeue()


@shared_task
def objects_purge() -> int:
    """Beat, hourly: delete objects whose deletion was deferred."""
    return services.objects_purge()


@shared_task
def backups_purge() -> int:
    """Beat, hourly: remove deleted restore points whose retention lock has ended."""
    return services.backups_purge()


@shared_task
def overdue_notify() -> int:
    """Beat: email owners whose agent is late or silent (once per incident)."""
    return services.overdue_notify()


@shared_task(bind=True, acks_late=False, soft_time_limit=4 * 60 * 60, time_limit=4 * 60 * 60 + 300)
def files_job(self, job: str, user_id: int, backup_id: str, command: dict) -> None:
    """Browse or read a restore point's files for a waiting web request (see services.files).

    Not acknowledged late: a redelivered browse would answer a request that
    gave up long ago. The parsing itself runs in a confined child process.
    """
    services.files_job_run(
        job=job, user_id=user_id, backup_id=backup_id, command=command, eager=bool(self.request.is_eager)
    )
