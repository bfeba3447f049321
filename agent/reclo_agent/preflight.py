"""Will this server boot on EC2? A read-only check the agent runs with each backup on Linux.

EC2 presents disks as NVMe and networks through ENA, so a server whose
initramfs lacks the NVMe driver does not find its root disk there, and one
whose ``/etc/fstab`` names disks by device (``/dev/sda1``) waits for a disk
that has another name. The checks, each ``pass``, ``fail`` or ``unknown``
with a detail and, for a failure, the fix:

- ``nvme``: the NVMe driver built into the kernel (``modules.builtin``) or
  in the initramfs (read here: newc cpio archives, plain or gzip, xz,
  zstd, bzip2 or lz4 compressed, as Debian's, Ubuntu's and Red Hat's are);
- ``ena``: the ENA network driver built in, in the initramfs, or a module
  the system loads after boot;
- ``fstab``: every disk in ``/etc/fstab`` named by UUID, LABEL (or
  PARTUUID/PARTLABEL, a ``/dev/disk/by-*`` link, an LVM or md name);
- ``boot_mode``: BIOS or UEFI (``/sys/firmware/efi``), which the cloud VM
  must be started with;
- ``boot_loader``: for BIOS, boot code in the disk's first sector; for
  UEFI, an ``.efi`` loader on the EFI system partition.

Nothing of the server's is written, mounted or loaded: only files are read.
The one write is the agent's own: given a ``cache_dir`` (its state folder),
the initramfs listing is kept there, keyed by the file's path, size and
modification time, since unpacking the archive costs about a third of a
second of every backup and the file changes only with a kernel update. ``root``,
``sys_dir`` and ``disk`` are parameters, so the tests check a disk image's
root file system.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

PASS, FAIL, UNKNOWN = "pass", "fail", "unknown"
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
STABLE_PREFIXES = ("UUID=", "LABEL=", "PARTUUID=", "PARTLABEL=", "/dev/disk/by-", "/dev/mapper/", "/dev/md")
DEVICE_NAME = re.compile(r"^/dev/(sd[a-z]+|hd[a-z]+|vd[a-z]+|xvd[a-z]+|nvme\d+n\d+|mmcblk\d+)(p?\d+)?$")
NOT_DISKS = {"proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "nfs", "nfs4", "cifs", "none", "swap-file"}


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


# --- reading an initramfs -------------------------------------------------------------


def _decompressor(head: bytes, data: BinaryIO):
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=data)
    if head.startswith(b"\xfd7zXZ") or head.startswith(b"\x5d\x00\x00"):
        return lzma.LZMAFile(data)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        import pyzstd

        return pyzstd.ZstdFile(data)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(data)
    if head.startswith(b"\x02\x21\x4c\x18") or head.startswith(b"\x04\x22\x4d\x18"):
        if shutil.which("lz4") is None:
            raise ValueError("the initramfs is lz4-compressed and lz4 is not installed")
        out = subprocess.run(["lz4", "-dc"], input=data.read(), capture_output=True, check=True, timeout=300)
        return io.BytesIO(out.stdout)
    raise ValueError(f"unknown initramfs format (starts {head[:6].hex()})")


def _cpio_names(stream) -> tuple[list[str], bool]:
    """The names in newc cpio archives read from ``stream``; (names, whether a trailer ended it)."""
    names: list[str] = []
    while True:
        header = stream.read(110)
        while header and header[0] == 0:  # cpio pads archives to 512 bytes with zeros
            header = header.lstrip(b"\0")
            header += stream.read(110 - len(header))
        if len(header) < 110:
            return names, False
        if header[:6] not in (b"070701", b"070702"):
            raise ValueError("not a newc cpio archive")
        size, namesize = int(header[54:62], 16), int(header[94:102], 16)
        name = stream.read(namesize)[:-1].decode("utf-8", "replace")
        _skip(stream, (-(110 + namesize)) % 4 + size + (-size) % 4)
        if name == "TRAILER!!!":
            return names, True
        names.append(name)


def _skip(stream, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


def initramfs_files(path: Path) -> list[str]:
    """Every file name in an initramfs: plain cpio segments (early microcode) then a compressed one."""
    data = path.read_bytes()
    names: list[str] = []
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:  # padding between segments
            pos += 1
        if pos >= len(data):
            break
        if data[pos : pos + 6] in (b"070701", b"070702"):
            stream = io.BytesIO(data)
            stream.seek(pos)
            found, _ = _cpio_names(stream)
            names += found
            pos = stream.tell()
            continue
        stream = _decompressor(data[pos : pos + 6], io.BytesIO(data[pos:]))
        while True:
            found, more = _cpio_names(stream)
            names += found
            if not more:
                break
        break
    return names


def initramfs_files_cached(path: Path, cache_dir: Path | None) -> list[str]:
    """:func:`initramfs_files`, kept in ``cache_dir`` until the file's size or modification time changes."""
    if cache_dir is None:
        return initramfs_files(path)
    stat = path.stat()
    identity = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = cache_dir / "initramfs-names.json"
    try:
        kept = json.loads(cache.read_text())
        if kept.get("identity") == identity and isinstance(kept.get("names"), list):
            return [str(name) for name in kept["names"]]
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: list it again
    names = initramfs_files(path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".tmp")
        partial.write_text(json.dumps({"identity": identity, "names": names}))
        partial.replace(cache)
    except OSError:
        pass  # a cache we cannot write costs time, not the check
    return names


