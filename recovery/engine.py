"""The step engine: claim a step, run it, record the outcome, enqueue what follows.

It runs any `Pipeline` (`recovery/pipeline.py`): a run row and its step
rows, a table of `Step(name, title, handler, deadline, error_code)`, the
Celery task that runs one go of a step, and an optional `on_exit` hook.
The failover (`recovery.failover.FAILOVER`, the default of every function
here) is one pipeline. A drill (`queued → preparing → booting → checking →
passed/failed`) is another: its own run and step models with the fields
`Pipeline` lists, its own `StepTable` of handlers, a task that calls
`run_step(drill_id, step, pipeline=DRILL)`, a beat entry that calls
`reconcile(pipeline=DRILL)`, `succeeded="passed"`, and `on_exit` pointing
at its teardown, which then runs after commit however the drill ends
(passed, failed by a step, a deadline, a crash, or retries running out).
Start a run with `start(run, pipeline=...)` inside the transaction that
creates it.

Every step runs in a small Celery task that may be delivered twice, run
late, or die at any instruction. So:

- A task works only while it holds the run's lease, taken with a
  conditional UPDATE (status is this step, and no live lease). No row
  changed means another worker has it, or the step is over: return.
- Long steps renew the lease as they go (`StepContext.heartbeat`); a worker
  that dies stops renewing, the lease runs out, and the reconciler
  re-enqueues the step. A worker that finds its lease taken stops.
- Outputs (the ids of what a step created) are saved the moment they exist
  (`StepContext.save`), so a re-run finds them instead of creating again.
- The next step is enqueued with `transaction.on_commit`, after the state
  that it claims is committed.
- Waiting on AWS is a `Wait`: the lease is released and the same step is
  enqueued again with a countdown; no worker sleeps. Every step has a
  deadline.
- Transient cloud errors retry with jittered, capped exponential backoff;
  permanent ones fail the run at once with the step's code and a reason.
"""

import functools
import logging
import random
import time
import uuid
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.module_loading import import_string
from kombu.exceptions import OperationalError as BrokerError

from reclo_site.cloud import CloudPermanentError, CloudUnavailable
from reclo_site.errors import Code

from .failover import FAILOVER
from .pipeline import Done, Pipeline, StepFailed, Wait

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "MAX_RETRIES",
    "Done",
    "LostClaim",
    "StepContext",
    "StepFailed",
    "Wait",
    "backoff",
    "claim",
    "enqueue",
    "next_step",
    "reconcile",
    "run_step",
    "start",
    "step_for_status",
]

log = logging.getLogger(__name__)

# Transient errors in a row before a step gives up; backoff between them.
MAX_RETRIES = 8
BACKOFF_BASE = 5.0
BACKOFF_CAP = 300.0
# A long step renews its lease (and shows progress) at most this often.
HEARTBEAT_EVERY = 5.0


def backoff(retries: int) -> float:
    """Seconds before retry number `retries` (1, 2, ...): exponential, capped, fully jittered.

    Full jitter spreads the retries of many runs hit by the same throttling,
    so they do not come back in lockstep; the floor of one base keeps a
    retry from being immediate.
    """
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, retries - 1))
    return random.uniform(BACKOFF_BASE, max(BACKOFF_BASE, ceiling))


def next_step(step: str, *, pipeline: Pipeline = FAILOVER) -> str | None:
    following = pipeline.steps.after(step)
    return following.name if following else None


def step_for_status(status: str, *, pipeline: Pipeline = FAILOVER) -> str | None:
    """The step a run in `status` is at (queued is about to start the first)."""
    return pipeline.step_for_status(status)


class LostClaim(Exception):
    """Our lease ran out and another worker took the step over: stop quietly."""


# --- The context a handler works in -------------------------------------------------------


class StepContext:
    """What a step handler gets: the run, its step row, and ways to save and report."""

    def __init__(self, run, step, token: uuid.UUID, pipeline: Pipeline = FAILOVER):
        self.run = run
        self.step = step
        self.token = token
        self.pipeline = pipeline
        self._last_beat = time.monotonic()

    @property
    def recovery(self):
        """The failover's name for the run."""
        return self.run

    @property
    def outputs(self) -> dict:
        """What this step saved so far (on earlier tries too)."""
        return self.step.outputs

    def previous(self, name: str) -> dict:
        """The outputs of an earlier step of this run."""
        return self.pipeline.step_rows_of(self.run.pk).get(name=name).outputs

    def _renew(self, **step_fields) -> None:
        now = timezone.now()
        with transaction.atomic():
            kept = self.pipeline.runs.filter(pk=self.run.pk, lease_token=self.token).update(
                lease_until=now + self.pipeline.lease, updated=now
            )
            if not kept:
                raise LostClaim(f"{self.pipeline.name} {self.run.pk} was taken over")
            if step_fields:
                self.pipeline.step_rows.filter(pk=self.step.pk).update(**step_fields)
        self._last_beat = time.monotonic()

    def save(self, **values) -> None:
        """Record outputs now (ids of things just created), while we still hold the lease."""
        self.step.outputs = {**self.step.outputs, **values}
        self._renew(outputs=self.step.outputs)

    def heartbeat(self, detail: str | None = None, *, force: bool = False) -> None:
        """Renew the lease (and show `detail`), at most every few seconds unless forced."""
        # Well within the lease, whatever its setting is.
        every = min(HEARTBEAT_EVERY, self.pipeline.lease.total_seconds() / 3)
        if not force and time.monotonic() - self._last_beat < every:
            return
        fields = {}
        if detail is not None:
            self.step.detail = fields["detail"] = detail[:200]
        self._renew(**fields)


