"""WireGuard for recovered servers: keys, their encryption at rest, and the two configs.

The gateway is a small Linux instance in the tenant's recovery network. It
gets its whole configuration (including its private key) through user-data
at first boot, listens on UDP 51820, and masquerades the tunnel into the
VPC, so recovered servers need no route back to the tunnel. The customer's
client config sends only the recovered server's private address through
the tunnel (split tunnel: the office's own internet is untouched).

Private keys leave this module only inside those two documents; they are
never logged and never put in task arguments or step outputs.
"""

import base64
import ipaddress
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from django.conf import settings

WIREGUARD_PORT = 51820


@dataclass(frozen=True)
class KeyPair:
    private: str  # base64, as `wg genkey` prints it
    public: str

    def __repr__(self) -> str:  # never show the private key in tracebacks or logs
        return f"KeyPair(public={self.public!r})"


def generate_keypair() -> KeyPair:
    """A WireGuard (X25519) key pair, base64-encoded like `wg genkey | wg pubkey`."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return KeyPair(base64.b64encode(private).decode(), base64.b64encode(public).decode())


def public_key_of(private: str) -> str:
    raw = base64.b64decode(private)
    return base64.b64encode(
        X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ).decode()


def _fernet() -> MultiFernet:
    return MultiFernet([Fernet(key.encode() if isinstance(key, str) else key) for key in settings.RECLO_VPN_KEYS])


def encrypt(secret: str) -> str:
    """Encrypt a private key for the database with the first of RECLO_VPN_KEYS."""
    return _fernet().encrypt(secret.encode()).decode()


def decrypt(token: str) -> str:
    """Decrypt with any of RECLO_VPN_KEYS; a wrong key raises ValueError (without the data)."""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ValueError(
            "cannot decrypt a VPN key: RECLO_VPN_KEYS does not hold the key it was encrypted with"
        ) from None


def rotate(token: str) -> str:
    """Re-encrypt with the first key (after a new key was put first in RECLO_VPN_KEYS)."""
    return _fernet().rotate(token.encode()).decode()


@dataclass(frozen=True)
class Tunnel:
    """Addresses inside the WireGuard tunnel: the gateway is .1, the customer's side .2."""

    network: ipaddress.IPv4Network

    @classmethod
    def from_settings(cls) -> "Tunnel":
        return cls(ipaddress.ip_network(settings.RECLO_VPN_TUNNEL_CIDR))

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def client(self) -> str:
        return str(self.network.network_address + 2)


def gateway_config(*, gateway_private_key: str, client_public_key: str, vpc_cidr: str) -> str:
    """The gateway's /etc/wireguard/wg0.conf (a wg-quick config)."""
    tunnel = Tunnel.from_settings()
    nat = f"POSTROUTING -s {tunnel.network} -d {vpc_cidr} -j MASQUERADE"
    return (
        "[Interface]\n"
        f"Address = {tunnel.gateway}/{tunnel.network.prefixlen}\n"
        f"ListenPort = {WIREGUARD_PORT}\n"
        f"PrivateKey = {gateway_private_key}\n"
        f"PostUp = sysctl -w net.ipv4.ip_forward=1; iptables -t nat -A {nat}\n"
        f"PostDown = iptables -t nat -D {nat}\n"
        "\n"
        "[Peer]\n"
        "# The customer's office\n"
        f"PublicKey = {client_public_key}\n"
        f"AllowedIPs = {tunnel.client}/32\n"
    )


def gateway_user_data(*, gateway_private_key: str, client_public_key: str, vpc_cidr: str) -> str:
    """The gateway's cloud-init user-data: install WireGuard, write wg0.conf, start it.

    Amazon Linux 2023's kernel has WireGuard built in; only the tools are
    installed. The config is written with umask 077 (root-only).
    """
    config = gateway_config(
        gateway_private_key=gateway_private_key, client_public_key=client_public_key, vpc_cidr=vpc_cidr
    )
    return (
        "#!/bin/bash\n"
        "# ReClo VPN gateway: WireGuard into this recovery network.\n"
        "set -euo pipefail\n"
        "umask 077\n"
        "dnf install -y wireguard-tools iptables-nft || yum install -y wireguard-tools iptables\n"
        "mkdir -p /etc/wireguard\n"
        "cat > /etc/wireguard/wg0.conf <<'RECLO_WG'\n"
        f"{config}"
        "RECLO_WG\n"
        "systemctl enable --now wg-quick@wg0\n"
    )


def client_config(
    *, client_private_key: str, gateway_public_key: str, endpoint: str, server_private_ip: str, server_name: str
) -> str:
    """The customer's WireGuard config: one route, to the recovered server's private address."""
    tunnel = Tunnel.from_settings()
    return (
        f"# ReClo recovery VPN to {server_name} ({server_private_ip})\n"
        "[Interface]\n"
        f"PrivateKey = {client_private_key}\n"
        f"Address = {tunnel.client}/32\n"
        "\n"
        "[Peer]\n"
        "# ReClo VPN gateway\n"
        f"PublicKey = {gateway_public_key}\n"
        f"Endpoint = {endpoint}:{WIREGUARD_PORT}\n"
        f"AllowedIPs = {server_private_ip}/32\n"
        # Keeps the office's NAT mapping open so the server can reach back.
        "PersistentKeepalive = 25\n"
    )
