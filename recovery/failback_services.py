"""Failback writes and questions: bring a recovered server home, and whether the cloud copy holds unsaved work.

Views call these; the pipeline (`recovery.failback.FAILBACK`) does the work
in the worker, and `failback_finished` is its `on_exit` hook.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import notify
from accounts.audit import audit_record
from accounts.models import AuditEvent
from reclo_site import cloud
from reclo_site.cloud import imaging
from reclo_site.errors import Code, ServiceError

from . import engine
from .failback import FAILBACK
from .models import Failback, Instance, Recovery
from .notify import end_claimed

log = logging.getLogger(__name__)

# A recovered server whose disk can be brought home: one that exists and holds still or runs.
BRING_HOME_STATES = (Instance.State.RUNNING, Instance.State.STOPPED)


def failback_get(*, user, failback_id) -> Failback | None:
    """The user's failback of that id (another tenant's, or a malformed id, is None)."""
    try:
        pk = uuid.UUID(str(failback_id))
    except ValueError:
        return None
    return Failback.objects.filter(user=user, pk=pk).select_related("recovery", "parent").first()


def can_bring_home(instance: Instance | None) -> bool:
    return bool(
        instance is not None
        and instance.recovery.status == Recovery.Status.READY
        and instance.state in BRING_HOME_STATES
        and instance.recovery.server_id is not None
    )


def failback_start(*, user, recovery: Recovery) -> Failback:
    """Queue a failback of the recovered server of `recovery` (the caller's own).

    Raises ServiceError NOT_FOUND (another tenant's), INSTANCE_STATE_CONFLICT (no running or stopped
    server to bring home, or its server was removed from the portal),
    FAILOVER_RUNNING (a failback of it is already on its way; the database
    decides a race between two clicks).
    """
    if recovery.user_id != user.pk:
        raise ServiceError(Code.NOT_FOUND, "No failover of yours has that id.")
    instance = Instance.objects.filter(recovery=recovery).select_related("recovery").first()
    if not can_bring_home(instance):
        state = instance.state if instance else "not started"
        raise ServiceError(
            Code.INSTANCE_STATE_CONFLICT,
            f"Only a running or stopped server in the cloud can be brought home (this one is {state}).",
        )
    assert instance is not None  # (can_bring_home checked it)
    try:
        with transaction.atomic():
            failback = Failback.objects.create(
                user=user,
                recovery=recovery,
                server=recovery.server,
                server_name=recovery.server_name,
                instance_id=instance.instance_id,
                due_at=timezone.now(),
            )
            engine.start(failback, pipeline=FAILBACK)
    except IntegrityError:  # the partial unique index: one active failback per recovery
        raise ServiceError(Code.FAILOVER_RUNNING, f"{recovery.server_name} is already being brought home.") from None
    log.info("failback %s queued for recovery %s", failback.pk, recovery.pk)
    audit_record(AuditEvent.Kind.FAILBACK_STARTED, user=user, server=recovery.server_name,
                 recovery_id=str(recovery.pk), failback_id=str(failback.pk))  # fmt: skip
    return failback


def last_saved(instance: Instance) -> Failback | None:
    """The newest failback that made a restore point of this cloud server."""
    return (
        Failback.objects.filter(recovery_id=instance.recovery_id, status=Failback.Status.READY)
        .order_by("-snapshot_at")
        .first()
    )


def unsaved_changes(instance: Instance) -> bool:
    """Whether the cloud server may hold work no restore point has: it ran, and nothing was brought home since.

    Since it last started or stopped: a failback snapshot taken before the
    server was started again (or before it was stopped, while it still ran)
    misses what it wrote afterwards.
    """
    if instance.state == Instance.State.TERMINATED:
        return False
    saved = last_saved(instance)
    if saved is None or saved.snapshot_at is None:
        return True
    moments: list[datetime] = [instance.launched]
    if instance.running_since:
        moments.append(instance.running_since)
    if instance.state in (Instance.State.STOPPING, Instance.State.STOPPED) and instance.stopped_at:
        moments.append(instance.stopped_at)
    return saved.snapshot_at < max(moments)


def failback_finished(failback_id, status: str) -> bool:
    """Record and email the end of a failback; False when it was already told (or is not over).

    Can run twice (the engine's contract): the audit event, taken under the
    run's row lock, is the claim, so the email goes out once.
    """
    kinds = {
        Failback.Status.READY: AuditEvent.Kind.FAILBACK_READY,
        Failback.Status.FAILED: AuditEvent.Kind.FAILBACK_FAILED,
    }
    failback = end_claimed(
        Failback, failback_id, kinds, "failback_id", related=("user", "recovery", "parent"),
        details=lambda run: {} if run.status == Failback.Status.FAILED else {"backup_id": str(run.backup_ref)},
    )  # fmt: skip
    if failback is None:
        return False
    _snapshot_drop(failback)
    template = "failback_ready" if failback.status == Failback.Status.READY else "failback_failed"
    notify.owner_email(failback.user, f"recovery/email/{template}", {"failback": failback})
    return True


def _snapshot_drop(failback: Failback) -> None:
    """Delete the failback's snapshot of the cloud disk: the restore point holds it now (or it failed).

    A next failback compares with the failover's snapshot, never with this
    one, and a retry takes a new one. A cloud error is logged: the snapshot
    (tagged `reclo:failback`) then waits for the next end of this hook.
    """
    if not failback.snapshot_id:
        return
    try:
        imaging.delete_snapshot(failback.snapshot_id)
    except cloud.CloudError:
        log.warning("failback %s: could not delete snapshot %s", failback.pk, failback.snapshot_id, exc_info=True)
