"""A tenant's recovery network and its VPN gateway: created once, shared by the tenant's failovers.

Two failovers of one tenant may reach these at the same time, so the work
on a network or gateway row is done under a lease taken with a conditional
UPDATE (like the recovery's own); the loser waits a few seconds and looks
again. Every resource is tagged with the tenant and its role and its id is
saved the moment it exists, so a worker that dies half-way leaves nothing
that the next one would create a second time.
"""

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from reclo_site.cloud import compute, network

from . import devices, vpn
from .models import Instance, Recovery, RecoveryNetwork, VpnGateway
from .pipeline import Wait

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=5)


def _tags(user_id: int, role: str, **extra) -> dict:
    return {
        "reclo:managed": "true",
        "reclo:tenant": str(user_id),
        "reclo:role": role,
        "Name": f"reclo-{user_id}-{role}",
        **extra,
    }


def _take(model, pk) -> uuid.UUID | None:
    now = timezone.now()
    token = uuid.uuid4()
    taken = (
        model.objects.filter(pk=pk)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .update(lease_token=token, lease_until=now + LEASE)
    )
    return token if taken else None


def _give_back(model, pk, token) -> None:
    model.objects.filter(pk=pk, lease_token=token).update(lease_token=None, lease_until=None)


def network_ensure(user) -> RecoveryNetwork | None:
    """The tenant's ready network, creating what is missing; None while another worker builds it.

    Idempotent: each resource is its saved id, else the one carrying its
    tags, else a new one.
    """
    net, _ = RecoveryNetwork.objects.get_or_create(user=user)
    if net.ready and _still_there(net):
        return net
    token = _take(RecoveryNetwork, net.pk)
    if token is None:
        return None
    try:
        net.refresh_from_db()
        uid = user.pk

        def ensure(field: str, role: str, create) -> str:
            value = getattr(net, field)
            if not value:
                kind = {"vpc_id": "vpc", "igw_id": "internet-gateway", "subnet_id": "subnet"}.get(field)
                found = network.find_tagged(kind, _tags(uid, role)) if kind else []
                value = found[0] if found else create()
                setattr(net, field, value)
                RecoveryNetwork.objects.filter(pk=net.pk).update(**{field: value})
            return value

        vpc_id = ensure(
            "vpc_id", "vpc", lambda: network.create_vpc(cidr=settings.RECLO_RECOVERY_VPC_CIDR, tags=_tags(uid, "vpc"))
        )
        igw_id = ensure(
            "igw_id", "internet-gateway", lambda: network.create_internet_gateway(tags=_tags(uid, "internet-gateway"))
        )
        network.attach_internet_gateway(igw_id=igw_id, vpc_id=vpc_id)
        ensure(
            "subnet_id",
            "subnet",
            lambda: network.create_subnet(
                vpc_id=vpc_id, cidr=settings.RECLO_RECOVERY_SUBNET_CIDR, tags=_tags(uid, "subnet")
            ),
        )
        ensure("route_table_id", "route-table", lambda: network.route_to_internet(vpc_id=vpc_id, igw_id=igw_id))
        gateway_group = ensure(
            "gateway_group_id",
            "vpn-gateway",
            lambda: network.create_security_group(
                vpc_id=vpc_id,
                name=f"reclo-{uid}-vpn-gateway",
                description="ReClo VPN gateway: WireGuard only",
                tags=_tags(uid, "vpn-gateway"),
            ),
        )
        server_group = ensure(
            "server_group_id",
            "servers",
            lambda: network.create_security_group(
                vpc_id=vpc_id,
                name=f"reclo-{uid}-servers",
                description="ReClo recovered servers: reachable through the VPN gateway only",
                tags=_tags(uid, "servers"),
            ),
        )
        # UDP 51820 is open on the gateway only; servers take traffic from the gateway alone.
        network.allow_udp(group_id=gateway_group, port=vpn.WIREGUARD_PORT, cidr="0.0.0.0/0", description="WireGuard")
        network.allow_all_from_group(group_id=server_group, source_group_id=gateway_group, description="VPN gateway")
        RecoveryNetwork.objects.filter(pk=net.pk).update(ready=True)
        net.ready = True
        return net
    finally:
        _give_back(RecoveryNetwork, net.pk, token)


