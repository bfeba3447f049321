"""Drill writes: start a drill, cancel a server's drill for a real failover, start the scheduled ones.

A drill never stands in the way of a real failover: `drill_cancel_for_server`
(called by `recovery_start`) ends a running drill of that server at once,
and its teardown (after commit) stops the guest; the worker booting it
notices at its next heartbeat and stops too.
"""

import functools
import logging
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from backups import chains
from backups.models import AccountLimits, Backup, Server
from reclo_site.errors import Code, ServiceError

from . import engine, selectors
from .drills import DRILL
from .models import Drill, Recovery

log = logging.getLogger(__name__)


def drill_interval(server: Server) -> timedelta | None:
    """How often `server` is drilled; None when it asked for no scheduled drills.

    `Server.drill_every_days`: empty means the default (RECLO_DRILL_EVERY_DAYS,
    7), 0 means never.
    """
    days = getattr(server, "drill_every_days", None)
    if days is None:
        days = settings.RECLO_DRILL_EVERY_DAYS
    return timedelta(days=days) if days else None


def drill_sandbox(user) -> str:
    """Where `user`'s drills boot: their account's `AccountLimits.drill_sandbox`, else RECLO_DRILL_SANDBOX.

    `local` (the default, and what `make run` and the tests use) boots on
    ReClo's worker in QEMU; `aws` in an isolated subnet of ReClo's AWS
    account, as a failover would, at the cost of an instance and a snapshot
    per drill. The operator picks per account (Django admin, account limits).
    """
    chosen = AccountLimits.objects.filter(user=user).values_list("drill_sandbox", flat=True).first()
    return chosen or settings.RECLO_DRILL_SANDBOX


def drill_start(*, user, backup_id, probe_port: int | None = None, trigger: str = Drill.Trigger.API) -> Drill:
    """Queue a drill of a verified restore point of `user`'s.

    Raises ServiceError NO_RESTORABLE_BACKUP (no such verified backup of
    theirs, or its chain is broken), MALFORMED (a bad port), DRILL_RUNNING
    (a drill or a failover of this server is running), SANDBOX_FAILED (the
    configured sandbox is not available here).
    """
    if probe_port is not None and not 1 <= probe_port <= 65535:
        raise ServiceError(Code.MALFORMED, "probe_port must be a TCP port (1-65535).", field="probe_port")
    backup = selectors.restorable_backup(user=user, backup_id=backup_id)
    if backup is None:
        raise ServiceError(Code.NO_RESTORABLE_BACKUP, "No restorable (verified) backup of yours has that id.")
    try:
        chains.restorable_chain(backup)
    except chains.ChainError as exc:
        raise ServiceError(Code.NO_RESTORABLE_BACKUP, f"That restore point cannot be drilled: {exc}") from exc
    sandbox = drill_sandbox(user)
    if sandbox not in Drill.Sandbox.values:
        raise ServiceError(Code.SANDBOX_FAILED, f"The {sandbox} drill sandbox is not available on this portal.")
    server = backup.server
    if probe_port is None:
        probe_port = getattr(server, "drill_probe_port", None)
    if Recovery.objects.filter(server=server, status__in=Recovery.ACTIVE).exists():
        raise ServiceError(Code.DRILL_RUNNING, f"A failover of {server.name} is running; a drill would only slow it.")
    try:
        with transaction.atomic():
            drill = Drill.objects.create(
                user=user,
                server=server,
                server_name=server.name,
                backup=backup,
                backup_ref=backup.pk,
                backup_created=backup.date_created,
                sandbox=sandbox,
                trigger=trigger,
                probe_port=probe_port,
                due_at=timezone.now(),
            )
            engine.start(drill, pipeline=DRILL)
    except IntegrityError:  # the partial unique index: one drill at a time per server
        raise ServiceError(Code.DRILL_RUNNING, f"A drill of {server.name} is already running.") from None
    log.info("drill %s queued for server %s (restore point %s, %s)", drill.pk, server.pk, backup.pk, trigger)
    return drill


def drill_cancel_for_server(*, server: Server, reason: str) -> list[str]:
    """End the server's running drill (if any) as failed with `reason`; its teardown runs after commit.

    Clearing the lease makes the worker on it lose its claim at its next
    heartbeat, so it stops the guest and records nothing more.
    """
    now = timezone.now()
    cancelled = []
    for drill_id in Drill.objects.filter(server=server, status__in=Drill.ACTIVE).values_list("pk", flat=True):
        with transaction.atomic():
            moved = Drill.objects.filter(pk=drill_id, status__in=Drill.ACTIVE).update(
                status=Drill.Status.FAILED,
                error_code=Code.DRILL_RUNNING,
                error=reason,
                lease_token=None,
                lease_until=None,
                due_at=None,
                updated=now,
                finished=now,
            )
            if moved:
                DRILL.step_rows_of(drill_id).filter(status__in=["pending", "running", "waiting"]).update(
                    status="failed", finished=now, error=reason
                )
                # The cancelled drill is the failover's doing, not a failed restore point: no email.
                transaction.on_commit(functools.partial(_teardown, drill_id))
                cancelled.append(str(drill_id))
    return cancelled


def _teardown(drill_id) -> None:
    from .drill_steps import teardown  # the handlers import the sandbox; services stay light

    # Runs in the request that starts the failover: an aws instance is not
    # waited for (drills_reconcile' sweep deletes its network once it is gone).
    teardown(drill_id, "cancelled", wait_for_cloud=False)


def drills_schedule(*, now=None, limit: int | None = None) -> list[str]:
    """Start a drill of each server whose interval has passed since its last drill. Bounded, idempotent.

    The newest verified restore point is drilled; a server with a drill or a
    failover running, or none verified, is left for the next run. Two beat
    runs at once start one drill per server (the unique index).
    """
    now = now or timezone.now()
    limit = limit or settings.RECLO_DRILL_SCHEDULE_BATCH
    servers = (
        Server.objects.select_related("user")
        .filter(Exists(Backup.objects.filter(server=OuterRef("pk"), status=Backup.Status.VERIFIED)))
        .exclude(Exists(Drill.objects.filter(server=OuterRef("pk"), status__in=Drill.ACTIVE)))
        .order_by("pk")
    )
    started: list[str] = []
    for server in servers.iterator():
        if len(started) >= limit:
            break
        interval = drill_interval(server)
        if interval is None:
            continue
        last = Drill.objects.filter(server=server).order_by("-created").values_list("created", flat=True).first()
        if last is not None and last > now - interval:
            continue
        newest = Backup.objects.filter(server=server, status=Backup.Status.VERIFIED).order_by("-date_created").first()
        if newest is None:
            continue  # the query above only finds servers with a verified restore point; it may be gone since
        try:
            drill = drill_start(user=server.user, backup_id=newest.pk, trigger=Drill.Trigger.SCHEDULE)
        except ServiceError as exc:
            log.info("scheduled drill of server %s not started: %s", server.pk, exc)
            continue
        started.append(str(drill.pk))
    return started
