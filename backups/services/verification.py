"""Verifying uploads, and the scrub that re-checks stored restore points.

Nothing the agent declared is trusted. Two ways to a verdict:

- by checksums (an upload whose complete declared its part checksums):
  S3 checked each part against its SHA-256 on arrival, and the object's
  composite checksum (GetObjectAttributes) must be the one those
  declared parts make; then the VHD's structure is checked by ranged
  reads of the metadata only (seek table, footers, header, BAT). Work
  and time grow with the metadata, not the disk: a verdict in seconds;
- by reading (uploads without part checksums, and the weekly scrub): the
  worker reads the whole stored object (ranged reads through the cloud
  adapter, never a whole download to disk), checks its SHA-256,
  decompresses every frame against its checksum, and checks the VHD.

The first leaves the object's whole SHA-256 as the agent declared it,
and the frames' contents unread: the scrub (and every restore and drill)
reads them and compares that SHA-256, and a mismatch marks the chain
broken.
"""

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from reclo_agent import vhd

from accounts import notify
from accounts.audit import audit_record
from accounts.models import AuditEvent
from reclo_site import cloud
from reclo_site.cloud import storage

from ..chains import descendants_of
from ..models import Backup
from .lifecycle import backup_fail, lock_period

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class ObjectCheck:
    """What reading a stored restore point found."""

    size: int
    sha256: str
    info: vhd.VHDInfo
    # The version that was read (empty on an unversioned bucket) and its ETag.
    version_id: str = ""
    etag: str = ""


def object_check(
    key: str,
    *,
    kind: str,
    virtual_size: int,
    parent_unique_id: uuid.UUID | None = None,
    version_id: str | None = None,
    etag: str | None = None,
    on_fetch: Callable[[], None] | None = None,
) -> ObjectCheck:
    """Read a stored restore point and check everything about it.

    `version_id` / `etag` read exactly that version (a verified one); without
    them the current version is read, and the check says which it was.

    The VHD's structure (footer and header checksums, disk type fits
    `kind`, parent id, virtual size, every BAT entry inside the data) is
    validated through the seek table, reading only the frames it needs;
    then every zstd frame is decompressed against the seek table and its
    checksum, front to back, which is also the pass that hashes the object.

    The work is bounded by what is stored: the header's block count is
    capped before the BAT is read, the decompressed size by the disk's,
    and both passes are C-level work per byte (see the agent's reader).
    `on_fetch` is called after every ranged GET (the caller's heartbeat).

    Raises VHDError for a bad file, ObjectArchived for an object in any
    storage class but STANDARD (an agent may not choose GLACIER: a restore
    point must be readable at once), ObjectNotFound / ObjectChanged /
    CloudUnavailable for storage trouble.
    """
    with storage.ObjectReader(key, version_id=version_id, etag=etag, sha256=True, on_fetch=on_fetch) as raw:
        info = _structure(raw, kind=kind, virtual_size=virtual_size, parent_unique_id=parent_unique_id)
        vhd.check_seekable(raw)
        digest = raw.sha256_hexdigest()
        return ObjectCheck(size=raw.size, sha256=digest, info=info, version_id=raw.version_id, etag=raw.etag)


def _structure(raw, *, kind: str, virtual_size: int, parent_unique_id) -> vhd.VHDInfo:
    """The storage class, then the VHD's structure through the seek table (metadata reads only)."""
    if raw.storage_class != storage.STANDARD:
        raise cloud.ObjectArchived(f"{raw.key} is {raw.storage_class}", "InvalidObjectState", raw.storage_class)
    # Refused from the header alone: a BAT of more blocks than any real
    # writer declares (a few KB of zstd can declare 2 GiB of BAT).
    info = vhd.validate(
        vhd.open_seekable(raw),
        expected_kind=kind,
        parent_unique_id=parent_unique_id,
        virtual_size=virtual_size,
        max_blocks=settings.RECLO_VERIFY_MAX_BLOCKS,
    )
    # A VHD is never much bigger than its disk (bitmaps and tables add
    # well under 1%). Refuse a larger one before decompressing it all:
    # a few kilobytes of zstd can claim terabytes of zeros.
    if info.file_size > max_vhd_size(virtual_size):
        raise vhd.VHDError(f"the VHD is {info.file_size} bytes, far more than a {virtual_size}-byte disk needs")
    return info