# The network's saved ids, with the kind of resource each names; the VPC first.
_NETWORK_IDS = (
    ("vpc_id", "vpc"),
    ("igw_id", "internet-gateway"),
    ("subnet_id", "subnet"),
    ("route_table_id", "route-table"),
    ("gateway_group_id", "security-group"),
    ("server_group_id", "security-group"),
)


def _still_there(net: RecoveryNetwork) -> bool:
    """Check the saved ids against the cloud; forget the ones that are gone (all of them with the VPC).

    The ids are cached per tenant, and a VPC or security group deleted by
    hand would otherwise fail every later failover (InvalidGroup.NotFound).
    False sends the caller on to rebuild what is missing.
    """
    gone = [
        field for field, kind in _NETWORK_IDS if getattr(net, field) and not network.exists(kind, getattr(net, field))
    ]
    if not gone:
        return True
    if "vpc_id" in gone:
        gone = [field for field, _ in _NETWORK_IDS]  # nothing inside a deleted VPC is left
    log.warning("recovery network of tenant %s: %s gone, recreating", net.user_id, ", ".join(gone))
    cleared = {field: "" for field in gone}
    RecoveryNetwork.objects.filter(pk=net.pk).update(ready=False, **cleared)
    for field, value in cleared.items():
        setattr(net, field, value)
    net.ready = False
    return False


def _new_keys() -> dict:
    gateway, token = vpn.generate_keypair(), vpn.new_agent_token()
    return {
        "gateway_public_key": gateway.public,
        "gateway_private_key_enc": vpn.encrypt(gateway.private),
        "agent_token_enc": vpn.encrypt(token),
        "agent_token_hash": vpn.hash_agent_token(token),
        "last_report": None,
    }


def _gateway_row(net: RecoveryNetwork) -> VpnGateway:
    gateway = VpnGateway.objects.filter(network=net).first()
    if gateway is None:
        gateway, _ = VpnGateway.objects.get_or_create(network=net, defaults=_new_keys())
    return gateway


def _renew_generation(gateway: VpnGateway) -> None:
    """A released (or vanished) gateway comes back as a new one, with new keys and ClientToken."""
    fields = {
        **_new_keys(),
        "generation": gateway.generation + 1,
        "state": VpnGateway.State.NEW,
        "instance_id": "",
        "allocation_id": "",
        "public_ip": "",
        "private_ip": "",
        "released": None,
        # A new instance: it has not reported yet, and the old one's outage is over.
        "last_report": None,
        "down_since": None,
    }
    VpnGateway.objects.filter(pk=gateway.pk, generation=gateway.generation).update(**fields)
    gateway.refresh_from_db()


def gateway_image() -> str:
    return settings.RECLO_VPN_GATEWAY_AMI or compute.latest_image_from_parameter(
        settings.RECLO_VPN_GATEWAY_AMI_PARAMETER
    )


