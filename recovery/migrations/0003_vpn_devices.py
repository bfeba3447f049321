import uuid

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


def give_gateways_agent_tokens(apps, schema_editor):
    """Existing gateways get a peer-sync credential (only new launches carry it in their user-data)."""
    from recovery import vpn

    for gateway in apps.get_model("recovery", "VpnGateway").objects.all():
        token = vpn.new_agent_token()
        gateway.agent_token_enc = vpn.encrypt(token)
        gateway.agent_token_hash = vpn.hash_agent_token(token)
        gateway.save(update_fields=["agent_token_enc", "agent_token_hash"])


class Migration(migrations.Migration):
    dependencies = [
        ("recovery", "0002_drills"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RemoveField(model_name="vpngateway", name="client_public_key"),
        migrations.RemoveField(model_name="vpngateway", name="client_private_key_enc"),
        migrations.AddField(
            model_name="vpngateway", name="agent_token_enc", field=models.TextField(default=""), preserve_default=False
        ),
        migrations.AddField(
            model_name="vpngateway",
            name="agent_token_hash",
            field=models.CharField(default="", max_length=64),
            preserve_default=False,
        ),
        migrations.RunPython(give_gateways_agent_tokens, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="vpngateway", name="agent_token_hash", field=models.CharField(max_length=64, unique=True)
        ),
        migrations.AddField(
            model_name="vpngateway", name="last_report", field=models.DateTimeField(blank=True, null=True)
        ),
        migrations.AddField(
            model_name="recoverynetwork", name="vpn_dns", field=models.CharField(blank=True, max_length=255)
        ),
        migrations.CreateModel(
            name="VpnDevice",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=63)),
                ("address", models.GenericIPAddressField(protocol="IPv4")),
                ("public_key", models.CharField(max_length=44)),
                ("private_key_enc", models.TextField()),
                ("created", models.DateTimeField(default=django.utils.timezone.now)),
                ("last_handshake", models.DateTimeField(blank=True, null=True)),
                (
                    "user",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="vpn_devices",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={
                "ordering": ["created", "address"],
                "constraints": [
                    models.UniqueConstraint(fields=("user", "address"), name="vpn_device_unique_address")
                ],
            },
        ),
    ]
