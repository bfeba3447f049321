"""Admin views of failovers, failbacks and instances (read-mostly: the pipeline owns these rows)."""

from django.contrib import admin

from .models import Failback, FailbackStep, Instance, Recovery, RecoveryNetwork, RecoveryStep, VpnDevice, VpnGateway


class StepInline(admin.TabularInline):
    """A pipeline run's steps, read-only."""

    extra = 0
    can_delete = False
    fields = ("name", "status", "started", "finished", "attempts", "retries", "detail", "error", "outputs")
    readonly_fields = fields


# What the engine writes on every run (a lease, its due time, its dates).
RUN_READONLY = ("lease_token", "lease_until", "due_at", "created", "updated", "finished")


class RecoveryStepInline(StepInline):
    model = RecoveryStep


@admin.register(Recovery)
class RecoveryAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "server_name", "status", "error_code", "instance_type", "created", "finished")
    list_filter = ("status", "import_method")
    search_fields = ("id", "server_name", "user__email")
    readonly_fields = RUN_READONLY
    inlines = [RecoveryStepInline]


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = (
        "instance_id",
        "user",
        "state",
        "instance_type",
        "private_ip",
        "public_ip",
        "launched",
        "stopped_at",
    )
    list_filter = ("state",)
    search_fields = ("instance_id", "user__email")


@admin.register(RecoveryNetwork)
class RecoveryNetworkAdmin(admin.ModelAdmin):
    list_display = ("user", "vpc_id", "subnet_id", "ready", "created")


@admin.register(VpnGateway)
class VpnGatewayAdmin(admin.ModelAdmin):
    list_display = ("network", "instance_id", "public_ip", "state", "generation", "created")
    # The encrypted private keys are never shown, not even encrypted.
    exclude = ("gateway_private_key_enc", "agent_token_enc", "agent_token_hash")


@admin.register(VpnDevice)
class VpnDeviceAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "address", "created", "last_handshake")
    exclude = ("private_key_enc",)


class FailbackStepInline(StepInline):
    model = FailbackStep


@admin.register(Failback)
class FailbackAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "server_name", "status", "kind", "error_code", "snapshot_at", "finished")
    list_filter = ("status", "kind")
    search_fields = ("id", "server_name", "user__email", "backup_ref")
    readonly_fields = RUN_READONLY
    inlines = [FailbackStepInline]
