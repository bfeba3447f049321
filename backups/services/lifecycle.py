"""Ending restore points: failing them, deleting them, and the clean-up jobs.

Every function here follows the house rule for cloud calls: the database
state changes in its own short transaction, the S3 calls happen outside
it, and what could not be deleted is written down (ObjectDeletion) for the
purge job instead of being forgotten.
"""

import itertools
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts import notify
from accounts.audit import audit_record
from accounts.models import AuditEvent
from reclo_site import cloud
from reclo_site.cloud import storage
from reclo_site.errors import Code, ServiceError

from .. import chains
from ..chains import descendants_of
from ..models import AccountLimits, Backup, ObjectDeletion

log = logging.getLogger(__name__)

# A pending upload stays usable this long after its newest credentials
# expired, so an agent that finished writing just in time can still complete.
UPLOAD_GRACE = timedelta(hours=1)
# A verification still `verifying` after this long lost its worker (the
# task's hard time limit plus a margin): clean-up enqueues it again.
# A verification enqueued this long ago with no worker on it has lost its
# message (broker trouble, or a redelivery that never came): send it again.
# Past the broker's visibility timeout, which redelivers a killed worker's.
VERIFY_REQUEUE_AFTER = timedelta(minutes=15)
CLEAN_UP_BATCH = 200
PURGE_BATCH = 500

LIVE_STATUSES = (Backup.Status.PENDING, Backup.Status.VERIFYING, Backup.Status.VERIFIED)
# A key whose lock date is unknown (S3 refused to delete a locked version) is
# tried again this much later.
LOCKED_RETRY = timedelta(days=1)


def lock_period(user) -> timedelta:
    """How long this account's verified restore points stay locked (RECLO_LOCK_DAYS unless overridden)."""
    days = AccountLimits.objects.filter(user=user).values_list("lock_days", flat=True).first()
    return timedelta(days=settings.RECLO_LOCK_DAYS if days is None else days)


def object_forget(
    key: str, *, reason: str, not_before: datetime | None = None, locked_until: datetime | None = None
) -> None:
    """Delete an object (every version of it) now, or write it down for the purge job.

    `not_before` in the future always defers: used while someone may still
    hold credentials for the key (an agent that can still write it, or a
    restore that can still read it). A `locked_until` in the future defers
    to then: S3 Object Lock refuses sooner. Never raises for cloud failures.
    """
    now = timezone.now()
    if locked_until is not None and (not_before is None or not_before < locked_until):
        not_before = locked_until
    if not_before is None or not_before <= now:
        try:
            storage.delete_object(key)
            return
        except storage.ObjectLocked as exc:
            log.info("%s is still locked; deferring its deletion: %s", key, exc)
            not_before = now + LOCKED_RETRY
        except cloud.CloudError as exc:
            log.warning("deleting %s failed, deferring: %s", key, exc)
            not_before = now
    ObjectDeletion.objects.update_or_create(key=key, defaults={"not_before": not_before, "reason": reason[:200]})


def _after_writable(backup: Backup) -> None:
    """An agent may rewrite a pending key until its credentials expire: purge it then."""
    if backup.credentials_expire and backup.credentials_expire > timezone.now():
        object_forget(backup.key, reason="written after it was given up", not_before=backup.credentials_expire)


def backup_fail(*, backup: Backup, reason: str, from_statuses=(Backup.Status.PENDING, Backup.Status.VERIFYING)) -> bool:
    """Mark a backup failed with `reason` and delete its object.

    Conditional on its status being one of `from_statuses`, so of two
    workers only one fails it. Returns whether this call did. Idempotent.
    """
    changed = Backup.objects.filter(pk=backup.pk, status__in=from_statuses).update(
        status=Backup.Status.FAILED, failure=reason[:2000]
    )
    if changed:
        log.info("backup %s failed: %s", backup.pk, reason)
        object_forget(backup.key, reason="failed verification", locked_until=backup.locked_until)
        _after_writable(backup)
    return bool(changed)


