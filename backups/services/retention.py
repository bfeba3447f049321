"""Retention: keep the newest N restore points of each disk, losing none of them.

When a disk has more than `RECLO_RETENTION_KEEP` verified restore points,
the oldest one (a chain's full) falls out of the window. Deleting it would
break the incrementals built on it, so instead its first incremental is
merged into it: the agent package's chain merger writes the disk as it was
at that incremental as one dynamic VHD, keeping the incremental's VHD id,
so the next incremental's parent id still matches. The merged object is
written beside the old ones and verified like an upload before the rows
switch to it; the old objects are deleted later, once no restore that was
granted them can still be reading them.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from reclo_agent import vhd

from reclo_site import cloud
from reclo_site.cloud import storage

from ..models import Backup, ObjectDeletion
from ..naming import backup_key
from .lifecycle import backup_in_use, failed_branches_drop, lock_period, object_forget
from .verification import object_check

log = logging.getLogger(__name__)

# A merge claim older than this belongs to a worker that died (the merge
# task's hard time limit plus a margin); another worker may take it over.
CLAIM_TTL = timedelta(hours=3, minutes=30)


class MergeFailed(Exception):
    """The merged full did not verify; the chain is left as it was."""


def retention_apply(*, server_id: int, disk: str) -> str:
    """One retention step for a server's disk; returns what it did.

    "" when the disk is within its window (or must wait), "dropped" when a
    full nothing depends on fell out of it, "merged" after merging the
    oldest incremental into its full. The caller repeats while it returns
    something. Safe to run twice at once: merges are claimed.
    """
    keep = max(1, settings.RECLO_RETENTION_KEEP)
    verified = list(
        Backup.objects.filter(
            server_id=server_id, disk=disk, status=Backup.Status.VERIFIED, deleted_at__isnull=True
        ).order_by("date_created", "pk")
    )
    if len(verified) <= keep:
        return ""
    oldest = verified[0]
    if oldest.kind != Backup.Kind.FULL:
        log.warning("oldest verified restore point %s of %s/%s is not a full; skipping", oldest.pk, server_id, disk)
        return ""
    # A hidden (deleted, still locked) child keeps its row until its lock
    # ends: the full then waits, as it waits for one still verifying.
    children = list(Backup.objects.filter(parent=oldest).exclude(status=Backup.Status.FAILED))
    if any(child.deleted_at for child in children):
        return ""
    if backup_in_use([oldest.pk]):
        return ""  # a running failover reads this full by its id; the verdict after it re-runs this
    if not children:
        return "dropped" if _drop_full(oldest) else ""
    if len(children) != 1 or children[0].status != Backup.Status.VERIFIED:
        return ""  # an incremental on it is still being uploaded or verified; the next verdict re-runs this
    return "merged" if backup_merge(base_id=oldest.pk, child_id=children[0].pk) else ""


def _drop_full(full: Backup) -> bool:
    """Delete a full that fell out of the window and that nothing builds on."""
    with transaction.atomic():
        row = Backup.objects.select_for_update().filter(pk=full.pk, status=Backup.Status.VERIFIED).first()
        if row is None or not failed_branches_drop(row):
            return False
        row.delete()
        _defer_deletion(row.key, "fell out of the retention window", row.locked_until)
    return True


def _defer_deletion(key: str, reason: str, locked_until=None) -> None:
    # A restore granted before this change may still be reading the object,
    # and a locked one cannot be deleted before its lock ends anyway.
    not_before = timezone.now() + settings.RECLO_CREDENTIALS_TTL
    if locked_until is not None and locked_until > not_before:
        not_before = locked_until
    ObjectDeletion.objects.update_or_create(key=key, defaults={"not_before": not_before, "reason": reason})


def backup_merge(*, base_id, child_id) -> Backup | None:
    """Merge a full and its one incremental into a new full for the incremental.

    The incremental's row keeps its id, date and VHD id and becomes a full
    pointing at the merged object; the old full's row goes away. Returns
    the merged row, or None when another worker holds the claim or the
    chain changed meanwhile (nothing changes then). Raises MergeFailed or
    the cloud's errors, leaving the chain as it was.
    """
    now = timezone.now()
    claimed = (
        Backup.objects.filter(pk=child_id, parent_id=base_id, status=Backup.Status.VERIFIED)
        .filter(Q(merge_claimed_at__isnull=True) | Q(merge_claimed_at__lt=now - CLAIM_TTL))
        .update(merge_claimed_at=now)
    )
    if not claimed:
        return None
    base = Backup.objects.get(pk=base_id)
    child = Backup.objects.select_related("server", "user").get(pk=child_id)
    merged_key = backup_key(
        user_id=child.user_id, server=child.server.name, disk=child.disk, backup_id=child.pk, merged=True
    )
    locked_until = None
    try:
        size, digest, version_id = _write_merged(base, child, merged_key)
        check = object_check(
            merged_key, kind=Backup.Kind.FULL, virtual_size=child.virtual_size, version_id=version_id or None
        )
        if check.size != size or check.sha256 != digest or check.info.unique_id != child.vhd_unique_id:
            raise MergeFailed(f"the merged full of {child.pk} did not verify")
        if check.version_id:
            # The merged full is a restore point like the upload it replaces:
            # locked for the account's period, before the rows point at it.
            locked_until = storage.lock_version(merged_key, check.version_id, now + lock_period(child.user))
    except storage.ObjectChanged as exc:
        Backup.objects.filter(pk=child.pk, merge_claimed_at=now).update(merge_claimed_at=None)
        object_forget(merged_key, reason="merge abandoned")
        raise MergeFailed(f"merging {base.pk} and {child.pk}: {exc}") from exc
    except (vhd.VHDError, cloud.CloudError, MergeFailed) as exc:
        Backup.objects.filter(pk=child.pk, merge_claimed_at=now).update(merge_claimed_at=None)
        object_forget(merged_key, reason="merge abandoned", locked_until=locked_until)
        if isinstance(exc, vhd.VHDError):
            raise MergeFailed(f"merging {base.pk} and {child.pk}: {exc}") from exc
        raise

    with transaction.atomic():
        rows = {b.pk: b for b in Backup.objects.select_for_update().filter(pk__in=[base.pk, child.pk])}
        b, c = rows.get(base.pk), rows.get(child.pk)
        unchanged = (
            b is not None
            and c is not None
            and b.status == c.status == Backup.Status.VERIFIED
            and c.parent_id == b.pk
            and (b.key, c.key) == (base.key, child.key)
            and c.merge_claimed_at == now
            # Other branches on the old full must be failed ones (gone with it).
            and failed_branches_drop(b, keep=c)
        )
        if unchanged and b is not None and c is not None:  # (the checks above, spelt out for the type checker)
            old = [(b.key, b.locked_until), (c.key, c.locked_until)]
            c.kind, c.parent, c.key = Backup.Kind.FULL, None, merged_key
            c.file_size, c.sha256, c.merge_claimed_at, c.scrubbed_at = size, digest, None, None
            c.version_id, c.etag, c.locked_until = check.version_id, check.etag, locked_until
            c.save(
                update_fields=[
                    *("kind", "parent", "key", "file_size", "sha256", "merge_claimed_at", "scrubbed_at"),
                    *("version_id", "etag", "locked_until"),
                ]
            )
            b.delete()
            for key, key_locked_until in old:
                _defer_deletion(key, f"merged into {c.pk}", key_locked_until)
    if not unchanged:
        log.info("chain of %s changed during its merge; discarding the merged object", child.pk)
        Backup.objects.filter(pk=child.pk, merge_claimed_at=now).update(merge_claimed_at=None)
        object_forget(merged_key, reason="merge discarded", locked_until=locked_until)
        return None
    log.info("merged %s into %s (%d bytes)", base.pk, child.pk, size)
    return c


def _write_merged(base: Backup, child: Backup, key: str) -> tuple[int, str, str]:
    """Stream the merged full of `base` + `child` into a new object; (size, sha256, version id).

    Both are read at their verified versions: bytes written over their keys
    since are never merged (ObjectChanged when an unversioned one changed).
    """
    with (
        storage.ObjectReader(base.key, **base.pinned) as base_raw,
        storage.ObjectReader(child.key, **child.pinned) as child_raw,
    ):
        chain = vhd.open_chain([vhd.open_seekable(base_raw), vhd.open_seekable(child_raw)])
        if chain.top.info.unique_id != child.vhd_unique_id:
            raise MergeFailed(f"the stored incremental {child.pk} is not the one that was verified")
        # The merged object is at most the size of its two sources (it
        # holds each block once), which sizes the multipart parts.
        with storage.ObjectWriter(key, expected_size=(base.file_size or 0) + (child.file_size or 0)) as out:
            writer = vhd.SeekableZstdWriter(out)
            with writer:
                vhd.merge_chain(chain, writer)
        return writer.compressed_size, writer.sha256(), out.version_id
