"""Instance sizes offered for a failover, with what they cost per hour.

Prices are AWS's on-demand list prices in us-east-1 (Linux; Windows adds its
licence, shown separately), checked 2025. They are for the customer's
orientation on the fail-over page and for a drill's cost estimate
(`recovery.drill_cost`), not for billing.
"""

from dataclasses import dataclass
from decimal import Decimal

GiB = 1024**3


@dataclass(frozen=True)
class Size:
    instance_type: str
    vcpus: int
    memory_gib: int
    hourly_usd: Decimal
    windows_hourly_usd: Decimal
    label: str

    @property
    def description(self) -> str:
        return f"{self.label}: {self.vcpus} vCPU, {self.memory_gib} GiB memory"


SIZES = (
    Size("t3.small", 2, 2, Decimal("0.0208"), Decimal("0.0392"), "Small"),
    Size("t3.medium", 2, 4, Decimal("0.0416"), Decimal("0.0600"), "Medium"),
    Size("t3.large", 2, 8, Decimal("0.0832"), Decimal("0.1108"), "Large"),
    Size("t3.xlarge", 4, 16, Decimal("0.1664"), Decimal("0.1984"), "Extra large"),
    Size("m5.2xlarge", 8, 32, Decimal("0.3840"), Decimal("0.7520"), "Double extra large"),
)
BY_TYPE = {size.instance_type: size for size in SIZES}

# What runs beside every recovered server, per hour: the VPN gateway
# (t3.nano) and the public IPv4 addresses (server and gateway).
VPN_GATEWAY_HOURLY_USD = Decimal("0.0052")
PUBLIC_IPV4_HOURLY_USD = Decimal("0.005")

# What an aws drill is billed for besides its instance's hours (`recovery.drill_cost`), us-east-1 list
# prices. Storage: the Amazon EBS pricing page (aws.amazon.com/ebs/pricing), gp3 volume storage and
# standard-tier snapshot storage per GB-month, the 2025 prices like those above. PutSnapshotBlock:
# "Pricing for EBS direct APIs" in the Amazon EBS user guide, per 1,000 blocks written, read 2 Dec 2026.
EBS_GP3_GB_MONTH_USD = Decimal("0.08")
EBS_SNAPSHOT_GB_MONTH_USD = Decimal("0.05")
EBS_PUT_SNAPSHOT_BLOCK_PER_1000_USD = Decimal("0.006")
# AWS prorates storage by the second over the month, and bills a Linux instance and a gp3 volume per
# second with a one-minute minimum.
SECONDS_PER_MONTH = 30 * 24 * 3600
BILLED_SECONDS_MINIMUM = 60


def size_for_disk(virtual_size: int) -> Size:
    """A sensible default for a server by its disk: bigger disks mean bigger workloads.

    Small-office servers with up to 64 GiB disks run fine on 4 GiB of memory;
    a file or database server with a large disk wants more.
    """
    if virtual_size <= 64 * GiB:
        return BY_TYPE["t3.medium"]
    if virtual_size <= 256 * GiB:
        return BY_TYPE["t3.large"]
    if virtual_size <= 1024 * GiB:
        return BY_TYPE["t3.xlarge"]
    return BY_TYPE["m5.2xlarge"]


def total_hourly(size: Size) -> Decimal:
    """The server, its VPN gateway and two public addresses, per hour (Linux prices)."""
    return size.hourly_usd + VPN_GATEWAY_HOURLY_USD + 2 * PUBLIC_IPV4_HOURLY_USD


# EBS snapshot storage (standard tier), per GB-month: what warm standby's
# staged snapshots cost (recovery.staging.monthly_cost).
SNAPSHOT_GB_MONTH_USD = Decimal("0.05")


def snapshot_monthly(stored_bytes: int) -> Decimal:
    """The monthly price of `stored_bytes` kept in EBS snapshots, to the cent."""
    return (Decimal(stored_bytes) / 1000**3 * SNAPSHOT_GB_MONTH_USD).quantize(Decimal("0.01"))