def object_check_by_checksum(
    key: str,
    *,
    kind: str,
    virtual_size: int,
    part_checksum: str,
    file_size: int,
    sha256: str,
    parent_unique_id: uuid.UUID | None = None,
    on_fetch: Callable[[], None] | None = None,
) -> ObjectCheck | None:
    """Check a stored restore point by S3's checksum and its metadata alone (see the module doc).

    `part_checksum` is the composite the declared parts make ("<base64>-<parts>").
    Returns None when the object has no composite SHA-256 checksum (uploaded
    without part checksums): the caller then reads it whole. Raises
    VHDError for a bad file or a checksum that is not the declared one, and
    what :func:`object_check` raises for storage trouble.
    """
    with storage.ObjectReader(key, chunk_size=MiB, cache_chunks=8, on_fetch=on_fetch) as raw:
        attributes = storage.object_checksum(key, version_id=raw.version_id or None)
        if attributes["etag"] and raw.etag and attributes["etag"] != raw.etag:
            raise storage.ObjectChanged(f"{key} changed while it was being checked", "ETagChanged")
        if not attributes["checksum_sha256"] or attributes["checksum_type"] not in ("", "COMPOSITE"):
            return None
        declared, _, parts = part_checksum.partition("-")
        if attributes["checksum_sha256"] != declared:
            raise vhd.VHDError(
                "the object's checksum in storage is not the one its declared part checksums make "
                "(a part is missing, extra or not the one uploaded)"
            )
        if attributes["parts"] is not None and str(attributes["parts"]) != parts:
            raise vhd.VHDError(f"the object has {attributes['parts']} parts in storage; {parts} were declared")
        if raw.size != file_size:
            raise vhd.VHDError(f"the stored object is {raw.size} bytes; {file_size} were declared")
        info = _structure(raw, kind=kind, virtual_size=virtual_size, parent_unique_id=parent_unique_id)
        return ObjectCheck(size=raw.size, sha256=sha256, info=info, version_id=raw.version_id, etag=raw.etag)


def storage_class_problem(storage_class: str) -> str:
    """Why an object in `storage_class` is refused, in words for the owner and the agent."""
    which = f"the {storage_class}" if storage_class else "an archive"
    return (
        f"The object was stored in {which} storage class; a restore point must be STANDARD so a "
        "failover can read it at once. Upload it again without choosing a storage class."
    )


def max_vhd_size(virtual_size: int) -> int:
    """The largest VHD file (decompressed) a restore point of this disk may be."""
    return virtual_size + virtual_size // 256 + 64 * 1024 * 1024


class Heartbeat:
    """Renews a backup's `read_heartbeat` while a worker reads its object, at most every few seconds."""

    EVERY = timedelta(seconds=15)

    def __init__(self, backup_id, stamped_at):
        self.backup_id = backup_id
        self.last = stamped_at

    def __call__(self) -> None:
        now = timezone.now()
        if now - self.last >= self.EVERY:
            Backup.objects.filter(pk=self.backup_id).update(read_heartbeat=now)
            self.last = now


def read_claim(backup: Backup, *, status: str, limit: int | None = None) -> Heartbeat | str:
    """Claim the reading of `backup`'s object for this worker: a Heartbeat, or why not.

    "gone" when the backup is no longer in `status`, "running" when another
    worker's heartbeat is fresh (a duplicate delivery, or a worker that died
    a moment ago), "wait" when the tenant already has `limit` verifications
    running. The
    tenant's row is locked while counting, so two workers cannot both take
    the last slot.
    """
    now = timezone.now()
    fresh = now - settings.RECLO_VERIFY_STALE_AFTER
    with transaction.atomic():
        get_user_model().objects.select_for_update().filter(pk=backup.user_id).first()
        row = Backup.objects.select_for_update().filter(pk=backup.pk, status=status).first()
        if row is None:
            return "gone"
        if row.read_heartbeat and row.read_heartbeat > fresh:
            return "running"
        if limit is not None:
            running = Backup.objects.filter(
                user_id=row.user_id, status=Backup.Status.VERIFYING, read_heartbeat__gt=fresh
            ).count()
            if running >= limit:
                return "wait"
        Backup.objects.filter(pk=row.pk).update(read_heartbeat=now)
    return Heartbeat(backup.pk, now)


