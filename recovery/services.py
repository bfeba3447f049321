"""Failover and instance writes: start a failover, start/stop/terminate, the beat jobs.

Views and tasks call these. Cloud calls happen outside database
transactions: a pending state is committed first (with a conditional
UPDATE, which is also what stops two clicks or two job runs from acting
twice), then AWS is called, then the outcome is recorded.
"""

import logging

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.audit import audit_record
from accounts.models import AuditEvent
from backups import chains
from reclo_site import cloud
from reclo_site.cloud import compute, imaging, storage
from reclo_site.errors import Code, ServiceError

from . import drill_services, engine, failback_services, networks, paths, selectors, sizes
from .failover import FAILOVER
from .models import Failback, Instance, Recovery, RecoveryNetwork, RecoveryStep
from .steps import merged_key

log = logging.getLogger(__name__)

# Which instance states allow which action (anything else answers INSTANCE_STATE_CONFLICT).
ALLOWED = {
    "start": (Instance.State.STOPPED,),
    "stop": (Instance.State.PENDING, Instance.State.RUNNING),
    "terminate": (Instance.State.PENDING, Instance.State.RUNNING, Instance.State.STOPPING, Instance.State.STOPPED),
}
SYNC_BATCH = 200
FREE_BATCH = 50
FREE_MAX_PAGES = 20
# Failbacks tried before a server stopped for 14 days is terminated without its cloud work.
FREE_SAVE_TRIES = 3


# --- Failover ------------------------------------------------------------------------------


def recovery_start(*, user, backup_id, instance_type: str | None = None, import_method: str | None = None) -> Recovery:
    """Queue a failover of a verified restore point. Not idempotent: each call is a new failover.

    Raises ServiceError NO_RESTORABLE_BACKUP (no restorable backup of this
    user's with that id), FAILOVER_RUNNING (this server already has a
    failover running or a live instance), MALFORMED (unknown instance type). The first step is enqueued once
    the recovery is committed.
    """
    backup = selectors.restorable_backup(user=user, backup_id=backup_id)
    if backup is None:
        raise ServiceError(Code.NO_RESTORABLE_BACKUP, "No restorable (verified) backup of yours has that id.")
    try:
        chains.restorable_chain(backup)
    except chains.ChainError as exc:
        raise ServiceError(Code.NO_RESTORABLE_BACKUP, f"That restore point cannot be restored: {exc}") from exc
    if instance_type:
        if instance_type not in sizes.BY_TYPE:
            choices = ", ".join(sizes.BY_TYPE)
            raise ServiceError(
                Code.MALFORMED, f"Unknown instance type; choose one of {choices}.", field="instance_type"
            )
    else:
        instance_type = sizes.size_for_disk(backup.virtual_size).instance_type
    # Windows needs VM Import whatever the default (see recovery.paths).
    method = import_method or (
        paths.VM_IMPORT if paths.image_path(backup.server).platform == "windows" else settings.RECLO_IMPORT_METHOD
    )
    if method not in Recovery.ImportMethod.values:
        raise ServiceError(Code.MALFORMED, "Unknown import method.", field="import_method")
    server = backup.server
    if Instance.objects.filter(recovery__server=server).exclude(state=Instance.State.TERMINATED).exists():
        raise ServiceError(
            Code.FAILOVER_RUNNING, f"{server.name} already runs in the cloud; terminate that instance first."
        )
    now = timezone.now()
    try:
        with transaction.atomic():
            # A drill never blocks a real failover: it ends now, torn down after commit.
            drill_services.drill_cancel_for_server(
                server=server, reason=f"Cancelled: a failover of {server.name} started."
            )
            recovery = Recovery.objects.create(
                user=user,
                server=server,
                server_name=server.name,
                backup=backup,
                backup_ref=backup.pk,
                disk=backup.disk,
                virtual_size=backup.virtual_size,
                instance_type=instance_type,
                import_method=method,
                due_at=now,
            )
            engine.start(recovery, pipeline=FAILOVER)
    except IntegrityError:  # the partial unique index: one active failover per server
        raise ServiceError(Code.FAILOVER_RUNNING, f"A failover of {server.name} is already running.") from None
    log.info("recovery %s queued for server %s (restore point %s)", recovery.pk, server.pk, backup.pk)
    audit_record(AuditEvent.Kind.FAILOVER_STARTED, user=user, server=server.name, recovery_id=str(recovery.pk),
                 backup_id=str(backup.pk), instance_type=instance_type)  # fmt: skip
    return recovery


