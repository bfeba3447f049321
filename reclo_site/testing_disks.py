"""Bootable x86-64 test disks built from Debian packages, for the drill tests and bench.

:func:`test_disks` returns three raw disk images, built once and cached:

- ``good`` boots to a login prompt under SeaBIOS (GRUB's BIOS boot code in
  the MBR, its core image in the gap before the first partition) and under
  OVMF (GRUB's EFI image as ``\\EFI\\BOOT\\BOOTX64.EFI`` on a FAT EFI system
  partition). GRUB loads Debian's kernel and a small initramfs from the ext4
  root partition; the initramfs loads the NVMe, virtio, AHCI and ext4
  drivers, mounts the root by its label and starts ``/sbin/init`` there, a
  busybox shell script that prints :data:`READY_LINE`, serves
  :data:`HTTP_PORT` with busybox ``httpd`` and runs ``getty`` (``login:``)
  on the serial console and the screen;
- ``panics`` is the same disk with no initramfs: the kernel finds no driver
  for its root disk and panics ("VFS: Unable to mount root fs");
- ``random`` is random data: no partition table, no boot code.

Nothing is mounted and nothing is installed: the kernel and busybox come
from ``apt-get download`` + ``dpkg-deb -x``, the partition table from
``sfdisk``, the root file system from ``mkfs.ext4 -d`` (a staging folder
copied in), the EFI partition from mtools, and the boot loader from
``grub-mkimage`` with an embedded configuration written at fixed sectors
(what ``grub-bios-setup`` does, without needing a block device). extlinux
was the other choice; ``extlinux --install`` works only on a mounted file
system.

The images are cached under ``$XDG_CACHE_HOME/reclo/bootdisk/<key>/``
(``~/.cache`` by default; ``RECLO_BOOTDISK_CACHE`` overrides), the key being
a hash of the recipe version and the package versions, so a kernel update
builds a new set and an unchanged machine (CI's included) reuses the old one.
Building takes about 15 s and needs ``apt-get`` with package lists, the
``grub-common``, ``grub-pc-bin``, ``grub-efi-amd64-bin``, ``mtools``,
``fdisk`` and ``e2fsprogs`` packages, and ``modinfo`` (kmod). :func:`replace_file`
changes a file inside a disk copy (``debugfs``, no mount), e.g. between a
full and an incremental backup.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

RECIPE = "6"  # bump when the disks' recipe changes: the cache key includes it
READY_LINE = "reclo-test: ready"
HTTP_PORT = 80
ROOT_LABEL = "recloroot"
ROOT_UUID = "5265436c-6f00-4d00-8000-746573746469"
DISK_MIB = 64
ESP_START, ESP_SECTORS = 2048, 16 * 2048  # 16 MiB EFI system partition at 1 MiB
ROOT_START = ESP_START + ESP_SECTORS
SECTOR = 512

# Drivers the initramfs loads (dependencies are added from modinfo): the disk
# as NVMe (how EC2 presents EBS), virtio or SATA, ext4 (and the crc32c it asks
# for at mount time, which modinfo does not list), and the e1000e NIC of
# QEMU's q35 machine for the "port answers" check.
MODULES = ["nvme", "virtio_pci", "virtio_blk", "ahci", "sd_mod", "crc32c_generic", "ext4", "e1000e"]
BUSYBOX_PACKAGE = "busybox-static"
KERNEL_METAPACKAGE = "linux-image-amd64"
GRUB_PACKAGES = ["grub-pc-bin", "grub-efi-amd64-bin"]


class BootDiskError(RuntimeError):
    """The test disks could not be built (a tool or package is missing)."""


@dataclass(frozen=True)
class TestDisks:
    """Paths of the three cached raw images, and the versions they were built from."""

    good: Path
    panics: Path
    random: Path
    versions: dict
    __test__ = False  # not a test class, despite its name


def cache_root() -> Path:
    """Where built disks are kept between runs."""
    if os.environ.get("RECLO_BOOTDISK_CACHE"):
        return Path(os.environ["RECLO_BOOTDISK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reclo" / "bootdisk"


def _run(args: list[str], **kwargs) -> str:
    try:
        done = subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise BootDiskError(f"{args[0]} is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise BootDiskError(f"{' '.join(args)} failed: {exc.stderr.strip() or exc.stdout.strip()}") from exc
    return done.stdout


def _candidates(packages: list[str]) -> dict[str, str]:
    out = _run(["apt-cache", "show", "--no-all-versions", *packages])
    found: dict[str, str] = {}
    name = None
    for line in out.splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name in packages:
            found.setdefault(name, line.split(": ", 1)[1])
    missing = [p for p in packages if p not in found]
    if missing:
        raise BootDiskError(f"apt knows no version of {', '.join(missing)} (run apt-get update)")
    return found


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split(": ", 1)[1]
    raise BootDiskError(f"{KERNEL_METAPACKAGE} names no kernel package (run apt-get update)")


def _installed(package: str) -> str:
    try:
        return _run(["dpkg-query", "-W", "-f=${Version}", package])
    except BootDiskError as exc:
        raise BootDiskError(f"{package} is not installed (apt-get install {package})") from exc


def _apt_stamp() -> list:
    """What apt's answers depend on: the package lists and dpkg's status, by modification time."""
    stamp = []
    for folder in ("/var/lib/apt/lists", "/etc/apt/preferences.d"):
        try:
            stamp += sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file())
        except OSError:
            pass
    for name in ("/var/lib/dpkg/status", "/etc/apt/preferences"):
        try:
            stamp.append((name, os.stat(name).st_mtime_ns))
        except OSError:
            pass
    return stamp


def package_versions() -> dict:
    """The packages the disks are made of, with the versions apt would download now.

    apt-cache takes seconds here, so the answer is kept next to the disks and
    reused while apt's lists and dpkg's status are unchanged.
    """
    remembered = cache_root() / "versions.json"
    stamp = _apt_stamp()
    try:
        saved = json.loads(remembered.read_text())
        if saved["stamp"] == json.loads(json.dumps(stamp)):
            return saved["versions"]
    except (OSError, ValueError, KeyError):
        pass
    kernel = _kernel_package()
    versions = _candidates([kernel, BUSYBOX_PACKAGE])
    for package in GRUB_PACKAGES:
        versions[package] = _installed(package)
    remembered.parent.mkdir(parents=True, exist_ok=True)
    tmp = remembered.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "versions": versions}))
    tmp.replace(remembered)
    return versions


def test_disks() -> TestDisks:
    """The three test disks, built now if the cache has none for these package versions.

    Safe to call from several processes at once (a file lock serialises the
    build; the finished set is moved into place in one rename).
    """
    versions = package_versions()
    key = hashlib.sha256(repr((RECIPE, sorted(versions.items()))).encode()).hexdigest()[:16]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "good.raw").exists():
            with tempfile.TemporaryDirectory(dir=root, prefix=f"{key}.build-") as tmp:
                _build(Path(tmp), versions, root / "debs")
                (Path(tmp) / "out").rename(final)
    return TestDisks(final / "good.raw", final / "panics.raw", final / "random.raw", versions)


test_disks.__test__ = False  # type: ignore[attr-defined]  # a builder, not a test


def _download(package: str, version: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    found = list(debs.glob(f"{package}_*.deb"))
    wanted = [p for p in found if _run(["dpkg-deb", "-f", str(p), "Version"]).strip() == version]
    if wanted:
        return wanted[0]
    for old in found:
        old.unlink()
    # apt-get download writes into the current folder; as root it warns that
    # the _apt user cannot write there, which is harmless.
    _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=debs)
    got = list(debs.glob(f"{package}_*.deb"))
    if not got:
        raise BootDiskError(f"apt-get download {package}={version} wrote no .deb")
    return got[0]


def _module_closure(modules_dir: Path, names: list[str]) -> list[Path]:
    """The .ko files for ``names`` and their dependencies, dependencies first."""
    by_name = {p.name[: -len(".ko")].replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:  # built into the kernel
            return
        deps = _run(["modinfo", "-F", "depends", str(path)]).strip()
        for dep in filter(None, deps.split(",")):
            visit(dep)
        order.append(path)

    for name in names:
        visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (the initramfs format) of ``(path, mode, data)`` entries."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0")
        out.extend(bytes(-len(out) % 4))
        out.extend(data)
        out.extend(bytes(-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


INITRAMFS_INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "reclo-initramfs: loading disk drivers"
for m in $(cat /modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
root=""
for i in $(seq 1 300); do
  root=$(findfs LABEL={ROOT_LABEL} 2>/dev/null) && break
  sleep 0.1
done
if [ -z "$root" ] || ! mount -o ro -t ext4 "$root" /newroot; then
  echo "reclo-initramfs: no root file system with label {ROOT_LABEL}"
  exec sleep 2147483647
fi
echo "reclo-initramfs: root is $root"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

ROOT_INIT = f"""#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname reclo-test
echo "reclo-test: $(cat /etc/reclo-release)"
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
  httpd -p {HTTP_PORT} -h /srv/www
