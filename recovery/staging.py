"""Warm standby: each verified restore point of a server kept ready as a completed EBS snapshot.

With `Server.warm_standby` on, every verified restore point of the server
is staged (`stage_server`): a full (or a point whose parent is not staged)
as the one-pass writer writes a cold failover's disk, the non-zero blocks
of its merged chain; an incremental as an incremental snapshot of its
parent's staged snapshot (StartSnapshot with `ParentSnapshotId`), into which
only the EBS blocks its changed pages touch are written (its VHD's sector
bitmaps say which, `snapshot_write.changed_pieces`). A failover of a staged
point registers its image straight from the snapshot (`recovery.steps`).

Resumable: the snapshot id is recorded (`StagedSnapshot.snapshot_id`)
before any block is written, and the writer's checkpoints after each few
blocks, so a worker killed mid-staging is followed by one that writes on
into the same snapshot (PutSnapshotBlock is idempotent per block). A worker
killed between StartSnapshot and recording the id is covered by the tag
the snapshot carries and by its ClientToken. A snapshot AWS gave up on
(state error, e.g. not completed within its timeout) is deleted and the
point restaged from scratch under a new token.

In step with the restore points: whatever removes a restore point's row
(deletion, retention's drop or merge, the purge of a hidden one) leaves its
staged row without a backup, and `sweep` deletes the snapshot; a hidden
(deleted, still locked) point's snapshot goes too and is restaged if it is
brought back. Turning warm standby off deletes the server's snapshots.
Deleting a parent's snapshot never breaks a child's: AWS keeps in every
snapshot what it needs ("regardless of which prior snapshots have been
deleted, all active snapshots will have access to all the information
needed to restore the volume", DeleteSnapshot). A snapshot an image still
uses (a failover's) cannot be deleted; the sweep tries again later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.utils import timezone
from reclo_agent.vhd import VHDError

from backups import chains
from backups.models import Backup, Server
from backups.services.lifecycle import backup_in_use
from reclo_site import cloud
from reclo_site.cloud import imaging, storage

from . import paths, sizes, snapshot_write
from .models import StagedSnapshot

log = logging.getLogger(__name__)

# A staging worker renews its claim (for RECLO_STANDBY_STALE_AFTER) at most
# this often while it writes; an expired one belongs to a worker that died
# (the next run takes over).
RENEW_EVERY = timedelta(seconds=5)


def lease() -> timedelta:
    """How long a staging worker's claim holds without being renewed."""
    return settings.RECLO_STANDBY_STALE_AFTER


# Restore points staged per run of `stage_server` (a long history is staged over several runs).
BATCH = 20
TAG = "reclo:staged"
# A restore point whose snapshot AWS failed this many times is left unstaged
# (its failover writes the disk, as without warm standby; the log says why)
# and the points built on it are staged whole.
MAX_RESTARTS = 3


class Busy(Exception):
    """Another worker is staging this restore point, or AWS is still sealing it (`retry`: look again soon)."""

    def __init__(self, message: str, *, retry: bool = False):
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class Outcome:
    """What a run of `stage_server` did: points staged now, and whether to run again soon."""

    staged: int = 0
    again: bool = False


def wanted(server: Server) -> bool:
    """Whether `server`'s restore points are staged: warm standby on, and a failover takes the EBS direct path.

    A Windows server fails over by VM Import, which takes the merged VHD,
    not a snapshot: staging would cost without shortening its failover.
    """
    return bool(server.warm_standby) and paths.image_path(server).method == paths.EBS_DIRECT


def live_points(server: Server):
    """The restore points a failover may take: verified and not deleted, oldest first."""
    return Backup.objects.filter(server=server, status=Backup.Status.VERIFIED, deleted_at__isnull=True).order_by(
        "date_created", "pk"
    )


