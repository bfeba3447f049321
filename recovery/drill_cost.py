"""What a drill in the aws sandbox cost, estimated from what it did.

The drill's record holds what is billed: its resources with the times each
was made and removed (`Drill.resources`), the EBS blocks its preparing step
wrote and the size of the image's disk (that step's outputs), the instance
type (the booting step's verdict). `usage_of` reads those into a `Usage`;
`estimate` prices it with the list prices in `recovery.sizes` (both pure
functions of plain data; `drill_usage` gathers a drill's). Not billed, so
not counted: the VPC, subnet and security group, the image itself (only its
snapshot is), the console reads; the sandbox has no public address and
moves no data out. An estimate: AWS's bill, where everything carries the
drill's tag, is the measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.utils import timezone

from reclo_site.cloud.imaging import EBS_BLOCK_SIZE

from . import sizes

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class Usage:
    """What an aws drill used, in the units AWS bills it by."""

    instance_type: str
    instance_seconds: float  # launched to terminated
    volume_gib: int  # the instance's gp3 root volume, made and deleted with it
    snapshot_bytes: int  # what the snapshot stores: EBS keeps (and bills) only the blocks written
    snapshot_seconds: float  # made to deleted
    put_blocks: int  # PutSnapshotBlock calls, each one 512 KiB block


@dataclass(frozen=True)
class Part:
    what: str  # "instance t3.medium 6 min"
    usd: Decimal | None  # None: no list price known for it


@dataclass(frozen=True)
class Estimate:
    parts: tuple[Part, ...]

    @property
    def total(self) -> Decimal:
        """The parts with a known price, to the cent."""
        exact = sum((p.usd for p in self.parts if p.usd is not None), Decimal(0))
        return exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)

    @property
    def exact(self) -> Decimal:
        return sum((p.usd for p in self.parts if p.usd is not None), Decimal(0))

    def text(self) -> str:
        """ "Estimated cost: $0.04 (instance t3.medium 6 min $0.0042, ...)", for the report."""
        if not self.parts:
            return "Estimated cost: $0.00 (nothing billable was made)"
        total = "under $0.01" if self.total == 0 and self.exact > 0 else f"${self.total}"
        listed = ", ".join(f"{p.what} {_usd(p.usd)}" for p in self.parts)
        return f"Estimated cost: {total} ({listed})"


def estimate(usage: Usage) -> Estimate:
    """Price `usage` at AWS's list prices (`recovery.sizes`): instance and disk per second, storage, requests."""
    parts = []
    if usage.instance_seconds > 0:
        # Billed per second, a minute at least: the instance and its disk alike.
        billed = Decimal(max(usage.instance_seconds, sizes.BILLED_SECONDS_MINIMUM))
        size = sizes.BY_TYPE.get(usage.instance_type)
        parts.append(
            Part(
                f"instance {usage.instance_type} {_duration(usage.instance_seconds)}",
                size.hourly_usd * billed / 3600 if size else None,
            )
        )
        if usage.volume_gib:
            parts.append(
                Part(
                    f"its {usage.volume_gib} GiB gp3 disk",
                    sizes.EBS_GP3_GB_MONTH_USD * usage.volume_gib * billed / sizes.SECONDS_PER_MONTH,
                )
            )
    if usage.snapshot_bytes and usage.snapshot_seconds > 0:
        parts.append(
            Part(
                f"snapshot {_size(usage.snapshot_bytes)} held {_duration(usage.snapshot_seconds)}",
                sizes.EBS_SNAPSHOT_GB_MONTH_USD
                * Decimal(usage.snapshot_bytes)
                / GiB
                * Decimal(usage.snapshot_seconds)
                / sizes.SECONDS_PER_MONTH,
            )
        )
    if usage.put_blocks:
        parts.append(
            Part(
                f"{usage.put_blocks:,} PutSnapshotBlock calls",
                sizes.EBS_PUT_SNAPSHOT_BLOCK_PER_1000_USD * usage.put_blocks / 1000,
            )
        )
    return Estimate(tuple(parts))


def usage_of(
    resources: list[dict],
    prepared: dict,
    booted: dict,
    *,
    instance_type: str,
    boot_span: tuple[datetime | None, datetime | None],
    now: datetime,
) -> Usage:
    """A drill's `Usage` from its resources and its preparing and booting steps' outputs.

    Times are the record's: an instance counts until the teardown noted it
    removed (it was terminated a little earlier, at the verdict), so this
    errs high. A resource not removed yet counts until `now`. An instance
    the record has no launch time of (its boot failed before the verdict
    named it, and the teardown found it) counts from the booting step's
    start (`boot_span`). `instance_type` is the one launched when the
    verdict does not say.
    """
    details = (booted.get("verdict") or {}).get("details") or {}
    instance_seconds = 0.0
    snapshot_seconds = 0.0
    for item in resources:
        what = item.get("what", "")
        start, end = _parse(item.get("created")), _parse(item.get("removed"))
        if what.startswith("instance "):
            if start is None:
                start, end = boot_span[0], end or boot_span[1]
            instance_seconds += _seconds(start, end or now)
        elif what.startswith(("snapshot ", "EBS snapshot and image ")):  # the latter: the placeholder
            snapshot_seconds = max(snapshot_seconds, _seconds(start, end or now))
    volume_gib = int(prepared.get("volume_gib") or 0)
    put_blocks = int(prepared.get("blocks_written") or 0)
    # A resumed step writes some blocks again: the snapshot holds no more than its disk.
    stored = min(put_blocks * EBS_BLOCK_SIZE, volume_gib * GiB) if volume_gib else put_blocks * EBS_BLOCK_SIZE
    return Usage(
        instance_type=details.get("instance_type") or instance_type,
        instance_seconds=instance_seconds,
        volume_gib=volume_gib,
        snapshot_bytes=stored,
        snapshot_seconds=snapshot_seconds,
        put_blocks=put_blocks,
    )


def drill_usage(drill, now: datetime | None = None) -> Usage:
    """`usage_of` the drill's own record."""
    steps = {s.name: s for s in drill.steps.all()}
    booting = steps.get("booting")
    return usage_of(
        drill.resources or [],
        steps["preparing"].outputs if "preparing" in steps else {},
        booting.outputs if booting else {},
        instance_type=settings.RECLO_DRILL_INSTANCE_TYPE,
        boot_span=(booting.started, booting.finished) if booting else (None, None),
        now=now or timezone.now(),
    )


def _parse(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def _seconds(start: datetime | None, end: datetime | None) -> float:
    if start is None or end is None:
        return 0.0
    return max(0.0, (end - start).total_seconds())


def _duration(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{max(1, round(n / MiB))} MiB"


def _usd(amount: Decimal | None) -> str:
    if amount is None:
        return "(no price known, not counted)"
    if 0 < amount < Decimal("0.0001"):
        return "under $0.0001"
    return f"${amount.quantize(Decimal('0.0001'), rounding=ROUND_HALF_UP)}"
