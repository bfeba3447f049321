"""The failback's step handlers, each `(StepContext) -> Done | Wait`, named in `recovery.failback.FAILBACK_STEPS`.

Like the failover's (`recovery/steps.py`), each may run many times (retries,
waits, a worker killed half-way, a task delivered twice) and begins by
looking at what is already there: the ids it saved, then the snapshot
tagged with the failback's id, then the restore point's row. So a worker
killed at any point is followed by one that carries on without a second
snapshot: a copy cut short is started again from the same snapshot (its
upload is only complete once the whole VHD went up).
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.db.models import Q
from django.utils import timezone
from reclo_agent.vhd import SeekableZstdWriter, VHDError, VHDReader, VHDWriter, make_bitmap, open_seekable
from reclo_agent.vhd.format import DEFAULT_BLOCK_SIZE, SECTOR, bitmap_size

from backups import chains
from backups.models import Backup
from backups.naming import backup_key
from backups.services import verification
from reclo_site import cloud
from reclo_site.cloud import imaging, storage, volumes
from reclo_site.errors import Code

from .engine import StepContext
from .models import Failback, Recovery, RecoveryStep
from .pipeline import Done, StepFailed, Wait

log = logging.getLogger(__name__)

MiB = 1024 * 1024
EBS = volumes.EBS_BLOCK_SIZE
SNAPSHOT_POLL = 10.0
VERIFY_POLL = 10.0


def failback_tags(failback: Failback) -> dict:
    return {
        "reclo:managed": "true",
        "reclo:tenant": str(failback.user_id),
        # Not `reclo:recovery`: the failover finds its own snapshot by that tag.
        "reclo:failback-of": str(failback.recovery_id),
        "reclo:failback": str(failback.pk),
        "reclo:role": "failback-disk",
        "Name": f"reclo {failback.server_name} (failback)",
    }


def file_name(failback: Failback) -> str:
    """The restore point's file name (what the agent's uploads call theirs; kept for display)."""
    return f"{failback.recovery.disk}-failback-{failback.backup_ref}.vhd"


# --- snapshotting ---------------------------------------------------------------------------


def snapshot(ctx: StepContext) -> Done | Wait:
    """Snapshot the recovered server's root volume (once), wait for it, and decide full or incremental."""
    failback: Failback = ctx.run
    snapshot_id = ctx.outputs.get("snapshot_id")
    if not snapshot_id:
        # When it is taken, as a lower bound saved before the call: a worker that finds the snapshot
        # by its tag after a crash must not date it later than the disk it holds.
        if "requested_at" not in ctx.outputs:
            ctx.save(requested_at=timezone.now().isoformat())
        found = imaging.find_snapshots({"reclo:failback": str(failback.pk)})
        if found:
            snapshot_id = found[0]["snapshot_id"]
        else:
            try:
                volume_id = volumes.root_volume(failback.instance_id)
            except cloud.ObjectNotFound as exc:
                raise StepFailed(
                    Code.IMPORT_FAILED, "The server in the cloud is gone: there is no disk left to bring home."
                ) from exc
            snapshot_id = volumes.create_snapshot(
                volume_id,
                description=f"ReClo failback of {failback.server_name}",
                tags=failback_tags(failback),
            )
        # Saved the moment it exists: a worker killed now is followed by one that finds it.
        ctx.save(snapshot_id=snapshot_id)
        Failback.objects.filter(pk=failback.pk, snapshot_at__isnull=True).update(
            snapshot_id=snapshot_id, snapshot_at=datetime.fromisoformat(ctx.outputs["requested_at"])
        )
    state, message = imaging.snapshot_state(snapshot_id)
    if state == "pending":
        return Wait(SNAPSHOT_POLL, "The cloud is taking the snapshot of the server's disk.")
    if state != "completed":
        raise StepFailed(Code.IMPORT_FAILED, f"The snapshot failed ({state}): {message or 'no reason given'}.")
    kind, parent, base_snapshot, why = _decide(failback)
    Failback.objects.filter(pk=failback.pk).update(kind=kind, parent=parent)
    return Done({"snapshot_id": snapshot_id, "kind": kind, "base_snapshot_id": base_snapshot, "why": why}, why[:200])


def imported_snapshot(recovery: Recovery) -> str:
    """The snapshot the failover wrote the restore point into (EBS direct), '' when unknown or gone."""
    step = RecoveryStep.objects.filter(recovery=recovery, name="importing").first()
    snapshot_id = (step.outputs if step else {}).get("snapshot_id", "")
    if not snapshot_id:
        return ""
    try:
        state, _ = imaging.snapshot_state(snapshot_id)
    except cloud.ObjectNotFound:
        return ""
    return snapshot_id if state == "completed" else ""