def backup_in_use(ids: list) -> str:
    """Why these restore points must not be deleted now, or "" when nothing uses them.

    A failover that is still running reads the chain up to its restore
    point (and keeps its id), and so does a drill that has not finished.
    Their links to the backup are SET_NULL, so the database alone would let
    the row go: this asks. The one place to add other users of a restore point.
    """
    from recovery.models import Drill, Recovery  # recovery depends on backups, not the other way round

    users: list[tuple[type[Recovery] | type[Drill], str, str]] = [
        (Recovery, "A failover", "is using this restore point; delete it once that failover is ready or has failed."),
        (Drill, "A drill", "is booting this restore point; delete it once the drill has finished."),
    ]
    for model, what, advice in users:
        run = (
            model.objects.filter(status__in=model.ACTIVE)
            .filter(models.Q(backup_id__in=ids) | models.Q(backup_ref__in=ids))
            .order_by("created")
            .first()
        )
        if run is not None:
            return (
                f"{what} of {run.server_name} (started {run.created:%Y-%m-%d %H:%M} UTC, now "
                f"{run.get_status_display()}) {advice}"
            )
    return ""


def failed_branches_drop(parent: Backup, *, keep=None) -> bool:
    """Delete the failed restore points built on `parent`, deepest first.

    `keep` (a child of `parent`) and everything built on it are left alone.
    Their objects are deleted later by the purge job (a scrub-failed one may
    still be stored). Returns False, deleting nothing, if a restore point
    that is not failed hangs in one of those branches. Runs in the caller's
    transaction.
    """
    rows = list(Backup.objects.filter(server_id=parent.server_id, disk=parent.disk))
    spared = {keep.pk} | {b.pk for _, b in descendants_of(keep, rows)} if keep is not None else set()
    doomed = [(depth, b) for depth, b in descendants_of(parent, rows) if b.pk not in spared]
    if any(b.status != Backup.Status.FAILED for _, b in doomed):
        return False
    later = timezone.now() + settings.RECLO_CREDENTIALS_TTL
    for _, backup in sorted(doomed, key=lambda item: -item[0]):
        when = max(later, backup.locked_until) if backup.locked_until else later
        ObjectDeletion.objects.update_or_create(
            key=backup.key, defaults={"not_before": when, "reason": "failed, below a retired restore point"}
        )
        backup.delete()
    return True


@dataclass
class Deletion:
    """What `backup_delete` did: removed now, or hidden until their lock ends."""

    deleted: list = field(default_factory=list)
    scheduled: list = field(default_factory=list)
    locked_until: datetime | None = None


