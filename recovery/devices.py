"""VPN devices (services and tenant-scoped reads) and the gateway's peer-sync endpoint logic.

An account's devices share one tunnel range (`RECLO_VPN_TUNNEL_CIDR`, the
gateway is .1); each has its own key pair, so two PCs never fight over one
peer slot on the gateway. The gateway's agent reports handshakes and gets
the current peer list with a credential that opens nothing else.
"""

import ipaddress
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from reclo_site.errors import Code, ServiceError

from . import vpn
from .models import Instance, RecoveryNetwork, VpnDevice, VpnGateway

FIRST_DEVICE_NAME = "Office"


def device_list(*, user) -> list[VpnDevice]:
    return list(VpnDevice.objects.filter(user=user))


def device_get(*, user, device_id) -> VpnDevice:
    """The caller's device; another tenant's (or an unknown, or a malformed) id answers 404 412."""
    try:
        device_id = uuid.UUID(str(device_id))
    except ValueError:
        device_id = None
    device = VpnDevice.objects.filter(user=user, pk=device_id).first() if device_id else None
    if device is None:
        raise ServiceError(Code.NO_VPN_DEVICE, "No VPN device of yours has that id.")
    return device


def device_create(*, user, name: str) -> VpnDevice:
    """A new device with its own key pair and the account's lowest free tunnel address."""
    name = " ".join(name.split())
    if not name:
        raise ServiceError(Code.MALFORMED, "Give the device a name, such as \u201cReception PC\u201d.", field="name")
    keys = vpn.generate_keypair()
    tunnel = vpn.Tunnel.from_settings()
    for _attempt in range(5):
        taken = set(VpnDevice.objects.filter(user=user).values_list("address", flat=True))
        address = next((a for a in tunnel.device_addresses() if a not in taken), None)
        if address is None:
            raise ServiceError(Code.MALFORMED, "The account has as many VPN devices as its tunnel can hold.")
        try:
            with transaction.atomic():
                return VpnDevice.objects.create(
                    user=user,
                    name=name[:63],
                    address=address,
                    public_key=keys.public,
                    private_key_enc=vpn.encrypt(keys.private),
                )
        except IntegrityError:
            continue  # another device took that address a moment ago
    raise ServiceError(Code.MALFORMED, "Too many devices added at once; try again.")


def device_revoke(*, device: VpnDevice) -> None:
    """Forget the device; the gateway drops its peer at the next sync (within a minute)."""
    VpnDevice.objects.filter(pk=device.pk).delete()


def first_device(*, user) -> VpnDevice:
    """The account's first device, made on first use (for the per-instance config route)."""
    device = VpnDevice.objects.filter(user=user).first()
    return device or device_create(user=user, name=FIRST_DEVICE_NAME)


def ready_gateway(user_id) -> VpnGateway | None:
    gateway = VpnGateway.objects.filter(network__user_id=user_id, state=VpnGateway.State.READY).first()
    return gateway if gateway and gateway.public_ip else None


def device_config(*, device: VpnDevice) -> str:
    """The device's wg-quick config; 409 406 while the account has no gateway up."""
    gateway = ready_gateway(device.user_id)
    if gateway is None:
        raise ServiceError(
            Code.INSTANCE_STATE_CONFLICT,
            "The VPN gateway is not up: it starts with your first failover. Download the config then.",
        )
    return vpn.client_config(
        device_private_key=vpn.decrypt(device.private_key_enc),
        device_address=device.address,
        device_name=device.name,
        gateway_public_key=gateway.gateway_public_key,
        endpoint=gateway.public_ip,
        routed_cidr=settings.RECLO_RECOVERY_SUBNET_CIDR,
        dns=dns_get(user_id=device.user_id).entries,
    )


_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", re.I)


def _is_domain(text: str) -> bool:
    """A search domain such as `practice.local` (RFC 1123 labels; not all digits, which is a bad address)."""
    labels = text.rstrip(".").split(".")
    return len(text) <= 253 and all(_LABEL.match(p) for p in labels) and not labels[-1].isdigit()


DnsMode = RecoveryNetwork.VpnDns


@dataclass(frozen=True)
class Dns:
    """The DNS line of the account's device configs: how it is chosen, and what it is now."""

    mode: str
    custom: str  # the owner's entries, kept when another mode is chosen
    entries: str  # what `DNS =` says ("" for no line)
    server_name: str = ""  # the recovered server whose address it is (mode "server")


