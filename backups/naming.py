"""Names the agent declares, and the object keys the portal builds from them.

Server and disk names end up inside S3 object keys, and those keys end up
inside IAM session policies. A name that carried a slash, `..`, a wildcard
(`*`, `?`) or a policy variable (`${...}`) could move a key out of the
tenant's prefix or widen a policy to other objects, so names are checked
against a small allow-list of characters rather than a deny-list, and keys
are only ever built here, from checked names and ids the portal made.
"""

import re
import uuid

# Letters, digits, '.', '_' and '-'; starts with a letter or digit; no "..".
# Long enough for host names and disk names (sda, nvme0n1, PhysicalDrive0).
NAME_MAX = 63
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
FILE_NAME_MAX = 255
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")

KEY_ROOT = "backups"
KEY_SUFFIX = ".vhd.zst"
# Retention writes the merged full of a chain beside the objects it
# replaces, so both exist until the merged one is verified.
MERGED_SUFFIX = ".merged.vhd.zst"


class InvalidName(ValueError):
    """A declared name the portal refuses; the message says what is allowed."""


def _check(value, pattern: re.Pattern, what: str, max_length: int) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        raise InvalidName(
            f"{what} must be 1–{max_length} characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'."
        )
    return value


def check_name(value, what: str = "name") -> str:
    """A server or disk name, unchanged, or InvalidName."""
    return _check(value, _NAME_RE, what, NAME_MAX)


def check_file_name(value) -> str:
    """The agent's file name of a restore point (kept for display), or InvalidName."""
    return _check(value, _FILE_NAME_RE, "file_name", FILE_NAME_MAX)


def tenant_prefix(user_id: int) -> str:
    """Everything a tenant owns in the bucket lives under this prefix."""
    if not isinstance(user_id, int) or isinstance(user_id, bool) or user_id <= 0:
        raise ValueError(f"user id must be a positive integer, not {user_id!r}")
    return f"{KEY_ROOT}/{user_id}/"


def backup_key(*, user_id: int, server: str, disk: str, backup_id: uuid.UUID, merged: bool = False) -> str:
    """`backups/<user id>/<server>/<disk>/<backup id>.vhd.zst`, from checked parts only.

    `merged` names the object retention writes when it folds this restore
    point into its chain's full (`<backup id>.merged.vhd.zst`).
    """
    if not isinstance(backup_id, uuid.UUID):
        raise TypeError("backup_id must be a UUID made by the portal")
    suffix = MERGED_SUFFIX if merged else KEY_SUFFIX
    return f"{tenant_prefix(user_id)}{check_name(server, 'server')}/{check_name(disk, 'disk')}/{backup_id}{suffix}"
