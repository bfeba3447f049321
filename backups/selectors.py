"""Tenant-scoped reads of servers and backups, shaped for the API and the pages.

Each selector runs a fixed number of queries whatever the number of
backups: the list joins its server, and the dashboard's per-disk figures
come from two grouped queries (aggregates, and the newest rows of each
disk through a window function).
"""

from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import Count, F, Max, OuterRef, Q, Subquery, Sum, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from .chains import descendants_of, group_into_chains
from .health import ORDER, Health, schedule_health
from .models import Backup, Server

TIMELINE_LIMIT = 500

HEALTH_ORDER = ORDER


def backup_list(*, user, server: str | None = None):
    """The user's backups, newest first, optionally of one server (by name); deleted ones are hidden."""
    qs = (
        Backup.objects.filter(user=user, deleted_at__isnull=True)
        .select_related("server")
        .order_by("-date_created", "-pk")
    )
    if server is not None:
        # The server's id first (one indexed lookup): filtering on a known id
        # lets the planner walk the (server, date, id) index for the page
        # instead of sorting the server's backups.
        server_id = Server.objects.filter(user=user, name=server).values_list("pk", flat=True).first()
        qs = qs.filter(server_id=server_id) if server_id is not None else qs.none()
    return qs


def backup_get(*, user, backup_id) -> Backup | None:
    """One of the user's backups, or None (also for another tenant's id, or a deleted one)."""
    try:
        return Backup.objects.select_related("server").get(user=user, pk=backup_id, deleted_at__isnull=True)
    except Backup.DoesNotExist:
        return None


def disk_health(*, newest_verified_at, newest_status, uploading: bool, schedule: Health) -> tuple[str, str]:
    """(badge colour, words) for a disk: its own trouble (failed, none yet), else its server's schedule."""
    if newest_status == Backup.Status.FAILED:
        return "red", "last backup failed"
    if newest_verified_at is None:
        return ("amber", "first backup in progress") if uploading else ("red", "no restore point")
    return schedule.colour, schedule.label


@dataclass
class DiskState:
    server_id: int
    disk: str
    restore_points: int = 0
    stored_bytes: int = 0
    uploading: bool = False
    newest_verified_at: datetime | None = None
    newest: dict | None = None  # the newest completed backup (any verdict)
    health: str = "red"
    health_label: str = ""


def disk_states(
    *, server_ids: list[int], now: datetime | None = None, servers: list[Server] | None = None
) -> dict[tuple[int, str], DiskState]:
    """Figures and health of every disk of these servers, in two queries (three without `servers`)."""
    now = now or timezone.now()
    states: dict[tuple[int, str], DiskState] = {}
    if not server_ids:
        return states
    stored = Q(status__in=[Backup.Status.VERIFIED, Backup.Status.VERIFYING])
    aggregates = (
        Backup.objects.filter(server_id__in=server_ids, deleted_at__isnull=True)
        .values("server_id", "disk")
        .annotate(
            points=Count("pk", filter=Q(status=Backup.Status.VERIFIED)),
            stored=Sum("file_size", filter=stored),
            uploading=Count("pk", filter=Q(status__in=[Backup.Status.PENDING, Backup.Status.VERIFYING])),
            newest_verified=Max("date_created", filter=Q(status=Backup.Status.VERIFIED)),
        )
        .order_by()
    )
    for row in aggregates:
        states[row["server_id"], row["disk"]] = DiskState(
            server_id=row["server_id"],
            disk=row["disk"],
            restore_points=row["points"],
            stored_bytes=row["stored"] or 0,
            uploading=bool(row["uploading"]),
            newest_verified_at=row["newest_verified"],
        )
    newest_rows = (
        Backup.objects.filter(server_id__in=server_ids, deleted_at__isnull=True)
        .exclude(status=Backup.Status.PENDING)
        .annotate(rank=Window(RowNumber(), partition_by=[F("server_id"), F("disk")], order_by=F("date_created").desc()))
        .filter(rank=1)
        .values("id", "server_id", "disk", "kind", "status", "date_created", "file_size", "failure")
    )
    for newest in newest_rows:
        states[newest["server_id"], newest["disk"]].newest = dict(newest)
    if servers is None:
        servers = list(Server.objects.filter(pk__in=server_ids))
    schedules = {s.pk: schedule_health(s, now) for s in servers}
    for state in states.values():
        state.health, state.health_label = disk_health(
            newest_verified_at=state.newest_verified_at,
            newest_status=state.newest["status"] if state.newest else None,
            uploading=state.uploading,
            schedule=schedules[state.server_id],
        )
    return states