def _decide(failback: Failback) -> tuple[str, Backup | None, str, str]:
    """(kind, parent, base snapshot, why): incremental only when its parent is certain to be the imported disk."""
    recovery = failback.recovery
    full = Failback.Kind.FULL
    if recovery.import_method != Recovery.ImportMethod.EBS_DIRECT:
        # VM Import installs drivers into the disk it imports: the imported
        # snapshot is not the restore point, so its changed blocks are not
        # the cloud's changes to it.
        return full, None, "", "A full restore point: the server was imported by VM Import."
    parent = recovery.backup
    if parent is None or parent.deleted_at is not None or parent.status != Backup.Status.VERIFIED:
        return full, None, "", "A full restore point: the failover's restore point is no longer kept."
    try:
        chains.restorable_chain(parent)
    except chains.ChainError:
        return full, None, "", "A full restore point: the failover's restore point can no longer be restored."
    # Restore points form one line per disk: a point already built on the
    # failover's would make a fork that verification refuses.
    if (
        Backup.objects.filter(parent=parent, deleted_at__isnull=True)
        .filter(Q(status=Backup.Status.VERIFIED) | Q(status=Backup.Status.VERIFYING))
        .exists()
    ):
        return full, None, "", "A full restore point: a newer backup is already built on the failover's restore point."
    base = imported_snapshot(recovery)
    if not base:
        return full, None, "", "A full restore point: the failover's disk snapshot is gone."
    return (
        Failback.Kind.INCREMENTAL,
        parent,
        base,
        "Only the blocks changed in the cloud: an incremental restore point.",
    )


# --- copying --------------------------------------------------------------------------------