def dns_get(*, user_id) -> Dns:
    """The account's VPN DNS: by default the newest live recovered server's address, or the owner's, or none."""
    net = RecoveryNetwork.objects.filter(user_id=user_id).first()
    mode = net.vpn_dns_mode if net else DnsMode.SERVER
    custom = net.vpn_dns if net else ""
    if mode == DnsMode.NONE:
        return Dns(mode, custom, "")
    if mode == DnsMode.CUSTOM:
        return Dns(mode, custom, custom)
    live = (
        Instance.objects.filter(user_id=user_id)
        .exclude(state__in=[Instance.State.TERMINATED, Instance.State.SHUTTING_DOWN])
        .exclude(private_ip="")
        .select_related("recovery")
        .first()
    )
    return Dns(mode, custom, live.private_ip if live else "", live.recovery.server_name if live else "")


def dns_set(*, user, mode: str, custom: str = "") -> Dns:
    """Choose the DNS of every device config; custom entries are DNS server addresses and search domains."""
    if mode not in DnsMode.values:
        raise ServiceError(Code.MALFORMED, "Choose one of the DNS options.", field="dns_mode")
    entries = [e for e in re.split(r"[\s,]+", custom.strip()) if e]
    if mode == DnsMode.CUSTOM:
        addresses = 0
        for entry in entries:
            try:
                ipaddress.ip_address(entry)
                addresses += 1
            except ValueError:
                if not _is_domain(entry):
                    raise ServiceError(
                        Code.MALFORMED,
                        f"\u201c{entry[:64]}\u201d is neither an IP address nor a domain name.",
                        field="dns",
                    ) from None
        if not addresses:
            raise ServiceError(
                Code.MALFORMED,
                "Give at least one DNS server address, such as 10.213.1.10 (names such as practice.local "
                "can follow it).",
                field="dns",
            )
    value = ", ".join(entries)
    if len(value) > 255:
        raise ServiceError(Code.MALFORMED, "That is too long for one DNS line.", field="dns")
    net, _ = RecoveryNetwork.objects.get_or_create(user=user)
    RecoveryNetwork.objects.filter(pk=net.pk).update(
        vpn_dns_mode=mode, **({"vpn_dns": value} if mode == DnsMode.CUSTOM else {})
    )
    return dns_get(user_id=user.pk)


def config_file_name(device: VpnDevice) -> str:
    """`reclo-<name>.conf`: wg-quick takes the interface name from the file name (at most 15 characters)."""
    safe = "".join(c for c in device.name if c.isalnum() or c in "-_")[:9] or "device"
    return f"reclo-{safe}.conf"


def peers(user_id) -> list[vpn.Peer]:
    """The account's devices as gateway peers."""
    return [
        vpn.Peer(public_key=d.public_key, address=d.address, name=d.name)
        for d in VpnDevice.objects.filter(user_id=user_id)
    ]


def gateway_for_token(token: str) -> VpnGateway | None:
    """The (not released) gateway holding this peer-sync credential."""
    if not token:
        return None
    return (
        VpnGateway.objects.filter(agent_token_hash=vpn.hash_agent_token(token))
        .exclude(state__in=[VpnGateway.State.RELEASED, VpnGateway.State.RELEASING])
        .select_related("network")
        .first()
    )


def _handshakes(text: str) -> dict[str, datetime]:
    """`wg show wg0 latest-handshakes` output (`<public key>\\t<unix time>` lines); 0 means never."""
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) == 0:
            continue
        try:
            found[parts[0]] = datetime.fromtimestamp(int(parts[1]), tz=UTC)
        except (OverflowError, ValueError, OSError):
            continue
    return found


def gateway_sync(*, gateway: VpnGateway, report: str) -> str:
    """Record the agent's report (its call and each peer's last handshake); answer the peers it must have."""
    now = timezone.now()
    VpnGateway.objects.filter(pk=gateway.pk).update(last_report=now)
    user_id = gateway.network.user_id
    for public_key, when in _handshakes(report).items():
        # A clock running ahead on the gateway must not put a handshake in the future.
        VpnDevice.objects.filter(user_id=user_id, public_key=public_key).update(last_handshake=min(when, now))
    return vpn.peers_config(peers(user_id))
