"""Which way a server's disk becomes a bootable EC2 image, and why.

- Linux: EBS direct (the chain merged straight into snapshot blocks), then
  RegisterImage with the server's boot mode and ENA. Minutes.
- Windows: VM Import (ImportImage), which installs EC2's drivers and
  handles the licence; AWS documents that an image registered straight from
  a snapshot of a Windows disk does not launch. Slow, but the only way.

The system and boot mode come from the agent's bootability preflight
(`Server.preflight`: {"boot_mode": "bios"|"uefi", "kernel", "os", ...})
when the server has reported one; without it the server is taken for a
Linux one booting in legacy BIOS mode, and the failover page says so.
"""

from dataclasses import dataclass

# RegisterImage's and ImportImage's names for the boot modes.
BOOT_MODES = {"bios": "legacy-bios", "uefi": "uefi"}
DEFAULT_BOOT_MODE = "legacy-bios"
EBS_DIRECT = "ebs_direct"
VM_IMPORT = "vm_import"


@dataclass(frozen=True)
class ImagePath:
    """The path a failover takes: `method` (ebs_direct or vm_import), `platform`, `boot_mode` and why."""

    method: str
    platform: str  # linux or windows
    boot_mode: str  # legacy-bios or uefi
    reason: str

    @property
    def label(self) -> str:
        return "EBS direct" if self.method == EBS_DIRECT else "VM Import"


def _preflight(server) -> dict:
    # The field arrives with the servers' status reports; a server that never sent one has none.
    report = getattr(server, "preflight", None)
    return report if isinstance(report, dict) else {}


def image_path(server) -> ImagePath:
    """The path for a failover of `server`, from what its agent last reported."""
    report = _preflight(server)
    reported_mode = report.get("boot_mode")
    boot_mode = BOOT_MODES.get(reported_mode or "", DEFAULT_BOOT_MODE)
    mode_words = f"{'UEFI' if boot_mode == 'uefi' else 'legacy BIOS'}"
    mode_source = "as its agent reported" if reported_mode in BOOT_MODES else "assumed: no boot mode reported"
    if str(report.get("os", "")).lower() == "windows":
        return ImagePath(
            VM_IMPORT,
            "windows",
            boot_mode,
            f"Windows: VM Import installs EC2's drivers and licence (slower, usually 30–90 minutes); "
            f"boots in {mode_words} mode ({mode_source}).",
        )
    system = "Linux" if report else "Linux (assumed: the server has sent no preflight report)"
    return ImagePath(
        EBS_DIRECT,
        "linux",
        boot_mode,
        f"{system}: the disk is written straight into a cloud snapshot (EBS direct, the fast path); "
        f"boots in {mode_words} mode ({mode_source}).",
    )


# Without earlier failovers to measure from: a fixed part (launch, VPN
# gateway, image registration) and a time per GiB of disk. Rough figures,
# replaced by this deployment's own measurements once it has some.
DEFAULT_FIXED_SECONDS = {EBS_DIRECT: 180, VM_IMPORT: 1800}
DEFAULT_SECONDS_PER_GIB = {EBS_DIRECT: 6, VM_IMPORT: 120}
GiB = 1024**3


def expected_seconds(method: str, virtual_size: int, measured: list[tuple[int, float]]) -> int:
    """Expected time to ready for a disk of `virtual_size` bytes by `method`.

    `measured`: (disk bytes, seconds to ready) of earlier failovers by the
    same method. With some, their seconds per GiB (beyond the fixed part)
    scale to this disk; without, the default rates apply.
    """
    gib = max(1.0, virtual_size / GiB)
    fixed = DEFAULT_FIXED_SECONDS[method]
    if measured:
        per_gib = sorted(max(0.0, seconds - fixed) / max(1.0, size / GiB) for size, seconds in measured)
        rate = per_gib[len(per_gib) // 2]  # the median: one stuck failover does not skew it
    else:
        rate = DEFAULT_SECONDS_PER_GIB[method]
    return int(fixed + rate * gib)


def about(seconds: int) -> str:
    """'about N minutes' for a page."""
    minutes = max(1, round(seconds / 60))
    if minutes >= 120:
        return f"about {round(minutes / 60)} hours"
    return f"about {minutes} minute{'s' if minutes != 1 else ''}"
