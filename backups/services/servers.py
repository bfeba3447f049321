"""Servers: enrollment keys, server credentials, revoking a server, the owner's settings.

An owner mints a one-time enrollment key for a server (a new name creates
the server); the agent on that server trades the key for a *server
credential* (an `ApiToken` with `server` set) without anyone typing the
owner's password there. What that credential may do is decided centrally by
`accounts.permissions.CredentialScope`.
"""

import shlex
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts import notify, throttle
from accounts.audit import audit_record
from accounts.models import ApiToken, AuditEvent
from accounts.services import token_create
from accounts.tokens import TOKEN_RE, hash_token, new_token
from reclo_site.errors import Code, ServiceError

from ..models import EnrollmentKey, Server
from ..naming import InvalidName, check_name

HOSTNAME_MAX = 255
DRILL_EVERY_DAYS_MAX = 365


@dataclass(frozen=True)
class EnrollmentGrant:
    """A new enrollment key (shown once) and the commands that use it."""

    server: Server
    key: str
    expires: datetime
    install_command: str
    enroll_command: str


def enrollment_commands(key: str, portal: str | None = None) -> tuple[str, str]:
    """(install_command, enroll_command): the installer's one line, and the agent's own command."""
    portal = (portal or settings.SITE_URL).rstrip("/")
    install = f"curl -fsSL {shlex.quote(portal + '/agent/install.sh')} | sudo sh -s -- --key {shlex.quote(key)}"
    enroll = f"reclo-agent enroll --portal {shlex.quote(portal)} --key {shlex.quote(key)}"
    return install, enroll


def enrollment_key_create(*, user, server: str) -> EnrollmentGrant:
    """A one-time key (24 hours) for the user's server named `server`, created if new.

    Older unused keys of the server stop working: only the newest key shown
    to the owner can enrol. Not idempotent: every call mints a new key.
    """
    try:
        check_name(server, "The server name")
    except InvalidName as exc:
        raise ServiceError(Code.MALFORMED, str(exc), field="server") from None
    key = new_token()
    now = timezone.now()
    with transaction.atomic():
        server_row, _ = Server.objects.get_or_create(user=user, name=server)
        EnrollmentKey.objects.filter(server=server_row, used_at__isnull=True).update(used_at=now, voided=True)
        row = EnrollmentKey.objects.create(
            server=server_row,
            key_hash=hash_token(key),
            prefix=key[:6],
            created=now,
            expires=now + settings.ENROLLMENT_KEY_LIFETIME,
        )
    audit_record(AuditEvent.Kind.ENROLLMENT_KEY_CREATED, user=user, server=server, key_prefix=row.prefix)
    install, enroll = enrollment_commands(key)
    return EnrollmentGrant(
        server=server_row, key=key, expires=row.expires, install_command=install, enroll_command=enroll
    )


def _bad_key(address: str) -> ServiceError:
    throttle.enroll_record_failure(address)
    audit_record(AuditEvent.Kind.ENROLLMENT_FAILED, address=address)
    return ServiceError(
        Code.BAD_ENROLLMENT_KEY,
        "That enrollment key is invalid, already used or expired; make a new one in the portal (Add a server).",
    )


def server_enroll(*, key: str, hostname: str = "", address: str = "") -> tuple[Server, ApiToken, str]:
    """Trade a one-time enrollment key for a server credential: (server, token row, token).

    212 for an unknown, used, voided or expired key; after
    ENROLL_FAILURES_PER_ADDRESS bad keys from one address in the window,
    103 with Retry-After. The key is claimed with a conditional UPDATE in
    the same transaction that creates the credential, so two agents racing
    with one key get one credential between them.
    """
    wait = throttle.enroll_retry_after(address)
    if wait:
        raise ServiceError(
            Code.THROTTLED, f"Too many bad enrollment keys; try again in {wait} seconds.",
            headers={"Retry-After": str(wait)},
        )  # fmt: skip
    hostname = (hostname or "").strip()
    if len(hostname) > HOSTNAME_MAX or not hostname.isprintable():
        raise ServiceError(Code.MALFORMED, f"hostname: at most {HOSTNAME_MAX} printable characters.", field="hostname")
    if not isinstance(key, str) or not TOKEN_RE.match(key):
        raise _bad_key(address)
    now = timezone.now()
    with transaction.atomic():
        row = EnrollmentKey.objects.select_related("server__user").filter(key_hash=hash_token(key)).first()
        claimed = (
            row is not None
            and EnrollmentKey.objects.filter(pk=row.pk, used_at__isnull=True, expires__gt=now).update(
                used_at=now, hostname=hostname
            )
            == 1
        )
        if row is not None and claimed and row.server.user.is_active:
            server = row.server
            if hostname:
                Server.objects.filter(pk=server.pk).update(hostname=hostname)
                server.hostname = hostname
            name = f"server {server.name}" + (f" ({hostname})" if hostname else "")
            token, raw = token_create(user=server.user, name=name[:100], address=address, server=server)
        else:
            claimed = False
    if not claimed:
        raise _bad_key(address)
    audit_record(AuditEvent.Kind.SERVER_ENROLLED, user=server.user, address=address, server=server.name,
                 hostname=hostname, token_prefix=token.prefix)  # fmt: skip
    notify.owner_email(
        server.user, "backups/email/server_enrolled", {"server": server, "hostname": hostname, "address": address}
    )
    return server, token, raw


