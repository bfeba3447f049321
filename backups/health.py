"""A server's health from what its agent reports (`POST /api/v1/servers/{server}/status`).

The agent reports its schedule as the scheduler really has it (null when no
timer or cron entry would run), the next run, and the last scheduled run's
result: at the start and end of every scheduled run and whenever the
schedule changes. So the badge reads:

- "no schedule installed": no report yet, or the agent reports none;
- "agent silent": no report for SILENT_INTERVALS intervals (at least
  SILENT_MIN), so the server is off, cut off, or the agent is gone;
- "late": the next run passed by the margin without a report;
- "last scheduled backup failed": the agent ran and said so;
- "on schedule" otherwise.

Never from the gaps between restore points: backups made by hand say
nothing about a schedule.
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils.timesince import timesince

# A run reports as it starts, but the clock of a busy machine or a cron
# daemon may lag: late only after this much (or half an interval, if longer).
LATE_MARGIN = timedelta(minutes=30)
SILENT_INTERVALS = 3
SILENT_MIN = timedelta(hours=6)
_EVERY_RE = re.compile(r"^\s*(\d+)\s*(m|min|h|d)\s*$", re.IGNORECASE)
_UNIT = {"m": 60, "min": 60, "h": 3600, "d": 86400}

ORDER = {"green": 0, "amber": 1, "red": 2}


@dataclass(frozen=True)
class Health:
    colour: str  # green, amber, red
    label: str  # the badge's words
    kind: str  # none, ok, failed, late, silent
    detail: str = ""  # the cause in plain words (the emails, the badge's title)


def parse_every(text: str) -> timedelta | None:
    """The agent's interval ("30m", "1h", "1d") as a timedelta; None when unreadable."""
    m = _EVERY_RE.match(text or "")
    if not m:
        return None
    return timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2).lower()]) or None


def _local(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def schedule_health(server, now: datetime) -> Health:
    """The badge of `server` (its status fields) at `now`."""
    every = parse_every(server.schedule)
    if server.status_at is None or every is None:
        return Health("amber", "no schedule installed", "none",
                      "The agent reports no backup schedule: backups happen only when someone runs them.")  # fmt: skip
    quiet = now - server.status_at
    if quiet > max(every * SILENT_INTERVALS, SILENT_MIN):
        return Health(
            "red", "agent silent", "silent",
            f"The agent on {server.name} has not reported for {timesince(server.status_at, now)} "
            f"(it backs up every {server.schedule}). The server may be off or cut off from the internet, "
            "or the agent was removed.",
        )  # fmt: skip
    if server.next_run and now > server.next_run + max(LATE_MARGIN, every / 2):
        return Health(
            "amber", "late", "late",
            f"The backup of {server.name} due at {_local(server.next_run)} has not started: it is "
            f"{timesince(server.next_run, now)} late. The agent last reported {timesince(server.status_at, now)} "
            "ago; its timer may be stopped or the server busy or asleep.",
        )  # fmt: skip
    if server.last_result == "failed":
        return Health("red", "last scheduled backup failed", "failed",
                      f"The last scheduled backup failed: {server.last_message or 'no reason given'}.")  # fmt: skip
    return Health("green", "on schedule", "ok", f"Every {server.schedule}; next run {_local(server.next_run)}."
                  if server.next_run else f"Every {server.schedule}.")  # fmt: skip