# --- Instances -----------------------------------------------------------------------------


TRANSITIONAL = (Instance.State.PENDING, Instance.State.STOPPING, Instance.State.SHUTTING_DOWN)
WATCH_EVERY = 5
WATCH_MAX = 180  # polls, 15 minutes: then instances_sync takes over


def _claim_action(instance: Instance, action: str, pending_state: str) -> str:
    """Move the instance to `pending_state` if its state allows `action`; returns the state it had.

    The state is the portal's record; a transition (stopping, pending) is
    followed by `instance_watch` within seconds, so the record is not
    refreshed here: that would race with an action still in flight.
    """
    previous = Instance.objects.filter(pk=instance.pk).values_list("state", flat=True).first()
    claimed = Instance.objects.filter(pk=instance.pk, state__in=ALLOWED[action]).update(state=pending_state)
    if not claimed:
        later = " Try again in a few seconds." if previous in TRANSITIONAL else ""
        raise ServiceError(Code.INSTANCE_STATE_CONFLICT, f"The instance is {previous}; it cannot {action} now.{later}")
    return previous or ""


def _undo(instance: Instance, pending_state: str, previous: str) -> None:
    Instance.objects.filter(pk=instance.pk, state=pending_state).update(state=previous)


def instance_stop(*, instance: Instance) -> Instance:
    """Stop a running instance. INSTANCE_STATE_CONFLICT in another state, INSTANCE_ACTION_FAILED if AWS refuses."""
    previous = _claim_action(instance, "stop", Instance.State.STOPPING)
    try:
        state = compute.stop_instance(instance.instance_id)
    except cloud.CloudError as exc:
        _undo(instance, Instance.State.STOPPING, previous)
        raise ServiceError(Code.INSTANCE_ACTION_FAILED, f"The cloud did not stop the instance: {exc}") from exc
    now = timezone.now()
    # The clean-up clock starts at the stop request (sync corrects it if AWS says otherwise).
    Instance.objects.filter(pk=instance.pk).update(state=state, stopped_at=now, running_since=None, synced=now)
    _watch_on_commit(instance.pk)
    instance.refresh_from_db()
    audit_record(AuditEvent.Kind.INSTANCE_STOPPED, user=instance.user, instance_id=instance.instance_id)
    return instance


def instance_start(*, instance: Instance) -> Instance:
    """Start a stopped instance. INSTANCE_STATE_CONFLICT in another state, LAUNCH_FAILED if the cloud refuses."""
    previous = _claim_action(instance, "start", Instance.State.PENDING)
    try:
        state = compute.start_instance(instance.instance_id)
    except cloud.CloudError as exc:
        _undo(instance, Instance.State.PENDING, previous)
        raise ServiceError(Code.LAUNCH_FAILED, f"The cloud did not start the instance: {exc}") from exc
    now = timezone.now()
    Instance.objects.filter(pk=instance.pk).update(state=state, stopped_at=None, running_since=now, synced=now)
    _watch_on_commit(instance.pk)
    instance.refresh_from_db()
    audit_record(AuditEvent.Kind.INSTANCE_STARTED, user=instance.user, instance_id=instance.instance_id)
    return instance


def _watch_on_commit(pk: int) -> None:
    from .tasks import instance_watch

    transaction.on_commit(lambda: instance_watch.apply_async((pk, WATCH_MAX), countdown=WATCH_EVERY))


def instance_watch(*, instance_pk: int, polls_left: int) -> str | None:
    """Follow an instance through a transition (stopping, pending) until it settles. Idempotent.

    A short task that re-schedules itself every few seconds, at most
    `polls_left` more times; instances_sync covers whatever it misses.
    Returns the state seen.
    """
    from .tasks import instance_watch

    row = Instance.objects.filter(pk=instance_pk).first()
    if row is None or row.state not in TRANSITIONAL:
        return row.state if row else None
    _apply_observed(row, compute.describe_instances([row.instance_id]).get(row.instance_id), timezone.now())
    state = Instance.objects.filter(pk=instance_pk).values_list("state", flat=True).first()
    if state in TRANSITIONAL and polls_left > 1:
        instance_watch.apply_async((instance_pk, polls_left - 1), countdown=WATCH_EVERY)
    return state


