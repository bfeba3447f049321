"""WireGuard keys, their encryption at rest, and the configs (checked by wg-quick where installed)."""

import base64
import logging
import subprocess

import pytest
from cryptography.fernet import Fernet

from reclo_site import testing
from recovery import vpn


def test_it_makes_wireguard_key_pairs():
    pair = vpn.generate_keypair()
    assert len(base64.b64decode(pair.private)) == 32
    assert len(base64.b64decode(pair.public)) == 32
    assert vpn.public_key_of(pair.private) == pair.public
    assert vpn.generate_keypair().private != pair.private


def test_a_key_pair_never_shows_its_private_key():
    pair = vpn.generate_keypair()
    assert pair.private not in repr(pair)
    assert pair.private not in str(pair)


def test_private_keys_are_encrypted_and_decrypted(settings):
    settings.RECLO_VPN_KEYS = [Fernet.generate_key().decode()]
    secret = vpn.generate_keypair().private
    token = vpn.encrypt(secret)
    assert secret not in token
    assert vpn.decrypt(token) == secret


def test_a_new_key_first_still_reads_old_tokens_and_rotation_moves_them(settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.RECLO_VPN_KEYS = [old]
    token = vpn.encrypt("secret")
    settings.RECLO_VPN_KEYS = [new, old]
    assert vpn.decrypt(token) == "secret"
    rotated = vpn.rotate(token)
    settings.RECLO_VPN_KEYS = [new]
    assert vpn.decrypt(rotated) == "secret"
    with pytest.raises(ValueError, match="RECLO_VPN_KEYS") as info:
        vpn.decrypt(token)
    assert "secret" not in str(info.value)


def test_the_local_default_key_is_a_fernet_key(settings):
    Fernet(settings.RECLO_VPN_KEYS[0].encode())


def _client_config(dns=""):
    return vpn.client_config(
        device_private_key=vpn.generate_keypair().private,
        device_address="10.214.0.3",
        device_name="Reception\nPC",
        gateway_public_key=vpn.generate_keypair().public,
        endpoint="203.0.113.7",
        routed_cidr="10.213.1.0/24",
        dns=dns,
    )


def test_a_device_config_routes_the_whole_recovery_subnet_and_nothing_else():
    config = _client_config()
    assert "AllowedIPs = 10.213.1.0/24\n" in config
    assert "Endpoint = 203.0.113.7:51820\n" in config
    assert "Address = 10.214.0.3/32\n" in config
    assert "MTU = 1420\n" in config
    assert "0.0.0.0/0" not in config and "DNS" not in config
    # The owner's name stays on its comment line.
    assert config.startswith("# ReClo recovery VPN: Reception PC\n[Interface]\n")


def test_a_device_config_has_the_dns_entry_when_one_is_set():
    assert "DNS = 10.213.1.10\n" in _client_config(dns="10.213.1.10")


def _peers():
    return [vpn.Peer(vpn.generate_keypair().public, "10.214.0.2", "Reception PC"),
            vpn.Peer(vpn.generate_keypair().public, "10.214.0.3", "Phone")]  # fmt: skip


def test_the_gateway_user_data_configures_wireguard_nat_and_the_peer_sync_agent():
    gateway, peers = vpn.generate_keypair(), _peers()
    data = vpn.gateway_user_data(
        gateway_private_key=gateway.private,
        peers=peers,
        vpc_cidr="10.213.0.0/16",
        agent_token="tok-en",
        portal_url="https://portal.example/",
    )
    assert data.startswith("#!/bin/bash\n")
    assert "set -e" not in data  # an early exit would leave the gateway half-configured for good
    assert f"PrivateKey = {gateway.private}\n" in data
    for peer in peers:
        assert f"PublicKey = {peer.public_key}\nAllowedIPs = {peer.address}/32\n" in data
    assert "ListenPort = 51820" in data and "MTU = 1420\n" in data
    assert "-s 10.214.0.0/24 -d 10.213.0.0/16 -j MASQUERADE" in data
    assert "retry install_tools" in data and "retry systemctl enable --now wg-quick@wg0" in data
    assert "RECLO_GATEWAY_TOKEN=tok-en\nRECLO_PORTAL_URL=https://portal.example\n" in data
    assert "OnUnitActiveSec=30" in data and "systemctl enable --now reclo-peer-sync.timer" in data
    assert "wg syncconf wg0" in data and vpn.AGENT_PATH in data


def test_the_gateway_user_data_is_valid_bash(tmp_path):
    data = vpn.gateway_user_data(
        gateway_private_key=vpn.generate_keypair().private,
        peers=_peers(),
        vpc_cidr="10.213.0.0/16",
        agent_token="t",
        portal_url="http://p",
    )
    path = tmp_path / "user-data"
    path.write_text(data)
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    script = tmp_path / "sync"
    script.write_text(vpn.PEER_SYNC_SCRIPT)
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_agent_tokens_are_random_and_stored_hashed():
    one, two = vpn.new_agent_token(), vpn.new_agent_token()
    assert one != two and len(one) >= 40
    assert vpn.hash_agent_token(one) != one and len(vpn.hash_agent_token(one)) == 64


def _wg_quick_strip(tmp_path, name: str, text: str) -> str:
    wg_quick = testing.require_tool("wg-quick")
    path = tmp_path / f"{name}.conf"
    path.write_text(text)
    path.chmod(0o600)
    done = subprocess.run([wg_quick, "strip", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wg_quick_accepts_the_client_config(tmp_path):
    stripped = _wg_quick_strip(tmp_path, "reclo-front", _client_config(dns="10.213.1.10"))
    assert "PrivateKey" in stripped and "AllowedIPs = 10.213.1.0/24" in stripped
    assert "Address" not in stripped  # wg-quick's own keys are stripped, the rest is for wg


def test_wg_quick_accepts_the_gateway_config(tmp_path):
    config = vpn.gateway_config(
        gateway_private_key=vpn.generate_keypair().private,
        peers=_peers(),
        vpc_cidr="10.213.0.0/16",
    )
    stripped = _wg_quick_strip(tmp_path, "wg0", config)
    assert "ListenPort = 51820" in stripped and stripped.count("[Peer]") == 2


@pytest.mark.django_db
def test_private_keys_never_reach_the_logs(chain, user, drive, caplog):
    from recovery import selectors, services
    from recovery.models import Instance, VpnDevice, VpnGateway

    caplog.set_level(logging.DEBUG)
    recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    assert drive(recovery.pk).status == "ready"
    gateway = VpnGateway.objects.get()
    assert selectors.vpn_client_config(instance=Instance.objects.get())
    device = VpnDevice.objects.get()
    secrets_ = [
        vpn.decrypt(gateway.gateway_private_key_enc),
        vpn.decrypt(gateway.agent_token_enc),
        vpn.decrypt(device.private_key_enc),
    ]
    for secret in secrets_:
        assert secret not in caplog.text
        assert secret not in str(gateway.__dict__)