fi
dmesg -n 1  # keep kernel messages off the login screen (panics still show)
echo "{READY_LINE}"
respawn() {{ while true; do "$@"; sleep 1; done; }}
respawn getty -L 115200 ttyS0 vt100 &
respawn getty 38400 tty1 linux &
while true; do sleep 3600; done
"""


def _grub_config(*, with_initrd: bool, serial: bool) -> str:
    lines = []
    if serial:  # GRUB's BIOS build: show its messages on the serial console too
        lines += ["serial --unit=0 --speed=115200", "terminal_input serial console", "terminal_output serial console"]
    lines += [
        f"search --no-floppy --fs-uuid --set=root {ROOT_UUID}",
        'echo "GRUB: loading the ReClo test kernel"',
        "linux /boot/vmlinuz console=tty0 console=ttyS0,115200 panic=0",
    ]
    if with_initrd:
        lines.append("initrd /boot/initrd.img")
    lines.append("boot")
    return "\n".join(lines) + "\n"


GRUB_MODULES_COMMON = ["part_msdos", "ext2", "fat", "linux", "search", "search_fs_uuid", "echo", "test"]


def _grub_images(work: Path, *, with_initrd: bool) -> tuple[bytes, bytes]:
    """GRUB's BIOS core image and EFI executable, each with the boot commands built in."""
    bios_cfg, efi_cfg = work / "bios.cfg", work / "efi.cfg"
    bios_cfg.write_text(_grub_config(with_initrd=with_initrd, serial=True))
    efi_cfg.write_text(_grub_config(with_initrd=with_initrd, serial=False))
    core, efi = work / "core.img", work / "BOOTX64.EFI"
    _run(["grub-mkimage", "-O", "i386-pc", "-o", str(core), "-c", str(bios_cfg), "-p", "/boot/grub",
          *GRUB_MODULES_COMMON, "biosdisk", "serial", "terminal"])  # fmt: skip
    _run(["grub-mkimage", "-O", "x86_64-efi", "-o", str(efi), "-c", str(efi_cfg), "-p", "/EFI/BOOT",
          *GRUB_MODULES_COMMON])  # fmt: skip
    core_bytes = core.read_bytes()
    if len(core_bytes) > (ESP_START - 1) * SECTOR:
        raise BootDiskError(f"GRUB's core image ({len(core_bytes)} bytes) does not fit before the first partition")
    return core_bytes, efi.read_bytes()


