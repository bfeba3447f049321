"""Re-encrypt the stored VPN private keys and gateway credentials with the first of RECLO_VPN_KEYS."""

from django.core.management.base import BaseCommand
from django.db import transaction

from recovery import vpn
from recovery.models import VpnDevice, VpnGateway


class Command(BaseCommand):
    help = (
        "After putting a new key first in RECLO_VPN_KEYS (keeping the old one after it), re-encrypt every "
        "stored WireGuard private key with the new key; then the old key can be removed. Idempotent."
    )

    def handle(self, *args, **options):
        count = 0
        for pk in VpnGateway.objects.values_list("pk", flat=True):
            with transaction.atomic():
                gateway = VpnGateway.objects.select_for_update().get(pk=pk)
                gateway.gateway_private_key_enc = vpn.rotate(gateway.gateway_private_key_enc)
                gateway.agent_token_enc = vpn.rotate(gateway.agent_token_enc)
                gateway.save(update_fields=["gateway_private_key_enc", "agent_token_enc"])
            count += 1
        devices = 0
        for pk in VpnDevice.objects.values_list("pk", flat=True):
            with transaction.atomic():
                device = VpnDevice.objects.select_for_update().filter(pk=pk).first()
                if device is None:  # revoked meanwhile
                    continue
                device.private_key_enc = vpn.rotate(device.private_key_enc)
                device.save(update_fields=["private_key_enc"])
            devices += 1
        self.stdout.write(f"re-encrypted the keys of {count} VPN gateway(s) and {devices} VPN device(s)")