def read_release(backup: Backup) -> None:
    """End this worker's claim (its verdict is written, or it gives up for a retry)."""
    Backup.objects.filter(pk=backup.pk).update(read_heartbeat=None)


def _problem(
    backup: Backup, *, parent_unique_id, on_fetch=None, by_checksum: bool = False
) -> tuple[ObjectCheck | None, str]:
    """Check `backup`'s object against its row: (check, "") or (None, reason).

    `by_checksum`: verify by S3's checksum and the metadata when the upload
    declared part checksums (the upload's verdict; the scrub reads all).
    """
    pinned = bool(backup.version_id or backup.etag)
    try:
        check = None
        if by_checksum and backup.part_checksum and backup.sha256 and backup.file_size:
            check = object_check_by_checksum(
                backup.key,
                kind=backup.kind,
                virtual_size=backup.virtual_size,
                part_checksum=backup.part_checksum,
                file_size=backup.file_size,
                sha256=backup.sha256,
                parent_unique_id=parent_unique_id,
                on_fetch=on_fetch,
            )
            if check is None:
                log.info("%s has no composite checksum in storage; reading it whole", backup.key)
        if check is None:
            check = object_check(
                backup.key,
                kind=backup.kind,
                virtual_size=backup.virtual_size,
                parent_unique_id=parent_unique_id,
                **backup.pinned,
                on_fetch=on_fetch,
            )
    except cloud.ObjectNotFound:
        if pinned:
            return None, "The verified version of the object is not in storage."
        return None, "The object is not in storage."
    except cloud.ObjectArchived as exc:
        return None, storage_class_problem(exc.storage_class)
    except storage.ObjectChanged:
        if pinned:
            return None, "The object in storage is not the version that was verified (it was replaced since)."
        return None, "The object was overwritten while it was being checked."
    except vhd.VHDError as exc:
        return None, f"Not a valid restore point: {exc}"
    if backup.file_size is not None and check.size != backup.file_size:
        return None, f"The stored object is {check.size} bytes; {backup.file_size} were declared."
    if backup.sha256 and check.sha256 != backup.sha256:
        return None, f"The stored object's SHA-256 is {check.sha256}; {backup.sha256} was declared."
    return check, ""


class VerificationDeferred(Exception):
    """Not now: the tenant has its share running, or a worker (perhaps dead) holds this one.

    `retry_in` is when to try again, in seconds: a dead worker's claim is
    stale by then and the retry takes over.
    """

    def __init__(self, message: str, retry_in: int):
        super().__init__(message)
        self.retry_in = retry_in


def backup_verify(*, backup_id) -> Backup | None:
    """The worker's verdict on a completed upload: `verified`, or `failed` with the reason.

    On success retention is enqueued for the backup's disk. An incremental
    is refused if, meanwhile, its parent stopped being verified or another
    restore point on the same parent was verified first (a fork). Storage
    outages propagate (CloudUnavailable) so the task retries. Idempotent:
    does nothing unless the backup is `verifying` and no live worker is on
    it. Raises VerificationDeferred while the tenant has
    RECLO_MAX_CONCURRENT_VERIFICATIONS running (so one account's flood of
    uploads cannot take every worker) or while another worker's heartbeat
    on this one is fresh.
    """
    backup = Backup.objects.select_related("parent", "user").filter(pk=backup_id).first()
    if backup is None or backup.status != Backup.Status.VERIFYING:
        return backup
    claim = read_claim(backup, status=Backup.Status.VERIFYING, limit=settings.RECLO_MAX_CONCURRENT_VERIFICATIONS)
    if claim == "wait":
        raise VerificationDeferred(f"account {backup.user_id} has its share of verifications running", 30)
    if claim == "running":
        # A duplicate delivery, or the redelivery of a task whose pool process
        # was killed while its heartbeat is still fresh: look again once a
        # dead worker's heartbeat would be stale.
        stale = int(settings.RECLO_VERIFY_STALE_AFTER.total_seconds())
        raise VerificationDeferred(f"a worker is verifying {backup.pk}", stale + 1)
    if isinstance(claim, str):
        return backup  # gone
    try:
        return _verify(backup, claim)
    finally:
        read_release(backup)