# --- Starting, claiming and running -------------------------------------------------------


def start(run, *, pipeline: Pipeline = FAILOVER) -> None:
    """Give a just-created run its step rows and enqueue its first step on commit.

    Call it inside the transaction that creates `run` (in status queued).
    """
    pipeline.step_rows.bulk_create(
        pipeline.step_rows.model(**{pipeline.run_field: run}, name=step.name, position=n)
        for n, step in enumerate(pipeline.steps)
    )
    first = pipeline.steps.first.name
    transaction.on_commit(lambda: enqueue(run.pk, first, pipeline=pipeline))


def claim(run_id, step: str, *, pipeline: Pipeline = FAILOVER) -> uuid.UUID | None:
    """Take the lease of `run_id` for `step`; None if someone else has it or it moved on."""
    now = timezone.now()
    token = uuid.uuid4()
    statuses = [step, pipeline.queued] if step == pipeline.steps.first.name else [step]
    claimed = (
        pipeline.runs.filter(pk=run_id, status__in=statuses)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .update(status=step, lease_token=token, lease_until=now + pipeline.lease, due_at=None, updated=now)
    )
    return token if claimed else None


def enqueue(run_id, step: str, countdown: float | None = None, *, pipeline: Pipeline = FAILOVER) -> None:
    """Send the pipeline's task for `step` (call it from on_commit, so what it claims is committed).

    A broker outage is logged, not raised: by then the state is committed (a
    run accepted, a step done), and the reconciler sends a step whose
    message never left just as it does one the broker lost.
    """
    options = {"countdown": countdown} if countdown else {}
    try:
        import_string(pipeline.task).apply_async((str(run_id), step), **options)
    except (BrokerError, OSError) as exc:
        log.warning("%s %s: could not send the %s step (%s); the reconciler will", pipeline.name, run_id, step, exc)


def run_step(run_id, step: str, *, pipeline: Pipeline = FAILOVER) -> str:
    """Run one go of `step` for a run. Idempotent; returns what happened, for logs and tests."""
    token = claim(run_id, step, pipeline=pipeline)
    if token is None:
        return "not claimed"
    spec = pipeline.steps[step]
    run = pipeline.runs.select_related(*pipeline.select_related).get(pk=run_id)
    now = timezone.now()
    row = pipeline.step_rows_of(run.pk).get(name=step)
    pipeline.step_rows.filter(pk=row.pk).update(
        status="running",
        started=row.started or now,
        deadline=row.deadline or now + spec.deadline,
        attempts=F("attempts") + 1,
    )
    row.refresh_from_db()
    if row.deadline < now:
        return _fail(pipeline, run, row, token, spec.error_code, f"{spec.title} did not finish in time.")

    ctx = StepContext(run, row, token, pipeline)
    try:
        result = spec.run(ctx)
    except LostClaim:
        log.warning("%s %s: lost the %s step to another worker", pipeline.name, run_id, step)
        return "lost claim"
    except StepFailed as exc:
        return _fail(pipeline, run, row, token, exc.code, exc.reason)
    except CloudPermanentError as exc:
        return _fail(pipeline, run, row, token, spec.error_code, f"The cloud refused: {exc}")
    except (CloudUnavailable, OperationalError, InterfaceError, SoftTimeLimitExceeded) as exc:
        return _retry_later(pipeline, run, row, token, exc)
    except Exception as exc:  # noqa: BLE001 - a bug must fail the run readably, not loop
        log.exception("%s %s: %s step crashed", pipeline.name, run_id, step)
        reason = f"Internal error in {step} ({exc.__class__.__name__})."
        return _fail(pipeline, run, row, token, spec.error_code, reason)
    if isinstance(result, Wait):
        return _wait(pipeline, run, row, token, result)
    return _advance(pipeline, run, row, token, result)


def _exit_on_commit(pipeline: Pipeline, run_id, status: str) -> None:
    if pipeline.on_exit:
        hook = import_string(pipeline.on_exit)
        transaction.on_commit(lambda: hook(run_id, status))