def stage_server(server_id: int) -> Outcome:
    """Bring a server's staged snapshots in step with its restore points and its setting.

    Off (or a VM Import server): its staged snapshots are deleted. On: every
    live restore point without a completed snapshot is staged, oldest first
    (so an incremental finds its parent's snapshot). Idempotent; `again`
    asks the caller to run it once more after a while (a point busy with
    another worker, a snapshot being sealed, or more than `BATCH` to do).
    """
    server = Server.objects.filter(pk=server_id).first()
    if server is None:
        return Outcome()
    if not wanted(server):
        sweep(server_id=server_id)  # what it cannot delete yet (an image uses it), the beat job retries
        return Outcome()
    staged, again = 0, False
    todo = list(live_points(server).exclude(staged__state=StagedSnapshot.State.COMPLETED)[: BATCH + 1])
    for point in todo[:BATCH]:
        try:
            row = stage(point)
        except Busy as exc:
            # Its children wait for its snapshot (else each would be written whole). Another
            # worker's staging carries on by itself (or the reconciler takes it over).
            again = exc.retry
            break
        except chains.ChainError as exc:
            log.info("not staging %s: %s", point.pk, exc)
            continue
        if row.state != StagedSnapshot.State.COMPLETED:
            if row.restarts < MAX_RESTARTS:
                again = True  # its snapshot failed: the next run starts it over, before its children
                break
            continue  # given up: its children are staged whole (no parent snapshot to start on)
        staged += 1
    sweep(server_id=server_id)
    return Outcome(staged=staged, again=again or len(todo) > BATCH)


def staged_snapshot(backup: Backup | None) -> str:
    """The completed staged snapshot of a restore point, or "" (not staged, or its server's standby is off)."""
    if backup is None:
        return ""
    row = StagedSnapshot.objects.filter(backup=backup, state=StagedSnapshot.State.COMPLETED).first()
    if row is None or not Server.objects.filter(pk=backup.server_id, warm_standby=True).exists():
        return ""
    return row.snapshot_id


# --- Staging one restore point ------------------------------------------------------------


def stage(backup: Backup) -> StagedSnapshot:
    """Stage one live restore point whose parent (if any) is staged; returns its completed row.

    Raises Busy when another worker holds it or AWS is still sealing it,
    ChainError when the chain cannot be read (not staged), CloudError and
    the writer's errors as they come (the row keeps what was done).
    """
    chain = chains.restorable_chain(backup)
    parent_snapshot = ""
    if len(chain) > 1:
        parent = StagedSnapshot.objects.filter(backup_id=chain[-2].pk, state=StagedSnapshot.State.COMPLETED).first()
        parent_snapshot = parent.snapshot_id if parent else ""
    row, _ = StagedSnapshot.objects.get_or_create(
        backup=backup,
        defaults={
            "user_id": backup.user_id,
            "backup_ref": backup.pk,
            "volume_gib": imaging.volume_gib(backup.virtual_size),
            "parent_snapshot_id": parent_snapshot,
        },
    )
    if row.state == StagedSnapshot.State.COMPLETED or (
        row.state == StagedSnapshot.State.FAILED and row.restarts >= MAX_RESTARTS
    ):
        return row
    if not _claim(row):
        raise Busy(f"{backup.pk} is being staged by another worker")
    try:
        row.refresh_from_db()
        if row.state == StagedSnapshot.State.FAILED:
            _restart(row, parent_snapshot)
        if not row.snapshot_id:
            _start(row, backup, parent_snapshot)
        if row.state == StagedSnapshot.State.WRITING:
            if not _write(row, chain):
                return row  # its snapshot failed under it; the next run restarts it
        return _seal(row)
    finally:
        StagedSnapshot.objects.filter(pk=row.pk).update(lease_until=None)


def _claim(row: StagedSnapshot) -> bool:
    now = timezone.now()
    return bool(
        StagedSnapshot.objects.filter(pk=row.pk)
        .exclude(state=StagedSnapshot.State.COMPLETED)
        .filter(models.Q(lease_until__isnull=True) | models.Q(lease_until__lt=now))
        .update(lease_until=now + lease(), attempts=models.F("attempts") + 1)
    )


def _tags(row: StagedSnapshot, backup: Backup) -> dict:
    return {
        "reclo:managed": "true",
        "reclo:tenant": str(backup.user_id),
        TAG: str(backup.pk),
        "reclo:restart": str(row.restarts),
        "Name": f"reclo {backup.server.name} {backup.disk} (warm standby)",
    }


