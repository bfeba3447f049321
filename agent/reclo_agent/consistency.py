"""How a backup reads its disk, and what that makes the restore point (its ``consistency``).

- ``offline``: an image file or a device nothing has mounted (see
  :mod:`.mounts`): nobody writes while it is read.
- ``snapshot``: an LVM logical volume in use whose volume group has free
  extents: the backup reads a snapshot (:mod:`.lvm`).
- ``frozen``: in use, and ``--freeze`` was given: its file systems are
  frozen for the read (:mod:`.freeze`).
- ``crash``: in use, read as it is while it changes: like the disk after a
  power cut. Journaling file systems recover from that, applications with
  open files may not; the log says so in one line, with what to do.

The decision is made before the upload starts (the portal records it);
:func:`reading` then carries it out around the read, with the hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from . import lvm
from .errors import DiskError
from .freeze import DEFAULT_LIMIT, Freezer, check_freezable
from .hooks import Hooks
from .mounts import Mount, mounts_of
from .source import Source

log = logging.getLogger(__name__)

SNAPSHOT, FROZEN, CRASH, OFFLINE = "snapshot", "frozen", "crash", "offline"
CHOICES = (SNAPSHOT, FROZEN, CRASH, OFFLINE)


@dataclass
class ReadPlan:
    consistency: str
    mounts: list[Mount] = field(default_factory=list)
    volume: lvm.Volume | None = None

    @property
    def mount_points(self) -> str:
        return ", ".join(m.mount_point for m in self.mounts)


def assess(source: str, *, freeze: bool, state_dir: str, lvm_run: lvm.Runner = lvm.run_command,
           proc_dir: str = "/proc", sys_dir: str = "/sys") -> ReadPlan:  # fmt: skip
    """Decide how to read ``source`` (see the module doc); UsageError when --freeze cannot be done."""
    mounts = mounts_of(source, proc_dir=proc_dir, sys_dir=sys_dir)
    if not mounts:
        return ReadPlan(OFFLINE)
    if lvm.is_logical_volume(source, sys_dir=sys_dir) and lvm.tools_present():
        try:
            volume = lvm.volume_info(source, lvm_run)
        except lvm.LVMError as exc:
            log.warning("cannot ask LVM about %s (%s); not using a snapshot", source, exc)
        else:
            if lvm.can_snapshot(volume):
                return ReadPlan(SNAPSHOT, mounts, volume)
            log.info("the volume group %s has no free extents: no snapshot of %s", volume.vg, source)
    if freeze:
        check_freezable(mounts, state_dir)
        return ReadPlan(FROZEN, mounts)
    plan = ReadPlan(CRASH, mounts)
    log.warning(
        "%s is in use (mounted at %s): this restore point is crash-consistent, like the disk after a power cut. "
        "For a consistent one, put the data on LVM with free extents in its volume group (the agent takes a "
        "snapshot), add --freeze for a small or quiet disk, or quiesce applications with --pre-hook/--post-hook.",
        source,
        plan.mount_points,
    )
    return plan


@contextmanager
def reading(plan: ReadPlan, src: Source, hooks: Hooks, *, freeze_limit: float = DEFAULT_LIMIT,
            lvm_run: lvm.Runner = lvm.run_command) -> Iterator[Source]:  # fmt: skip
    """Yield the Source to read for ``plan``: the snapshot's, or ``src`` (frozen, or as it is).

    The hooks run around the moment the disk is captured: for a snapshot
    the post-hook runs as soon as it is taken (the applications need not
    wait for the whole read); otherwise around the whole read.
    """
    if plan.consistency == SNAPSHOT:
        assert plan.volume is not None  # a snapshot plan names its volume
        with ExitStack() as stack:
            with hooks.around():
                path = stack.enter_context(lvm.snapshot(plan.volume, lvm_run))
            snap = stack.enter_context(Source(path))
            if snap.size != src.size:
                raise DiskError(f"The snapshot {path} is {snap.size} bytes, the volume {src.size}.")
            yield snap
        return
    if plan.consistency == FROZEN:

        def expired() -> None:
            src.interrupt(DiskError(
                f"The freeze of {plan.mount_points} reached its limit of {freeze_limit:.0f} s before the disk "
                "was read, so it was thawed and this backup stopped (it would not be of one moment). Raise "
                "--freeze-limit, back up a quieter moment, or use an LVM snapshot."
            ))  # fmt: skip

        with hooks.around():
            freezer = Freezer(plan.mounts, limit=freeze_limit, on_expire=expired)
            with freezer:
                yield src
            if freezer.expired:
                expired()
                src.read_at(0, 1)  # raises the error above
        return
    with hooks.around():
        yield src
