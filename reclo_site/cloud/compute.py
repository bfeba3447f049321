"""EC2 instances and Elastic IPs: recovered servers and VPN gateways.

RunInstances takes a ClientToken (AWS returns the first instance for a
repeated token, for about a week), AllocateAddress does not: callers tag what
they create and look for the tag first. moto ignores ClientToken, so the
tag lookup is also what keeps the local emulator free of duplicates.

moto quirks worth knowing (docs/architecture.md, The cloud adapter): instance states jump to their end
state at once, and an Elastic IP stays associated with a terminated
instance, so `release_address` always disassociates first.
"""

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from .clients import client
from .errors import CloudError, CloudPermanentError, ObjectNotFound, translate
from .network import tag_filters, tag_specifications

# Instance states in which an instance still exists (and costs or can cost money).
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
# "User initiated (2026-11-26 05:20:13 GMT)": when a stop began (AWS says GMT, moto UTC).
_TRANSITION_TIME = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)")


@dataclass(frozen=True)
class InstanceInfo:
    """What the portal needs to know about one instance."""

    instance_id: str
    state: str
    instance_type: str
    image_id: str = ""
    private_ip: str = ""
    public_ip: str = ""
    launched: datetime | None = None
    state_reason: str = ""
    tags: dict = field(default_factory=dict)

    @property
    def transitioned_at(self) -> datetime | None:
        """When the instance entered its current state, if AWS says (it does for stops)."""
        match = _TRANSITION_TIME.search(self.state_reason or "")
        if not match:
            return None
        return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


def _ec2():
    return client("ec2")


def _call(operation: str, what: str, **kwargs) -> dict:
    try:
        return getattr(_ec2(), operation)(**kwargs)
    # An answer botocore cannot parse (an HTML error page from a proxy or an
    # emulator lacking the call) is a failed call like any other.
    except (ClientError, BotoCoreError, ResponseParserError) as exc:
        raise translate(exc, what) from exc


def _info(raw: dict) -> InstanceInfo:
    return InstanceInfo(
        instance_id=raw["InstanceId"],
        state=raw.get("State", {}).get("Name", ""),
        instance_type=raw.get("InstanceType", ""),
        image_id=raw.get("ImageId", ""),
        private_ip=raw.get("PrivateIpAddress", "") or "",
        public_ip=raw.get("PublicIpAddress", "") or "",
        launched=raw.get("LaunchTime"),
        state_reason=raw.get("StateTransitionReason", "") or "",
        tags={t["Key"]: t["Value"] for t in raw.get("Tags", [])},
    )


def run_instance(
    *,
    image_id: str,
    instance_type: str,
    subnet_id: str,
    security_group_ids: list[str],
    client_token: str,
    tags: dict,
    user_data: str | None = None,
    public_address: bool = False,
) -> InstanceInfo:
    """Launch one instance. Idempotent on real AWS through `client_token`.

    `public_address` gives it a public IPv4 address at launch (a VPN gateway
    needs the internet for its packages before an Elastic IP is attached).

    `user_data` may hold secrets (a VPN gateway's private key): it is passed
    to AWS only, never logged, and botocore's logger is kept at WARNING.
    """
    kwargs = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": client_token,
        "TagSpecifications": tag_specifications("instance", tags) + tag_specifications("volume", tags),
        # IMDSv2 only: user-data (and with it the gateway's key) is not
        # readable through a simple SSRF on the instance.
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
    }
    if public_address:
        # A subnet and groups are then given on the interface, not beside it.
        kwargs["NetworkInterfaces"] = [
            {"DeviceIndex": 0, "SubnetId": subnet_id, "Groups": security_group_ids, "AssociatePublicIpAddress": True}
        ]
    else:
        kwargs.update(SubnetId=subnet_id, SecurityGroupIds=security_group_ids)
    if user_data is not None:
        kwargs["UserData"] = user_data
    reservation = _call("run_instances", f"launch {instance_type} from {image_id}", **kwargs)
    return _info(reservation["Instances"][0])


def console_output(instance_id: str, *, limit: int = 4000) -> str:
    """The end of an instance's serial console (what its boot and user-data printed); "" if none yet."""
    raw = _call("get_console_output", f"read the console of {instance_id}", InstanceId=instance_id, Latest=True)
    text = raw.get("Output") or ""
    try:  # base64 on the wire, and boto3 leaves it so
        decoded = base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except ValueError:
        decoded = text
    return decoded[-limit:]


