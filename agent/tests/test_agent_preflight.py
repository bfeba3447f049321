"""The bootability preflight against real disk images' root file systems: a bootable one and a broken one.

Each image is a whole disk (MBR + ext4) on a loop device, its root file
system mounted read-only, so the preflight cannot change anything: a write
would fail. The good image carries this machine's Debian kernel files
(``modules.builtin`` and the initramfs that update-initramfs made) when the
machine has them, else ones made here the same way (a newc cpio, zstd).
"""

import glob
import gzip
import os
import subprocess
from pathlib import Path

import pytest
from disk_images import MiB, attached_disk
from reclo_agent import preflight

KERNEL = "6.1.0-99-amd64"
GOOD_FSTAB = b"UUID=0a3c5d6e-1111-2222-3333-444455556666 / ext4 errors=remount-ro 0 1\nproc /proc proc defaults 0 0\n"
BROKEN_FSTAB = b"/dev/sda1 / ext4 defaults 0 1\n/dev/sda2 none swap sw 0 0\nLABEL=data /data ext4 defaults 0 2\n"


def cpio(tmp_path: Path, files: list[str], name: str) -> bytes:
    """A newc cpio archive (``cpio -o -H newc``) holding empty files at ``files``."""
    tree = tmp_path / name
    for f in files:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        (tree / f).write_bytes(b"\x7fELF module")
    listing = "\n".join(files) + "\n"
    out = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=listing.encode(),
                         capture_output=True, check=True)  # fmt: skip
    return out.stdout


def zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


def debian_kernel_files():
    """(version, modules.builtin, initramfs) of this machine's Debian kernel, or None."""
    for builtin in sorted(glob.glob("/lib/modules/*/modules.builtin")):
        version = Path(builtin).parent.name
        initrd = Path(f"/boot/initrd.img-{version}")
        if initrd.is_file():
            return version, Path(builtin).read_bytes(), initrd.read_bytes()
    return None


def good_root(tmp_path, require_tool, kernel_files: str):
    real = debian_kernel_files() if kernel_files == "debian" else None
    if real is not None:
        version, builtin, initrd = real
    else:
        require_tool("cpio")
        require_tool("zstd")
        version = KERNEL
        builtin = b"kernel/drivers/ata/libata.ko\nkernel/fs/ext4/ext4.ko\n"
        mods = f"usr/lib/modules/{version}/kernel/drivers"
        # An early, uncompressed segment (CPU microcode) before the compressed main one, as Debian makes it.
        initrd = cpio(tmp_path, ["kernel/x86/microcode/GenuineIntel.bin"], "early") + zstd(
            cpio(tmp_path, [f"{mods}/nvme/host/nvme.ko", f"{mods}/net/ethernet/amazon/ena/ena.ko", "init"], "main")
        )
    boot_img = Path("/usr/lib/grub/i386-pc/boot.img")
    code = boot_img.read_bytes()[:440] if boot_img.is_file() else b"\xeb\x63\x90" + b"GRUB \x00" * 20
    files = {
        f"lib/modules/{version}/modules.builtin": builtin,
        f"boot/initrd.img-{version}": initrd,
        "etc/fstab": GOOD_FSTAB,
    }
    return version, files, code


@pytest.mark.parametrize("kernel_files", ["debian", "made here"])
def test_a_bootable_disk_passes_every_check(tmp_path, require_tool, kernel_files):
    version, files, code = good_root(tmp_path, require_tool, kernel_files)
    with attached_disk(tmp_path, files, size=96 * MiB, boot_code=code, read_only=True) as disk:
        result = preflight.run(str(disk.mount), sys_dir=str(tmp_path / "sys"), disk=disk.device)
    checks = {c["name"]: c for c in result["checks"]}
    assert result["ok"] is True, result
    assert result["kernel"] == version and result["boot_mode"] == "bios"
    assert [c["status"] for c in result["checks"]] == ["pass"] * 5
    assert "initramfs" in checks["nvme"]["detail"] and "initramfs" in checks["ena"]["detail"]
    assert "GRUB" in checks["boot_loader"]["detail"]
    assert all(c["fix"] == "" for c in result["checks"])


