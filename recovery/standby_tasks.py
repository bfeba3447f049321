"""Celery tasks of warm standby (`recovery.staging`), on the default queue.

Not in `recovery.tasks`: every task named `recovery.tasks.*` goes to the
failover queue (`reclo_site.queues`), and staging a large disk takes as long
as writing it; it must never hold up a failover. `recovery.tasks` imports
this module so the workers register these tasks.
"""

from celery import shared_task

from reclo_site.cloud import CloudUnavailable

from . import staging

# Staging streams a whole disk; it renews its lease as it goes, so a long run
# is not mistaken for a dead one. The limits only stop a hung call.
SOFT_LIMIT = 4 * 60 * 60 - 5 * 60
HARD_LIMIT = 4 * 60 * 60
# How soon a server's staging runs again when AWS is still sealing a snapshot.
AGAIN_SECONDS = 15


@shared_task(
    soft_time_limit=SOFT_LIMIT,
    time_limit=HARD_LIMIT,
    autoretry_for=(CloudUnavailable,),
    retry_backoff=10,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=10,
)
def standby_stage(server_id: int) -> int:
    """Bring a server's staged snapshots in step (after a verified backup, a change of its setting)."""
    outcome = staging.stage_server(server_id)
    if outcome.again:
        standby_stage.apply_async((server_id,), countdown=AGAIN_SECONDS)
    return outcome.staged


@shared_task
def standby_reconcile() -> int:
    """Beat job: stage what lost messages and dead workers left, delete the staged snapshots nothing needs."""
    servers = staging.servers_to_stage()
    for server_id in servers:
        standby_stage.delay(server_id)
    staging.sweep()
    return len(servers)
