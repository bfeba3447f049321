"""What a server's agent reports about itself: schedule, version, bootability preflight."""

from django.utils import timezone

from reclo_site.errors import Code, ServiceError

from ..models import Server
from ..naming import InvalidName, check_name

PREFLIGHT_FAIL = "fail"


def server_status_record(
    *,
    user,
    server: str,
    schedule: str | None,
    next_run,
    agent_version: str,
    preflight: dict | None,
    last_run_at=None,
    last_result: str | None = None,
    last_message: str = "",
) -> Server:
    """Store the agent's report on the user's server; 105 when there is no such server.

    Idempotent: the newest report replaces the last (and so ends a late or
    silent incident, backups.health). A report without a preflight (an agent
    on another system) keeps the last one.
    """
    try:
        check_name(server, "server")
    except InvalidName:
        raise ServiceError(Code.NOT_FOUND, "No server with that name.") from None
    row = Server.objects.filter(user=user, name=server).first()
    if row is None:
        raise ServiceError(Code.NOT_FOUND, "No server with that name.")
    now = timezone.now()
    row.schedule = schedule or ""
    row.next_run = next_run
    row.agent_version = agent_version or ""
    row.status_at = now
    row.last_run_at, row.last_result, row.last_message = last_run_at, last_result or "", last_message or ""
    fields = ["schedule", "next_run", "agent_version", "status_at", "last_run_at", "last_result", "last_message"]
    if preflight is not None:
        checks = list(preflight.get("checks") or [])
        # The verdict is the checks', not what the agent claims.
        row.preflight = {**preflight, "checks": checks, "ok": all(c["status"] != PREFLIGHT_FAIL for c in checks)}
        row.preflight_at = now
        fields += ["preflight", "preflight_at"]
    row.save(update_fields=fields)
    return row
