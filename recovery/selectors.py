"""Tenant-scoped reads for failovers and instances. Another tenant's ids find nothing."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Q
from django.utils import timezone

from backups.models import Backup, Server

from . import devices
from .models import Drill, Instance, Recovery


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


def newest_verified_backup(*, server: Server) -> Backup | None:
    """The server's newest verified restore point (what a drill tests by default)."""
    return Backup.objects.filter(server=server, status=Backup.Status.VERIFIED).order_by("-date_created").first()


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


def measured_failovers(*, method: str, limit: int = 20) -> list[tuple[int, float]]:
    """(disk bytes, seconds to ready) of the latest failovers by `method` that reached ready.

    Across tenants: a rate of the deployment, not of anyone's data (no ids
    or names leave this function).
    """
    rows = (
        Recovery.objects.filter(import_method=method, status=Recovery.Status.READY, finished__isnull=False)
        .order_by("-finished")
        .values_list("virtual_size", "created", "finished")[:limit]
    )
    return [(size, (finished - created).total_seconds()) for size, created, finished in rows if finished is not None]


# --- Drills -----------------------------------------------------------------------------------


def drill_list(*, user, server: str | None = None):
    """The user's drills, newest first; only those of the server named `server` if given."""
    qs = Drill.objects.filter(user=user).prefetch_related("steps")
    if server:
        qs = qs.filter(server_name=server)
    return qs.order_by("-created")


def drill_get(*, user, drill_id) -> Drill | None:
    """The user's drill of that id, or None (unknown, malformed, another tenant's)."""
    pk = _as_uuid(drill_id)
    if pk is None:
        return None
    return Drill.objects.filter(user=user, pk=pk).prefetch_related("steps").first()


def newest_drills_by_backup(backup_ids) -> dict:
    """The newest finished drill of each of these restore points: {backup id: Drill}."""
    newest: dict = {}
    rows = Drill.objects.filter(backup_ref__in=list(backup_ids), status__in=Drill.FINISHED).order_by("-created")
    for drill in rows.only("pk", "backup_ref", "status", "finished", "error", "created"):
        newest.setdefault(drill.backup_ref, drill)
    return newest


def bootable(drill: Drill | None) -> dict | None:
    """The backup object's `bootable`: verified by its newest drill, or null."""
    if drill is None or drill.status != Drill.Status.PASSED:
        return None
    return {"verified": True, "drill_id": str(drill.pk), "at": drill.finished}


@dataclass
class DrillStanding:
    """A server's drills as its pages show them: the last one, the last passing one, whether one is overdue."""

    last: Drill | None
    last_passed: Drill | None
    interval: timedelta | None
    by_backup: dict
    since: datetime | None = None  # when the server was added: a new one is not overdue yet

    @property
    def overdue(self) -> bool:
        """No passing drill in twice the server's interval (the dashboard warns)."""
        if self.interval is None:
            return False
        since = self.last_passed.finished if self.last_passed else self.since
        return since is None or since < timezone.now() - 2 * self.interval


def drill_standing(*, servers) -> dict:
    """{server id: DrillStanding} for these servers (three queries whatever their number)."""
    from .drill_services import drill_interval

    servers = list(servers)
    ids = [s.pk for s in servers]
    last: dict[int, Drill] = {}
    for drill in Drill.objects.filter(server_id__in=ids).order_by("-created"):
        if drill.server_id is not None:
            last.setdefault(drill.server_id, drill)
    passed: dict[int, Drill] = {}
    for drill in Drill.objects.filter(server_id__in=ids, status=Drill.Status.PASSED).order_by("-finished"):
        if drill.server_id is not None:
            passed.setdefault(drill.server_id, drill)
    by_backup: dict = {}
    for drill in Drill.objects.filter(server_id__in=ids, status__in=Drill.FINISHED).order_by("-created"):
        by_backup.setdefault(drill.server_id, {}).setdefault(drill.backup_ref, drill)
    return {
        s.pk: DrillStanding(last.get(s.pk), passed.get(s.pk), drill_interval(s), by_backup.get(s.pk, {}), s.created)
        for s in servers
    }


def drills_between(*, user, start, end):
    """The user's finished drills in [start, end), oldest first: the contingency test report."""
    return (
        Drill.objects.filter(user=user, status__in=Drill.FINISHED, created__gte=start, created__lt=end)
        .prefetch_related("steps")
        .order_by("created")
    )