def _start(row: StagedSnapshot, backup: Backup, parent_snapshot: str) -> None:
    """Find (a killed worker's) or start the snapshot, and record its id before any block is written."""
    found = [
        s
        for s in imaging.find_snapshots({TAG: str(backup.pk), "reclo:restart": str(row.restarts)})
        if s["state"] != "error"
    ]
    if found:
        snapshot_id = found[0]["snapshot_id"]
    else:
        snapshot_id = imaging.start_snapshot(
            volume_size_gib=row.volume_gib,
            client_token=f"reclo-staged-{backup.pk}-{row.restarts}",
            tags=_tags(row, backup),
            description=f"ReClo warm standby of {backup.server.name} {backup.disk}, restore point {backup.pk}",
            parent_snapshot_id=parent_snapshot,
        )
    row.snapshot_id, row.parent_snapshot_id = snapshot_id, parent_snapshot
    row.state, row.started = StagedSnapshot.State.WRITING, timezone.now()
    row.save(update_fields=["snapshot_id", "parent_snapshot_id", "state", "started"])


def _restart(row: StagedSnapshot, parent_snapshot: str) -> None:
    """Give a failed snapshot up cleanly: delete it, forget its checkpoints, start over under a new token."""
    if row.snapshot_id:
        imaging.delete_snapshot(row.snapshot_id)
    row.snapshot_id, row.spans, row.changed_blocks = "", None, 0
    row.restarts += 1
    row.parent_snapshot_id = parent_snapshot
    row.state = StagedSnapshot.State.STARTING
    row.save(update_fields=["snapshot_id", "spans", "changed_blocks", "restarts", "parent_snapshot_id", "state"])


def _write(row: StagedSnapshot, chain: list[Backup]) -> bool:
    """Write the point's blocks from the checkpoints on; then CompleteSnapshot. False if the snapshot failed."""
    state, message = imaging.snapshot_state(row.snapshot_id)
    if state == "error":
        _fail(row, f"The snapshot failed before it was written: {message or 'no reason given'}.")
        return False
    changed_only = bool(row.parent_snapshot_id)
    layers = [(b.key, b.pinned) for b in chain]
    try:
        reader, shared = snapshot_write.open_layers(layers)
        spans = row.spans
        if spans is None:
            todo = snapshot_write.blocks_to_write(reader, shared, changed_only=changed_only)
            spans = snapshot_write.plan_spans(todo, reader.block_count)
            StagedSnapshot.objects.filter(pk=row.pk).update(spans=spans)
        renewed = [timezone.now()]

        def save(saved: list[list[int]]) -> None:
            StagedSnapshot.objects.filter(pk=row.pk).update(
                spans=saved, changed_blocks=sum(span[3] for span in saved), lease_until=timezone.now() + lease()
            )

        def heartbeat(_detail: str) -> None:
            now = timezone.now()
            if now - renewed[0] > RENEW_EVERY:
                StagedSnapshot.objects.filter(pk=row.pk).update(lease_until=now + lease())
                renewed[0] = now

        written = snapshot_write.write_chain(
            row.snapshot_id, reader, shared, spans, save=save, heartbeat=heartbeat, changed_only=changed_only
        )
    except (VHDError, storage.ObjectChanged, cloud.ObjectNotFound) as exc:
        # The stored chain is not what was verified: nothing to stage from it (the scrub reports it).
        raise chains.ChainError(f"the chain cannot be read: {exc}") from exc
    imaging.complete_snapshot(row.snapshot_id, changed_blocks=written)
    row.changed_blocks, row.state = written, StagedSnapshot.State.SEALING
    StagedSnapshot.objects.filter(pk=row.pk).update(changed_blocks=written, state=row.state)
    return True


def _seal(row: StagedSnapshot) -> StagedSnapshot:
    state, message = imaging.snapshot_state(row.snapshot_id)
    if state == "completed":
        row.state, row.completed, row.error = StagedSnapshot.State.COMPLETED, timezone.now(), ""
        row.save(update_fields=["state", "completed", "error"])
        return row
    if state == "error":
        _fail(row, f"AWS could not seal the snapshot: {message or 'no reason given'}.")
        return row
    raise Busy(f"{row.snapshot_id} is being sealed", retry=True)


def _fail(row: StagedSnapshot, reason: str) -> None:
    row.state, row.error = StagedSnapshot.State.FAILED, reason
    row.save(update_fields=["state", "error"])
    log.warning("staged snapshot %s of %s failed: %s", row.snapshot_id, row.backup_ref, reason)


