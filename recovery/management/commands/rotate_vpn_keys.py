"""Re-encrypt the stored VPN private keys with the first of RECLO_VPN_KEYS."""

from django.core.management.base import BaseCommand
from django.db import transaction

from recovery import vpn
from recovery.models import VpnGateway


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
                gateway.client_private_key_enc = vpn.rotate(gateway.client_private_key_enc)
                gateway.save(update_fields=["gateway_private_key_enc", "client_private_key_enc"])
            count += 1
        self.stdout.write(f"re-encrypted the keys of {count} VPN gateway(s)")