# --- the checks -------------------------------------------------------------------------


def _modules_dir(root: Path, kernel: str) -> Path | None:
    for base in ("lib/modules", "usr/lib/modules"):
        path = root / base / kernel
        if path.is_dir():
            return path
    return None


def find_kernel(root: Path) -> str | None:
    """The newest kernel version with a modules folder under ``root``."""
    versions = set()
    for base in ("lib/modules", "usr/lib/modules"):
        folder = root / base
        if folder.is_dir():
            versions |= {p.name for p in folder.iterdir() if p.is_dir()}

    def key(v: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)]

    return max(versions, key=key) if versions else None


def find_initramfs(root: Path, kernel: str) -> Path | None:
    for name in (f"initrd.img-{kernel}", f"initramfs-{kernel}.img", f"initrd-{kernel}", f"initramfs-{kernel}"):
        path = root / "boot" / name
        if path.is_file():
            return path
    return None


def _has_module(names, module: str) -> bool:
    wanted = {module + s for s in MODULE_SUFFIXES}
    return any(n.rsplit("/", 1)[-1] in wanted for n in names)


def _driver_checks(root: Path, kernel: str | None, cache_dir: Path | None = None) -> list[Check]:
    if kernel is None:
        reason = "no kernel modules folder (lib/modules/VERSION) was found"
        return [Check("nvme", UNKNOWN, reason), Check("ena", UNKNOWN, reason)]
    modules = _modules_dir(root, kernel)
    builtin_file = modules / "modules.builtin" if modules else None
    builtin = builtin_file.read_text().split() if builtin_file and builtin_file.is_file() else []
    initramfs = find_initramfs(root, kernel)
    in_initramfs: list[str] = []
    initramfs_problem = ""
    if initramfs is None:
        initramfs_problem = f"no initramfs for kernel {kernel} in /boot"
    else:
        try:
            in_initramfs = initramfs_files_cached(initramfs, cache_dir)
        except (ValueError, OSError, EOFError, lzma.LZMAError, subprocess.SubprocessError) as exc:
            initramfs_problem = f"cannot read {initramfs.name}: {exc}"
    on_disk = [p.name for p in modules.rglob("ena.ko*")] if modules else []
    checks = []

    if _has_module(builtin, "nvme"):
        checks.append(Check("nvme", PASS, f"the NVMe driver is built into kernel {kernel}"))
    elif _has_module(in_initramfs, "nvme"):
        checks.append(Check("nvme", PASS, f"the NVMe driver is in the initramfs of kernel {kernel}"))
    elif initramfs_problem and initramfs is not None:
        checks.append(Check("nvme", UNKNOWN, initramfs_problem))
    else:
        checks.append(Check(
            "nvme", FAIL,
            f"the NVMe driver is neither built into kernel {kernel} nor in its initramfs"
            + (f" ({initramfs_problem})" if initramfs_problem else "")
            + ": on EC2 the server would not find its root disk",
            "Debian/Ubuntu: add the line `nvme` to /etc/initramfs-tools/modules and run `update-initramfs -u`; "
            "Red Hat: `dracut --add-drivers nvme -f`.",
        ))  # fmt: skip

    if _has_module(builtin, "ena"):
        checks.append(Check("ena", PASS, f"the ENA network driver is built into kernel {kernel}"))
    elif _has_module(in_initramfs, "ena"):
        checks.append(Check("ena", PASS, f"the ENA network driver is in the initramfs of kernel {kernel}"))
    elif on_disk:
        checks.append(Check("ena", PASS, f"the ENA network driver is a module of kernel {kernel}, loaded at boot"))
    else:
        checks.append(Check(
            "ena", FAIL,
            f"kernel {kernel} has no ENA network driver: on EC2 the server would have no network",
            "Install a kernel that has it (Debian's and Ubuntu's stock kernels do) or the amazon-ena driver "
            "package, then `update-initramfs -u` (Red Hat: `dracut -f`).",
        ))  # fmt: skip
    return checks