def test_a_broken_disk_fails_with_the_fix_for_each_failure(tmp_path, require_tool):
    require_tool("cpio")
    mods = f"usr/lib/modules/{KERNEL}/kernel/drivers"
    files = {
        f"lib/modules/{KERNEL}/modules.builtin": b"kernel/fs/ext4/ext4.ko\n",
        f"lib/modules/{KERNEL}/kernel/drivers/net/ethernet/amazon/ena/ena.ko": b"\x7fELF",
        f"boot/initrd.img-{KERNEL}": gzip.compress(cpio(tmp_path, [f"{mods}/ata/ahci.ko", "init"], "main")),
        "etc/fstab": BROKEN_FSTAB,
    }
    with attached_disk(tmp_path, files, read_only=True) as disk:  # no boot code in the MBR
        result = preflight.run(str(disk.mount), sys_dir=str(tmp_path / "sys"), disk=disk.device)
    checks = {c["name"]: c for c in result["checks"]}
    assert result["ok"] is False
    assert checks["nvme"]["status"] == "fail" and "update-initramfs -u" in checks["nvme"]["fix"]
    assert checks["ena"]["status"] == "pass" and "loaded at boot" in checks["ena"]["detail"]
    assert checks["fstab"]["status"] == "fail"
    assert "/dev/sda1 (/)" in checks["fstab"]["detail"] and "/dev/sda2 (none)" in checks["fstab"]["detail"]
    assert "LABEL=data" not in checks["fstab"]["detail"]
    assert "blkid /dev/sda1" in checks["fstab"]["fix"]
    assert checks["boot_loader"]["status"] == "fail" and f"grub-install {disk.device}" in checks["boot_loader"]["fix"]


def test_uefi_needs_an_efi_loader(tmp_path):
    sys_dir = tmp_path / "sys"
    (sys_dir / "firmware" / "efi").mkdir(parents=True)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "fstab").write_bytes(GOOD_FSTAB)
    result = preflight.run(str(root), sys_dir=str(sys_dir), kernel=KERNEL)
    checks = {c["name"]: c for c in result["checks"]}
    assert result["boot_mode"] == "uefi"
    assert checks["boot_loader"]["status"] == "fail" and "x86_64-efi" in checks["boot_loader"]["fix"]
    assert checks["nvme"]["status"] == "fail"  # no modules folder, no initramfs
    loader = root / "boot" / "efi" / "EFI" / "debian" / "shimx64.efi"
    loader.parent.mkdir(parents=True)
    loader.write_bytes(b"MZ")
    result = preflight.run(str(root), sys_dir=str(sys_dir), kernel=KERNEL)
    assert {c["name"]: c for c in result["checks"]}["boot_loader"]["status"] == "pass"


def test_an_unreadable_initramfs_is_unknown_not_a_pass(tmp_path):
    root = tmp_path / "root"
    (root / "lib" / "modules" / KERNEL).mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "boot" / f"initrd.img-{KERNEL}").write_bytes(os.urandom(4096))
    result = preflight.run(str(root), sys_dir=str(tmp_path / "sys"))
    nvme = result["checks"][0]
    assert nvme["name"] == "nvme" and nvme["status"] == "unknown" and "unknown initramfs format" in nvme["detail"]


def test_the_disk_holding_a_mounted_file_system_is_found(tmp_path):
    with attached_disk(tmp_path, {}) as disk:
        assert preflight.disk_of(str(disk.mount)) == disk.device


@pytest.mark.parametrize("compress", [gzip.compress, zstd])
def test_initramfs_listing_reads_compressed_archives(tmp_path, compress, require_tool):
    require_tool("cpio")
    require_tool("zstd")
    path = tmp_path / "initrd"
    path.write_bytes(cpio(tmp_path, ["early.bin"], "e") + compress(cpio(tmp_path, ["a/nvme.ko.zst", "b"], "m")))
    assert preflight.initramfs_files(path) == ["early.bin", "a/nvme.ko.zst", "b"]


def test_the_initramfs_listing_is_kept_until_the_file_changes(tmp_path, require_tool, monkeypatch):
    require_tool("cpio")
    path, cache = tmp_path / "initrd", tmp_path / "state"
    path.write_bytes(gzip.compress(cpio(tmp_path, ["a/nvme.ko", "b"], "m")))
    assert preflight.initramfs_files_cached(path, cache) == ["a/nvme.ko", "b"]
    assert (cache / "initramfs-names.json").is_file()

    unpacked = []
    real = preflight.initramfs_files
    monkeypatch.setattr(preflight, "initramfs_files", lambda p: unpacked.append(p) or real(p))
    assert preflight.initramfs_files_cached(path, cache) == ["a/nvme.ko", "b"]
    assert unpacked == []  # read from the cache, not unpacked again

    # A kernel update rewrites the file: listed anew.
    path.write_bytes(gzip.compress(cpio(tmp_path, ["c/ena.ko"], "n")))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert preflight.initramfs_files_cached(path, cache) == ["c/ena.ko"]
    assert unpacked == [path]

    # A cache that cannot be read is no cache, not a failure.
    (cache / "initramfs-names.json").write_text("{not json")
    assert preflight.initramfs_files_cached(path, cache) == ["c/ena.ko"]
