"""``reclo-agent schedule install|remove``: recurring backups by systemd or cron.

The disks to back up are kept in ``<state>/schedule.json``; the timer (or
cron entry) runs ``reclo-agent backup --scheduled``, which backs them up one
after the other, carries on past a failing one and exits non-zero if any
failed -- so one timer serves every disk, and two disks never contend for
the state folder's lock.

systemd is used where it runs (``/run/systemd/system`` exists): a
``reclo-agent-backup.service`` (oneshot, low CPU and I/O priority) and a
``.timer`` (``OnUnitActiveSec``, with a random delay so a fleet of agents
does not hit the portal at the same second). As root the units go to
``/etc/systemd/system``; otherwise to ``~/.config/systemd/user`` (user units
run only while the user is logged in, unless ``loginctl enable-linger``).
Elsewhere cron: ``/etc/cron.d/reclo-agent`` as root, the user's crontab
otherwise (between marker comments, leaving other entries alone).

``--unit-dir`` and ``--cron-file`` redirect the files (tests, packaging);
then systemctl/crontab are not run and the next step is printed instead.
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
from pathlib import Path

from .errors import UsageError
from .fsutil import write_json_atomic

log = logging.getLogger(__name__)

UNIT = "reclo-agent-backup"
CRON_FILE = Path("/etc/cron.d/reclo-agent")
BEGIN, END = "# BEGIN reclo-agent (managed by `reclo-agent schedule`)", "# END reclo-agent"
_EVERY_RE = re.compile(r"^\s*(\d+)\s*(m|min|h|d)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Job:
    source: str
    server: str
    disk: str


def parse_every(text: str) -> int:
    """``"30m"``, ``"1h"``, ``"6h"``, ``"1d"`` -> seconds (at least 15 minutes)."""
    m = _EVERY_RE.match(text or "")
    if not m:
        raise UsageError(f"--every {text!r}: give an interval like 30m, 1h, 6h or 1d.")
    n = int(m.group(1))
    seconds = n * {"m": 60, "min": 60, "h": 3600, "d": 86400}[m.group(2).lower()]
    if seconds < 15 * 60:
        raise UsageError("--every must be at least 15m: a backup must finish before the next one starts.")
    return seconds


def cron_spec(seconds: int, rnd: random.Random | None = None) -> str:
    """The five cron fields for an interval cron can express exactly."""
    rnd = rnd or random.Random()
    minutes = seconds // 60
    if seconds % 60 == 0 and minutes < 60 and 60 % minutes == 0:
        return f"{rnd.randrange(minutes)}-59/{minutes} * * * *"
    hours = minutes // 60
    if minutes % 60 == 0 and hours < 24 and 24 % hours == 0:
        hour = "*" if hours == 1 else f"{rnd.randrange(hours)}-23/{hours}"
        return f"{rnd.randrange(60)} {hour} * * *"
    if minutes % 60 == 0 and hours % 24 == 0:
        days = hours // 24
        return f"{rnd.randrange(60)} {rnd.randrange(24)} {'*' if days == 1 else f'*/{days}'} * *"
    raise UsageError(
        "cron cannot run at that interval; use minutes dividing an hour (15m, 30m), "
        "hours dividing a day (1h, 2h, 6h, 12h) or whole days."
    )


def detect_method() -> str:
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        return "systemd"
    return "cron"


def _is_root() -> bool:
    return os.geteuid() == 0


def agent_command(config_path: Path) -> list[str]:
    """How the timer starts this agent: the same Python, the same config."""
    return [sys.executable, "-m", "reclo_agent", "--config", str(config_path.resolve())]


# --- the job list ------------------------------------------------------------------


def jobs_path(state_dir: Path) -> Path:
    return Path(state_dir) / "schedule.json"


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


# --- systemd ------------------------------------------------------------------------


def systemd_units(command: list[str], every: int, *, user: bool) -> dict[str, str]:
    exec_start = " ".join(shlex.quote(part) for part in [*command, "backup", "--scheduled"])
    service = f"""[Unit]
Description=ReClo image backup (reclo-agent)
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart={exec_start}
# A backup reads whole disks: let the server's own work go first.
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
"""
    timer = f"""[Unit]
