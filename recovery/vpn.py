"""WireGuard for recovered servers: keys, their encryption at rest, and the two configs.

The gateway is a small Linux instance in the tenant's recovery network. It
gets its configuration (its private key, the peers known at launch and a
token for the peer-sync agent) through user-data at first boot, listens on
UDP 51820, and masquerades the tunnel into the VPC, so recovered servers
need no route back to the tunnel. A systemd timer runs the peer-sync agent
every 30 seconds: it posts the last handshake of every peer to the portal
and applies the peer list it gets back with `wg syncconf` (no restart), so
a new device works, and a revoked one stops, within a minute.

Every device of the office (a PC, a laptop, a phone) has its own key pair
and tunnel address; its config routes the whole recovery subnet through the
tunnel (every recovered server at once) and nothing else (split tunnel: the
office's own internet is untouched).

Private keys leave this module only inside those documents; they are never
logged and never put in task arguments or step outputs.
"""

import base64
import hashlib
import ipaddress
import secrets
import shlex
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from django.conf import settings

WIREGUARD_PORT = 51820
# WireGuard's own default: 1500 less its 80 bytes of IPv6+UDP+WireGuard
# headers. Set on both sides, or the tunnel inherits EC2's jumbo 9001.
MTU = 1420
# The peer-sync agent's endpoint; its credential is good for nothing else.
AGENT_PATH = "/api/v1/vpn/gateway/peers"
AGENT_PERIOD_SECONDS = 30


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


def new_agent_token() -> str:
    """A gateway's peer-sync credential (shown once, in its user-data)."""
    return secrets.token_urlsafe(32)


def hash_agent_token(token: str) -> str:
    """SHA-256: the token is 256 random bits, so a fast hash is enough (no salt or stretching needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tunnel:
    """Addresses inside an account's WireGuard tunnel: the gateway is .1, devices .2 onwards."""

    network: ipaddress.IPv4Network

    @classmethod
    def from_settings(cls) -> "Tunnel":
        return cls(ipaddress.IPv4Network(settings.RECLO_VPN_TUNNEL_CIDR))

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def device_addresses(self):
        """Every address a device may get, in order (the gateway's excluded)."""
        for host in self.network.hosts():
            if str(host) != self.gateway:
                yield str(host)


@dataclass(frozen=True)
class Peer:
    """A device as the gateway sees it."""

    public_key: str
    address: str
    name: str = ""


def peers_config(peers: list[Peer]) -> str:
    """The [Peer] sections of the gateway (as `wg syncconf` and wg-quick read them)."""
    out = []
    for peer in peers:
        # Names are the owner's text: keep them on one comment line.
        name = " ".join(peer.name.split())[:63]
        out.append(f"[Peer]\n# {name}\nPublicKey = {peer.public_key}\nAllowedIPs = {peer.address}/32\n")
    return "\n".join(out)


def gateway_config(*, gateway_private_key: str, peers: list[Peer], vpc_cidr: str) -> str:
    """The gateway's /etc/wireguard/wg0.conf (a wg-quick config) with the peers known at launch."""
    tunnel = Tunnel.from_settings()
    nat = f"POSTROUTING -s {tunnel.network} -d {vpc_cidr} -j MASQUERADE"
    text = (
        "[Interface]\n"
        f"Address = {tunnel.gateway}/{tunnel.network.prefixlen}\n"
        f"ListenPort = {WIREGUARD_PORT}\n"
        f"PrivateKey = {gateway_private_key}\n"
        f"MTU = {MTU}\n"
        f"PostUp = sysctl -w net.ipv4.ip_forward=1; iptables -t nat -A {nat}\n"
        f"PostDown = iptables -t nat -D {nat}\n"
    )
    if peers:
        text += "\n" + peers_config(peers)
    return text


PEER_SYNC_SCRIPT = r"""#!/bin/bash
# ReClo peer sync: report each peer's last handshake, apply the portal's peer list.
# No errexit: every step says what failed; the timer tries again.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
. /etc/reclo/gateway.env
handshakes=$(wg show wg0 latest-handshakes 2>/dev/null)
peers=$(printf '%s\n' "$handshakes" | curl -fsS --max-time 20 --retry 2 --retry-delay 3 \
  -H "Authorization: Gateway $RECLO_GATEWAY_TOKEN" -H "Content-Type: text/plain" \
  --data-binary @- "$RECLO_PORTAL_URL/api/v1/vpn/gateway/peers") || {
  echo "reclo-peer-sync: the portal did not answer" >&2; exit 1; }
umask 077
{ cat /etc/reclo/wg0-interface.conf; printf '\n%s\n' "$peers"; } > /run/reclo-wg0.conf.new
# Unchanged, and wg0 has exactly these peers: leave it alone. Re-applying the same config is not
# free: wireguard-go rebinds its socket when ListenPort is set, and peers' AllowedIPs are replaced.
want=$(sed -n 's/^PublicKey = //p' /run/reclo-wg0.conf.new | sort)
if [ "$(cat /run/reclo-wg0.conf.new)" = "$(cat /run/reclo-wg0.conf 2>/dev/null)" ] \
  && [ "$want" = "$(wg show wg0 peers | sort)" ]; then
  rm -f /run/reclo-wg0.conf.new; exit 0
fi
mv /run/reclo-wg0.conf.new /run/reclo-wg0.conf
wg syncconf wg0 /run/reclo-wg0.conf || {
  rm -f /run/reclo-wg0.conf; echo "reclo-peer-sync: wg syncconf failed" >&2; exit 1; }
echo "reclo-peer-sync: $(grep -c '^\[Peer\]' /run/reclo-wg0.conf) peers applied"
"""

