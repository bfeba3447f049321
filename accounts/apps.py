from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class AccountsConfig(AppConfig):
    default = True  # this module also holds the admin's config below
    name = "accounts"
    verbose_name = "Accounts"

    def ready(self):
        from . import schema  # noqa: F401 - registers the OpenAPI auth extension


class RecloAdminConfig(admin_apps.AdminConfig):
    """django.contrib.admin with ReClo's admin site (accounts/admin_site.py) as `admin.site`."""

    default = False
    default_site = "accounts.admin_site.RecloAdminSite"
