"""The activity log in plain words: one sentence per audit event.

The audit log keeps machine-readable kinds and details (accounts/audit.py);
the owner reads sentences such as "Backup of frontdesk finished: 660 KB of
changes". Ids stay in the details, shown behind "technical details".
"""

from collections.abc import Callable

from django.template.defaultfilters import filesizeformat

from .models import AuditEvent

K = AuditEvent.Kind


def _server(d: dict) -> str:
    server, disk = d.get("server") or "a server", d.get("disk")
    return f"{server} ({disk})" if disk and disk not in ("sda", "disk0", "C") else str(server)


def _plural(n, word: str) -> str:
    n = int(n or 0)
    return f"{n} {word}{'' if n == 1 else 's'}"


def _login_ok(d):
    factor = d.get("second_factor")
    if factor == "recovery":
        return "Signed in with a recovery code"
    return "Signed in with a two-factor code" if factor else "Signed in"


def _login_failed(d):
    return (
        "A sign-in failed: wrong two-factor code"
        if d.get("step") == "two-factor"
        else "A sign-in failed: wrong password"
    )


def _upload(d):
    if d.get("refresh"):
        return f"Backup of {_server(d)} is still uploading"
    return f"Backup of {_server(d)} started"


def _verified(d):
    size = filesizeformat(d["file_size"]) if d.get("file_size") else ""
    if d.get("backup_kind") == "full":
        return f"Backup of {_server(d)} finished: a full copy" + (f" of {size}" if size else "")
    return f"Backup of {_server(d)} finished" + (f": {size} of changes" if size else "")


def _deleted(d):
    what = "Full copy" if d.get("backup_kind") == "full" else "Restore point"
    if d.get("purged"):
        return f"Restore point of {_server(d)} removed for good (its lock period ended)"
    if d.get("scheduled"):
        return f"{what} of {_server(d)} deleted; it is removed for good when its lock period ends"
    return f"{what} of {_server(d)} deleted"


def _password(d, reset=False):
    said = "Password reset by email" if reset else "Password changed"
    revoked = d.get("revoked")
    return f"{said}; {_plural(revoked, 'API token')} stopped working" if revoked else said


def _token(d, verb):
    name = d.get("token_name") or "API token"
    for_server = f" for {d['server']}" if d.get("server") else ""
    return f"API token “{name}”{for_server} {verb}"


SENTENCES: dict[str, Callable] = {
    K.LOGIN_OK: _login_ok,
    K.LOGIN_FAILED: _login_failed,
    K.TOKEN_CREATED: lambda d: _token(d, "created"),
    K.TOKEN_REVOKED: lambda d: _token(d, "revoked"),
    K.UPLOAD_CREDENTIALS: _upload,
    K.BACKUP_VERIFIED: _verified,
    K.BACKUP_FAILED: lambda d: f"Backup of {_server(d)} failed" + (f": {d['reason']}" if d.get("reason") else ""),
    K.BACKUP_DELETED: _deleted,
    K.FAILOVER_STARTED: lambda d: f"Failover of {d.get('server', 'a server')} started",
    K.FAILOVER_READY: lambda d: (
        f"Failover of {d.get('server', 'a server')} finished: your server in the cloud is running"
    ),
    K.FAILOVER_FAILED: lambda d: (
        f"Failover of {d.get('server', 'a server')} failed" + (f": {d['reason']}" if d.get("reason") else "")
    ),
    K.FAILBACK_STARTED: lambda d: f"Bringing {d.get('server', 'a server')} home started",
    K.FAILBACK_READY: lambda d: (
        f"{d.get('server', 'A server')} brought home: its work in the cloud is a verified restore point"
    ),
    K.FAILBACK_FAILED: lambda d: (
        f"Bringing {d.get('server', 'a server')} home failed" + (f": {d['reason']}" if d.get("reason") else "")
    ),
    K.INSTANCE_STARTED: lambda d: "Your server in the cloud was started",
    K.INSTANCE_STOPPED: lambda d: "Your server in the cloud was stopped",
    K.INSTANCE_TERMINATED: lambda d: "Your server in the cloud was terminated (removed for good)",
    K.ENROLLMENT_KEY_CREATED: lambda d: f"Enrollment key made for {d.get('server', 'a server')}",
    K.SERVER_ENROLLED: lambda d: (
        f"Server {d.get('server', '')} connected to ReClo" + (f" (host {d['hostname']})" if d.get("hostname") else "")
    ),
    K.ENROLLMENT_FAILED: lambda d: "Someone tried to connect a server with a wrong enrollment key",
    K.SERVER_REVOKED: lambda d: f"Server {d.get('server', '')} disconnected: its credentials stopped working",
    K.SERVER_REMOVED: lambda d: f"Server {d.get('server', '')} removed",
    K.PASSWORD_CHANGED: _password,
    K.PASSWORD_RESET_REQUESTED: lambda d: "A password reset was asked for",
    K.PASSWORD_RESET: lambda d: _password(d, reset=True),
    K.TWOFACTOR_ENABLED: lambda d: "Two-factor sign-in turned on",
    K.TWOFACTOR_DISABLED: lambda d: "Two-factor sign-in turned off",
    K.RECOVERY_CODE_USED: lambda d: (
        "A recovery code was used" + (f" ({_plural(d['left'], 'code')} left)" if "left" in d else "")
    ),
    K.RECOVERY_CODES_NEW: lambda d: "New recovery codes made (the old ones stopped working)",
    K.TIME_ZONE_CHANGED: lambda d: f"Time zone changed to {d.get('time_zone', '')}",
}

# Kinds that are worth a second look: shown with a red badge.
WARNING_KINDS = frozenset(
    {K.LOGIN_FAILED, K.ENROLLMENT_FAILED, K.BACKUP_FAILED, K.FAILOVER_FAILED, K.FAILBACK_FAILED, K.TWOFACTOR_DISABLED}
)


def event_sentence(event: AuditEvent) -> str:
    """What happened, as one sentence; the kind's label for a kind without one."""
    render = SENTENCES.get(event.kind)
    details = event.details or {}
    try:
        return render(details) if render else event.get_kind_display()
    except (KeyError, TypeError, ValueError):  # an old event with other details
        return event.get_kind_display()
