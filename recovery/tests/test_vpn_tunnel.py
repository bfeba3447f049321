"""A real WireGuard tunnel in network namespaces, driven by what ReClo generates.

    dev1, dev2, portal --[hub: bridge inet 198.51.100.0/24]-- gw --[hub: bridge vpc 10.213.1.0/24]-- srv1, srv2

The gateway runs its exact user-data (taken from the launch request moto
recorded) with only dnf, yum and systemctl swapped for shims: dnf fails its
first two calls; systemctl runs wg-quick and, for the timer, the unit's
ExecStart every 2 seconds. Its peer-sync agent talks to this test's portal,
served from inside the portal namespace. A reboot kills every process of
the gateway's namespace, wipes its NAT rules and forwarding, and starts
the units the user-data enabled (as systemd would; cloud-init does not run
user-data twice). The devices use their downloaded
configs with wg-quick. Kernel WireGuard where `ip link add type wireguard`
works, else wg-quick falls back to wireguard-go by itself. The hub has no
link to the host, so no packet leaves these namespaces; every namespace
(and every process in it) is removed on every exit.
"""

import base64
import ctypes
import os
import signal
import socket
import subprocess
import textwrap
import threading
from types import SimpleNamespace

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from rest_framework.test import APIClient

from reclo_site import testing
from reclo_site.cloud.clients import client
from recovery import devices, networks
from recovery.models import RecoveryNetwork, VpnDevice, VpnGateway

pytestmark = pytest.mark.django_db(transaction=True)

PREFIX = f"rv{os.getpid()}"
ROLES = ("hub", "gw", "portal", "dev1", "dev2", "srv1", "srv2")
INET = {"gw": "198.51.100.1", "portal": "198.51.100.2", "dev1": "198.51.100.11", "dev2": "198.51.100.12"}
VPC = {"gw": "10.213.1.5", "srv1": "10.213.1.21", "srv2": "10.213.1.22"}
PORTAL_PORT = 8000


def ns(role: str) -> str:
    return f"{PREFIX}-{role}"