def _assemble(path: Path, *, root_fs: Path, esp: Path, core: bytes) -> None:
    """MBR + GRUB boot code + EFI partition + root partition, in one raw file."""
    size = DISK_MIB * 1024 * 1024
    with open(path, "wb") as f:
        f.truncate(size)
    table = (
        "label: dos\nlabel-id: 0x5265436c\n"
        f"start={ESP_START}, size={ESP_SECTORS}, type=ef\n"
        f"start={ROOT_START}, type=83, bootable\n"
    )
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], input=table)
    boot = Path("/usr/lib/grub/i386-pc/boot.img").read_bytes()
    with open(path, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        # GRUB's boot.img goes in the first 440 bytes (the disk signature and
        # partition table after them stay); its default says "core image at
        # sector 1", and grub-mkimage already put the core's length in the
        # core's first sector. This is what grub-bios-setup writes.
        mbr[:440] = boot[:440]
        f.seek(0)
        f.write(mbr)
        f.seek(SECTOR)
        f.write(core)
        f.seek(ESP_START * SECTOR)
        f.write(esp.read_bytes())
        f.seek(ROOT_START * SECTOR)
        with open(root_fs, "rb") as fs:
            shutil.copyfileobj(fs, f, 1024 * 1024)


def _build(tmp: Path, versions: dict, debs: Path) -> None:
    kernel_package = next(p for p in versions if p.startswith("linux-image-"))
    kernel_deb = _download(kernel_package, versions[kernel_package], debs)
    busybox_deb = _download(BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE], debs)
    unpacked = tmp / "unpacked"
    _run(["dpkg-deb", "-x", str(kernel_deb), str(unpacked)])
    _run(["dpkg-deb", "-x", str(busybox_deb), str(unpacked)])
    vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"))
    release = vmlinuz.name[len("vmlinuz-") :]
    busybox = (unpacked / "bin" / "busybox").read_bytes()

    modules = _module_closure(unpacked / "lib" / "modules" / release, MODULES)
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""), ("lib", 0o40755, b""), ("lib/modules", 0o40755, b""),
        ("bin/busybox", 0o100755, busybox), ("init", 0o100755, INITRAMFS_INIT.encode()),
        ("modules.order", 0o100644, "".join(f"{m.name}\n" for m in modules).encode()),
    ]  # fmt: skip
    entries += [(f"lib/modules/{m.name}", 0o100644, m.read_bytes()) for m in modules]
    initrd = gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0)

    stage = tmp / "root"
    for folder in ["bin", "sbin", "boot", "etc", "proc", "sys", "dev", "run", "tmp", "srv/www", "root"]:
        (stage / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(vmlinuz, stage / "boot" / "vmlinuz")
    (stage / "boot" / "initrd.img").write_bytes(initrd)
    (stage / "bin" / "busybox").write_bytes(busybox)
    (stage / "bin" / "busybox").chmod(0o755)
    applets = _run([str(unpacked / "bin" / "busybox"), "--list"]).split()
    for applet in applets:
        if applet not in ("busybox", "init"):
            (stage / "bin" / applet).symlink_to("busybox")
    (stage / "sbin" / "init").write_text(ROOT_INIT)
    (stage / "sbin" / "init").chmod(0o755)
    (stage / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc" / "group").write_text("root:x:0:\n")
    (stage / "etc" / "hostname").write_text("reclo-test\n")
    (stage / "etc" / "reclo-release").write_text(f"ReClo drill test disk, kernel {release}\n")
    (stage / "srv" / "www" / "index.html").write_text("ReClo drill test disk\n")

    root_fs = tmp / "root.ext4"
    root_bytes = (DISK_MIB * 1024 * 1024) - ROOT_START * SECTOR
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", ROOT_UUID, "-E", "root_owner=0:0",
          "-d", str(stage), str(root_fs), f"{root_bytes // 1024}k"])  # fmt: skip

    out = tmp / "out"
    out.mkdir()
    for name, with_initrd in (("good.raw", True), ("panics.raw", False)):
        work = tmp / name
        work.mkdir()
        core, efi = _grub_images(work, with_initrd=with_initrd)
        esp = work / "esp.img"
        with open(esp, "wb") as f:
            f.truncate(ESP_SECTORS * SECTOR)
        _run(["mformat", "-i", str(esp), "-v", "RECLOESP", "::"])
        (work / "BOOTX64.EFI").write_bytes(efi)
        _run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"])
        _run(["mcopy", "-i", str(esp), str(work / "BOOTX64.EFI"), "::/EFI/BOOT/BOOTX64.EFI"])
        _assemble(out / name, root_fs=root_fs, esp=esp, core=core)
    write_random_disk(out / "random.raw", 16 * 1024 * 1024)


