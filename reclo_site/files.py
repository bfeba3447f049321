"""Private local files: ``var/`` holds the SQLite database (live sessions), keys and the broker.

Plain Python, so both the settings and ``make run`` (before Django is set
up) can use it.
"""

import os
import stat
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create `path` as a 0700 folder, or tighten an existing one of ours to 0700.

    A folder that is not ours, or is shared on purpose (sticky, like /tmp),
    is left as it is.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.geteuid() and not info.st_mode & stat.S_ISVTX and stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """Create `path` as an empty 0600 file, or tighten an existing one to 0600.

    Created before SQLite opens it, since SQLite makes new files with the
    umask's mode (usually 0644); its journal files copy the database's mode.
    """
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    if stat.S_IMODE(path.stat().st_mode) != 0o600:
        path.chmod(0o600)
    return path
