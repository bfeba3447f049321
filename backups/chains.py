"""Backup chains: a full restore point and the incrementals built on it.

Every walk over `Backup.parent` lives here: up a chain (what a restore,
failover or drill reads), down it (what a delete takes along) and across a
disk's history (how the server page groups restore points).
"""

from collections.abc import Iterable, Iterator, Mapping

from .models import Backup

# A chain longer than this is a bug or an attack, not a backup history.
MAX_CHAIN = 1000

# What readers of a chain need; `chain_of(..., fields=None)` loads whole rows.
READ_FIELDS = ("id", "user_id", "server_id", "disk", "parent_id", "kind", "key", "file_size", "sha256", "status",
               "failure", "virtual_size", "version_id", "etag", "deleted_at")  # fmt: skip


class ChainError(Exception):
    """The restore point cannot be restored: the reason, for the customer."""


def chain_of(backup: Backup, *, fields: Iterable[str] | None = READ_FIELDS) -> list[Backup]:
    """`backup` and its ancestors, base first, in one query (parents are on the same disk).

    The chain stops where a parent is not found (another disk's or gone);
    `restorable_chain` says whether that makes it unusable.
    """
    rows_query = Backup.objects.filter(server_id=backup.server_id, disk=backup.disk)
    if fields is not None:
        rows_query = rows_query.only(*fields)
    rows = {row.pk: row for row in rows_query}
    chain: list[Backup] = []
    for point in walk_up(rows.get(backup.pk, backup), rows):
        chain.append(point)
        if len(chain) > min(len(rows), MAX_CHAIN):
            raise ChainError("The backup chain is too long or loops.")
    chain.reverse()
    return chain


def walk_up(start: Backup, rows: Mapping) -> Iterator[Backup]:
    """`start`, then each parent found in `rows` (pk -> Backup of its disk), nearest first.

    Ends where a parent is not in `rows`; a caller that trusts no data
    bounds the walk (a parent loop never ends).
    """
    current: Backup | None = start
    while current is not None:
        yield current
        current = rows.get(current.parent_id) if current.parent_id else None


def restorable_chain(backup: Backup) -> list[Backup]:
    """The chain to read for `backup`, base first; ChainError if any link is unusable."""
    chain = chain_of(backup, fields=None)
    if chain[0].kind == Backup.Kind.INCREMENTAL:
        raise ChainError("A restore point this one builds on is missing.")
    for parent in chain[:-1]:
        if parent.status != Backup.Status.VERIFIED or parent.deleted_at is not None:
            raise ChainError("A restore point this one builds on is not verified.")
    if backup.status != Backup.Status.VERIFIED:
        raise ChainError("The restore point is not verified.")
    return chain


def descendants_of(backup: Backup, rows: Iterable[Backup]) -> list[tuple[int, Backup]]:
    """(depth, backup) of everything built on `backup`, from rows of its disk."""
    children: dict = {}
    for row in rows:
        children.setdefault(row.parent_id, []).append(row)
    found: list[tuple[int, Backup]] = []
    level, depth = [backup], 0
    while level:
        depth += 1
        level = [child for parent in level for child in children.get(parent.pk, [])]
        found.extend((depth, child) for child in level)
    return found


def group_into_chains(backups: Iterable[Backup]) -> dict[str, list[list[Backup]]]:
    """Disk -> its chains, oldest first, each base first, from backups in creation order.

    A restore point whose parent is not among `backups` (older than the
    window shown) starts a chain of its own.
    """
    by_disk: dict[str, list[list[Backup]]] = {}
    chain_by_pk: dict = {}
    for backup in backups:
        chain = chain_by_pk.get(backup.parent_id) if backup.parent_id else None
        if chain is None:
            chain = []
            by_disk.setdefault(backup.disk, []).append(chain)
        chain.append(backup)
        chain_by_pk[backup.pk] = chain
    return by_disk
