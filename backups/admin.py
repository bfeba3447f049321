from django.contrib import admin

from .models import AccountLimits, Backup, ObjectDeletion, Server


@admin.register(Server)
class ServerAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "created", "schedule", "status_at")
    search_fields = ("name", "user__email")


@admin.register(Backup)
class BackupAdmin(admin.ModelAdmin):
    """Read-mostly: backups change through the services (the API and the pages), not here."""

    list_display = ("id", "server", "disk", "kind", "status", "file_size", "date_created")
    list_filter = ("status", "kind")
    search_fields = ("id", "server__name", "user__email", "key")
    list_select_related = ("server",)
    readonly_fields = [f.name for f in Backup._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(AccountLimits)
class AccountLimitsAdmin(admin.ModelAdmin):
    list_display = ("user", "max_file_size", "lock_days", "drill_sandbox")
    search_fields = ("user__email",)


@admin.register(ObjectDeletion)
class ObjectDeletionAdmin(admin.ModelAdmin):
    list_display = ("key", "not_before", "attempts", "reason")
    search_fields = ("key",)