def gateway_ensure(net: RecoveryNetwork) -> VpnGateway | Wait:
    """The tenant's running WireGuard gateway, launching it if needed. Idempotent."""
    gateway = _gateway_row(net)
    if gateway.state == VpnGateway.State.READY and gateway.instance_id:
        info = compute.describe_instances([gateway.instance_id]).get(gateway.instance_id)
        if info is not None and info.state == "running":
            return gateway
        log.warning("VPN gateway %s of user %s is gone (%s); replacing it", gateway.instance_id, net.user_id,
                    info.state if info else "unknown")  # fmt: skip
    token = _take(VpnGateway, gateway.pk)
    if token is None:
        return Wait(3, "Another failover is setting up the VPN gateway.")
    try:
        gateway.refresh_from_db()
        if gateway.state in (VpnGateway.State.RELEASED, VpnGateway.State.RELEASING) or (
            gateway.state == VpnGateway.State.READY
        ):
            # Released, or READY but not running (checked above): start afresh.
            _renew_generation(gateway)
        tags = _tags(net.user_id, "vpn-gateway", **{"reclo:generation": str(gateway.generation)})
        lookup = {k: tags[k] for k in ("reclo:tenant", "reclo:role", "reclo:generation")}
        if not gateway.instance_id:
            info = compute.instance_find_or_run(
                lookup,
                image_id=gateway_image(),
                instance_type=settings.RECLO_VPN_GATEWAY_INSTANCE_TYPE,
                subnet_id=net.subnet_id,
                security_group_ids=[net.gateway_group_id],
                client_token=f"reclo-{net.user_id}-vpn-{gateway.generation}",
                tags=tags,
                user_data=vpn.gateway_user_data(
                    gateway_private_key=vpn.decrypt(gateway.gateway_private_key_enc),
                    peers=devices.peers(net.user_id),
                    vpc_cidr=settings.RECLO_RECOVERY_VPC_CIDR,
                    agent_token=vpn.decrypt(gateway.agent_token_enc),
                    portal_url=settings.SITE_URL,
                ),
                public_address=True,
            )
            gateway.instance_id = info.instance_id
            VpnGateway.objects.filter(pk=gateway.pk).update(
                instance_id=info.instance_id, state=VpnGateway.State.PROVISIONING
            )
        info = compute.describe_instance(gateway.instance_id)
        if info.state == "pending":
            return Wait(5, "The VPN gateway is booting.")
        if info.state != "running":
            # Gone before it was ready: the next try launches a new generation.
            VpnGateway.objects.filter(pk=gateway.pk).update(state=VpnGateway.State.RELEASED, released=timezone.now())
            return Wait(5, f"The VPN gateway stopped unexpectedly ({info.state}); starting a new one.")
        allocation_id, gateway.public_ip = compute.address_attach(
            allocation_id=gateway.allocation_id, lookup=lookup, tags=tags, instance_id=gateway.instance_id
        )
        if allocation_id != gateway.allocation_id:
            gateway.allocation_id = allocation_id
            VpnGateway.objects.filter(pk=gateway.pk).update(allocation_id=allocation_id)
        gateway.private_ip = info.private_ip
        gateway.state = VpnGateway.State.READY
        VpnGateway.objects.filter(pk=gateway.pk).update(
            public_ip=gateway.public_ip, private_ip=gateway.private_ip, state=gateway.state
        )
        return gateway
    finally:
        _give_back(VpnGateway, gateway.pk, token)


def gateway_in_use(net: RecoveryNetwork) -> bool:
    """Whether any of the tenant's instances (or failovers on their way) may still need the gateway."""
    live = Instance.objects.filter(user_id=net.user_id).exclude(
        state__in=[Instance.State.TERMINATED, Instance.State.SHUTTING_DOWN]
    )
    running = Recovery.objects.filter(user_id=net.user_id, status__in=Recovery.ACTIVE)
    return live.exists() or running.exists()


def gateway_release_if_unused(net: RecoveryNetwork) -> bool:
    """Terminate the tenant's gateway and release its address when nothing uses them. Idempotent.

    Returns whether the gateway is released. The network itself stays: it
    costs nothing and the next failover reuses it.
    """
    gateway = VpnGateway.objects.filter(network=net).first()
    if gateway is None or gateway.state == VpnGateway.State.RELEASED:
        return True
    if gateway_in_use(net):
        return False
    token = _take(VpnGateway, gateway.pk)
    if token is None:
        return False
    try:
        gateway.refresh_from_db()
        if gateway_in_use(net):  # a failover started while we took the lease
            return False
        VpnGateway.objects.filter(pk=gateway.pk).update(state=VpnGateway.State.RELEASING)
        if gateway.instance_id:
            compute.terminate_instance(gateway.instance_id)
        if gateway.allocation_id:
            compute.release_address(gateway.allocation_id)
        VpnGateway.objects.filter(pk=gateway.pk).update(state=VpnGateway.State.RELEASED, released=timezone.now())
        log.info("released the VPN gateway %s of user %s", gateway.instance_id, net.user_id)
        return True
    finally:
        _give_back(VpnGateway, gateway.pk, token)