def instance_terminate(*, instance: Instance) -> Instance:
    """Terminate an instance and, afterwards, release its address, image and (if unused) the VPN gateway.

    INSTANCE_STATE_CONFLICT if already terminated, INSTANCE_ACTION_FAILED if the cloud refuses. The release runs as
    a task after commit (and instances_sync re-enqueues it if it is lost).
    """
    previous = _claim_action(instance, "terminate", Instance.State.SHUTTING_DOWN)
    try:
        compute.terminate_instance(instance.instance_id)
    except cloud.CloudError as exc:
        _undo(instance, Instance.State.SHUTTING_DOWN, previous)
        raise ServiceError(Code.INSTANCE_ACTION_FAILED, f"The cloud did not terminate the instance: {exc}") from exc
    _terminated(instance.pk)
    instance.refresh_from_db()
    audit_record(AuditEvent.Kind.INSTANCE_TERMINATED, user=instance.user, instance_id=instance.instance_id)
    return instance


def _terminated(pk: int) -> None:
    from .tasks import instance_release

    now = timezone.now()
    with transaction.atomic():
        Instance.objects.filter(pk=pk, terminated_at__isnull=True).update(terminated_at=now)
        Instance.objects.filter(pk=pk).update(
            state=Instance.State.TERMINATED, running_since=None, public_ip="", synced=now
        )
        transaction.on_commit(lambda: instance_release.delay(pk))


def instance_release(*, instance_pk: int) -> bool:
    """Let go of what a terminated instance held. Idempotent; returns whether all is released.

    Its Elastic IP (disassociated first: moto keeps it associated after
    terminate), its image and snapshot, the merged disk in S3, and the
    tenant's VPN gateway if no other instance or failover needs it. The
    tenant's network stays for the next failover.
    """
    instance = Instance.objects.select_related("recovery").filter(pk=instance_pk).first()
    if instance is None or instance.released:
        return True
    if instance.state != Instance.State.TERMINATED:
        return False
    if instance.allocation_id:
        compute.release_address(instance.allocation_id)
    imported = (
        RecoveryStep.objects.filter(recovery=instance.recovery, name="importing")
        .values_list("outputs", flat=True)
        .first()
        or {}
    )
    image_id = instance.image_id or imported.get("image_id")
    # A staged snapshot (warm standby) stays: it is its restore point's, which the sweep deletes with it.
    staged = {imported["snapshot_id"]} if imported.get("staged") else set()
    if image_id:
        imaging.delete_image(image_id, keep=staged)  # with the snapshots AWS lists for it
    if imported.get("snapshot_id") and not staged:  # EBS direct's, by our own record (moto lists none)
        imaging.delete_snapshot(imported["snapshot_id"])
    recovery = instance.recovery
    reused = Recovery.objects.filter(
        user_id=recovery.user_id, backup_ref=recovery.backup_ref, status__in=Recovery.ACTIVE
    ).exists()
    if not reused:  # a failover on its way from the same restore point would skip its merge
        storage.delete_object(merged_key(recovery))
    Instance.objects.filter(pk=instance.pk).update(released=timezone.now())
    network = RecoveryNetwork.objects.filter(user_id=instance.user_id).first()
    if network is not None:
        networks.gateway_release_if_unused(network)
    return True


# --- Beat jobs -------------------------------------------------------------------------------


def _apply_observed(row: Instance, info: compute.InstanceInfo | None, now) -> bool:
    """Record what AWS says of one instance, unless someone changed the row meanwhile."""
    if info is None or info.state == Instance.State.TERMINATED:
        changed = Instance.objects.filter(pk=row.pk, state=row.state).update(
            state=Instance.State.TERMINATED, running_since=None, public_ip="", synced=now
        )
        if changed:
            Instance.objects.filter(pk=row.pk, terminated_at__isnull=True).update(terminated_at=now)
        return bool(changed)
    fields = {"state": info.state, "private_ip": info.private_ip or row.private_ip, "synced": now}
    if info.state == Instance.State.STOPPED:
        fields["stopped_at"] = row.stopped_at or info.transitioned_at or now
        fields["running_since"] = None
    elif info.state == Instance.State.RUNNING:
        fields["stopped_at"] = None
        fields["running_since"] = row.running_since or now
        if info.public_ip:
            fields["public_ip"] = info.public_ip
    return bool(Instance.objects.filter(pk=row.pk, state=row.state).update(**fields))