# --- Keeping them in step -----------------------------------------------------------------


def _doomed(server_id: int | None = None):
    """Staged rows whose snapshot must go: no live restore point behind it, or standby off."""
    rows = StagedSnapshot.objects.select_related("backup__server")
    gone = (
        models.Q(backup__isnull=True)
        | models.Q(backup__deleted_at__isnull=False)
        | ~models.Q(backup__status=Backup.Status.VERIFIED)
        | models.Q(backup__server__warm_standby=False)
    )
    if server_id is not None:
        rows = rows.filter(models.Q(backup__server_id=server_id) | models.Q(backup__isnull=True))
    return rows.filter(gone)


def sweep(*, server_id: int | None = None, limit: int = 200) -> bool:
    """Delete the staged snapshots nothing needs any more (of one server, plus orphans); True when none is left.

    A snapshot is kept while an image uses it (a failover's, until its
    server is terminated), while a running failover may be about to
    register one from it, or while a worker is still staging it (it is
    deleted once that worker let go); the next sweep tries again. Its row
    goes once AWS has deleted it.
    """
    left = False
    now = timezone.now()
    for row in _doomed(server_id)[:limit]:
        if (row.lease_until and row.lease_until > now) or backup_in_use([row.backup_ref]):
            left = True
            continue
        if row.snapshot_id and not imaging.delete_snapshot_unless_in_use(row.snapshot_id):
            left = True
            continue
        StagedSnapshot.objects.filter(pk=row.pk, snapshot_id=row.snapshot_id).delete()
    return not left


def servers_to_stage() -> list[int]:
    """Servers with warm standby on that have a live restore point without a completed snapshot."""
    return list(
        Server.objects.filter(warm_standby=True)
        .filter(
            models.Exists(
                Backup.objects.filter(
                    server=models.OuterRef("pk"), status=Backup.Status.VERIFIED, deleted_at__isnull=True
                ).exclude(staged__state=StagedSnapshot.State.COMPLETED)
            )
        )
        .values_list("pk", flat=True)
    )


# --- What it costs ------------------------------------------------------------------------

GB = 1000**3


@dataclass(frozen=True)
class Cost:
    """What warm standby of a server would keep in EBS snapshots, and its monthly price."""

    stored_bytes: int
    monthly_usd: Decimal

    @property
    def gb(self) -> Decimal:
        return (Decimal(self.stored_bytes) / GB).quantize(Decimal("0.1"))


def monthly_cost(server: Server) -> Cost:
    """An upper bound: each disk's full size (EBS stores only its written blocks) plus its incrementals' changes.

    An incremental's snapshot keeps only the 512 KiB blocks its pages
    touched; its stored (compressed) size is the closest figure known
    without reading it, so it is doubled for what zstd saved.
    """
    points = list(live_points(server).only("disk", "kind", "virtual_size", "file_size"))
    sizes_by_disk: dict[str, int] = {}
    changes = 0
    for point in points:
        sizes_by_disk[point.disk] = max(sizes_by_disk.get(point.disk, 0), point.virtual_size)
        if point.kind == Backup.Kind.INCREMENTAL:
            changes += 2 * (point.file_size or 0)
    stored = sum(sizes_by_disk.values()) + changes
    return Cost(stored, sizes.snapshot_monthly(stored))


@dataclass(frozen=True)
class Standing:
    """Warm standby of one server as its page shows it."""

    on: bool
    applies: bool  # a failover of this server takes the EBS direct path (staging shortens it)
    staged: int  # restore points with a completed snapshot
    points: int  # live restore points
    cost: Cost
    expected_seconds: int  # time to ready of a staged point's failover (no disk to write)


def standing(server: Server) -> Standing:
    """Whether warm standby is on for `server`, how far staging is, what it costs or would cost."""
    points = live_points(server)
    staged = StagedSnapshot.objects.filter(
        backup__in=points, state=StagedSnapshot.State.COMPLETED, snapshot_id__gt=""
    ).count()
    return Standing(
        on=bool(server.warm_standby),
        applies=paths.image_path(server).method == paths.EBS_DIRECT,
        staged=staged,
        points=points.count(),
        cost=monthly_cost(server),
        expected_seconds=paths.DEFAULT_FIXED_SECONDS[paths.EBS_DIRECT],
    )
