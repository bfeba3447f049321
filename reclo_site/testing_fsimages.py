"""Partitioned disk images with real file systems, for the file browser's tests and bench.

:func:`fs_disks` builds two versions of two disks from two file trees
(:data:`TREE_V1`, :data:`TREE_V2`: the second changes one file, deletes
one and adds one), each disk in a partition table:

- ``gpt``: GPT, partition 1 ext4 (``mkfs.ext4 -d``), partition 2 XFS
  (``mkfs.xfs -p`` with a proto file);
- ``mbr``: MBR, partition 1 FAT32 (``mkfs.vfat`` + ``mcopy``), partition 2
  NTFS (``mkfs.ntfs``, filled through ntfs-3g's FUSE driver).

Nothing is parsed by hand: the file systems are made by Debian's own tools
(e2fsprogs, xfsprogs, dosfstools, mtools, ntfs-3g) and the tables by
``sfdisk``. The images are cached under ``~/.cache/reclo/fsimages/<key>/``
(``RECLO_FSIMAGES_CACHE`` overrides), the key being a hash of the recipe and
the trees, so only the first run builds them (about ten seconds).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

RECIPE = "1"
MiB = 1024 * 1024
SECTOR = 512
FIRST = 2048  # partitions start at 1 MiB

# path -> (content seed and size, mode, mtime); a size of -1 is a folder.
TREE_V1 = {
    "docs": (-1, 0o755, 1_600_000_000),
    "docs/invoice 2024.txt": (1_000, 0o640, 1_700_000_000),
    "docs/scan.bin": (3 * MiB + 123, 0o600, 1_650_000_000),
    "docs/old": (-1, 0o750, 1_600_000_100),
    "docs/old/letter.txt": (5_000, 0o644, 1_500_000_000),
    "readme.txt": (300, 0o644, 1_710_000_000),
    "empty.txt": (0, 0o644, 1_710_000_001),
    "Ünïcode café.txt": (700, 0o644, 1_710_000_002),
    "delete-me.txt": (2_000, 0o644, 1_710_000_003),
}
TREE_V2 = {
    **{k: v for k, v in TREE_V1.items() if k != "delete-me.txt"},
    "docs/invoice 2024.txt": (1_500, 0o640, 1_720_000_000),  # changed
    "new.txt": (900, 0o644, 1_720_000_001),  # added
}
DELETED = "delete-me.txt"


def content(path: str, size: int, version: int) -> bytes:
    """The bytes of `path` in a tree version (text for .txt, random otherwise)."""
    rnd = random.Random(f"{path}:{size}:{version if path == 'docs/invoice 2024.txt' else 0}")
    if path.endswith(".txt"):
        words = [f"line {i} of {path} " for i in range(size // 10 + 1)]
        return "".join(words).encode()[:size]
    return rnd.randbytes(size)


def write_tree(root: Path, tree: dict, version: int) -> None:
    """Materialise a tree under `root` with its modes and times."""
    for path, (size, _mode, _mtime) in sorted(tree.items()):
        target = root / path
        if size < 0:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content(path, size, version))
    for path, (_size, mode, mtime) in sorted(tree.items(), key=lambda kv: -kv[0].count("/")):
        os.chmod(root / path, mode)
        os.utime(root / path, (mtime, mtime))


def _run(cmd: list[str], **kwargs) -> None:
    subprocess.run(cmd, check=True, capture_output=True, **kwargs)


def _ext4(tree: Path, out: Path, mib: int) -> None:
    _run(["truncate", "-s", f"{mib}M", str(out)])
    _run(["mkfs.ext4", "-q", "-F", "-L", "data", "-E", "root_owner=0:0", "-d", str(tree), str(out)])


def xfs_name(name: str) -> str:
    """A proto file cannot name a file with a space: on the XFS partition spaces are underscores."""
    return name.replace(" ", "_")


def _xfs(tree: Path, out: Path, mib: int) -> None:
    # mkfs.xfs -p reads a proto file: one line per entry, folders nested, "$" closing each.
    lines = ["reclo", "0 0", "d--755 0 0"]
    staged = out.parent / "xfs-src"  # source paths may not hold spaces either
    staged.mkdir(exist_ok=True)

    def walk(folder: Path, depth: int) -> None:
        for child in sorted(folder.iterdir()):
            mode = oct(child.stat().st_mode & 0o777)[2:]
            if child.is_dir():
                lines.append(f"{xfs_name(child.name)} d--{mode} 0 0")
                walk(child, depth + 1)
                lines.append("$")
            else:
                copy = staged / str(len(lines))
                shutil.copyfile(child, copy)
                lines.append(f"{xfs_name(child.name)} ---{mode} 0 0 {copy}")

    walk(tree, 0)
    lines.append("$")
    proto = out.with_suffix(".proto")
    proto.write_text("\n".join(lines) + "\n")
    _run(["truncate", "-s", f"{mib}M", str(out)])
    _run(["mkfs.xfs", "-q", "-f", "-L", "data", "-p", str(proto), str(out)])
    proto.unlink()
    shutil.rmtree(staged)
    # Proto files set no times: set them with xfs_io? It cannot on an image; the XFS side checks bytes and
    # modes, times are checked on ext4 (mkfs.ext4 -d keeps them), FAT and NTFS.


def _fat(tree: Path, out: Path, mib: int) -> None:
    _run(["truncate", "-s", f"{mib}M", str(out)])
    _run(["mkfs.vfat", "-F", "32", "-n", "DATA", str(out)])
    # mcopy -m keeps the modification times.
    _run(["mcopy", "-s", "-m", "-i", str(out), *[str(p) for p in sorted(tree.iterdir())], "::/"],
         env={**os.environ, "MTOOLS_NO_VFAT": "0", "MTOOLS_SKIP_CHECK": "1"})  # fmt: skip


def _ntfs(tree: Path, out: Path, mib: int) -> None:
    _run(["truncate", "-s", f"{mib}M", str(out)])
    _run(["mkfs.ntfs", "-q", "-F", "-f", "-L", "data", str(out)])
    mnt = Path(tempfile.mkdtemp(prefix="reclo-files-ntfs-"))
    try:
        _run(["ntfs-3g", str(out), str(mnt)])
        try:
            _run(["cp", "-a", "--no-preserve=ownership", *[str(p) for p in sorted(tree.iterdir())], str(mnt)])
        finally:
            _run(["fusermount", "-u", str(mnt)])
    finally:
        mnt.rmdir()


def _disk(out: Path, label: str, parts: list[tuple[Path, str]]) -> None:
    """A disk holding `parts` (image, sfdisk type) one after another, with a `label` (gpt/dos) table."""
    sizes = [p.stat().st_size // SECTOR for p, _ in parts]
    total = FIRST + sum(sizes) + 2048 + 34
    _run(["truncate", "-s", str(total * SECTOR), str(out)])
    script = [f"label: {label}", ""]
    start = FIRST
    for (_, kind), size in zip(parts, sizes, strict=True):
        script.append(f"start={start}, size={size}, type={kind}")
        start += size
    _run(["sfdisk", "-q", str(out)], input="\n".join(script).encode())
    start = FIRST
    for (image, _), size in zip(parts, sizes, strict=True):
        _run(["dd", f"if={image}", f"of={out}", "bs=1M", f"seek={start * SECTOR}", "oflag=seek_bytes",
              "conv=notrunc,sparse", "status=none"])  # fmt: skip
        start += size


def cache_root() -> Path:
    if os.environ.get("RECLO_FSIMAGES_CACHE"):
        return Path(os.environ["RECLO_FSIMAGES_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reclo" / "fsimages"


TOOLS = ("mkfs.ext4", "mkfs.xfs", "mkfs.vfat", "mcopy", "mkfs.ntfs", "ntfs-3g", "fusermount", "sfdisk")


def fs_disks() -> dict[str, Path]:
    """`{"gpt-1", "gpt-2", "mbr-1", "mbr-2"}` -> the cached raw images (see the module doc)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"building the file system images needs {', '.join(missing)}")
    key = hashlib.sha256(json.dumps([RECIPE, TREE_V1, TREE_V2]).encode()).hexdigest()[:16]
    folder = cache_root() / key
    names = ["gpt-1", "gpt-2", "mbr-1", "mbr-2"]
    paths = {n: folder / f"{n}.img" for n in names}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build once
        if all(p.exists() for p in paths.values()):
            return paths
        with tempfile.TemporaryDirectory(prefix="reclo-files-build-") as tmp:
            work = Path(tmp)
            for version, tree in ((1, TREE_V1), (2, TREE_V2)):
                src = work / f"tree{version}"
                write_tree(src, tree, version)
                _ext4(src, work / "ext4.img", 24)
                _xfs(src, work / "xfs.img", 300)
                _disk(work / "gpt.img", "gpt", [(work / "ext4.img", "linux"), (work / "xfs.img", "linux")])
                _fat(src, work / "fat.img", 40)
                _ntfs(src, work / "ntfs.img", 24)
                _disk(work / "mbr.img", "dos", [(work / "fat.img", "c"), (work / "ntfs.img", "7")])
                os.replace(work / "gpt.img", paths[f"gpt-{version}"])
                os.replace(work / "mbr.img", paths[f"mbr-{version}"])
    return paths