def copy(ctx: StepContext) -> Done:
    """Read the snapshot's blocks through EBS direct into a VHD (seekable zstd) in S3, and record it as a Backup.

    Full: every block the snapshot holds, into a dynamic VHD. Incremental:
    the blocks ListChangedBlocks gives between the failover's snapshot and
    this one, into a differencing VHD on the failover's restore point, each
    512 KiB piece marked in its block's sector bitmap. Written by the agent's
    own writers, streamed (a multipart upload), so memory stays at a few
    blocks whatever the disk's size.
    """
    failback: Failback = ctx.run
    existing = Backup.objects.filter(pk=failback.backup_ref).first()
    if existing is not None:
        # The row is made only after the upload completed: this is a re-run.
        return Done(
            {"backup_id": str(existing.pk), "key": existing.key}, "The restore point was already written.", True
        )
    if failback.server is None:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "The server was removed from the portal: nothing to add to.")
    recovery = failback.recovery
    before = ctx.previous("snapshotting")
    snapshot_id, kind = before["snapshot_id"], before["kind"]
    parent = failback.parent if kind == Failback.Kind.INCREMENTAL else None
    if kind == Failback.Kind.INCREMENTAL and parent is None:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "The failover's restore point was deleted during the failback.")
    key = backup_key(
        user_id=failback.user_id, server=failback.server.name, disk=recovery.disk, backup_id=failback.backup_ref
    )
    # Parts of an earlier try that died half-way would only cost storage.
    for stale_key, upload_id in storage.multipart_uploads(prefix=key, key=key):
        storage.abort_multipart_upload(stale_key, upload_id)

    size = recovery.virtual_size
    if parent is not None:
        parent_vhd = _parent_vhd(parent)
        block_size = parent_vhd.block_size
        listed = volumes.changed_blocks(before["base_snapshot_id"], snapshot_id)
    else:
        parent_vhd, block_size = None, DEFAULT_BLOCK_SIZE
        listed = list(volumes.snapshot_block_list(snapshot_id))
    # The volume is whole GiB; the disk is the restore point's size. Blocks past it hold nothing of the disk.
    beyond = sum(1 for index, _ in listed if index * EBS >= size)
    listed = [(index, token) for index, token in listed if index * EBS < size]
    per = block_size // EBS
    allocated = sorted({index // per for index, _ in listed})
    ctx.heartbeat(f"Copying {len(listed)} block(s) of 512 KiB from the cloud.", force=True)
    bound = (len(allocated) + 8) * (block_size + bitmap_size(block_size)) + MiB
    try:
        with storage.ObjectWriter(key, expected_size=bound, in_flight=3) as out:
            stored = SeekableZstdWriter(out)
            with stored:
                writer = VHDWriter(
                    stored,
                    size,
                    allocated,
                    block_size=block_size,
                    parent=parent_vhd.info.as_parent(parent.file_name) if parent and parent_vhd else None,
                )
                _write_blocks(ctx, writer, snapshot_id, listed, block_size, size, differencing=parent is not None)
                info = writer.close()
    except storage.ObjectChanged as exc:
        raise StepFailed(Code.IMPORT_FAILED, f"The failover's restore point changed in storage: {exc}") from exc
    except VHDError as exc:
        raise StepFailed(Code.IMPORT_FAILED, f"The failover's restore point is damaged: {exc}") from exc
    now = timezone.now()
    backup, _ = Backup.objects.get_or_create(
        pk=failback.backup_ref,
        defaults={
            "user_id": failback.user_id,
            "server": failback.server,
            "disk": recovery.disk,
            "kind": kind,
            "parent": parent,
            "file_name": file_name(failback),
            "key": key,
            "virtual_size": size,
            "file_size": stored.compressed_size,
            "sha256": stored.sha256(),
            "status": Backup.Status.VERIFYING,
            # Taken from a running server, like pulling its plug.
            "consistency": Backup.Consistency.CRASH,
            "date_created": failback.snapshot_at or now,
            "completed_at": now,
            "verify_queued_at": now,
        },
    )
    return Done(
        {
            "backup_id": str(backup.pk),
            "key": key,
            "blocks": len(listed),
            "beyond_disk": beyond,
            "file_size": stored.compressed_size,
            "vhd_unique_id": str(info.unique_id),
        },
        f"Copied {len(listed)} block(s) of 512 KiB into a {stored.compressed_size // MiB} MiB restore point.",
    )


def _parent_vhd(parent: Backup) -> VHDReader:
    """The failover's restore point's VHD (its footer is what the differencing VHD records), at its verified version."""
    try:
        return VHDReader(open_seekable(storage.ObjectReader(parent.key, chunk_size=MiB, **parent.pinned)))
    except cloud.ObjectNotFound as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "The failover's restore point is missing from storage.") from exc


def _write_blocks(ctx, writer: VHDWriter, snapshot_id: str, listed: list, block_size: int, size: int,
                  *, differencing: bool) -> None:  # fmt: skip
    """Gather the 512 KiB pieces into VHD blocks, in order, and write each (with the sectors it holds)."""
    per = block_size // EBS
    sectors_per_piece = EBS // SECTOR
    bitmap_bytes = block_size // SECTOR // 8
    current, data = -1, bytearray()
    pieces: list[int] = []

    def flush() -> None:
        if current < 0:
            return
        length = min(block_size, size - current * block_size)
        if differencing:
            # Only the pieces the cloud changed; the parent's sectors show through the rest.
            runs = [(p * sectors_per_piece, min(sectors_per_piece, length // SECTOR - p * sectors_per_piece))
                    for p in pieces]  # fmt: skip
            writer.write_block(current, bytes(data[:length]), make_bitmap(runs, bitmap_bytes))
        else:
            writer.write_block(current, bytes(data[:length]))

    done = 0
    for index, piece in volumes.read_blocks(snapshot_id, listed):
        block = index // per
        if block != current:
            flush()
            current, data, pieces = block, bytearray(block_size), []
        within = index % per
        data[within * EBS : (within + 1) * EBS] = piece
        pieces.append(within)
        done += 1
        ctx.heartbeat(f"Copied {done} of {len(listed)} block(s) ({done * 100 // max(1, len(listed))}%).")
    flush()


# --- verifying ------------------------------------------------------------------------------


def verify(ctx: StepContext) -> Done | Wait:
    """Verify the restore point with the verifier every upload goes through (`backups.services.verification`)."""
    failback: Failback = ctx.run
    backup = Backup.objects.filter(pk=failback.backup_ref).first()
    if backup is None:
        raise StepFailed(Code.VERIFICATION_FAILED, "The restore point was deleted before it was verified.")
    if backup.status == Backup.Status.VERIFYING:
        try:
            verification.backup_verify(backup_id=backup.pk)
        except verification.VerificationDeferred as exc:
            return Wait(exc.retry_in, "Waiting for a verification slot.")
        backup.refresh_from_db()
    if backup.status == Backup.Status.VERIFIED:
        return Done({"backup_id": str(backup.pk)}, "The restore point is verified: it can be restored.")
    if backup.status == Backup.Status.FAILED:
        raise StepFailed(Code.VERIFICATION_FAILED, f"The restore point did not verify: {backup.failure}")
    return Wait(VERIFY_POLL, "The restore point is being verified.")
