"""Celery tasks of the failover pipeline and the instance beat jobs.

Each takes ids, calls one service (the failover's two call the engine,
`recovery.engine`, with the failover pipeline) and is safe to run twice
(Celery does deliver twice: acks are late). The step task does its own
retry handling; the release task retries transient cloud errors.
"""

from celery import shared_task

from reclo_site.cloud import CloudUnavailable

from . import drill_services, engine, services, vpn_watch
from .drills import DRILL
from .failback import FAILBACK
from .failover import FAILOVER
from .standby_tasks import standby_reconcile, standby_stage  # noqa: F401 - registered with the worker from here

# A step may stream a large disk; it renews its lease while it works, so a
# long run is not mistaken for a dead one. The limits only stop a hung call.
STEP_SOFT_LIMIT = 4 * 60 * 60 - 5 * 60
STEP_HARD_LIMIT = 4 * 60 * 60


@shared_task(soft_time_limit=STEP_SOFT_LIMIT, time_limit=STEP_HARD_LIMIT)
def failover_step_run(recovery_id: str, step: str) -> str:
    """One go of one failover step: claim, work, record, enqueue the next."""
    return engine.run_step(recovery_id, step, pipeline=FAILOVER)


@shared_task(
    autoretry_for=(CloudUnavailable,), retry_backoff=10, retry_backoff_max=600, retry_jitter=True, max_retries=10
)
def instance_release(instance_pk: int) -> bool:
    """Release a terminated instance's address, image and (if unused) VPN gateway."""
    return services.instance_release(instance_pk=instance_pk)


@shared_task(autoretry_for=(CloudUnavailable,), retry_backoff=5, retry_backoff_max=60, retry_jitter=True, max_retries=5)
def instance_watch(instance_pk: int, polls_left: int) -> str | None:
    """Follow a stopping or starting instance until it settles (re-schedules itself)."""
    return services.instance_watch(instance_pk=instance_pk, polls_left=polls_left)


@shared_task
def failovers_reconcile() -> int:
    """Re-enqueue failover steps whose worker died or whose message was lost."""
    return engine.reconcile(pipeline=FAILOVER)


@shared_task
def instances_sync() -> int:
    return services.instances_sync()


@shared_task
def instances_free() -> list[str]:
    return services.instances_free()


@shared_task
def gateways_watch() -> int:
    """Email owners whose VPN gateway stopped reporting, and when it is back."""
    return vpn_watch.gateways_watch()


# --- Drills ---------------------------------------------------------------------------------

# A drill's boot is bounded by RECLO_DRILL_TIME_LIMIT; these only stop a hung call.
DRILL_SOFT_LIMIT = 2 * 60 * 60 - 60
DRILL_HARD_LIMIT = 2 * 60 * 60


@shared_task(soft_time_limit=DRILL_SOFT_LIMIT, time_limit=DRILL_HARD_LIMIT)
def drill_step_run(drill_id: str, step: str) -> str:
    """One go of one drill step: claim, work, record, enqueue the next (the teardown after the last)."""
    return engine.run_step(drill_id, step, pipeline=DRILL)


@shared_task
def drills_reconcile() -> int:
    """Re-enqueue drill steps whose worker died or whose message was lost; finish interrupted aws teardowns."""
    from .drill_steps import sweep_aws  # the handlers import the sandboxes; keep the task module light

    count = engine.reconcile(pipeline=DRILL)
    sweep_aws()
    return count


@shared_task
def drills_schedule() -> list[str]:
    """Start the drills that servers' intervals make due (a bounded batch per run)."""
    return drill_services.drills_schedule()


# --- Failbacks ------------------------------------------------------------------------------


@shared_task(soft_time_limit=STEP_SOFT_LIMIT, time_limit=STEP_HARD_LIMIT)
def failback_step_run(failback_id: str, step: str) -> str:
    """One go of one failback step: claim, work, record, enqueue the next."""
    return engine.run_step(failback_id, step, pipeline=FAILBACK)


@shared_task
def failbacks_reconcile() -> int:
    """Re-enqueue failback steps whose worker died or whose message was lost."""
    return engine.reconcile(pipeline=FAILBACK)
