"""Django's admin behind the portal's sign-in: the same limits, and the second factor.

The admin's own login form would check passwords with no limits at all, so
``/admin/login/`` *is* the portal's sign-in (accounts.views.login_view, the
limits of accounts/throttle.py, then a code). Only staff whose session
passed two-factor may use the admin; staff without it are sent to turn it on.
"""

from django.contrib import admin, messages
from django.shortcuts import redirect
from django.urls import reverse

from . import twofactor


class RecloAdminSite(admin.AdminSite):
    site_header = "ReClo administration"
    site_title = "ReClo admin"

    def has_permission(self, request):
        # OTPMiddleware's is_verified(): this session entered a code at sign-in.
        return super().has_permission(request) and request.user.is_verified()

    def login(self, request, extra_context=None):
        from .views import login_view

        user = request.user
        index = reverse("admin:index", current_app=self.name)
        if user.is_authenticated:
            if not (user.is_active and user.is_staff):
                messages.error(request, "This account cannot use the admin site.")
                return redirect("backups:dashboard")
            if not twofactor.is_enabled(user):
                messages.warning(request, "The admin site needs two-factor authentication: turn it on first.")
                return redirect("accounts:security")
            return redirect(twofactor.verify_url(request.GET.get("next") or index))
        return login_view(request, default_next=index)

    def password_change(self, request, extra_context=None):
        # The portal's page also revokes the account's tokens and other sessions.
        return redirect("accounts:password-change")
