"""Telling the owner that a failover finished: ready, or failed and why.

`FAILOVER.on_exit` calls `failover_finished` after the run's last commit.
The hook can run twice (the engine's contract, docs/architecture.md): the
audit event is the claim, taken under the run's row lock, so the email goes
out once.
"""

from django.db import transaction

from accounts import notify
from accounts.audit import audit_record
from accounts.models import AuditEvent

from .models import Recovery


def failover_finished(recovery_id, status: str) -> bool:
    """Record and email the end of a failover; False when it was already told (or is not over)."""
    kind = {
        Recovery.Status.READY: AuditEvent.Kind.FAILOVER_READY,
        Recovery.Status.FAILED: AuditEvent.Kind.FAILOVER_FAILED,
    }
    with transaction.atomic():
        recovery = Recovery.objects.select_for_update().filter(pk=recovery_id).select_related("user").first()
        if recovery is None or recovery.status not in kind:
            return False
        event_kind = kind[recovery.status]
        if AuditEvent.objects.filter(kind=event_kind, details__recovery_id=str(recovery.pk)).exists():
            return False
        details = {"server": recovery.server_name, "recovery_id": str(recovery.pk)}
        if recovery.status == Recovery.Status.FAILED:
            details["reason"] = recovery.error[:300]
        audit_record(event_kind, user=recovery.user, address="worker", **details)
    template = "failover_ready" if recovery.status == Recovery.Status.READY else "failover_failed"
    notify.owner_email(recovery.user, f"recovery/email/{template}", {"recovery": recovery})
    return True
