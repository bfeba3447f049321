"""Tenant-scoped reads for failovers and instances. Another tenant's ids find nothing."""

import uuid
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from backups.models import Backup, Server

from . import devices
from .models import Instance, Recovery

# A chain longer than this is a bug or an attack, not a backup history.
MAX_CHAIN = 1000


class ChainError(Exception):
    """The restore point cannot be restored: the reason, for the customer."""


def _as_uuid(value) -> uuid.UUID | None:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except (TypeError, ValueError, AttributeError):
        return None


def recovery_list(*, user, limit: int = 100):
    return Recovery.objects.filter(user=user).prefetch_related("steps").select_related("instance")[:limit]


def recovery_list_unfinished_or_failed(*, user, failed_within: timedelta = timedelta(days=7)):
    """Failovers still running, and those that failed lately: what the instances page lists above them."""
    since = timezone.now() - failed_within
    return Recovery.objects.filter(user=user).filter(
        Q(status__in=Recovery.ACTIVE) | Q(status=Recovery.Status.FAILED, created__gte=since)
    )[:20]


def recovery_get(*, user, recovery_id) -> Recovery | None:
    pk = _as_uuid(recovery_id)
    if pk is None:
        return None
    return Recovery.objects.filter(user=user, pk=pk).prefetch_related("steps").first()


def instance_list(*, user, include_terminated: bool = True):
    instances = Instance.objects.filter(user=user).select_related("recovery")
    if not include_terminated:
        instances = instances.exclude(state=Instance.State.TERMINATED)
    return instances


def instance_get(*, user, instance_id: str) -> Instance | None:
    if not isinstance(instance_id, str) or len(instance_id) > 32:
        return None
    return Instance.objects.filter(user=user, instance_id=instance_id).select_related("recovery").first()


def server_get(*, user, server_id: int) -> Server | None:
    return Server.objects.filter(user=user, pk=server_id).first()


def restore_points(*, server: Server):
    """The server's verified restore points, newest first (the fail-over form's choices)."""
    return Backup.objects.filter(server=server, status=Backup.Status.VERIFIED, deleted_at__isnull=True).order_by(
        "-date_created"
    )


def restorable_backup(*, user, backup_id) -> Backup | None:
    """The user's verified backup of that id, or None (unknown, another tenant's, not verified)."""
    pk = _as_uuid(backup_id)
    if pk is None:
        return None
    return (
        Backup.objects.filter(user=user, pk=pk, status=Backup.Status.VERIFIED, deleted_at__isnull=True)
        .select_related("server")
        .first()
    )


def backup_chain(backup: Backup) -> list[Backup]:
    """The restore point and its ancestors, base first; ChainError if any link is unusable."""
    chain = [backup]
    current = backup
    while current.kind == Backup.Kind.INCREMENTAL:
        if len(chain) > MAX_CHAIN:
            raise ChainError("The backup chain is too long.")
        parent = Backup.objects.filter(pk=current.parent_id).first() if current.parent_id else None
        if parent is None:
            raise ChainError("A restore point this one builds on is missing.")
        if parent.status != Backup.Status.VERIFIED or parent.deleted_at is not None:
            raise ChainError("A restore point this one builds on is not verified.")
        if (parent.user_id, parent.server_id, parent.disk) != (backup.user_id, backup.server_id, backup.disk):
            raise ChainError("The backup chain mixes servers or disks.")
        chain.append(parent)
        current = parent
    if backup.status != Backup.Status.VERIFIED:
        raise ChainError("The restore point is not verified.")
    chain.reverse()
    return chain


def vpn_client_config(*, instance: Instance) -> str | None:
    """The account's first device's WireGuard config (made on first use); None until the server's VPN is ready.

    One config reaches every recovered server of the account (the tunnel
    routes the whole recovery subnet).
    """
    recovery = instance.recovery
    if recovery.status != Recovery.Status.READY or not instance.private_ip:
        return None
    if devices.ready_gateway(instance.user_id) is None:
        return None
    return devices.device_config(device=devices.first_device(user=instance.user))