PEER_SYNC_UNITS = {
    "reclo-peer-sync.service": (
        "[Unit]\nDescription=ReClo VPN peer sync\nAfter=network-online.target wg-quick@wg0.service\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/local/sbin/reclo-peer-sync\n"
    ),
    "reclo-peer-sync.timer": (
        "[Unit]\nDescription=ReClo VPN peer sync every 30 seconds\n\n"
        f"[Timer]\nOnBootSec=10\nOnUnitActiveSec={AGENT_PERIOD_SECONDS}\nAccuracySec=1\n\n"
        "[Install]\nWantedBy=timers.target\n"
    ),
}


def _heredoc(path: str, text: str, marker: str) -> str:
    return f"cat > {path} <<'{marker}'\n{text}{'' if text.endswith(chr(10)) else chr(10)}{marker}\n"


def gateway_user_data(
    *, gateway_private_key: str, peers: list[Peer], vpc_cidr: str, agent_token: str, portal_url: str
) -> str:
    """The gateway's cloud-init user-data: install WireGuard, write its config and the peer-sync agent, start both.

    Amazon Linux 2023's kernel has WireGuard built in; only the tools are
    installed. Anything needing the network is retried with backoff (the
    address may come a little after boot; dnf may be slow), and there is no
    `set -e`: cloud-init runs user-data once, so an early exit would leave a
    gateway half-configured for good. Each step prints `reclo-gateway:` lines
    to the console, which the portal shows when the gateway never reports.
    Files are written with umask 077 (root-only).
    """
    config = gateway_config(gateway_private_key=gateway_private_key, peers=peers, vpc_cidr=vpc_cidr)
    # What `wg syncconf` gets besides the peers; ListenPort must be there (syncconf resets a missing one).
    interface = f"[Interface]\nPrivateKey = {gateway_private_key}\nListenPort = {WIREGUARD_PORT}\n"
    env = f"RECLO_GATEWAY_TOKEN={shlex.quote(agent_token)}\nRECLO_PORTAL_URL={shlex.quote(portal_url.rstrip('/'))}\n"
    parts = [
        "#!/bin/bash\n",
        "# ReClo VPN gateway: WireGuard into this recovery network.\n",
        "umask 077\n",
        'export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"\n',
        'say() { echo "reclo-gateway: $*"; echo "reclo-gateway: $*" > /dev/console 2>/dev/null || true; }\n',
        # Backoff 5, 10, 20, 40, 60, 60... seconds (RECLO_RETRY_DELAY sets the first).
        "retry() {\n"
        "  local try=1 delay=${RECLO_RETRY_DELAY:-5}\n"
        '  until "$@"; do\n'
        '    if [ "$try" -ge "${RECLO_RETRIES:-10}" ]; then say "gave up after $try tries: $*"; return 1; fi\n'
        '    say "try $try failed, again in ${delay}s: $*"; sleep "$delay"\n'
        '    try=$((try + 1)); delay=$((delay * 2)); [ "$delay" -gt 60 ] && delay=60\n'
        "  done\n"
        "}\n",
        "install_tools() { dnf install -y wireguard-tools iptables-nft || yum install -y wireguard-tools iptables; }\n",
        "mkdir -p /etc/wireguard /etc/reclo /usr/local/sbin /etc/systemd/system\n",
        _heredoc("/etc/wireguard/wg0.conf", config, "RECLO_WG"),
        _heredoc("/etc/reclo/wg0-interface.conf", interface, "RECLO_IF"),
        _heredoc("/etc/reclo/gateway.env", env, "RECLO_ENV"),
        _heredoc("/usr/local/sbin/reclo-peer-sync", PEER_SYNC_SCRIPT, "RECLO_SYNC"),
        "chmod 700 /usr/local/sbin/reclo-peer-sync\n",
        *(_heredoc(f"/etc/systemd/system/{name}", text, "RECLO_UNIT") for name, text in PEER_SYNC_UNITS.items()),
        'retry install_tools || say "WireGuard tools could not be installed"\n',
        'retry systemctl enable --now wg-quick@wg0 || say "wg0 did not come up"\n',
        "systemctl daemon-reload\n",
        'retry /usr/local/sbin/reclo-peer-sync || say "the portal never answered the peer sync"\n',
        'systemctl enable --now reclo-peer-sync.timer || say "the peer-sync timer did not start"\n',
        'say "done"\n',
    ]
    return "".join(parts)


def client_config(
    *,
    device_private_key: str,
    device_address: str,
    device_name: str,
    gateway_public_key: str,
    endpoint: str,
    routed_cidr: str,
    dns: str = "",
) -> str:
    """A device's WireGuard config: the whole recovery subnet through the tunnel, nothing else."""
    name = " ".join(device_name.split())[:63]
    text = (
        f"# ReClo recovery VPN: {name}\n"
        "[Interface]\n"
        f"PrivateKey = {device_private_key}\n"
        f"Address = {device_address}/32\n"
        f"MTU = {MTU}\n"
    )
    if dns:
        text += f"DNS = {dns}\n"
    return text + (
        "\n"
        "[Peer]\n"
        "# ReClo VPN gateway\n"
        f"PublicKey = {gateway_public_key}\n"
        f"Endpoint = {endpoint}:{WIREGUARD_PORT}\n"
        f"AllowedIPs = {routed_cidr}\n"
        # Keeps the office's NAT mapping open so the server can reach back.
        "PersistentKeepalive = 25\n"
    )
