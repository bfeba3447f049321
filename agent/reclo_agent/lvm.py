"""LVM snapshots: read a logical volume in use as it was at one moment.

When the source is an LVM logical volume and its volume group has free
extents, the backup reads a snapshot instead of the live volume:

1. ``lvs`` tells the volume's group and name, and the group's free extents;
2. a snapshot left by an earlier run that was killed (named
   ``reclo-snap-<volume>``, with this volume as its origin) is removed;
3. ``lvcreate --snapshot`` takes the new one, as large as the free extents
   allow up to the volume's own size (a snapshot that fills up becomes
   invalid and its reads fail, so the backup fails rather than lie);
4. the backup reads ``/dev/<group>/<snapshot>``;
5. ``lvremove`` drops it on every exit path (the ``with`` block's end, an
   exception, Ctrl-C, SIGTERM turned into an exception); a SIGKILL leaves
   it for the next run's step 2.

Every command goes through one ``run`` callable (argv in, stdout out), so
the tests check the commands as built, in order, on each exit path.
Device-mapper is missing on the machines this project is developed and
tested on: this module has not been run against a real LVM.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import DiskError

log = logging.getLogger(__name__)

SNAP_PREFIX = "reclo-snap-"
MIN_EXTENTS = 1
Runner = Callable[[list[str]], str]


class LVMError(DiskError):
    """An LVM command failed; the message has its error output."""


def run_command(argv: list[str]) -> str:
    """Run one LVM command; its stdout, or LVMError with what it printed."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LVMError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LVMError(f"{' '.join(argv[:2])} failed (exit {done.returncode}): {detail[-1] if detail else ''}")
    return done.stdout


@dataclass(frozen=True)
class Volume:
    vg: str
    lv: str
    size_extents: int
    vg_free_extents: int

    @property
    def snapshot_name(self) -> str:
        return f"{SNAP_PREFIX}{self.lv}"[:127]

    @property
    def snapshot_path(self) -> str:
        return f"/dev/{self.vg}/{self.snapshot_name}"


def is_logical_volume(path: str, *, sys_dir: str = "/sys") -> bool:
    """Whether ``path`` is a device-mapper device made by LVM (its dm uuid starts ``LVM-``)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISBLK(st.st_mode):
        return False
    uuid = Path(sys_dir, "dev", "block", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", "dm", "uuid")
    try:
        return uuid.read_text().startswith("LVM-")
    except OSError:
        return False


def tools_present() -> bool:
    return all(shutil.which(tool) for tool in ("lvs", "lvcreate", "lvremove"))


def info_command(path: str) -> list[str]:
    return ["lvs", "--noheadings", "--separator", "|", "--units", "b", "--nosuffix",
            "-o", "vg_name,lv_name,lv_size,vg_extent_size,vg_free_count", path]  # fmt: skip


def volume_info(path: str, run: Runner = run_command) -> Volume:
    """The group, name, size and the group's free extents of the volume at ``path``."""
    out = run(info_command(path)).strip()
    try:
        vg, lv, size, extent, free = (part.strip() for part in out.splitlines()[0].split("|"))
        return Volume(vg, lv, int(size) // int(extent), int(free))
    except (ValueError, IndexError) as exc:
        raise LVMError(f"lvs gave an answer the agent does not understand for {path}: {out!r}") from exc


def leftovers_command(volume: Volume) -> list[str]:
    return ["lvs", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name,origin", volume.vg]


def create_command(volume: Volume, extents: int) -> list[str]:
    return ["lvcreate", "--snapshot", "--name", volume.snapshot_name, "--extents", str(extents),
            f"{volume.vg}/{volume.lv}"]  # fmt: skip


def remove_command(vg: str, name: str) -> list[str]:
    return ["lvremove", "--yes", "--force", f"{vg}/{name}"]


def snapshot_extents(volume: Volume) -> int:
    """Extents for the snapshot: all the group's free ones, at most the volume's own size."""
    return min(volume.vg_free_extents, volume.size_extents)


def can_snapshot(volume: Volume) -> bool:
    return snapshot_extents(volume) >= MIN_EXTENTS


def remove_leftovers(volume: Volume, run: Runner = run_command) -> list[str]:
    """Remove the snapshots of this volume that a killed run left; their names."""
    removed = []
    for line in run(leftovers_command(volume)).splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[1].startswith(SNAP_PREFIX) and parts[2] == volume.lv:
            log.info("removing the snapshot %s/%s an earlier run left", parts[0], parts[1])
            run(remove_command(parts[0], parts[1]))
            removed.append(parts[1])
    return removed


@contextmanager
def snapshot(volume: Volume, run: Runner = run_command) -> Iterator[str]:
    """A snapshot of ``volume`` for the block; yields its device path. Removed on every exit."""
    remove_leftovers(volume, run)
    extents = snapshot_extents(volume)
    if extents < MIN_EXTENTS:
        raise LVMError(f"The volume group {volume.vg} has no free extents for a snapshot of {volume.lv}.")
    created = False
    try:
        run(create_command(volume, extents))
        created = True
        log.info("took the snapshot %s (%d extents) of %s/%s", volume.snapshot_path, extents, volume.vg, volume.lv)
        yield volume.snapshot_path
    finally:
        # Also after a failed lvcreate: it may have left the volume half made.
        try:
            run(remove_command(volume.vg, volume.snapshot_name))
        except LVMError as exc:
            log.log(logging.WARNING if created else logging.DEBUG,
                    "could not remove the snapshot %s (%s); the next backup removes it",
                    volume.snapshot_path, exc)  # fmt: skip
