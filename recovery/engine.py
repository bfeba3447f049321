"""The failover state machine: claim a step, run it, record the outcome, enqueue what follows.

Every step runs in a small Celery task (`recovery.tasks.recovery_run_step`)
that may be delivered twice, run late, or die at any instruction. So:

- A task works only while it holds the recovery's lease, taken with a
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
  permanent ones fail the recovery at once with a code and a reason.
"""

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import F, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from reclo_site.cloud import CloudPermanentError, CloudUnavailable

from .models import Recovery, RecoveryStep

log = logging.getLogger(__name__)

# The error code (docs/api.md, Recovery) for a failure in each step.
STEP_ERROR_CODES = {"consolidating": 403, "importing": 403, "launching": 404, "provisioning_vpn": 407}
STEP_TITLES = {
    "consolidating": "Preparing the disk",
    "importing": "Creating the cloud image",
    "launching": "Starting the server",
    "provisioning_vpn": "Setting up the VPN",
}
# How long a step may take, from its first start, before the recovery fails.
STEP_DEADLINES = {
    "consolidating": timedelta(hours=12),
    "importing": timedelta(hours=12),  # VM Import of a large disk takes hours
    "launching": timedelta(minutes=30),
    "provisioning_vpn": timedelta(minutes=30),
}
# Transient errors in a row before a step gives up; backoff between them.
MAX_RETRIES = 8
BACKOFF_BASE = 5.0
BACKOFF_CAP = 300.0
# A long step renews its lease (and shows progress) at most this often.
HEARTBEAT_EVERY = 5.0


def backoff(retries: int) -> float:
    """Seconds before retry number `retries` (1, 2, ...): exponential, capped, fully jittered.

    Full jitter spreads the retries of many recoveries hit by the same
    throttling, so they do not come back in lockstep; the floor of one base
    keeps a retry from being immediate.
    """
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, retries - 1))
    return random.uniform(BACKOFF_BASE, max(BACKOFF_BASE, ceiling))


def next_step(step: str) -> str | None:
    steps = Recovery.STEPS
    index = steps.index(step)
    return steps[index + 1] if index + 1 < len(steps) else None


def step_for_status(status: str) -> str | None:
    """The step a recovery in `status` is at (queued is about to consolidate)."""
    if status == Recovery.Status.QUEUED:
        return Recovery.STEPS[0]
    return status if status in Recovery.STEPS else None


# --- What a step handler returns or raises ------------------------------------------------


@dataclass
class Done:
    """The step finished; `outputs` are merged into what it saved along the way."""

    outputs: dict = field(default_factory=dict)
    detail: str = ""
    skipped: bool = False


@dataclass
class Wait:
    """AWS is not there yet: run this step again in `seconds`."""

    seconds: float
    detail: str = ""