def instance_status(instance_id: str) -> tuple[str, str]:
    """(system status, instance status) of EC2's status checks: ``ok``, ``initializing``, ``impaired``, ...

    ``("", "")`` while AWS reports none yet (it starts a minute or two
    after the instance is running).
    """
    raw = _call(
        "describe_instance_status",
        f"read the status checks of {instance_id}",
        InstanceIds=[instance_id],
        IncludeAllInstances=True,
    )
    for item in raw.get("InstanceStatuses", []):
        if item.get("InstanceId") == instance_id:
            return item.get("SystemStatus", {}).get("Status", ""), item.get("InstanceStatus", {}).get("Status", "")
    return "", ""


def console_screenshot(instance_id: str) -> bytes:
    """A JPEG of the instance's screen (GetConsoleScreenshot); AWS sends it base64-encoded."""
    raw = _call("get_console_screenshot", f"take a screenshot of {instance_id}", InstanceId=instance_id, WakeUp=True)
    return base64.b64decode(raw.get("ImageData") or "")


def describe_instances(instance_ids: list[str]) -> dict[str, InstanceInfo]:
    """The named instances that exist, by id; unknown ids are left out (no error).

    Filters by id instead of InstanceIds=, which fails the whole call when a
    single id is unknown (an instance terminated an hour ago has vanished).
    """
    found: dict[str, InstanceInfo] = {}
    for start in range(0, len(instance_ids), 200):
        batch = instance_ids[start : start + 200]
        for page in _pages(Filters=[{"Name": "instance-id", "Values": batch}]):
            for info in page:
                found[info.instance_id] = info
    return found


def describe_instance(instance_id: str) -> InstanceInfo:
    """One instance; ObjectNotFound when AWS no longer knows it."""
    found = describe_instances([instance_id])
    if instance_id not in found:
        raise ObjectNotFound(f"instance {instance_id} not found", "InvalidInstanceID.NotFound")
    return found[instance_id]


def find_instances(tags: dict, *, states: tuple[str, ...] = LIVE_STATES) -> list[InstanceInfo]:
    """Instances carrying all `tags`, in the given states."""
    filters = [*tag_filters(tags), {"Name": "instance-state-name", "Values": list(states)}]
    return [info for page in _pages(Filters=filters) for info in page]


def iter_instance_pages(*, tags: dict, states: tuple[str, ...], page_size: int = 100):
    """Pages (lists) of instances carrying `tags` in `states`, for bounded batch jobs."""
    filters = [*tag_filters(tags), {"Name": "instance-state-name", "Values": list(states)}]
    yield from _pages(Filters=filters, MaxResults=max(5, min(page_size, 1000)))


def _pages(**kwargs):
    token = None
    while True:
        if token:
            kwargs["NextToken"] = token
        resp = _call("describe_instances", "describe instances", **kwargs)
        yield [_info(raw) for reservation in resp.get("Reservations", []) for raw in reservation["Instances"]]
        token = resp.get("NextToken")
        if not token:
            return


def start_instance(instance_id: str) -> str:
    """Start a stopped instance; returns its new state."""
    resp = _call("start_instances", f"start {instance_id}", InstanceIds=[instance_id])
    return resp["StartingInstances"][0]["CurrentState"]["Name"]


def stop_instance(instance_id: str) -> str:
    """Stop a running instance; returns its new state."""
    resp = _call("stop_instances", f"stop {instance_id}", InstanceIds=[instance_id])
    return resp["StoppingInstances"][0]["CurrentState"]["Name"]


def terminate_instance(instance_id: str) -> str:
    """Terminate an instance; one already gone counts as terminated."""
    try:
        resp = _call("terminate_instances", f"terminate {instance_id}", InstanceIds=[instance_id])
    except ObjectNotFound:
        return "terminated"
    return resp["TerminatingInstances"][0]["CurrentState"]["Name"]


def user_data(instance_id: str) -> str:
    """An instance's user-data, decoded (for checks and tests)."""
    resp = _call("describe_instance_attribute", "read user data", InstanceId=instance_id, Attribute="userData")
    value = resp.get("UserData", {}).get("Value", "")
    return base64.b64decode(value).decode() if value else ""


