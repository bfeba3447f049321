"""Real disks for the agent's tests: an image with a partition table and ext4, on a loop device.

:func:`attached_disk` builds a disk image (``sfdisk``: one Linux partition
at 1 MiB; ``mkfs.ext4 -d`` fills it from a folder), attaches it with
``losetup -P``, mounts the partition and yields its paths. Every exit path
(a failing assertion, an exception, Ctrl-C) thaws, unmounts and detaches,
so a failing test leaves no mount or loop device behind.

These need root, loop devices and util-linux/e2fsprogs: locally a missing
one skips the test, under ``CI=true`` it fails it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
MiB = 1024 * 1024
PART_START = MiB  # the partition's first byte in the image
TOOLS = ("losetup", "sfdisk", "mkfs.ext4", "debugfs", "e2fsck", "mount", "umount", "fsfreeze", "blockdev", "partx")


def require_loop_devices() -> None:
    """Skip (locally) or fail (CI) unless root with loop devices and the disk tools."""
    problems = [f"{tool} is not installed" for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append("loop devices and mounts need root")
    elif not os.path.exists("/dev/loop-control"):
        problems.append("no /dev/loop-control (loop devices)")
    if problems:
        message = "; ".join(problems) + " (Debian: util-linux, fdisk, e2fsprogs)"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: the CI machine must provide it)", pytrace=False)
        pytest.skip(message)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=120)


def build_image(image: Path, root: Path, *, size: int = 64 * MiB, boot_code: bytes | None = None) -> None:
    """A disk image: an MBR with one ext4 partition from 1 MiB to the end, holding ``root``'s files.

    ``boot_code`` (at most 440 bytes) goes where a BIOS boot loader's first
    stage lives, before the partition table.
    """
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--quiet", str(image)], input="label: dos\nstart=2048, type=83\n", text=True,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    part = image.with_suffix(".part")
    with open(part, "wb") as f:
        f.truncate(size - PART_START)
    run("mkfs.ext4", "-q", "-F", "-L", "reclo-test", "-d", str(root), str(part))
    with open(part, "rb") as src, open(image, "r+b") as dst:
        dst.seek(PART_START)
        shutil.copyfileobj(src, dst, MiB)
        if boot_code is not None:
            assert len(boot_code) <= 440
            dst.seek(0)
            dst.write(boot_code)
    part.unlink()


def _partition_node(device: str) -> str:
    node = f"{device}p1"
    if not os.path.exists(node):
        # A kernel built without partition-table parsers (CONFIG_MSDOS_PARTITION
        # off, as on these machines) finds no partition at `losetup -P`;
        # partx reads the table itself and adds the partition (BLKPG).
        run("partx", "--add", device)
        for _ in range(50):
            if os.path.exists(node):
                break
            time.sleep(0.1)
    if not os.path.exists(node):
        pytest.fail(f"{device} has no partition device {node} after losetup -P and partx --add")
    return node


def _unmount(mount: Path) -> None:
    run("fsfreeze", "--unfreeze", str(mount), check=False)  # a test that died while frozen
    for _ in range(20):
        if run("umount", str(mount), check=False).returncode == 0:
            return
        time.sleep(0.2)
    run("umount", "--lazy", str(mount), check=False)


@contextmanager
def attached_disk(tmp_path: Path, files: dict[str, bytes], *, size: int = 64 * MiB, boot_code: bytes | None = None,
                  read_only: bool = False):  # fmt: skip
    """Yield ``SimpleNamespace(image, device, partition, mount)`` with ``files`` in the mounted partition."""
    require_loop_devices()
    root = tmp_path / "root"
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    root.mkdir(exist_ok=True)
    image = tmp_path / "disk.img"
    build_image(image, root, size=size, boot_code=boot_code)
    mount = tmp_path / "mnt"
    mount.mkdir()
    with ExitStack() as stack:
        device = run("losetup", "--find", "--show", "--partscan", str(image)).stdout.strip()
        stack.callback(run, "losetup", "--detach", device, check=False)
        partition = _partition_node(device)
        run("mount", "-t", "ext4", *(["-o", "ro"] if read_only else []), partition, str(mount))
        stack.callback(_unmount, mount)
        yield SimpleNamespace(image=image, device=device, partition=partition, mount=mount)


def write_synced(path: Path, data: bytes) -> None:
    """Write a file and make it durable (fsync of the file and its folder)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_disk_frozen(device: str) -> bytes:
    """What ``device`` holds: its buffers flushed (``blockdev --flushbufs``), then read."""
    run("blockdev", "--flushbufs", device)
    with open(device, "rb") as f:
        return f.read()


@contextmanager
def frozen(mount: Path):
    """The file system at ``mount`` frozen (``fsfreeze -f``) for the block; thawed on every exit."""
    run("fsfreeze", "--freeze", str(mount))
    try:
        yield
    finally:
        run("fsfreeze", "--unfreeze", str(mount), check=False)