class StepFailed(Exception):
    """A failure no retry will fix; `code` is one of the 4xx codes of docs/api.md."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class LostClaim(Exception):
    """Our lease ran out and another worker took the step over: stop quietly."""


# --- The context a handler works in -------------------------------------------------------


class StepContext:
    """What a step handler gets: the recovery, its step row, and ways to save and report."""

    def __init__(self, recovery: Recovery, step: RecoveryStep, token: uuid.UUID):
        self.recovery = recovery
        self.step = step
        self.token = token
        self._last_beat = time.monotonic()

    @property
    def outputs(self) -> dict:
        """What this step saved so far (on earlier tries too)."""
        return self.step.outputs

    def previous(self, name: str) -> dict:
        """The outputs of an earlier step of this recovery."""
        return RecoveryStep.objects.get(recovery_id=self.recovery.pk, name=name).outputs

    def _renew(self, **step_fields) -> None:
        now = timezone.now()
        with transaction.atomic():
            kept = Recovery.objects.filter(pk=self.recovery.pk, lease_token=self.token).update(
                lease_until=now + settings.RECLO_RECOVERY_STALE_AFTER, updated=now
            )
            if not kept:
                raise LostClaim(f"recovery {self.recovery.pk} was taken over")
            if step_fields:
                RecoveryStep.objects.filter(pk=self.step.pk).update(**step_fields)
        self._last_beat = time.monotonic()

    def save(self, **values) -> None:
        """Record outputs now (ids of things just created), while we still hold the lease."""
        self.step.outputs = {**self.step.outputs, **values}
        self._renew(outputs=self.step.outputs)

    def heartbeat(self, detail: str | None = None, *, force: bool = False) -> None:
        """Renew the lease (and show `detail`), at most every few seconds unless forced."""
        # Well within the lease, whatever RECLO_RECOVERY_STALE_AFTER is set to.
        every = min(HEARTBEAT_EVERY, settings.RECLO_RECOVERY_STALE_AFTER.total_seconds() / 3)
        if not force and time.monotonic() - self._last_beat < every:
            return
        fields = {}
        if detail is not None:
            self.step.detail = fields["detail"] = detail[:200]
        self._renew(**fields)


# --- Claiming and running -----------------------------------------------------------------


def claim(recovery_id, step: str) -> uuid.UUID | None:
    """Take the lease of `recovery_id` for `step`; None if someone else has it or it moved on."""
    now = timezone.now()
    token = uuid.uuid4()
    statuses = [step, Recovery.Status.QUEUED] if step == Recovery.STEPS[0] else [step]
    claimed = (
        Recovery.objects.filter(pk=recovery_id, status__in=statuses)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .update(
            status=step,
            lease_token=token,
            lease_until=now + settings.RECLO_RECOVERY_STALE_AFTER,
            due_at=None,
            updated=now,
        )
    )
    return token if claimed else None


def enqueue(recovery_id, step: str, countdown: float | None = None) -> None:
    """Send the task of `step` (call it from on_commit, so what it claims is committed).

    A broker outage is logged, not raised: by then the state is committed (a
    failover accepted, a step done), and the reconciler sends a step whose
    message never left just as it does one the broker lost.
    """
    from .tasks import recovery_run_step

    options = {"countdown": countdown} if countdown else {}
    try:
        recovery_run_step.apply_async((str(recovery_id), step), **options)
    except (BrokerError, OSError) as exc:
        log.warning("recovery %s: could not send the %s step (%s); the reconciler will", recovery_id, step, exc)


def run_step(recovery_id, step: str) -> str:
    """Run one go of `step` for a recovery. Idempotent; returns what happened, for logs and tests."""
    from .steps import HANDLERS

    token = claim(recovery_id, step)
    if token is None:
        return "not claimed"
    recovery = Recovery.objects.select_related("backup", "server", "user").get(pk=recovery_id)
    now = timezone.now()
    row = RecoveryStep.objects.get(recovery=recovery, name=step)
    RecoveryStep.objects.filter(pk=row.pk).update(
        status=RecoveryStep.Status.RUNNING,
        started=row.started or now,
        deadline=row.deadline or now + STEP_DEADLINES[step],
        attempts=F("attempts") + 1,
    )
    row.refresh_from_db()
    if row.deadline < now:
        return _fail(recovery, row, token, STEP_ERROR_CODES[step], f"{STEP_TITLES[step]} did not finish in time.")

    ctx = StepContext(recovery, row, token)
    try:
        result = HANDLERS[step](ctx)
    except LostClaim:
        log.warning("recovery %s: lost the %s step to another worker", recovery_id, step)
        return "lost claim"
    except StepFailed as exc:
        return _fail(recovery, row, token, exc.code, exc.reason)
    except CloudPermanentError as exc:
        return _fail(recovery, row, token, STEP_ERROR_CODES[step], f"The cloud refused: {exc}")
    except (CloudUnavailable, OperationalError, InterfaceError, SoftTimeLimitExceeded) as exc:
        return _retry_later(recovery, row, token, exc)
    except Exception as exc:  # noqa: BLE001 - a bug must fail the recovery readably, not loop
        log.exception("recovery %s: %s step crashed", recovery_id, step)
        return _fail(
            recovery, row, token, STEP_ERROR_CODES[step], f"Internal error in {step} ({exc.__class__.__name__})."
        )
    if isinstance(result, Wait):
        return _wait(recovery, row, token, result)
    return _advance(recovery, row, token, result)


def _advance(recovery: Recovery, row: RecoveryStep, token, result: Done) -> str:
    now = timezone.now()
    following = next_step(row.name)
    status = following or Recovery.Status.READY
    with transaction.atomic():
        moved = Recovery.objects.filter(pk=recovery.pk, lease_token=token).update(
            status=status,
            lease_token=None,
            lease_until=None,
            due_at=now if following else None,
            updated=now,
            finished=None if following else now,
        )
        if not moved:
            log.warning("recovery %s: lease lost before %s could finish", recovery.pk, row.name)
            return "lost claim"
        RecoveryStep.objects.filter(pk=row.pk).update(
            status=RecoveryStep.Status.SKIPPED if result.skipped else RecoveryStep.Status.DONE,
            finished=now,
            outputs={**row.outputs, **result.outputs},
            detail=result.detail[:200],
            retries=0,
            error="",
        )
        if following:
            transaction.on_commit(lambda: enqueue(recovery.pk, following))
    log.info("recovery %s: %s done, now %s", recovery.pk, row.name, status)
    return "done"


def _wait(recovery: Recovery, row: RecoveryStep, token, result: Wait) -> str:
    now = timezone.now()
    seconds = max(0.0, result.seconds)
    with transaction.atomic():
        released = Recovery.objects.filter(pk=recovery.pk, lease_token=token).update(
            lease_token=None, lease_until=None, due_at=now + timedelta(seconds=seconds), updated=now
        )
        if not released:
            return "lost claim"
        RecoveryStep.objects.filter(pk=row.pk).update(
            status=RecoveryStep.Status.WAITING,
            detail=result.detail[:200],
            retries=0,
            waited=F("waited") + seconds,
        )
        transaction.on_commit(lambda: enqueue(recovery.pk, row.name, countdown=seconds))
    return "waiting"


def _retry_later(recovery: Recovery, row: RecoveryStep, token, exc: Exception) -> str:
    retries = row.retries + 1
    if retries > MAX_RETRIES:
        return _fail(
            recovery,
            row,
            token,
            STEP_ERROR_CODES[row.name],
            f"The cloud stayed unavailable after {MAX_RETRIES} retries: {exc}",
        )
    delay = backoff(retries)
    log.warning(
        "recovery %s: %s hit a transient error (%s); retry %d in %.0fs", recovery.pk, row.name, exc, retries, delay
    )
    now = timezone.now()
    with transaction.atomic():
        released = Recovery.objects.filter(pk=recovery.pk, lease_token=token).update(
            lease_token=None, lease_until=None, due_at=now + timedelta(seconds=delay), updated=now
        )
        if not released:
            return "lost claim"
        RecoveryStep.objects.filter(pk=row.pk).update(
            status=RecoveryStep.Status.WAITING,
            retries=retries,
            detail=f"The cloud is busy; trying again in {delay:.0f} seconds."[:200],
        )
        transaction.on_commit(lambda: enqueue(recovery.pk, row.name, countdown=delay))
    return "retrying"


def _fail(recovery: Recovery, row: RecoveryStep, token, code: int, reason: str) -> str:
    now = timezone.now()
    with transaction.atomic():
        failed = Recovery.objects.filter(pk=recovery.pk, lease_token=token).update(
            status=Recovery.Status.FAILED,
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
        RecoveryStep.objects.filter(pk=row.pk).update(status=RecoveryStep.Status.FAILED, finished=now, error=reason)
    log.warning("recovery %s failed in %s (%d): %s", recovery.pk, row.name, code, reason)
    return "failed"


# --- The reconciler -------------------------------------------------------------------------


def reconcile(*, limit: int = 200) -> int:
    """Re-enqueue recoveries whose step has not moved for too long. Idempotent; safe to overlap.

    Two cases: a lease that ran out (the worker holding it died), and no
    lease with a task overdue by the stale period (its message was lost,
    e.g. an ETA task held by a killed worker). Each row is first moved to
    "due now" with a conditional UPDATE, so overlapping runs enqueue it once,
    and a re-enqueued row waits another stale period before the next try.
    Extra deliveries are harmless anyway: the step task's claim sorts them.
    """
    now = timezone.now()
    stale = settings.RECLO_RECOVERY_STALE_AFTER
    candidates = list(
        Recovery.objects.filter(status__in=Recovery.ACTIVE)
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
            moved = Recovery.objects.filter(pk=pk, status=status, lease_until=lease_until, due_at=due_at).update(
                lease_token=None, lease_until=None, due_at=now, updated=now
            )
            if moved:
                step = step_for_status(status)
                transaction.on_commit(lambda pk=pk, step=step: enqueue(pk, step))
                count += 1
    if count:
        log.info("reconciler re-enqueued %d recoveries", count)
    return count