def verification_deferred(*, backup_id) -> None:
    """Record that a deferred verification is enqueued again (the beat job then leaves it be)."""
    Backup.objects.filter(pk=backup_id, status=Backup.Status.VERIFYING).update(verify_queued_at=timezone.now())


def _verify(backup: Backup, heartbeat: Heartbeat) -> Backup:
    from .. import tasks  # tasks import the services; this breaks the cycle

    parent_unique_id = backup.parent.vhd_unique_id if backup.parent else None
    if backup.parent and parent_unique_id is None:
        backup_fail(backup=backup, reason="The parent backup's VHD id is unknown.")
        return backup
    check, reason = _problem(backup, parent_unique_id=parent_unique_id, on_fetch=heartbeat, by_checksum=True)
    locked_until = None
    # (_problem gives a check whenever it gives no reason.)
    if not reason and check is not None and check.version_id:
        # Locked before the verdict is committed (no cloud call inside the
        # transaction): a verified restore point is never unlocked. If the
        # verdict then goes the other way, the deletion waits for the lock.
        locked_until = storage.lock_version(backup.key, check.version_id, timezone.now() + lock_period(backup.user))
    if not reason and check is not None:
        with transaction.atomic():
            row = Backup.objects.select_for_update().filter(pk=backup.pk, status=Backup.Status.VERIFYING).first()
            if row is None:
                return backup  # deleted, or another worker decided first
            if row.parent_id:
                parent = Backup.objects.select_for_update().filter(pk=row.parent_id).first()
                if parent is None or parent.status != Backup.Status.VERIFIED or parent.deleted_at is not None:
                    reason = "The parent backup stopped being a verified restore point during verification."
                elif Backup.objects.filter(
                    parent_id=row.parent_id, status=Backup.Status.VERIFIED, deleted_at__isnull=True
                ).exists():
                    reason = "Another restore point built on the same parent was verified first."
            if not reason:
                row.status = Backup.Status.VERIFIED
                row.sha256 = check.sha256
                row.vhd_unique_id = check.info.unique_id
                row.verified_at = timezone.now()
                row.failure = ""
                row.version_id, row.etag, row.locked_until = check.version_id, check.etag, locked_until
                row.save(
                    update_fields=[
                        *("status", "sha256", "vhd_unique_id", "verified_at", "failure"),
                        *("version_id", "etag", "locked_until"),
                    ]
                )
                # The activity log's "Backup of frontdesk finished: 660 KB of changes".
                _audit_outcome(row, AuditEvent.Kind.BACKUP_VERIFIED)
                transaction.on_commit(
                    lambda: tasks.enqueue(tasks.retention_apply, row.server_id, row.disk)  # noqa: B023 - runs once
                )
                if row.server.warm_standby:
                    transaction.on_commit(lambda: tasks.standby_enqueue(row.server_id))  # noqa: B023 - runs once
                return row
    backup.locked_until = locked_until
    backup_fail(backup=backup, reason=reason, from_statuses=(Backup.Status.VERIFYING,))
    backup.refresh_from_db()
    if backup.status == Backup.Status.FAILED:
        _audit_outcome(backup, AuditEvent.Kind.BACKUP_FAILED, reason=reason[:300])
    return backup


