"""Telling the owner that a failover finished: ready, or failed and why.

`end_claimed` is the once-only claim every pipeline's end shares (failbacks too).

`FAILOVER.on_exit` calls `failover_finished` after the run's last commit.
The hook can run twice (the engine's contract, docs/architecture.md): the
audit event is the claim, taken under the run's row lock, so the email goes
out once.
"""

from collections.abc import Callable
from typing import Any

from django.db import models, transaction

from accounts import notify
from accounts.audit import audit_record
from accounts.models import AuditEvent

from .models import Recovery


def end_claimed(model: type[models.Model], run_id, kinds: dict, id_key: str,
                *, related=("user",), details: Callable = lambda run: {}):  # fmt: skip
    """Claim telling the end of a pipeline run (a failover, a failback): its audit event, once.

    The event, recorded under the run's row lock, is the claim: the run
    when this call made it (the caller then emails the owner), None when the
    end was told already or the run is not over. A failed run's event
    carries its reason; `details(run)` adds more.
    """
    with transaction.atomic():
        # Any: a run of any pipeline model (each has user, server_name, status, error).
        run: Any = (
            model._default_manager.select_for_update(of=("self",)).filter(pk=run_id).select_related(*related).first()
        )
        if run is None or run.status not in kinds:
            return None
        event_kind = kinds[run.status]
        if AuditEvent.objects.filter(kind=event_kind, **{f"details__{id_key}": str(run.pk)}).exists():
            return None
        extra = {"server": run.server_name, id_key: str(run.pk), **details(run)}
        if run.status == "failed":
            extra["reason"] = run.error[:300]
        audit_record(event_kind, user=run.user, address="worker", **extra)
    return run


def failover_finished(recovery_id, status: str) -> bool:
    """Record and email the end of a failover; False when it was already told (or is not over)."""
    kinds = {
        Recovery.Status.READY: AuditEvent.Kind.FAILOVER_READY,
        Recovery.Status.FAILED: AuditEvent.Kind.FAILOVER_FAILED,
    }
    recovery = end_claimed(Recovery, recovery_id, kinds, "recovery_id")
    if recovery is None:
        return False
    template = "failover_ready" if recovery.status == Recovery.Status.READY else "failover_failed"
    notify.owner_email(recovery.user, f"recovery/email/{template}", {"recovery": recovery})
    return True
