"""``reclo-agent schedule install|remove|status``: recurring backups by systemd or cron.

The disks to back up are kept in ``<state>/schedule.json``; the timer (or
cron entry) runs ``reclo-agent backup --scheduled``, which backs them up one
after the other, carries on past a failing one and exits non-zero if any
failed -- so one timer serves every disk, and two disks never contend for
the state folder's lock. Each scheduled run leaves its result in
``<state>/last_run.json``, which ``status`` shows and the portal is told.

A schedule is only recorded once something will really run it:

- systemd where it runs (``/run/systemd/system`` exists): a oneshot
  ``reclo-agent-backup.service`` and a ``.timer`` on a calendar slot with
  ``Persistent=true`` (a run missed while the machine was off happens once
  at the next start). Install succeeds only when ``systemctl is-enabled``
  and ``is-active`` of the timer say so.
- cron elsewhere: ``/etc/cron.d/reclo-agent`` as root, the user's crontab
  otherwise; install succeeds only while a cron daemon is running.

Anything else exits non-zero saying what is missing, and removes what it
wrote. ``--root DIR`` puts every system path under DIR (tests, images
being prepared): systemd is then enabled offline (``systemctl --root``), which
no running manager starts, so it is refused; cron counts as running when
``DIR/run/crond.pid`` names a live process called cron or crond.

The slot (minute, hour) is random per install, so a fleet of agents does not
hit the portal at the same second; it is stored, so the next run's time is
known without asking the scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .errors import AgentError, DiskError, UsageError
from .fsutil import write_json_atomic

log = logging.getLogger(__name__)

UNIT = "reclo-agent-backup"
TIMER = f"{UNIT}.timer"
BEGIN, END = "# BEGIN reclo-agent (managed by `reclo-agent schedule`)", "# END reclo-agent"
CRON_NAMES = {"cron", "crond"}
NO_CRON = "no cron daemon is running (Debian/Ubuntu: apt-get install cron, then start it)"
_EVERY_RE = re.compile(r"^\s*(\d+)\s*(m|min|h|d)\s*$", re.IGNORECASE)


class ScheduleError(AgentError):
    """The timer could not be made to run: says what is missing."""

    exit_code = 9


@dataclass(frozen=True)
class Job:
    source: str
    server: str
    disk: str


@dataclass(frozen=True)
class Slot:
    """When runs happen: every ``every`` seconds at ``minute`` (and ``hour``) offsets."""

    every: int
    minute: int
    hour: int = 0

    @classmethod
    def pick(cls, every: int, rnd: random.Random | None = None) -> Slot:
        rnd = rnd or random.Random()
        check_interval(every)
        minutes = every // 60
        if minutes < 60:
            return cls(every, rnd.randrange(minutes))
        hours = minutes // 60
        return cls(every, rnd.randrange(60), rnd.randrange(hours) if hours < 24 else rnd.randrange(24))

    def matches(self, at: datetime) -> bool:
        minutes = self.every // 60
        if minutes < 60:
            return at.minute % minutes == self.minute
        hours = minutes // 60
        if at.minute != self.minute:
            return False
        if hours < 24:
            return at.hour % hours == self.hour
        return at.hour == self.hour and (at.day - 1) % (hours // 24) == 0

    def next_after(self, now: datetime) -> datetime:
        """The first run strictly after ``now`` (an aware datetime), in local time."""
        at = now.astimezone().replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(62 * 24 * 60):  # whole days run at most a month apart
            if self.matches(at):
                return at
            at += timedelta(minutes=1)
        raise UsageError("The schedule never runs; install it again.")

    def cron(self) -> str:
        """The five cron fields."""
        minutes = self.every // 60
        if minutes < 60:
            return f"{self.minute}-59/{minutes} * * * *"
        hours = minutes // 60
        if hours < 24:
            return f"{self.minute} {'*' if hours == 1 else f'{self.hour}-23/{hours}'} * * *"
        days = hours // 24
        return f"{self.minute} {self.hour} {'*' if days == 1 else f'*/{days}'} * *"

    def calendar(self) -> str:
        """The same times as a systemd ``OnCalendar=`` expression."""
        minutes = self.every // 60
        if minutes < 60:
            return f"*-*-* *:{self.minute:02d}/{minutes}:00"
        hours = minutes // 60
        if hours < 24:
            return f"*-*-* {'*' if hours == 1 else f'{self.hour:02d}/{hours}'}:{self.minute:02d}:00"
        days = hours // 24
        return f"*-*-{'*' if days == 1 else f'01/{days}'} {self.hour:02d}:{self.minute:02d}:00"


def parse_every(text: str) -> int:
    """``"30m"``, ``"1h"``, ``"6h"``, ``"1d"`` -> seconds (at least 15 minutes)."""
    m = _EVERY_RE.match(text or "")
    if not m:
        raise UsageError(f"--every {text!r}: give an interval like 30m, 1h, 6h or 1d.")
    n = int(m.group(1))
    seconds = n * {"m": 60, "min": 60, "h": 3600, "d": 86400}[m.group(2).lower()]
    if seconds < 15 * 60:
        raise UsageError("--every must be at least 15m: a backup must finish before the next one starts.")
    check_interval(seconds)
    return seconds


def check_interval(seconds: int) -> None:
    """Only intervals that cron and systemd calendars both run evenly."""
    minutes, rest = divmod(seconds, 60)
    hours = minutes // 60
    if rest == 0 and (
        (minutes < 60 and 60 % minutes == 0)
        or (minutes % 60 == 0 and hours < 24 and 24 % hours == 0)
        or (minutes % 60 == 0 and hours % 24 == 0)
    ):
        return
    raise UsageError(
        "The schedule cannot run evenly at that interval; use minutes dividing an hour (15m, 30m), "
        "hours dividing a day (1h, 2h, 6h, 12h) or whole days."
    )


def _is_root() -> bool:
    return os.geteuid() == 0


class System:
    """The machine's paths and schedulers, or those under a fake root (``--root``)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).resolve() if root else Path("/")
        self.fake = self.root != Path("/")

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def method(self) -> str:
        if self.path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
            return "systemd"
        return "cron"

    # systemd ---------------------------------------------------------------------------

    @property
    def user_units(self) -> bool:
        return not _is_root() and not self.fake

    def unit_dir(self) -> Path:
        if not self.user_units:
            return self.path("/etc/systemd/system")
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
        return Path(base) / "systemd" / "user"

    def systemctl(self, *args: str) -> subprocess.CompletedProcess:
        scope = [f"--root={self.root}"] if self.fake else ["--user"] if self.user_units else []
        try:
            return subprocess.run(["systemctl", *scope, *args], capture_output=True, text=True, timeout=60)
        except FileNotFoundError as exc:
            raise ScheduleError("systemctl is not installed; cannot schedule with systemd.") from exc

    def timer_state(self) -> tuple[bool, str]:
        """(runs, why not): the timer is enabled and active."""
        enabled = self.systemctl("is-enabled", TIMER).stdout.strip() or "not installed"
        if enabled != "enabled":
            return False, f"the systemd timer {TIMER} is {enabled}"
        if self.fake:
            return False, f"no systemd is running in {self.root} to start {TIMER} (it is only enabled)"
        active = self.systemctl("is-active", TIMER).stdout.strip() or "unknown"
        if active != "active":
            return False, f"the systemd timer {TIMER} is enabled but {active}"
        return True, ""

    # cron ------------------------------------------------------------------------------

    @property
    def cron_file(self) -> Path | None:
        """``/etc/cron.d/reclo-agent`` as root (or under a fake root); None: the user's crontab."""
        return self.path("/etc/cron.d/reclo-agent") if _is_root() or self.fake else None

    def cron_running(self) -> bool:
        """Whether a cron daemon runs: crond.pid's process, or (on the real root) any process so named."""
        for pidfile in ("/run/crond.pid", "/var/run/crond.pid"):
            try:
                pid = int(self.path(pidfile).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if _process_name(pid) in CRON_NAMES:
                return True
        if self.fake:
            return False
        return any(_process_name(int(p.name)) in CRON_NAMES for p in Path("/proc").iterdir() if p.name.isdigit())


def _process_name(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # "pid (comm) state ...": a zombie is not running.
    name, _, rest = text.partition("(")[2].rpartition(")")
    return "" if rest.split()[:1] == ["Z"] else name


ENV_LAUNCHER = "RECLO_AGENT_LAUNCHER"


def agent_command(config_path: Path) -> list[str]:
    """How the timer starts this agent, the same config, by absolute paths.

    The portal's installer runs the agent through a launcher script (its
    libraries are not on Python's path) and names it in RECLO_AGENT_LAUNCHER;
    otherwise the same Python with ``-m reclo_agent``.
    """
    config = ["--config", str(Path(config_path).resolve())]
    launcher = os.environ.get(ENV_LAUNCHER, "")
    if launcher and os.path.isabs(launcher) and os.access(launcher, os.X_OK):
        return [launcher, *config]
    return [str(Path(sys.executable).absolute()), "-m", "reclo_agent", *config]


def absolute_source(source: str) -> str:
    """The source as an absolute path, checked readable now rather than at 3 a.m."""
    path = Path(source).expanduser()
    path = path if path.is_absolute() else path.resolve()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        raise DiskError(f"Cannot read {path}: {why}; a scheduled backup of it would fail.") from exc
    os.close(fd)
    return str(path)


# --- the job list and the last run ------------------------------------------------------


def jobs_path(state_dir: Path) -> Path:
    return Path(state_dir) / "schedule.json"


def last_run_path(state_dir: Path) -> Path:
    return Path(state_dir) / "last_run.json"


def load_jobs(state_dir: Path) -> tuple[list[Job], dict]:
    try:
        data = json.loads(jobs_path(state_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"The schedule {jobs_path(state_dir)} is unreadable ({exc}); install it again.") from exc
    return [Job(**j) for j in data.get("jobs", [])], data


def save_jobs(state_dir: Path, jobs: list[Job], **extra) -> None:
    write_json_atomic(jobs_path(state_dir), {"jobs": [asdict(j) for j in jobs], **extra})


def record_run(state_dir: Path, *, ok: bool, message: str = "", at: datetime | None = None) -> dict:
    """Keep the result of a scheduled run (``status`` and the portal read it)."""
    at = at or datetime.now(UTC)
    data = {"at": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "result": "ok" if ok else "failed", "message": message[:500]}
    write_json_atomic(last_run_path(state_dir), data)
    return data


def last_run(state_dir: Path) -> dict | None:
    try:
        return json.loads(last_run_path(state_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- systemd ------------------------------------------------------------------------


def systemd_units(command: list[str], slot: Slot, *, user: bool) -> dict[str, str]:
    exec_start = " ".join(shlex.quote(part) for part in [*command, "backup", "--scheduled"])
    network = "" if user else "After=network-online.target\nWants=network-online.target\n"
    service = f"""[Unit]
Description=ReClo image backup (reclo-agent)
{network}
[Service]
Type=oneshot
ExecStart={exec_start}
# A backup reads whole disks: let the server's own work go first.
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
"""
    timer = f"""[Unit]
Description=Run the ReClo image backup every {slot.every // 60} minutes

[Timer]
OnCalendar={slot.calendar()}
# A run missed while the machine was off happens once when it is back.
Persistent=true

[Install]
WantedBy=timers.target
"""
    return {f"{UNIT}.service": service, TIMER: timer}


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise ScheduleError(f"`systemctl {what}` failed: {(result.stderr or result.stdout).strip()}")


def install_systemd(system: System, command: list[str], slot: Slot) -> str:
    unit_dir = system.unit_dir()
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in systemd_units(command, slot, user=system.user_units).items():
        (unit_dir / name).write_text(text, encoding="utf-8")
    if system.fake:
        _check(system.systemctl("enable", TIMER), f"enable {TIMER}")
    else:
        _check(system.systemctl("daemon-reload"), "daemon-reload")
        _check(system.systemctl("enable", "--now", TIMER), f"enable --now {TIMER}")
    return f"systemd timer {TIMER} ({unit_dir})"


def remove_systemd(system: System) -> bool:
    unit_dir = system.unit_dir()
    timer, service = unit_dir / TIMER, unit_dir / f"{UNIT}.service"
    if not timer.exists() and not service.exists():
        return False
    result = system.systemctl("disable", *([] if system.fake else ["--now"]), TIMER)
    if result.returncode != 0:
        log.warning("systemctl disable %s: %s", TIMER, result.stderr.strip())
    timer.unlink(missing_ok=True)
    service.unlink(missing_ok=True)
    if not system.fake:
        system.systemctl("daemon-reload")
    return True


# --- cron -----------------------------------------------------------------------------


def cron_line(command: list[str], slot: Slot, state_dir: Path, *, system: bool) -> str:
    logfile = Path(state_dir).resolve() / "scheduled.log"
    run = " ".join(shlex.quote(part) for part in [*command, "backup", "--scheduled"])
    # cron has no journal: append the run's log lines to a file in the state folder.
    return f"{slot.cron()}{' root' if system else ''} {run} >> {shlex.quote(str(logfile))} 2>&1"


def _replace_block(text: str, block: str | None) -> str:
    """``text`` with our marked block replaced by ``block`` (or removed when None)."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    text = pattern.sub("", text)
    if block:
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"{BEGIN}\n{block}\n{END}\n"
    return text


def _read_user_crontab() -> str:
    try:
        result = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise ScheduleError("Neither systemd nor the crontab command is available to schedule backups.") from exc
    return result.stdout if result.returncode == 0 else ""  # "no crontab for user" is not an error


def _write_user_crontab(text: str) -> None:
    result = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True)
    if result.returncode != 0:
        raise ScheduleError(f"crontab refused the new entry: {result.stderr.strip()}")


def _cron_text(system: System) -> str:
    path = system.cron_file
    if path is None:
        return _read_user_crontab()
    return path.read_text(encoding="utf-8") if path.exists() else ""


def install_cron(system: System, command: list[str], slot: Slot, state_dir: Path) -> str:
    path = system.cron_file
    line = cron_line(command, slot, state_dir, system=path is not None)
    if path is None:
        _write_user_crontab(_replace_block(_read_user_crontab(), line))
        return "cron (your crontab)"
    old = _cron_text(system)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_replace_block(old, line), encoding="utf-8")
    return f"cron ({path})"


def remove_cron(system: System) -> bool:
    path = system.cron_file
    old = _cron_text(system)
    new = _replace_block(old, None)
    if new == old:
        return False
    if path is None:
        _write_user_crontab(new)
    elif new.strip():
        path.write_text(new, encoding="utf-8")
    else:
        path.unlink()
    return True


def cron_state(system: System) -> tuple[bool, str]:
    if BEGIN not in _cron_text(system):
        return False, "the cron entry is missing"
    if not system.cron_running():
        return False, NO_CRON
    return True, ""


# --- entry points -----------------------------------------------------------------------


@dataclass
class Installed:
    jobs: list[Job]
    where: str
    next_run: datetime


def install(
    *,
    jobs: list[Job],
    every: str,
    config_path: Path,
    state_dir: Path,
    method: str | None = None,
    root: str | Path | None = None,
    read: dict | None = None,
) -> Installed:
    """Install the timer, check it really runs, then save the jobs.

    ``read`` holds --freeze, --freeze-limit and the hooks for each run.
    Raises :class:`ScheduleError` (after removing what it wrote) when
    nothing would start the runs.
    """
    if not jobs:
        raise UsageError(
            "Nothing to schedule: give the SOURCE to back up, or make a first backup by hand "
            "(reclo-agent backup SOURCE) and run schedule install again."
        )
    seconds = parse_every(every)
    system = System(root)
    method = method or system.method()
    _, old = load_jobs(state_dir)
    kept = old.get("slot") or {}
    # Reinstalling (an upgrade) keeps the slot, so the next run does not move.
    slot = Slot(**kept) if kept.get("every") == seconds else Slot.pick(seconds)
    command = agent_command(config_path)
    if method == "cron" and not system.cron_running():
        # Nothing written: a cron entry no daemon reads is a schedule that lies.
        raise ScheduleError(f"Backups were not scheduled: {NO_CRON}. Nothing was installed.")
    if method == "systemd":
        where = install_systemd(system, command, slot)
        runs, why = system.timer_state()
    else:
        where = install_cron(system, command, slot, state_dir)
        runs, why = cron_state(system)
    if not runs:
        remove_systemd(system) if method == "systemd" else remove_cron(system)
        jobs_path(state_dir).unlink(missing_ok=True)
        raise ScheduleError(f"Backups were not scheduled: {why}. Nothing was installed.")
    if old.get("method") and old["method"] != method:
        remove_cron(system) if old["method"] == "cron" else remove_systemd(system)
    save_jobs(state_dir, jobs, every=every, method=method, slot=asdict(slot), root=str(system.root), read=read or {})
    return Installed(jobs=jobs, where=where, next_run=slot.next_after(datetime.now(UTC)))


def remove(*, state_dir: Path, method: str | None = None, root: str | Path | None = None) -> bool:
    _, data = load_jobs(state_dir)
    system = System(root or data.get("root"))
    method = method or data.get("method") or system.method()
    removed = remove_systemd(system) if method == "systemd" else remove_cron(system)
    jobs_path(state_dir).unlink(missing_ok=True)
    return removed or bool(data)


@dataclass
class Status:
    """What really runs: ``runs`` false with ``problem`` when a schedule is recorded but would not run."""

    jobs: list[Job]
    every: str | None = None
    method: str | None = None
    runs: bool = False
    problem: str = ""
    next_run: datetime | None = None
    last_run: dict | None = None


def status(*, state_dir: Path, root: str | Path | None = None, now: datetime | None = None) -> Status:
    """The schedule as the scheduler sees it now, with the last run's result."""
    jobs, data = load_jobs(state_dir)
    result = Status(jobs=jobs, last_run=last_run(state_dir))
    if not jobs:
        return result
    system = System(root or data.get("root"))
    result.every, result.method = data.get("every"), data.get("method")
    try:
        runs, why = system.timer_state() if result.method == "systemd" else cron_state(system)
    except ScheduleError as exc:
        runs, why = False, str(exc)
    result.runs, result.problem = runs, why
    if runs and data.get("slot"):
        result.next_run = Slot(**data["slot"]).next_after(now or datetime.now(UTC))
    return result