def sh(*args, check=True, timeout=60, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {done.stdout}{done.stderr}")
    return done


def in_ns(role: str, *args, **kwargs):
    return sh("ip", "netns", "exec", ns(role), *args, **kwargs)


def _remove_namespaces():
    for role in ROLES:
        name = ns(role)
        if not os.path.exists(f"/run/netns/{name}"):
            continue
        pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:  # only processes this test started in its own namespace
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        if testing.IN_CI:
            pytest.fail("the VPN tunnel test needs root (network namespaces)")
        pytest.skip("needs root")
    for tool in ("ip", "ss", "wg", "wg-quick", "iptables", "curl", "ping", "unshare", "nsenter"):
        testing.require_tool(tool)
    if sh("ip", "link", "add", "rvprobe0", "type", "wireguard", check=False).returncode == 0:
        sh("ip", "link", "del", "rvprobe0")
    else:
        testing.require_tool("wireguard-go")
    try:
        for role in ROLES:
            sh("ip", "netns", "add", ns(role))
            in_ns(role, "ip", "link", "set", "lo", "up")
        for bridge in ("inet", "vpc"):
            in_ns("hub", "ip", "link", "add", bridge, "type", "bridge")
            in_ns("hub", "ip", "link", "set", bridge, "up")
        for bridge, table in (("inet", INET), ("vpc", VPC)):
            for role, address in table.items():
                inside = "eth0" if bridge == "inet" else "eth1"
                outside = f"{bridge[0]}-{role}"
                in_ns("hub", "ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns(role))
                in_ns("hub", "ip", "link", "set", outside, "master", bridge, "up")
                in_ns(role, "ip", "addr", "add", f"{address}/24", "dev", inside)
                in_ns(role, "ip", "link", "set", inside, "up")
        yield
    finally:
        _remove_namespaces()


_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(role: str) -> socket.socket:
    """A TCP socket of another network namespace: made by a thread that enters it (setns is per thread)."""
    made = {}

    def work():
        try:
            with open(f"/run/netns/{ns(role)}") as handle:
                if _libc.setns(handle.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                    raise OSError(ctypes.get_errno(), "setns")
            made["socket"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # reported below
            made["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["socket"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


class _PortalServer(ThreadedWSGIServer):
    def server_bind(self):
        # No getfqdn(): a reverse lookup would leave the namespaces.
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "portal", self.server_address[1]
        self.setup_environ()


@pytest.fixture
def portal(namespaces, settings):
    """This test's Django serving inside the portal namespace (its database connections stay on the host)."""
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, INET["portal"]]
    settings.SITE_URL = f"http://{INET['portal']}:{PORTAL_PORT}"
    server = _PortalServer((INET["portal"], PORTAL_PORT), _Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket = socket_in("portal")
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.server_bind()
    server.server_activate()
    server.set_app(WSGIHandler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield settings.SITE_URL
    server.shutdown()
    server.server_close()


SHIMS = {
    "dnf": """\
        #!/bin/bash
        # Test shim: fails twice (like a gateway without a network yet), then "installs" (the host has the tools).
        n=$(( $(cat "$RECLO_TEST_DIR/dnf.count" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$RECLO_TEST_DIR/dnf.count"
        if [ "$n" -le 2 ]; then echo "dnf: Curl error (6): Could not resolve host (shim, call $n)" >&2; exit 1; fi
        command -v wg >/dev/null && command -v wg-quick >/dev/null
        """,
    "yum": """\
        #!/bin/bash
        exit 1
        """,
    "systemctl": """\
        #!/bin/bash
        # Test shim for what the user-data asks of systemd. `enable` records the unit in /etc (which
        # outlives a reboot, like the disk) so that reboot_gateway starts what systemd would.
        echo "systemctl $*" >> "$RECLO_TEST_DIR/systemctl.log"
        start() {
          case "$1" in
            wg-quick@wg0) wg-quick up wg0 ;;
            reclo-peer-sync.timer)
              grep -q '^OnUnitActiveSec=' /etc/systemd/system/reclo-peer-sync.timer || return 1
              run=$(sed -n 's/^ExecStart=//p' /etc/systemd/system/reclo-peer-sync.service)
              ( while true; do $run >> "$RECLO_TEST_DIR/sync.log" 2>&1; sleep 2; done ) </dev/null >/dev/null 2>&1 &
              echo $! > "$RECLO_TEST_DIR/timer.pid" ;;
            *) echo "systemctl shim: cannot start $1" >&2; return 1 ;;
          esac
        }
        case "$1 $2" in
          "enable --now") echo "$3" >> /etc/systemd/reclo-shim-enabled; start "$3" ;;
          "daemon-reload ") exit 0 ;;
          "start "*) start "$2" ;;
          *) echo "systemctl shim: unexpected $*" >&2; exit 1 ;;
        esac
        """,
}


def _gateway_mounts(tmp_path) -> str:
    """The gateway's own disk (/etc, /usr/local: overlays kept in tmp_path), a fresh /run and its console."""
    t = tmp_path
    return textwrap.dedent(f"""\
        set -u
        mount -t overlay overlay -o lowerdir=/etc,upperdir={t}/etc-up,workdir={t}/etc-work /etc
        mount -t overlay overlay -o lowerdir=/usr/local,upperdir={t}/local-up,workdir={t}/local-work /usr/local
        mount -t tmpfs tmpfs /run
        mount --bind {t}/console /dev/console
        export PATH={t}/shims:$PATH RECLO_TEST_DIR={t} RECLO_RETRY_DELAY=1
        """)


def _run_on_gateway(tmp_path, script: str) -> str:
    (tmp_path / "launcher").write_text(_gateway_mounts(tmp_path) + script)
    done = in_ns("gw", "unshare", "--mount", "--propagation", "private", "bash", str(tmp_path / "launcher"),
                 check=False, timeout=180)  # fmt: skip
    return done.stdout + done.stderr


def boot_gateway(tmp_path, user_data: str) -> str:
    """Run the user-data in the gw namespace with private /etc, /usr/local, /run and console. Its output."""
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(textwrap.dedent(text))
        (shims / name).chmod(0o755)
    (tmp_path / "user-data").write_text(user_data)
    for d in ("etc-up", "etc-work", "local-up", "local-work"):
        (tmp_path / d).mkdir()
    (tmp_path / "console").write_text("")
    return _run_on_gateway(tmp_path, f"bash {tmp_path}/user-data\n")


def reboot_gateway(tmp_path) -> str:
    """Power the gateway off and boot it again, as EC2 would: what it had in memory is lost, its disk is kept.

    Off: every process of the gw namespace ends (the timer, wireguard-go), so wg0, /run and the mount
    namespace go with them; the NAT rules and IP forwarding are reset. On: cloud-init does not run the
    user-data again; systemd starts the units it enabled (wg-quick@wg0, then the peer-sync timer).
    """
    for pid in sh("ip", "netns", "pids", ns("gw")).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    testing.wait_until(lambda: not sh("ip", "netns", "pids", ns("gw")).stdout.split(), timeout=20, what="gw off")
    in_ns("gw", "ip", "link", "del", "wg0", check=False)  # kernel WireGuard outlives its processes
    # A killed wireguard-go's threads may still be closing its UDP socket after it left the pid list.
    testing.wait_until(lambda: not in_ns("gw", "ss", "-Hlun", "sport = :51820").stdout.strip(), timeout=20,
                       what="the old gateway's port closed")  # fmt: skip
    in_ns("gw", "iptables", "-t", "nat", "-F")
    in_ns("gw", "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    assert "wg0" not in in_ns("gw", "ip", "link", "show").stdout
    return _run_on_gateway(
        tmp_path, 'while read -r unit; do systemctl start "$unit"; done < /etc/systemd/reclo-shim-enabled\n'
    )


def device_up(tmp_path, role: str, config: str):
    path = tmp_path / role / f"rc{role[-1]}.conf"
    path.parent.mkdir()
    path.write_text(config)
    path.chmod(0o600)
    # A private /run: wireguard-go's control socket stays out of the host's /run/wireguard.
    in_ns(role, "unshare", "--mount", "--propagation", "private", "sh", "-c",
          f"mount -t tmpfs tmpfs /run && wg-quick up {path}")  # fmt: skip


def start_servers():
    banner = textwrap.dedent("""\
        import socket, sys, threading
        def serve(port):
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port)); s.listen(16)
            while True:
                c, _ = s.accept(); c.sendall(f"{sys.argv[1]}:{port}\\n".encode()); c.close()
        for p in (445, 3389):
            threading.Thread(target=serve, args=(p,), daemon=True).start()
        threading.Event().wait()
        """)
    for role in ("srv1", "srv2"):
        subprocess.Popen(["ip", "netns", "exec", ns(role), "python3", "-c", banner, role],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def ping(role, address, count=1, interval="0.2"):
    return in_ns(role, "ping", "-n", "-q", "-c", str(count), "-i", interval, "-W", "2", address, check=False,
                 timeout=120)  # fmt: skip


def tcp(role, address, port) -> str:
    code = f"import socket; s = socket.create_connection(({address!r}, {port}), 5); print(s.recv(64).decode().strip())"
    return in_ns(role, "python3", "-c", code, check=False, timeout=30).stdout.strip()


def gateway_peers(tmp_path) -> str:
    pid = (tmp_path / "timer.pid").read_text().strip()
    return sh("nsenter", "-t", pid, "-m", "-n", "wg", "show", "wg0", "peers").stdout


def assert_sealed():
    """Nothing can leave: no namespace has a default route, and the hub's bridges link only our veths."""
    for role in ROLES:
        assert in_ns(role, "ip", "route", "show", "default").stdout.strip() == "", role
    host_links = sh("ip", "-o", "link", "show").stdout
    assert not any(name in host_links for name in ("i-gw", "v-gw", "i-dev1", "v-srv1")), host_links


def both_reach_both(count=25):
    """Both devices ping both servers at the same time, with no loss, and open TCP 445 and 3389 on each."""
    for role in ("dev1", "dev2"):
        for server in ("srv1", "srv2"):
            testing.wait_until(lambda r=role, s=server: ping(r, VPC[s]).returncode == 0, timeout=60, what=f"{role}")
    runs = [(r, s, subprocess.Popen(["ip", "netns", "exec", ns(r), "ping", "-n", "-q", "-c", str(count), "-i", "0.1",
                                     "-W", "2", VPC[s]], stdout=subprocess.PIPE, text=True))
            for r in ("dev1", "dev2") for s in ("srv1", "srv2")]  # fmt: skip
    for role, server, proc in runs:
        out, _ = proc.communicate(timeout=60)
        assert " 0% packet loss" in out, (role, server, out)
    for role in ("dev1", "dev2"):
        for server in ("srv1", "srv2"):
            for port in (445, 3389):
                assert tcp(role, VPC[server], port) == f"{server}:{port}"


@pytest.fixture
def office(aws, portal, user, tmp_path):
    """The gateway booted from its exact user-data (dnf failing twice), two devices connected, two servers."""
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {testing.token_for(user)}")
    first = devices.device_create(user=user, name="Reception PC")  # known at launch: in the user-data
    net = networks.network_ensure(user)
    gateway = networks.gateway_ensure(net)
    assert isinstance(gateway, VpnGateway)
    raw = client("ec2").describe_instance_attribute(InstanceId=gateway.instance_id, Attribute="userData")
    user_data = base64.b64decode(raw["UserData"]["Value"]).decode()
    # The gateway's public address is its address on this test's "internet".
    VpnGateway.objects.filter(pk=gateway.pk).update(public_ip=INET["gw"])
    assert RecoveryNetwork.objects.get(user=user).ready

    console = boot_gateway(tmp_path, user_data)
    assert (tmp_path / "dnf.count").read_text().strip() == "3", console  # failed twice, then worked
    assert "reclo-gateway: done" in console and "gave up" not in console, console
    gateway.refresh_from_db()
    assert gateway.last_report is not None, console  # the agent's first report

    second = api.post("/api/v1/vpn/devices", {"name": "Dr. Smith's laptop"}, format="json").json()["device"]
    for role, device_id in (("dev1", first.pk), ("dev2", second["device_id"])):
        config = api.get(f"/api/v1/vpn/devices/{device_id}/config")
        assert config.status_code == 200, config.content
        # No server recovered in the portal here, so no DNS line (wg-quick would hand it to the host's resolvconf).
        assert "DNS" not in config.content.decode()
        device_up(tmp_path, role, config.content.decode())
    start_servers()
    # The second device reaches the gateway through the peer sync, without a restart.
    testing.wait_until(lambda: ping("dev2", VPC["srv1"]).returncode == 0, timeout=30, what="dev2 through the sync")
    return SimpleNamespace(api=api, first=first, second=second, gateway=gateway)


def test_two_devices_reach_two_recovered_servers_through_one_gateway(office, tmp_path):
    api, first, second = office.api, office.first, office.second
    both_reach_both()
    # MTU 1420 on both ends.
    assert "mtu 1420" in in_ns("dev1", "ip", "link", "show", "rc1").stdout
    pid = (tmp_path / "timer.pid").read_text().strip()
    assert "mtu 1420" in sh("nsenter", "-t", pid, "-n", "ip", "link", "show", "wg0").stdout

    # Handshakes reach the devices list.
    testing.wait_until(
        lambda: all(d["last_handshake"] for d in api.get("/api/v1/vpn/devices").json()["devices"]),
        timeout=20,
        what="handshakes reported",
    )

    # Revoked: the gateway drops it at its next sync; the other device is untouched.
    assert api.delete(f"/api/v1/vpn/devices/{second['device_id']}").status_code == 200
    testing.wait_until(lambda: gateway_peers(tmp_path).split() == [first.public_key], timeout=20, what="peer dropped")
    assert " 100% packet loss" in ping("dev2", VPC["srv1"], count=5).stdout
    assert tcp("dev2", VPC["srv2"], 445) == ""
    assert " 0% packet loss" in ping("dev1", VPC["srv2"], count=10, interval="0.1").stdout
    assert_sealed()


def test_the_tunnel_survives_a_gateway_reboot(office, tmp_path):
    both_reach_both(count=10)
    keys = {office.first.public_key, VpnDevice.objects.get(pk=office.second["device_id"]).public_key}
    before = VpnGateway.objects.get(pk=office.gateway.pk).last_report
    # The config on the gateway's disk knows only the device of launch time; the other comes back by the sync.
    launch_config = (tmp_path / "etc-up" / "wireguard" / "wg0.conf").read_text()
    assert launch_config.count("[Peer]") == 1 and office.first.public_key in launch_config

    console = reboot_gateway(tmp_path)
    assert (tmp_path / "dnf.count").read_text().strip() == "3", console  # no user-data again: no install
    assert "wg0" in in_ns("gw", "ip", "link", "show").stdout, console
    testing.wait_until(lambda: VpnGateway.objects.get(pk=office.gateway.pk).last_report > before, timeout=30,
                       what="the gateway reporting again")  # fmt: skip
    try:
        both_reach_both()
    except BaseException:
        print(console, (tmp_path / "sync.log").read_text()[-3000:])
        raise
    assert set(gateway_peers(tmp_path).split()) == keys
    # What a reboot wiped, the boot put back: the NAT rule and forwarding.
    assert "MASQUERADE" in in_ns("gw", "iptables", "-t", "nat", "-S").stdout
    assert in_ns("gw", "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    assert_sealed()
