"""Server and disk names, as the portal accepts them.

The portal puts them into object keys and IAM policies, so it allows only
1-63 letters, digits, ``.``, ``_`` and ``-``, starting with a letter or
digit, without ``..``. Names given with ``--server``/``--disk`` must already
be like that (a silently changed name would start a new chain); the
defaults -- the host name and the source's file name -- are made so.
"""

from __future__ import annotations

import os
import re
import socket

from .errors import UsageError

_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check(value: str, what: str) -> str:
    if not _VALID.fullmatch(value or "") or ".." in value:
        raise UsageError(
            f"{what} {value!r} is not allowed: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'."
        )
    return value


def sanitize(value: str, fallback: str) -> str:
    """``value`` made acceptable: other characters become ``-``."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", value)
    value = re.sub(r"\.{2,}", ".", value)
    value = value.lstrip("._-")[:63].rstrip("._-")
    return value or fallback


def default_server() -> str:
    return sanitize(socket.gethostname().split(".")[0], "server")


def default_disk(source: str) -> str:
    """``/dev/sda`` -> ``sda``, ``/srv/images/disk0.img`` -> ``disk0.img``."""
    return sanitize(os.path.basename(os.path.normpath(source)), "disk")