def server_get(*, user, name: str) -> Server:
    """The user's server of that name, or 404 (also for another tenant's)."""
    server = Server.objects.filter(user=user, name=name).first() if isinstance(name, str) else None
    if server is None:
        raise ServiceError(Code.NOT_FOUND, "No server with that name.")
    return server


def server_credentials_revoke(*, user, server: Server, address: str = "") -> int:
    """Stop every credential of the server at once, and void its unused enrollment keys.

    Returns how many credentials were live. Idempotent: a second call
    revokes nothing more. The server and its restore points stay.
    """
    if server.user_id != user.pk:
        raise ServiceError(Code.NOT_FOUND, "No server with that name.")
    now = timezone.now()
    with transaction.atomic():
        revoked = ApiToken.objects.filter(server=server, revoked_at__isnull=True).update(revoked_at=now)
        EnrollmentKey.objects.filter(server=server, used_at__isnull=True).update(used_at=now, voided=True)
    audit_record(AuditEvent.Kind.SERVER_REVOKED, user=user, address=address, server=server.name, revoked=revoked)
    notify.owner_email(user, "backups/email/server_revoked", {"server": server, "address": address})
    return revoked


def server_remove(*, user, server: Server, address: str = "") -> None:
    """Remove a server that has no restore points left (none at all, not even hidden or failed ones).

    Its credentials and enrollment keys go with it; past failovers and
    drills keep its name. A server with any restore point answers
    HAS_DEPENDENTS: delete those first. The row lock keeps a backup from
    being started on it meanwhile (its insert waits, then finds no server).
    """
    if server.user_id != user.pk:
        raise ServiceError(Code.NOT_FOUND, "No server with that name.")
    with transaction.atomic():
        row = Server.objects.select_for_update().filter(pk=server.pk).first()
        if row is None:
            return
        if row.backups.exists():
            raise ServiceError(Code.HAS_DEPENDENTS, "This server still has restore points; delete them first.")
        row.delete()
    audit_record(AuditEvent.Kind.SERVER_REMOVED, user=user, address=address, server=server.name)


_UNSET = object()


def server_update(
    *, user, server: Server, warm_standby=_UNSET, drill_every_days=_UNSET, drill_probe_port=_UNSET
) -> Server:
    """Change the owner's settings of a server; only the given ones. Idempotent."""
    if server.user_id != user.pk:
        raise ServiceError(Code.NOT_FOUND, "No server with that name.")
    fields = {}
    changes = {}
    if warm_standby is not _UNSET:
        if not isinstance(warm_standby, bool):
            fields["warm_standby"] = ["true or false."]
        changes["warm_standby"] = warm_standby
    for name, value, low, high in (
        ("drill_every_days", drill_every_days, 1, DRILL_EVERY_DAYS_MAX),
        ("drill_probe_port", drill_probe_port, 1, 65535),
    ):
        if value is _UNSET:
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            fields[name] = [f"A whole number from {low} to {high}, or null."]
        changes[name] = value
    if fields:
        raise ServiceError(Code.MALFORMED, "The request has invalid fields: " + ", ".join(sorted(fields)) + ".", fields)
    if changes:
        Server.objects.filter(pk=server.pk).update(**changes)
        if "warm_standby" in changes and changes["warm_standby"] != server.warm_standby:
            from .. import tasks  # tasks import the services

            # On: stage its restore points; off: delete its staged snapshots (recovery.staging).
            transaction.on_commit(lambda: tasks.standby_enqueue(server.pk))
        for name, value in changes.items():
            setattr(server, name, value)
    return server