Description=Run the ReClo image backup every {every // 60} minutes

[Timer]
OnBootSec=10min
OnUnitActiveSec={every}s
RandomizedDelaySec={min(every // 10, 900)}s

[Install]
WantedBy=timers.target
"""
    if user:
        service = service.replace("After=network-online.target\nWants=network-online.target\n", "")
    return {f"{UNIT}.service": service, f"{UNIT}.timer": timer}


def default_unit_dir() -> Path:
    if _is_root():
        return Path("/etc/systemd/system")
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "systemd" / "user"


def _systemctl(*args: str) -> None:
    cmd = ["systemctl", *([] if _is_root() else ["--user"]), *args]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise UsageError("systemctl is not installed; use --method cron.") from exc
    except subprocess.CalledProcessError as exc:
        raise UsageError(f"`{' '.join(cmd)}` failed: {exc.stderr.strip() or exc.returncode}") from exc


def install_systemd(command: list[str], every: int, unit_dir: Path | None) -> str:
    managed = unit_dir is None
    unit_dir = unit_dir or default_unit_dir()
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in systemd_units(command, every, user=not _is_root()).items():
        (unit_dir / name).write_text(text, encoding="utf-8")
    if not managed:
        return f"wrote {UNIT}.service and {UNIT}.timer to {unit_dir}; enable with: systemctl enable --now {UNIT}.timer"
    _systemctl("daemon-reload")
    _systemctl("enable", "--now", f"{UNIT}.timer")
    return f"systemd timer {UNIT}.timer enabled ({unit_dir})"


def remove_systemd(unit_dir: Path | None) -> bool:
    managed = unit_dir is None
    unit_dir = unit_dir or default_unit_dir()
    timer, service = unit_dir / f"{UNIT}.timer", unit_dir / f"{UNIT}.service"
    if not timer.exists() and not service.exists():
        return False
    if managed:
        try:
            _systemctl("disable", "--now", f"{UNIT}.timer")
        except UsageError as exc:
            log.warning("%s", exc)
    timer.unlink(missing_ok=True)
    service.unlink(missing_ok=True)
    if managed:
        _systemctl("daemon-reload")
    return True


# --- cron -----------------------------------------------------------------------------


def cron_line(command: list[str], every: int, state_dir: Path, *, system: bool) -> str:
    logfile = Path(state_dir).resolve() / "scheduled.log"
    run = " ".join(shlex.quote(part) for part in [*command, "backup", "--scheduled"])
    # cron has no journal: append the run's log lines to a file in the state folder.
    return f"{cron_spec(every)}{' root' if system else ''} {run} >> {shlex.quote(str(logfile))} 2>&1"


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
        raise UsageError("Neither systemd nor the crontab command is available to schedule backups.") from exc
    return result.stdout if result.returncode == 0 else ""  # "no crontab for user" is not an error


def _write_user_crontab(text: str) -> None:
    result = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True)
    if result.returncode != 0:
        raise UsageError(f"crontab refused the new entry: {result.stderr.strip()}")


def install_cron(command: list[str], every: int, state_dir: Path, cron_file: Path | None) -> str:
    if cron_file is not None or _is_root():
        path = cron_file or CRON_FILE
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        line = cron_line(command, every, state_dir, system=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_replace_block(old, line), encoding="utf-8")
        return f"cron entry written to {path}"
    line = cron_line(command, every, state_dir, system=False)
    _write_user_crontab(_replace_block(_read_user_crontab(), line))
    return "cron entry added to your crontab"


def remove_cron(cron_file: Path | None) -> bool:
    if cron_file is not None or _is_root():
        path = cron_file or CRON_FILE
        if not path.exists():
            return False
        old = path.read_text(encoding="utf-8")
        new = _replace_block(old, None)
        if new.strip():
            path.write_text(new, encoding="utf-8")
        else:
            path.unlink()
        return new != old
    old = _read_user_crontab()
    new = _replace_block(old, None)
    if new != old:
        _write_user_crontab(new)
    return new != old


# --- entry points -----------------------------------------------------------------------


def install(
    *,
    jobs: list[Job],
    every: str,
    config_path: Path,
    state_dir: Path,
    method: str | None = None,
    unit_dir: Path | None = None,
    cron_file: Path | None = None,
    read: dict | None = None,
) -> str:
    """Save the jobs and install the timer; ``read`` holds --freeze, --freeze-limit and the hooks for each run."""
    if not jobs:
        raise UsageError(
            "Nothing to schedule: give the SOURCE to back up, or make a first backup by hand "
            "(reclo-agent backup SOURCE) and run schedule install again."
        )
    seconds = parse_every(every)
    method = method or ("cron" if cron_file else "systemd" if unit_dir else detect_method())
    command = agent_command(config_path)
    save_jobs(state_dir, jobs, every=every, method=method, read=read or {})
    if method == "systemd":
        return install_systemd(command, seconds, unit_dir)
    return install_cron(command, seconds, state_dir, cron_file)


def remove(
    *, state_dir: Path, method: str | None = None, unit_dir: Path | None = None, cron_file: Path | None = None
) -> bool:
    _, data = load_jobs(state_dir)
    method = method or ("cron" if cron_file else "systemd" if unit_dir else data.get("method") or detect_method())
    removed = remove_systemd(unit_dir) if method == "systemd" else remove_cron(cron_file)
    jobs_path(state_dir).unlink(missing_ok=True)
    return removed