def _exfat(tree: Path, out: Path, mib: int) -> None:
    # exFAT has no user-space writer that works on a file: exfat-fuse needs a block device, so the image is
    # attached to a loop device (made and detached here) and filled through the FUSE driver.
    _run(["truncate", "-s", f"{mib}M", str(out)])
    _run(["mkfs.exfat", "-L", "data", str(out)])
    loop = subprocess.run(["losetup", "-f", "--show", str(out)], check=True, capture_output=True, text=True)
    device = loop.stdout.strip()
    mnt = Path(tempfile.mkdtemp(prefix="reclo-files-exfat-"))
    try:
        _run(["mount.exfat-fuse", device, str(mnt)])
        try:
            _run(["cp", "-r", "--preserve=timestamps", *[str(p) for p in sorted(tree.iterdir())], str(mnt)])
        finally:
            _run(["fusermount", "-u", str(mnt)])
    finally:
        mnt.rmdir()
        _run(["losetup", "-d", device])


def exfat_disk() -> Path:
    """A GPT disk with one exFAT partition holding TREE_V1 (cached; needs root for the loop device)."""
    for tool in ("mkfs.exfat", "mount.exfat-fuse", "losetup", "fusermount", "sfdisk"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building the exFAT image needs {tool}")
    key = hashlib.sha256(json.dumps([RECIPE, "exfat", TREE_V1]).encode()).hexdigest()[:16]
    folder = cache_root() / key
    path = folder / "exfat-1.img"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        with tempfile.TemporaryDirectory(prefix="reclo-files-build-") as tmp:
            work = Path(tmp)
            write_tree(work / "tree", TREE_V1, 1)
            _exfat(work / "tree", work / "exfat.img", 24)
            _disk(work / "disk.img", "gpt", [(work / "exfat.img", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7")])
            os.replace(work / "disk.img", path)
    return path


# What each partition of the disks holds.
LAYOUT = {"gpt": {1: "ext4", 2: "xfs"}, "mbr": {1: "fat32", 2: "ntfs"}}


def expected_files(version: int, filesystem: str = "") -> dict[str, bytes]:
    """path (no leading slash) -> bytes of every file of a tree version (as named on `filesystem`)."""
    tree = TREE_V1 if version == 1 else TREE_V2
    rename = xfs_name if filesystem == "xfs" else (lambda p: p)
    return {rename(p): content(p, size, version) for p, (size, _m, _t) in tree.items() if size >= 0}


if __name__ == "__main__":
    for name, path in fs_disks().items():
        print(name, path)