def _advance(pipeline: Pipeline, run, row, token, result: Done) -> str:
    now = timezone.now()
    following = next_step(row.name, pipeline=pipeline)
    status = following or pipeline.succeeded
    with transaction.atomic():
        moved = pipeline.runs.filter(pk=run.pk, lease_token=token).update(
            status=status,
            lease_token=None,
            lease_until=None,
            due_at=now if following else None,
            updated=now,
            finished=None if following else now,
        )
        if not moved:
            log.warning("%s %s: lease lost before %s could finish", pipeline.name, run.pk, row.name)
            return "lost claim"
        pipeline.step_rows.filter(pk=row.pk).update(
            status="skipped" if result.skipped else "done",
            finished=now,
            outputs={**row.outputs, **result.outputs},
            detail=result.detail[:200],
            retries=0,
            error="",
        )
        if following:
            transaction.on_commit(lambda: enqueue(run.pk, following, pipeline=pipeline))
        else:
            _exit_on_commit(pipeline, run.pk, status)
    log.info("%s %s: %s done, now %s", pipeline.name, run.pk, row.name, status)
    return "done"


def _wait(pipeline: Pipeline, run, row, token, result: Wait) -> str:
    now = timezone.now()
    seconds = max(0.0, result.seconds)
    with transaction.atomic():
        released = pipeline.runs.filter(pk=run.pk, lease_token=token).update(
            lease_token=None, lease_until=None, due_at=now + timedelta(seconds=seconds), updated=now
        )
        if not released:
            return "lost claim"
        pipeline.step_rows.filter(pk=row.pk).update(
            status="waiting", detail=result.detail[:200], retries=0, waited=F("waited") + seconds
        )
        transaction.on_commit(lambda: enqueue(run.pk, row.name, countdown=seconds, pipeline=pipeline))
    return "waiting"


def _retry_later(pipeline: Pipeline, run, row, token, exc: Exception) -> str:
    retries = row.retries + 1
    if retries > MAX_RETRIES:
        reason = f"The cloud stayed unavailable after {MAX_RETRIES} retries: {exc}"
        return _fail(pipeline, run, row, token, pipeline.steps[row.name].error_code, reason)
    delay = backoff(retries)
    log.warning(
        "%s %s: %s hit a transient error (%s); retry %d in %.0fs", pipeline.name, run.pk, row.name, exc, retries, delay
    )
    now = timezone.now()
    with transaction.atomic():
        released = pipeline.runs.filter(pk=run.pk, lease_token=token).update(
            lease_token=None, lease_until=None, due_at=now + timedelta(seconds=delay), updated=now
        )
        if not released:
            return "lost claim"
        pipeline.step_rows.filter(pk=row.pk).update(
            status="waiting",
            retries=retries,
            detail=f"The cloud is busy; trying again in {delay:.0f} seconds."[:200],
        )
        transaction.on_commit(lambda: enqueue(run.pk, row.name, countdown=delay, pipeline=pipeline))
    return "retrying"


def _fail(pipeline: Pipeline, run, row, token, code: Code, reason: str) -> str:
    now = timezone.now()
    with transaction.atomic():
        failed = pipeline.runs.filter(pk=run.pk, lease_token=token).update(
            status=pipeline.failed,
            error_code=code,
            error=reason,
            lease_token=None,
            lease_until=None,
            due_at=None,
            updated=now,
            finished=now,
        )
        if not failed:
            return "lost claim"
        pipeline.step_rows.filter(pk=row.pk).update(status="failed", finished=now, error=reason)
        _exit_on_commit(pipeline, run.pk, pipeline.failed)
    log.warning("%s %s failed in %s (%d): %s", pipeline.name, run.pk, row.name, code, reason)
    return "failed"


# --- The reconciler -------------------------------------------------------------------------


def reconcile(*, limit: int = 200, pipeline: Pipeline = FAILOVER) -> int:
    """Re-enqueue runs whose step has not moved for too long. Idempotent; safe to overlap.

    Two cases: a lease that ran out (the worker holding it died), and no
    lease with a task overdue by the stale period (its message was lost,
    e.g. an ETA task held by a killed worker). Each row is first moved to
    "due now" with a conditional UPDATE, so overlapping runs enqueue it once,
    and a re-enqueued row waits another stale period before the next try.
    Extra deliveries are harmless anyway: the step task's claim sorts them.
    """
    now = timezone.now()
    stale = pipeline.lease
    candidates = list(
        pipeline.runs.filter(status__in=pipeline.active)
        .filter(
            Q(lease_until__lt=now)
            | Q(lease_until__isnull=True, due_at__lt=now - stale)
            | Q(lease_until__isnull=True, due_at__isnull=True, updated__lt=now - stale)
        )
        .values_list("pk", "status", "lease_until", "due_at")[:limit]
    )
    count = 0
    for pk, status, lease_until, due_at in candidates:
        with transaction.atomic():
            moved = pipeline.runs.filter(pk=pk, status=status, lease_until=lease_until, due_at=due_at).update(
                lease_token=None, lease_until=None, due_at=now, updated=now
            )
            step = pipeline.step_for_status(status)
            if moved and step is not None:  # `status` is an active one: it has a step
                transaction.on_commit(functools.partial(enqueue, pk, step, pipeline=pipeline))
                count += 1
    if count:
        log.info("reconciler re-enqueued %d %s runs", count, pipeline.name)
    return count