def backup_delete(*, user, backup_id, cascade: bool = False) -> Deletion:
    """Delete a restore point (and with `cascade` its dependents, newest first).

    NO_BACKUP_TO_DELETE for an unknown id or another tenant's; HAS_DEPENDENTS when live restore points
    depend on it and `cascade` is false (failed dependents go along anyway:
    nothing can be restored from them), or when a running failover uses it.

    When any of them is still under its retention lock, nothing can remove
    its object yet (not even the portal): they are all hidden at once
    (`deleted_at`) and `backups_purge` removes them when their locks end;
    `backup_undelete` brings them back until then. The result's
    `scheduled` and `locked_until` say so.

    Otherwise the rows are first marked failed in one transaction, so no
    new incremental can start on them and no verification in flight can
    succeed on top of them; then each object is deleted, then its row. A
    storage failure answers DELETE_FAILED and leaves the remaining rows failed, so
    deleting again finishes the job. Idempotent in effect: repeating it
    after a DELETE_FAILED continues where it stopped; repeating it on a hidden one
    answers the same schedule.
    """
    target = Backup.objects.filter(user=user, pk=backup_id).first()
    if target is None:
        raise ServiceError(Code.NO_BACKUP_TO_DELETE, "No backup with that id.")
    now = timezone.now()
    with transaction.atomic():
        rows = list(Backup.objects.select_for_update().filter(server_id=target.server_id, disk=target.disk))
        target = next((row for row in rows if row.pk == target.pk), None)
        if target is None:
            raise ServiceError(Code.NO_BACKUP_TO_DELETE, "No backup with that id.")
        below = descendants_of(target, rows)
        live = [b for _, b in below if b.status != Backup.Status.FAILED and b.deleted_at is None]
        if live and not cascade:
            raise ServiceError(
                Code.HAS_DEPENDENTS,
                f"{len(live)} newer restore point(s) depend on this backup; delete them first, "
                "or pass ?cascade=true to delete them with it.",
            )
        # Children before parents; among equals, newest first.
        doomed = [b for _, b in sorted(below, key=lambda item: (-item[0], -item[1].date_created.timestamp()))]
        doomed.append(target)
        ids = [b.pk for b in doomed]
        in_use = backup_in_use(ids)
        if in_use:
            raise ServiceError(Code.HAS_DEPENDENTS, in_use)
        locks = [b.locked_until for b in doomed if b.locked_until and b.locked_until > now]
        if locks:
            hide = [b.pk for b in doomed if b.deleted_at is None]
            Backup.objects.filter(pk__in=hide).update(deleted_at=now)
    if locks:
        for backup in doomed:
            if backup.pk in hide:
                audit_record(AuditEvent.Kind.BACKUP_DELETED, user=user, server=target.server.name,
                             disk=backup.disk, backup_id=str(backup.pk), backup_kind=backup.kind,
                             scheduled=True)  # fmt: skip
        _tell_owner_deleted(user, target, doomed, locked_until=max(locks))
        return Deletion(scheduled=ids, locked_until=max(locks))
    with transaction.atomic():
        Backup.objects.filter(pk__in=ids).exclude(status=Backup.Status.FAILED).update(
            status=Backup.Status.FAILED, failure="Being deleted at the owner's request."
        )
    result = Deletion()
    for backup in doomed:
        try:
            storage.delete_object(backup.key)
        except storage.ObjectLocked:
            # Locked after its row was read (a verification that finished
            # meanwhile): S3 keeps it, the purge job removes it later.
            object_forget(backup.key, reason="deleted while it was being locked", not_before=now + LOCKED_RETRY)
        except cloud.CloudError as exc:
            log.warning("deleting backup %s: %s", backup.pk, exc)
            raise ServiceError(Code.DELETE_FAILED, "Storage did not delete the backup; try again.") from exc
        Backup.objects.filter(pk=backup.pk).delete()
        _after_writable(backup)
        result.deleted.append(backup.pk)
        audit_record(AuditEvent.Kind.BACKUP_DELETED, user=user, server=target.server.name, disk=backup.disk,
                     backup_id=str(backup.pk), backup_kind=backup.kind)  # fmt: skip
    _tell_owner_deleted(user, target, doomed)
    return result


def _tell_owner_deleted(user, target: Backup, doomed: list, locked_until=None) -> None:
    """One email per deletion (a token that deletes restore points is worth knowing about)."""
    notify.owner_email(
        user,
        "backups/email/restore_point_deleted",
        {
            "server": target.server,
            "disk": target.disk,
            "backups": sorted(doomed, key=lambda b: b.date_created),
            "count": len(doomed),
            "locked_until": locked_until,
        },
    )


