"""Small file-system helpers: atomic writes of state files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

STATE_DIR_MODE = 0o700


def write_json_atomic(path: Path, data) -> None:
    """Replace ``path`` with ``data`` as JSON, so a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