def fstab_check(root: Path) -> Check:
    fstab = root / "etc" / "fstab"
    if not fstab.is_file():
        return Check("fstab", FAIL, "there is no /etc/fstab", "Create /etc/fstab naming the root file system by UUID.")
    bad = []
    for line in fstab.read_text(errors="replace").splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3 or fields[2] in NOT_DISKS or fields[0].startswith(STABLE_PREFIXES):
            continue
        if DEVICE_NAME.match(fields[0]):
            bad.append((fields[0], fields[1]))
    if not bad:
        return Check("fstab", PASS, "/etc/fstab names its disks by UUID or LABEL")
    listed = ", ".join(f"{dev} ({where})" for dev, where in bad)
    first = bad[0][0]
    return Check(
        "fstab",
        FAIL,
        f"/etc/fstab names disks by device: {listed}; on EC2 the disks have other names",
        f"Replace each device name by its UUID: `blkid {first}` prints it; write `UUID=...` instead of {first}.",
    )


def boot_mode(sys_dir: Path) -> str:
    return "uefi" if (sys_dir / "firmware" / "efi").is_dir() else "bios"


def boot_loader_check(root: Path, mode: str, disk: str | None) -> Check:
    if mode == "uefi":
        loaders = []
        for esp in (root / "boot" / "efi" / "EFI", root / "efi" / "EFI", root / "boot" / "EFI"):
            if esp.is_dir():
                loaders += [p for p in esp.rglob("*") if p.suffix.lower() == ".efi"]
        if loaders:
            return Check("boot_loader", PASS, f"UEFI loader {loaders[0].relative_to(root)} on the EFI system partition")
        return Check(
            "boot_loader", FAIL, "no .efi boot loader under /boot/efi/EFI (is the EFI system partition mounted?)",
            "Mount the EFI system partition on /boot/efi and run `grub-install --target=x86_64-efi`.",
        )  # fmt: skip
    if disk is None:
        return Check("boot_loader", UNKNOWN, "the disk holding / was not found, so its boot sector was not read")
    try:
        with open(disk, "rb") as f:
            sector = f.read(512)
    except OSError as exc:
        return Check("boot_loader", UNKNOWN, f"cannot read the boot sector of {disk}: {exc.strerror}")
    fix = f"Install the boot loader on the whole disk: `grub-install {disk}`."
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return Check("boot_loader", FAIL, f"{disk} has no boot sector (no MBR signature)", fix)
    if not any(sector[:440]):
        return Check("boot_loader", FAIL, f"the boot sector of {disk} holds no boot code", fix)
    name = "GRUB" if b"GRUB" in sector[:440] else "a BIOS boot loader"
    return Check("boot_loader", PASS, f"{name} in the boot sector of {disk}")


def disk_of(path: str, *, proc_dir: str = "/proc", sys_dir: str = "/sys") -> str | None:
    """The whole disk holding the file system of ``path`` (through partitions and device-mapper)."""
    from .mounts import parse_mountinfo

    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) == 0:  # btrfs and the like: the mount source names the device
        for mount in parse_mountinfo(Path(proc_dir, "self", "mountinfo").read_text()):
            if mount.device == majmin and mount.source.startswith("/dev/"):
                try:
                    rdev = os.stat(mount.source).st_rdev
                except OSError:
                    return None
                majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
    for _ in range(8):
        node = Path(sys_dir, "dev", "block", majmin)
        if not node.exists():
            return None
        node = node.resolve()
        if (node / "partition").exists():
            return f"/dev/{node.parent.name}"
        slaves = sorted((node / "slaves").iterdir()) if (node / "slaves").is_dir() else []
        if not slaves:
            return f"/dev/{node.name}"
        majmin = Path(sys_dir, "class", "block", slaves[0].name, "dev").read_text().strip()
    return None


def run(
    root: str = "/",
    *,
    sys_dir: str = "/sys",
    disk: str | None = None,
    kernel: str | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Every check of ``root``: ``{"ok", "boot_mode", "kernel", "checks": [...]}`` (the portal's ``preflight``).

    ``cache_dir``: where the initramfs listing may be kept between runs (the agent's state folder).
    """
    root_path = Path(root)
    if kernel is None:
        kernel = os.uname().release if root == "/" and _modules_dir(root_path, os.uname().release) else None
        kernel = kernel or find_kernel(root_path)
    mode = boot_mode(Path(sys_dir))
    checks = _driver_checks(root_path, kernel, cache_dir)
    checks.append(fstab_check(root_path))
    checks.append(Check("boot_mode", PASS, f"the server boots by {mode.upper()}; the cloud VM is started the same way"))
    checks.append(boot_loader_check(root_path, mode, disk))
    return {
        "ok": all(c.status != FAIL for c in checks),
        "boot_mode": mode,
        "kernel": kernel,
        "checks": [asdict(c) for c in checks],
    }