def _audit_outcome(backup: Backup, kind: str, **details) -> None:
    audit_record(kind, user=backup.user, address="worker", server=backup.server.name, disk=backup.disk,
                 backup_id=str(backup.pk), backup_kind=backup.kind, file_size=backup.file_size, **details)  # fmt: skip


def backup_scrub(*, backup_id) -> str:
    """Re-read one verified restore point; mark its chain broken if it changed.

    Returns "" when the object is sound, else the problem found. A sound
    restore point verified before versions were recorded gets the version
    it was read at pinned and locked now. Storage outages propagate for a
    retry. Idempotent.
    """
    backup = Backup.objects.select_related("parent", "server", "user").filter(pk=backup_id).first()
    if backup is None or backup.status != Backup.Status.VERIFIED:
        return ""
    claim = read_claim(backup, status=Backup.Status.VERIFIED)
    if isinstance(claim, str):
        return ""  # gone, or another worker is re-reading it
    try:
        return _scrub(backup, claim)
    finally:
        read_release(backup)


def _scrub(backup: Backup, heartbeat: Heartbeat) -> str:
    parent_unique_id = backup.parent.vhd_unique_id if backup.parent else None
    check, problem = _problem(backup, parent_unique_id=parent_unique_id, on_fetch=heartbeat)
    if not problem and check is not None and backup.vhd_unique_id and check.info.unique_id != backup.vhd_unique_id:
        problem = f"The VHD id changed from {backup.vhd_unique_id} to {check.info.unique_id}."
    stamp: dict[str, Any] = {"scrubbed_at": timezone.now()}
    if not problem and check is not None and not (backup.version_id or backup.etag):
        stamp.update(version_id=check.version_id, etag=check.etag)
        if check.version_id:
            until = timezone.now() + lock_period(backup.user)
            stamp["locked_until"] = storage.lock_version(backup.key, check.version_id, until)
    Backup.objects.filter(pk=backup.pk).update(**stamp)
    if problem:
        chain_mark_broken(backup=backup, reason=problem)
    return problem


def backups_scrub_pick(*, sample: int | None = None) -> list:
    """Ids of the verified restore points to re-read this run: the least recently checked."""
    sample = settings.RECLO_SCRUB_SAMPLE if sample is None else sample
    return list(
        Backup.objects.filter(status=Backup.Status.VERIFIED, deleted_at__isnull=True)
        # Never checked first (PostgreSQL would put NULLs last by default).
        .order_by(F("scrubbed_at").asc(nulls_first=True), "verified_at")
        .values_list("pk", flat=True)[:sample]
    )


def chain_mark_broken(*, backup: Backup, reason: str) -> list:
    """Mark `backup` and every restore point built on it failed, and tell the owner.

    Conditional on `backup` still having the key and digest that were
    checked (retention may have replaced it meanwhile). Returns the ids
    marked; idempotent.
    """
    with transaction.atomic():
        changed = Backup.objects.filter(
            pk=backup.pk, key=backup.key, sha256=backup.sha256, status=Backup.Status.VERIFIED
        ).update(status=Backup.Status.FAILED, failure=f"Scrub: {reason}"[:2000])
        if not changed:
            return []
        rows = list(Backup.objects.filter(server_id=backup.server_id, disk=backup.disk))
        below = [b.pk for _, b in descendants_of(backup, rows) if b.status != Backup.Status.FAILED]
        Backup.objects.filter(pk__in=below).update(
            status=Backup.Status.FAILED, failure=f"Restore point {backup.pk} below it in the chain is broken."
        )
    log.error("chain of %s/%s broken at %s: %s", backup.server.name, backup.disk, backup.pk, reason)
    _tell_owner_chain_broken(backup, reason, len(below))
    return [backup.pk, *below]


def _tell_owner_chain_broken(backup: Backup, reason: str, dependents: int) -> None:
    # A mail that fails is logged by owner_email; the marking stands and the page shows it too.
    notify.owner_email(
        backup.user, "backups/email/chain_broken", {"backup": backup, "reason": reason, "dependents": dependents}
    )