def instances_sync(*, batch_size: int = SYNC_BATCH) -> int:
    """Bring recorded instance states in step with the cloud; returns rows changed. Idempotent.

    An instance stopped or terminated outside the portal shows as such. The
    least recently synced rows go first, at most `batch_size` per run, and
    each write is conditional on the state read, so a user's click in
    between (or an overlapping run) is never overwritten with stale news.
    """
    from .tasks import instance_release

    now = timezone.now()
    rows = list(
        Instance.objects.exclude(state=Instance.State.TERMINATED)
        .exclude(recovery__status__in=Recovery.ACTIVE)  # the failover itself is watching those
        .order_by("synced")[:batch_size]
    )
    if rows:
        found = compute.describe_instances([row.instance_id for row in rows])
        changed = sum(_apply_observed(row, found.get(row.instance_id), now) for row in rows)
    else:
        changed = 0
    # Terminated (here or outside) but not released yet: (re)try the release.
    for pk in Instance.objects.filter(state=Instance.State.TERMINATED, released__isnull=True).values_list(
        "pk", flat=True
    )[:batch_size]:
        instance_release.delay(pk)
    return changed


def _saving_first(row: Instance) -> bool:
    """Whether the cloud server's work is being brought home before it is terminated.

    A server that may hold work no restore point has (see
    `failback_services.unsaved_changes`) gets a failback first; the run
    after it is ready terminates the server. After FREE_SAVE_TRIES failed
    failbacks since the stop (each emailed to the owner) it is terminated
    anyway: the 14 days are the owner's promise as much as ours.
    """
    if not failback_services.unsaved_changes(row) or not failback_services.can_bring_home(row):
        return False
    tries = Failback.objects.filter(recovery_id=row.recovery_id, created__gte=row.stopped_at or row.launched)
    if tries.filter(status__in=list(Failback.ACTIVE)).exists():
        return True
    if tries.filter(status=Failback.Status.FAILED).count() >= FREE_SAVE_TRIES:
        log.warning("instances_free: %s is terminated without its cloud work: bringing it home failed", row.instance_id)
        return False
    try:
        failback_services.failback_start(user=row.recovery.user, recovery=row.recovery)
    except ServiceError as exc:
        if exc.code == Code.FAILOVER_RUNNING:
            return True
        log.warning("instances_free: could not bring %s home first: %s", row.instance_id, exc)
        return False
    log.info("instances_free: bringing %s home before it is terminated", row.instance_id)
    return True


def instances_free(*, batch_size: int = FREE_BATCH, max_pages: int = FREE_MAX_PAGES) -> list[str]:
    """Terminate ReClo's recovery instances stopped for longer than the lifetime (14 days).

    One that may hold work no restore point has is first brought home (a
    failback, see `_saving_first`) and terminated by a later run.

    Only instances carrying ReClo's tags (managed, role server) are looked
    at, by the cloud's own filter; untagged ones are never touched. The stop
    time is the portal's record, else the time AWS gives in the transition
    reason; unknown means not yet. At most `batch_size` terminations and
    `max_pages` pages per run. Overlapping runs are safe: each instance is
    claimed with a conditional UPDATE before it is terminated, and
    terminating twice is harmless anyway. Returns the terminated ids.
    """
    cutoff = timezone.now() - settings.RECLO_STOPPED_INSTANCE_LIFETIME
    freed: list[str] = []
    pages = compute.iter_instance_pages(
        tags={"reclo:managed": "true", "reclo:role": "server"}, states=("stopped",), page_size=batch_size
    )
    for number, page in enumerate(pages):
        if number >= max_pages:
            break
        for info in page:
            row = Instance.objects.filter(instance_id=info.instance_id).first()
            since = (row.stopped_at if row else None) or info.transitioned_at
            if since is None or since > cutoff:
                continue
            if row is not None and _saving_first(row):
                continue
            if row is not None:
                claimed = (
                    Instance.objects.filter(pk=row.pk)
                    .exclude(state__in=[Instance.State.SHUTTING_DOWN, Instance.State.TERMINATED])
                    .update(state=Instance.State.SHUTTING_DOWN)
                )
                if not claimed:
                    continue
            try:
                compute.terminate_instance(info.instance_id)
            except cloud.CloudError as exc:
                log.warning("instances_free: could not terminate %s: %s", info.instance_id, exc)
                if row is not None:
                    _undo(row, Instance.State.SHUTTING_DOWN, Instance.State.STOPPED)
                continue
            if row is not None:
                _terminated(row.pk)
            log.info("instances_free: terminated %s, stopped since %s", info.instance_id, since.isoformat())
            freed.append(info.instance_id)
            if len(freed) >= batch_size:
                return freed
    return freed
