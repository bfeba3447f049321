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


def _client_config():
    return vpn.client_config(
        client_private_key=vpn.generate_keypair().private,
        gateway_public_key=vpn.generate_keypair().public,
        endpoint="203.0.113.7",
        server_private_ip="10.213.1.4",
        server_name="front-desk",
    )


def test_the_client_config_routes_only_to_the_server():
    config = _client_config()
    assert "AllowedIPs = 10.213.1.4/32\n" in config
    assert "Endpoint = 203.0.113.7:51820\n" in config
    assert "Address = 10.214.0.2/32\n" in config
    assert "0.0.0.0/0" not in config


def test_the_gateway_user_data_configures_wireguard_and_nat():
    gateway, client = vpn.generate_keypair(), vpn.generate_keypair()
    data = vpn.gateway_user_data(
        gateway_private_key=gateway.private, client_public_key=client.public, vpc_cidr="10.213.0.0/16"
    )
    assert data.startswith("#!/bin/bash\n")
    assert f"PrivateKey = {gateway.private}\n" in data
    assert f"PublicKey = {client.public}\n" in data
    assert "ListenPort = 51820" in data
    assert "AllowedIPs = 10.214.0.2/32" in data
    assert "-s 10.214.0.0/24 -d 10.213.0.0/16 -j MASQUERADE" in data
    assert "systemctl enable --now wg-quick@wg0" in data


def _wg_quick_strip(tmp_path, name: str, text: str) -> str:
    wg_quick = testing.require_tool("wg-quick")
    path = tmp_path / f"{name}.conf"
    path.write_text(text)
    path.chmod(0o600)
    done = subprocess.run([wg_quick, "strip", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wg_quick_accepts_the_client_config(tmp_path):
    stripped = _wg_quick_strip(tmp_path, "reclo-front", _client_config())
    assert "PrivateKey" in stripped and "AllowedIPs = 10.213.1.4/32" in stripped
    assert "Address" not in stripped  # wg-quick's own keys are stripped, the rest is for wg


def test_wg_quick_accepts_the_gateway_config(tmp_path):
    config = vpn.gateway_config(
        gateway_private_key=vpn.generate_keypair().private,
        client_public_key=vpn.generate_keypair().public,
        vpc_cidr="10.213.0.0/16",
    )
    stripped = _wg_quick_strip(tmp_path, "wg0", config)
    assert "ListenPort = 51820" in stripped


@pytest.mark.django_db
def test_private_keys_never_reach_the_logs(chain, user, drive, caplog):
    from recovery import selectors, services
    from recovery.models import Instance, VpnGateway

    caplog.set_level(logging.DEBUG)
    recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    assert drive(recovery.pk).status == "ready"
    gateway = VpnGateway.objects.get()
    secrets_ = [vpn.decrypt(gateway.gateway_private_key_enc), vpn.decrypt(gateway.client_private_key_enc)]
    assert selectors.vpn_client_config(instance=Instance.objects.get())
    for secret in secrets_:
        assert secret not in caplog.text
        assert secret not in str(gateway.__dict__)