@dataclass
class ServerOverview:
    server: Server
    disks: list[DiskState] = field(default_factory=list)
    now: datetime = field(default_factory=timezone.now)

    @property
    def schedule(self) -> Health:
        """The health of the agent's schedule (backups.health)."""
        return schedule_health(self.server, self.now)

    def _worst(self) -> tuple[str, str]:
        # The schedule's trouble first (it says why), then the disks'.
        badges = [(self.schedule.colour, self.schedule.label)] + [(d.health, d.health_label) for d in self.disks]
        if not self.disks:
            badges.append(("red", "no restore point"))
        return max(badges, key=lambda b: HEALTH_ORDER[b[0]])

    @property
    def health(self) -> str:
        return self._worst()[0]

    @property
    def health_label(self) -> str:
        return self._worst()[1]

    @property
    def newest_verified_at(self) -> datetime | None:
        return max((d.newest_verified_at for d in self.disks if d.newest_verified_at), default=None)

    @property
    def stored_bytes(self) -> int:
        return sum(d.stored_bytes for d in self.disks)


def server_overview(*, user, name: str | None = None) -> list[ServerOverview]:
    """The dashboard: each server of the user (or the one of that name) with its disks' figures and health."""
    query = Server.objects.filter(user=user).order_by("name")
    if name is not None:
        query = query.filter(name=name)
    servers = list(query)
    states = disk_states(server_ids=[s.pk for s in servers], servers=servers)
    by_server: dict[int, list[DiskState]] = {}
    for state in states.values():
        by_server.setdefault(state.server_id, []).append(state)
    return [ServerOverview(server=s, disks=sorted(by_server.get(s.pk, []), key=lambda d: d.disk)) for s in servers]


@dataclass
class DiskTimeline:
    state: DiskState
    chains: list[list[Backup]]  # newest chain first; each chain base first


def server_timeline(*, user, server_id: int) -> tuple[ServerOverview, list[DiskTimeline]] | None:
    """A server's restore points grouped by disk and chain, or None if not the user's.

    Shows the newest TIMELINE_LIMIT backups (retention keeps far fewer
    verified ones; failed ones add up until deleted).
    """
    server = Server.objects.filter(user=user, pk=server_id).first()
    if server is None:
        return None
    backups = list(server.backups.order_by("-date_created", "-pk")[:TIMELINE_LIMIT])
    backups.reverse()
    states = disk_states(server_ids=[server.pk], servers=[server])
    by_pk = {backup.pk: backup for backup in backups}
    for backup in backups:
        if backup.parent_id in by_pk:
            backup.parent = by_pk[backup.parent_id]  # cached: the page says "changes since <its parent>"
    chains_by_disk = group_into_chains(backups)
    timelines = [
        # A disk whose restore points are all scheduled for removal has no figures.
        DiskTimeline(
            state=states.get((server.pk, disk)) or DiskState(server_id=server.pk, disk=disk),
            chains=list(reversed(chains)),
        )
        for disk, chains in sorted(chains_by_disk.items())
    ]
    overview = ServerOverview(server=server, disks=[t.state for t in timelines])
    return overview, timelines


def backup_delete_preview(*, user, backup_id) -> tuple[Backup, list[Backup]] | None:
    """A backup of the user and the restore points a cascading delete would take along."""
    backup = backup_get(user=user, backup_id=backup_id)
    if backup is None:
        return None
    rows = list(Backup.objects.filter(server_id=backup.server_id, disk=backup.disk, deleted_at__isnull=True))
    below = sorted((b for _, b in descendants_of(backup, rows)), key=lambda b: b.date_created, reverse=True)
    return backup, below


def server_credential_counts(*, server_ids: list[int]) -> dict[int, int]:
    """How many live server credentials each of these servers has (enrolled agents)."""
    from accounts.models import ApiToken

    rows = (
        ApiToken.objects.active()
        .filter(server_id__in=server_ids)
        .values("server_id")
        .annotate(n=Count("pk"))
        .order_by()
    )
    return {row["server_id"]: row["n"] for row in rows}


def newest_consistency(*, server_ids: list[int]) -> dict[int, str]:
    """Server id -> how its newest visible verified restore point was read (one query)."""
    newest = (
        Backup.objects.filter(server=OuterRef("pk"), status=Backup.Status.VERIFIED, deleted_at__isnull=True)
        .order_by("-date_created")
        .values("consistency")[:1]
    )
    rows = Server.objects.filter(pk__in=server_ids).annotate(newest=Subquery(newest)).values_list("pk", "newest")
    return {pk: value for pk, value in rows if value}