def backup_undelete(*, user, backup_id) -> Backup:
    """Bring back a restore point deleted while locked, with the hidden ones it builds on.

    309 for an unknown id or another tenant's; 316 once its lock (or that of
    a restore point it builds on) has ended, so it may already be gone from
    storage, or when it was removed already. Idempotent: a restore point
    that is not deleted is returned as it is.
    """
    now = timezone.now()
    with transaction.atomic():
        target = Backup.objects.select_for_update().filter(user=user, pk=backup_id).first()
        if target is None:
            removed = AuditEvent.objects.filter(
                user=user, kind=AuditEvent.Kind.BACKUP_DELETED, details__backup_id=str(backup_id), details__purged=True
            ).first()
            if removed is not None:
                raise ServiceError(
                    Code.LOCKED,
                    f"This restore point was removed on {removed.created:%Y-%m-%d %H:%M} UTC when its lock ended; "
                    "it cannot be brought back.",
                )
            raise ServiceError(Code.NO_BACKUP_TO_DELETE, "No backup with that id.")
        if target.deleted_at is None:
            return target
        same_disk = Backup.objects.select_for_update().filter(server_id=target.server_id, disk=target.disk)
        rows = {b.pk: b for b in same_disk}
        # The hidden restore point and the hidden ones it builds on.
        chain = list(itertools.takewhile(lambda b: b.deleted_at is not None, chains.walk_up(target, rows)))
        for point in chain:
            if point.locked_until is None or point.locked_until <= now:
                raise ServiceError(
                    Code.LOCKED,
                    f"The lock of {'this restore point' if point is target else 'a restore point it builds on'} "
                    "has ended and it is being removed; it cannot be brought back.",
                )
        Backup.objects.filter(pk__in=[p.pk for p in chain]).update(deleted_at=None)
    target.refresh_from_db()
    return target


def backups_purge(*, now: datetime | None = None) -> int:
    """Beat job: remove hidden (deleted) restore points whose lock has ended.

    Newest first: a restore point is removed only once nothing is built on
    it any more, so one run removes a chain's tail and the next runs the
    rest. Bounded batches; each removal is conditional, so overlapping
    runs do no harm, and a storage failure leaves the row for the next run.
    Returns the number removed.
    """
    now = now or timezone.now()
    removed = 0
    while removed < PURGE_BATCH:
        due = list(
            Backup.objects.filter(deleted_at__isnull=False)
            .filter(models.Q(locked_until__isnull=True) | models.Q(locked_until__lte=now))
            .filter(children__isnull=True)
            .select_related("server", "user")
            .order_by("-date_created")[: PURGE_BATCH - removed]
        )
        if not due:
            break
        progress = 0
        for backup in due:
            if backup_in_use([backup.pk]):
                continue
            try:
                storage.delete_object(backup.key)
            except cloud.CloudError as exc:
                log.warning("purging backup %s: %s; next run retries", backup.pk, exc)
                continue
            gone = Backup.objects.filter(pk=backup.pk, deleted_at__isnull=False, children__isnull=True).delete()[0]
            if gone:
                removed += 1
                progress += 1
                audit_record(AuditEvent.Kind.BACKUP_DELETED, user=backup.user, server=backup.server.name,
                             disk=backup.disk, backup_id=str(backup.pk), purged=True, address="beat")  # fmt: skip
        if not progress:
            break
    return removed


def uploads_clean_up(*, now: datetime | None = None) -> dict:
    """Beat job: drop pending uploads past their credentials, abort stale multipart uploads.

    Also re-enqueues verifications whose worker was lost. Works in bounded
    batches; safe to overlap with itself (every step is conditional).
    """

    now = now or timezone.now()
    counts = {"dropped": 0, "aborted": 0, "requeued": 0}
    stale = Backup.objects.filter(status=Backup.Status.PENDING, credentials_expire__lt=now - UPLOAD_GRACE)
    for backup in stale.order_by("credentials_expire")[:CLEAN_UP_BATCH]:
        try:
            for key, upload_id in storage.multipart_uploads(prefix=backup.key, key=backup.key):
                storage.abort_multipart_upload(key, upload_id)
                counts["aborted"] += 1
            storage.delete_object(backup.key)
        except cloud.CloudError as exc:
            log.warning("clean-up of upload %s: %s; next run retries", backup.pk, exc)
            continue
        counts["dropped"] += Backup.objects.filter(pk=backup.pk, status=Backup.Status.PENDING).delete()[0]

    # Multipart uploads no pending upload explains: started before any
    # credentials still alive could have started them. The whole bucket, not
    # only backups/: a worker's own upload (a failover's merged disk under
    # images/) is left behind when an outage also refused its abort, and
    # no worker's upload outlives its task's 4-hour limit.
    started_before = now - settings.RECLO_CREDENTIALS_TTL - UPLOAD_GRACE
    try:
        uploads = storage.multipart_uploads(prefix="", initiated_before=started_before)
    except cloud.CloudError as exc:
        log.warning("listing multipart uploads: %s", exc)
        uploads = []
    alive = set(
        Backup.objects.filter(
            status=Backup.Status.PENDING,
            key__in={key for key, _ in uploads},
            credentials_expire__gte=now - UPLOAD_GRACE,
        ).values_list("key", flat=True)
    )
    for key, upload_id in uploads:
        if key not in alive:
            try:
                storage.abort_multipart_upload(key, upload_id)
                counts["aborted"] += 1
            except cloud.CloudError as exc:
                log.warning("aborting upload of %s: %s", key, exc)

    counts["requeued"] = verifications_requeue(now=now)
    return counts


