"""Which file systems are mounted from a disk: its own, its partitions', and what they hold.

A disk is in use when a file system on it is mounted: on the device itself,
on one of its partitions (``/sys/dev/block/M:m/<name>p1/partition``), or on a
device built on top of them (device-mapper, LVM, md: sysfs ``holders``).
An image file is in use when a loop device backed by it is. The mounts are
read from ``/proc/self/mountinfo`` (field 3 is the device number; btrfs and
others show an anonymous one, so the mount source is matched too).

Everything reads ``/proc`` and ``/sys`` only; the roots are parameters so
the tests can point them at files of their own.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    """One mounted file system: the device it is on, where, and its type."""

    device: str  # "major:minor"
    mount_point: str
    fs_type: str
    source: str  # the mount source as mountinfo gives it, e.g. /dev/loop0p1


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/self/mountinfo`` text."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(fields[2], _unescape(fields[4]), tail[0], _unescape(tail[1])))
    return mounts


def _majmin(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def related_devices(rdev: int, *, sys_dir: str = "/sys") -> set[str]:
    """``rdev`` and every device whose data lives on it: partitions, then holders of any of them."""
    found: set[str] = set()
    todo = [_majmin(rdev)]
    while todo:
        dev = todo.pop()
        if dev in found:
            continue
        found.add(dev)
        node = Path(sys_dir, "dev", "block", dev)
        if not node.exists():
            continue
        base = node.resolve()
        for child in base.iterdir():
            if (child / "partition").exists() and (child / "dev").exists():
                todo.append((child / "dev").read_text().strip())
        holders = base / "holders"
        if holders.is_dir():
            for holder in holders.iterdir():
                dev_file = Path(sys_dir, "class", "block", holder.name, "dev")
                if dev_file.exists():
                    todo.append(dev_file.read_text().strip())
    return found


def loop_devices_of(image: str, *, sys_dir: str = "/sys") -> list[int]:
    """Device numbers of the loop devices whose backing file is ``image``."""
    try:
        target = os.stat(image)
    except OSError:
        return []
    found = []
    for backing in Path(sys_dir, "block").glob("loop*/loop/backing_file"):
        name = backing.read_text().strip().removesuffix(" (deleted)")
        try:
            st = os.stat(name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            dev = (backing.parent.parent / "dev").read_text().strip()
            major, minor = dev.split(":")
            found.append(os.makedev(int(major), int(minor)))
    return found


def mounts_of(path: str, *, proc_dir: str = "/proc", sys_dir: str = "/sys") -> list[Mount]:
    """The file systems mounted from ``path`` (a block device or an image file), one per device.

    Bind mounts of the same file system are left out: freezing one freezes it.
    """
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        roots = [st.st_rdev]
    elif stat.S_ISREG(st.st_mode):
        roots = loop_devices_of(path, sys_dir=sys_dir)
    else:
        return []
    devices: set[str] = set()
    for root in roots:
        devices |= related_devices(root, sys_dir=sys_dir)
    if not devices:
        return []
    text = Path(proc_dir, "self", "mountinfo").read_text()
    result, seen = [], set()
    for mount in parse_mountinfo(text):
        device = mount.device
        if device not in devices and mount.source.startswith("/dev/"):
            try:
                sst = os.stat(mount.source)
            except OSError:
                continue
            if stat.S_ISBLK(sst.st_mode) and _majmin(sst.st_rdev) in devices:
                device = _majmin(sst.st_rdev)
        if device in devices and device not in seen:
            seen.add(device)
            result.append(Mount(device, mount.mount_point, mount.fs_type, mount.source))
    return result