def replace_file(disk: Path, path: str, data: bytes) -> None:
    """Replace (or create) file ``path`` in a test disk's root file system, in place, without mounting.

    ``debugfs -w`` edits the ext4 partition inside the raw image through its
    byte offset. The guest prints ``/etc/reclo-release`` at boot (``reclo-test:
    <its first line>``), so changing that file shows on the console which
    restore point booted. Work on a copy: the cached disks are shared.
    """
    target = f"{disk}?offset={ROOT_START * SECTOR}"
    with tempfile.NamedTemporaryFile() as src:
        src.write(data)
        src.flush()
        _run(["debugfs", "-w", "-R", f"rm {path}", target])  # "file not found" is fine: nothing to remove
        _run(["debugfs", "-w", "-R", f"write {src.name} {path}", target])
    # debugfs reports most failures on stderr with exit status 0: read it back.
    if read_file(disk, path) != data:
        raise BootDiskError(f"debugfs did not write {path} into {disk}")


def read_file(disk: Path, path: str) -> bytes:
    """The bytes of ``path`` in a test disk's root file system (``debugfs cat``, no mount)."""
    done = subprocess.run(["debugfs", "-R", f"cat {path}", f"{disk}?offset={ROOT_START * SECTOR}"],
                          check=True, capture_output=True)  # fmt: skip
    return done.stdout


def write_random_disk(path: Path, size: int, seed: int = 12) -> None:
    """``size`` bytes of seeded random data with no boot signature: a disk that cannot boot."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[510:512] = b"\x00\x00"  # never the 0x55AA a BIOS boots from
    path.write_bytes(bytes(data))


if __name__ == "__main__":  # `python -m reclo_site.testing_disks`: build (or find) the disks, print where
    built = test_disks()
    for disk in (built.good, built.panics, built.random):
        print(disk)
    print(" ".join(f"{name}={version}" for name, version in built.versions.items()))