def verifications_requeue(*, now: datetime | None = None) -> int:
    """Beat job: re-enqueue verifications that no live worker is on and whose message looks lost.

    A backup qualifies while `verifying`, with no fresh heartbeat (its
    worker died, or it never started) and last enqueued more than
    VERIFY_REQUEUE_AFTER ago; it is stamped as enqueued again, so it waits
    that long before the next try. A duplicate of a message that was only
    late does nothing (the worker's claim). Bounded batches; idempotent.
    """
    from .. import tasks  # tasks import the services; this breaks the cycle

    now = now or timezone.now()
    due = now - VERIFY_REQUEUE_AFTER
    stuck = (
        Backup.objects.filter(status=Backup.Status.VERIFYING)
        .filter(Q(read_heartbeat__isnull=True) | Q(read_heartbeat__lt=now - settings.RECLO_VERIFY_STALE_AFTER))
        .annotate(queued=Coalesce("verify_queued_at", "completed_at", "date_created"))
        .filter(queued__lt=due)
        .order_by("queued")
    )
    requeued = 0
    for backup_id, stamp in stuck.values_list("pk", "verify_queued_at")[:CLEAN_UP_BATCH]:
        # Conditional on the stamp read: two overlapping runs send it once.
        same_stamp = Q(verify_queued_at__isnull=True) if stamp is None else Q(verify_queued_at=stamp)
        claimed = Backup.objects.filter(same_stamp, pk=backup_id, status=Backup.Status.VERIFYING).update(
            verify_queued_at=now
        )
        if claimed:
            tasks.enqueue(tasks.backup_verify, str(backup_id))
            requeued += 1
    return requeued


def objects_purge(*, now: datetime | None = None) -> int:
    """Beat job: delete the objects written down in ObjectDeletion once due.

    A key that a live backup uses again is never deleted (its entry is just
    dropped). Failures stay for the next run. Safe to overlap.
    """
    now = now or timezone.now()
    due = list(ObjectDeletion.objects.filter(not_before__lte=now).order_by("not_before")[:PURGE_BATCH])
    if not due:
        return 0
    in_use = set(
        Backup.objects.filter(key__in=[d.key for d in due], status__in=LIVE_STATUSES).values_list("key", flat=True)
    )
    done, purged = [], 0
    for entry in due:
        if entry.key in in_use:
            done.append(entry.pk)
            continue
        try:
            storage.delete_object(entry.key)
        except storage.ObjectLocked as exc:
            # Locked longer than the entry said (a restore point's lock was
            # extended): try again once more of it has passed.
            log.info("purging %s: still locked (%s)", entry.key, exc)
            ObjectDeletion.objects.filter(pk=entry.pk).update(not_before=now + LOCKED_RETRY)
            continue
        except cloud.CloudError as exc:
            log.warning("purging %s: %s; next run retries", entry.key, exc)
            ObjectDeletion.objects.filter(pk=entry.pk).update(attempts=models.F("attempts") + 1)
            continue
        done.append(entry.pk)
        purged += 1
    ObjectDeletion.objects.filter(pk__in=done).delete()
    return purged