# --- Elastic IPs ---------------------------------------------------------------


@dataclass(frozen=True)
class AddressInfo:
    allocation_id: str
    public_ip: str
    instance_id: str = ""
    association_id: str = ""


def _address(raw: dict) -> AddressInfo:
    return AddressInfo(
        allocation_id=raw["AllocationId"],
        public_ip=raw.get("PublicIp", ""),
        instance_id=raw.get("InstanceId", "") or "",
        association_id=raw.get("AssociationId", "") or "",
    )


def allocate_address(*, tags: dict) -> AddressInfo:
    """A new Elastic IP, tagged (AllocateAddress takes no ClientToken: look for the tag first)."""
    resp = _call(
        "allocate_address",
        "allocate Elastic IP",
        Domain="vpc",
        TagSpecifications=tag_specifications("elastic-ip", tags),
    )
    return AddressInfo(allocation_id=resp["AllocationId"], public_ip=resp["PublicIp"])


def find_addresses(tags: dict) -> list[AddressInfo]:
    resp = _call("describe_addresses", "find Elastic IPs", Filters=tag_filters(tags))
    return [_address(raw) for raw in resp.get("Addresses", [])]


def describe_address(allocation_id: str) -> AddressInfo | None:
    try:
        resp = _call("describe_addresses", f"describe {allocation_id}", AllocationIds=[allocation_id])
    except ObjectNotFound:
        return None
    except CloudPermanentError as exc:
        if exc.code == "InvalidAllocationID.NotFound":
            return None
        raise
    addresses = resp.get("Addresses", [])
    return _address(addresses[0]) if addresses else None


def associate_address(*, allocation_id: str, instance_id: str) -> None:
    """Point the address at the instance. Idempotent (re-association to the same instance is a no-op)."""
    _call(
        "associate_address",
        f"associate {allocation_id} with {instance_id}",
        AllocationId=allocation_id,
        InstanceId=instance_id,
        AllowReassociation=True,
    )


def instance_find_or_run(lookup: dict, **run_kwargs) -> InstanceInfo:
    """The live instance tagged `lookup`, else a new one from `run_instance(**run_kwargs)`.

    The tags find an instance a killed worker started; `client_token` in
    `run_kwargs` makes a retried launch return the same one.
    """
    found = find_instances(lookup)
    return found[0] if found else run_instance(**run_kwargs)


def address_attach(*, allocation_id: str, lookup: dict, tags: dict, instance_id: str) -> tuple[str, str]:
    """Give the instance an Elastic IP: `allocation_id` if known, else the one tagged `lookup`, else a new one.

    Returns (allocation id, public address); idempotent, so a step that
    died half-way can run it again.
    """
    if not allocation_id:
        found = find_addresses(lookup)
        allocation_id = (found[0] if found else allocate_address(tags=tags)).allocation_id
    associate_address(allocation_id=allocation_id, instance_id=instance_id)
    address = describe_address(allocation_id)
    return allocation_id, address.public_ip if address else ""


def release_address(allocation_id: str) -> None:
    """Disassociate (if needed) and release an Elastic IP. Idempotent.

    AWS refuses to release an associated address, and moto keeps an address
    associated with a terminated instance, so disassociate first.
    """
    address = describe_address(allocation_id)
    if address is None:
        return
    if address.association_id:
        try:
            _call("disassociate_address", f"disassociate {allocation_id}", AssociationId=address.association_id)
        except CloudError as exc:
            if exc.code not in ("InvalidAssociationID.NotFound", "InvalidAddress.NotFound"):
                raise
    try:
        _call("release_address", f"release {allocation_id}", AllocationId=allocation_id)
    except CloudError as exc:
        if exc.code not in ("InvalidAllocationID.NotFound", "InvalidAddress.NotFound"):
            raise


# --- Images for helper instances --------------------------------------------------


def latest_image_from_parameter(name: str) -> str:
    """The AMI id an SSM public parameter names (e.g. Amazon Linux's latest)."""
    try:
        return client("ssm").get_parameter(Name=name)["Parameter"]["Value"]
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"read SSM parameter {name}") from exc
