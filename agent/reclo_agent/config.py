"""The agent's configuration file: portal URL, API token (and enrolled server), state folder.

Where it lives (first that applies):

1. ``--config PATH`` on the command line;
2. the ``RECLO_AGENT_CONFIG`` environment variable;
3. ``/etc/reclo/agent.json`` when running as root -- image backups of block
   devices need root, and the systemd timer that ``schedule install`` writes
   then runs system-wide, like any other daemon's configuration;
4. ``$XDG_CONFIG_HOME/reclo/agent.json`` (``~/.config/reclo/agent.json``)
   otherwise, e.g. for backing up image files as an ordinary user.

The state folder (block maps, resumable uploads, the lock) defaults to
``/var/lib/reclo-agent`` for root and ``$XDG_STATE_HOME/reclo-agent``
(``~/.local/state/reclo-agent``) otherwise; ``login --state-dir`` changes it.

The file holds the API token, so it is written with mode 0600 (created that
way, never widened afterwards) inside a folder of mode 0700. A file found
readable by others is tightened on load with a warning, because the token
may already have been read: logging in again replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import NotLoggedIn, UsageError

log = logging.getLogger(__name__)

ENV_CONFIG = "RECLO_AGENT_CONFIG"
FILE_MODE = 0o600
DIR_MODE = 0o700


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_config_path() -> Path:
    """Where the config lives when neither ``--config`` nor the environment say."""
    if _is_root():
        return Path("/etc/reclo/agent.json")
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "reclo" / "agent.json"


def default_state_dir() -> Path:
    if _is_root():
        return Path("/var/lib/reclo-agent")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "reclo-agent"


def config_path(cli_value: str | None = None) -> Path:
    """The config file to use: ``--config``, then ``RECLO_AGENT_CONFIG``, then the default."""
    value = cli_value or os.environ.get(ENV_CONFIG)
    return Path(value).expanduser() if value else default_config_path()


@dataclass
class Config:
    """What ``login`` stores; ``path`` is where it was read from (not saved)."""

    path: Path
    portal: str = ""
    token: str = field(default="", repr=False)  # never in repr(), logs or output
    token_expires: str = ""
    email: str = ""
    user_id: int | None = None
    # Set by ``enroll``: the token is a server credential of this server
    # (it may only back up and restore this one), and ``backup`` names it.
    server: str = ""
    state_dir: str = ""
    # Optional defaults for ``backup`` (scheduled runs use them too).
    bandwidth_limit: str = ""

    @property
    def state(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()

    def require_login(self) -> None:
        if not self.portal or not self.token:
            raise NotLoggedIn(
                f"Not enrolled or logged in (no token in {self.path}). "
                "Run: reclo-agent enroll --portal URL --key KEY (the key from the portal's Add a server), "
                "or reclo-agent login --portal URL --email EMAIL"
            )

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("path")
        return data


def load(path: Path) -> Config:
    """Read the config at ``path``; a missing file gives an empty config."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return Config(path=path)
    except OSError as exc:
        raise UsageError(f"Cannot read the config file {path}: {exc.strerror}.") from exc
    if stat.S_IMODE(st.st_mode) & 0o077:
        _tighten(path, st)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise UsageError(f"Cannot read the config file {path}: permission denied (run as its owner).") from exc
    except (OSError, ValueError) as exc:
        raise UsageError(f"The config file {path} is not valid JSON ({exc}); log in again to rewrite it.") from exc
    if not isinstance(data, dict):
        raise UsageError(f"The config file {path} does not hold a JSON object; log in again to rewrite it.")
    known = {name for name in Config.__dataclass_fields__ if name != "path"}
    return Config(path=path, **{k: v for k, v in data.items() if k in known})


def _tighten(path: Path, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    try:
        os.chmod(path, FILE_MODE)
    except OSError as exc:
        raise UsageError(
            f"The config file {path} holds the API token but is readable by others (mode {mode:04o}), "
            f"and its mode cannot be changed ({exc.strerror}). Run: chmod 600 {path}"
        ) from exc
    log.warning(
        "The config file %s was readable by others (mode %04o); it is now 0600. "
        "Its token may have been read: run `reclo-agent login` again to replace it.",
        path,
        mode,
    )


def save(config: Config) -> None:
    """Write ``config`` atomically with mode 0600 (never briefly wider)."""
    path = config.path
    try:
        path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # mkstemp creates the file 0600 from the start, so the token is
        # never on disk with a wider mode, whatever the umask.
        fd, tmp = tempfile.mkstemp(prefix=".agent-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(config.to_json(), f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise UsageError(f"Cannot write the config file {path}: {exc.strerror}.") from exc
