"""Management commands: the vmimport role, rotating the VPN key encryption key."""

import json
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command

from reclo_site.cloud.clients import client
from recovery import vpn
from recovery.models import RecoveryNetwork, VpnDevice, VpnGateway


def test_setup_vmimport_creates_the_role_and_is_idempotent(aws, settings):
    out = StringIO()
    call_command("setup_vmimport", stdout=out)
    call_command("setup_vmimport", stdout=out)  # a second run updates, does not fail
    assert "role vmimport ready" in out.getvalue()
    iam = client("iam")
    role = iam.get_role(RoleName="vmimport")["Role"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert trust["Statement"][0]["Principal"] == {"Service": "vmie.amazonaws.com"}
    policy = iam.get_role_policy(RoleName="vmimport", PolicyName="reclo-vmimport")["PolicyDocument"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    resources = [r for s in policy["Statement"] for r in (s["Resource"] if isinstance(s["Resource"], list) else [])]
    assert "arn:aws:s3:::reclo-test/images/*" in resources
    assert not any(r.startswith("arn:aws:s3:::reclo-test/backups") for r in resources)


@pytest.mark.django_db
def test_rotate_vpn_keys_re_encrypts_with_the_first_key(settings, user):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.RECLO_VPN_KEYS = [old]
    gateway = VpnGateway.objects.create(
        network=RecoveryNetwork.objects.create(user=user),
        gateway_public_key="g",
        gateway_private_key_enc=vpn.encrypt("gateway-secret"),
        agent_token_enc=vpn.encrypt("agent-secret"),
        agent_token_hash=vpn.hash_agent_token("agent-secret"),
    )
    device = VpnDevice.objects.create(
        user=user, name="PC", address="10.214.0.2", public_key="d", private_key_enc=vpn.encrypt("device-secret")
    )
    settings.RECLO_VPN_KEYS = [new, old]
    call_command("rotate_vpn_keys", stdout=StringIO())
    settings.RECLO_VPN_KEYS = [new]
    gateway.refresh_from_db()
    assert vpn.decrypt(gateway.gateway_private_key_enc) == "gateway-secret"
    assert vpn.decrypt(gateway.agent_token_enc) == "agent-secret"
    device.refresh_from_db()
    assert vpn.decrypt(device.private_key_enc) == "device-secret"
