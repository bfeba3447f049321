"""Account pages: sign-up, sign-in (password, then a code), password change and reset, two-factor, tokens."""

import time

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login, logout
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import (
    PasswordChangeView,
    PasswordResetCompleteView,
    PasswordResetConfirmView,
    PasswordResetDoneView,
    PasswordResetView,
)
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse, reverse_lazy
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST
from django_otp.plugins.otp_static.models import StaticDevice

from reclo_site.errors import Code, ServiceError
from reclo_site.http import client_address

from . import services, throttle, twofactor
from .audit import audit_record
from .forms import CodeForm, LoginForm, PasswordResetForm, SetupCodeForm, SignupForm, TimeZoneForm, TokenCreateForm
from .models import ApiToken, AuditEvent, User


def signup(request):
    if request.user.is_authenticated:
        return redirect("backups:dashboard")
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        if user is not None:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome to ReClo, {user.username}. Add your first server below.")
            return redirect("backups:dashboard")
    return render(request, "accounts/signup.html", {"form": form})


LOGIN_PENDING_SESSION_KEY = "reclo_login_pending"


def _safe_next(request, target: str | None) -> str | None:
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return target
    return None


def login_view(request, default_next: str | None = None):
    """Sign-in, step one: email and password. With two-factor on, step two asks for a code."""
    if request.user.is_authenticated:
        return redirect("backups:dashboard")
    form = LoginForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        address = client_address(request)
        try:
            user = services.user_check_login(
                email=form.cleaned_data["email"], password=form.cleaned_data["password"], address=address
            )
        except ServiceError as exc:
            form.add_error(None, exc.message)
            status = 429 if exc.code == Code.LOGIN_THROTTLED else 200
        else:
            target = _safe_next(request, request.POST.get("next") or request.GET.get("next")) or default_next
            if twofactor.is_enabled(user):
                # Not signed in yet: the session only remembers who passed the password, briefly.
                request.session[LOGIN_PENDING_SESSION_KEY] = {"user": user.pk, "at": time.time(), "next": target}
                return redirect("accounts:verify")
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect(target or "backups:dashboard")
    context = {"form": form, "next": request.GET.get("next", "")}
    return render(request, "accounts/login.html", context, status=status)


def _pending_user(request):
    pending = request.session.get(LOGIN_PENDING_SESSION_KEY)
    if not pending or time.time() - pending.get("at", 0) > settings.RECLO_OTP_LOGIN_STEP.total_seconds():
        return None, None
    user = User.objects.filter(pk=pending.get("user"), is_active=True).first()
    return user, pending.get("next")


def verify(request):
    """Enter a code: step two of signing in, or again before a destructive action."""
    signing_in = not request.user.is_authenticated
    if signing_in:
        user, target = _pending_user(request)
        if user is None:
            request.session.pop(LOGIN_PENDING_SESSION_KEY, None)
            messages.info(request, "Sign in again: the code must follow the password within 5 minutes.")
            return redirect("accounts:login")
    else:
        user, target = request.user, _safe_next(request, request.POST.get("next") or request.GET.get("next"))
        if not twofactor.is_enabled(user):
            return redirect(target or "backups:dashboard")
    form = CodeForm(request.POST or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        try:
            device = twofactor.verify(user=user, code=form.cleaned_data["code"], address=client_address(request))
        except ServiceError as exc:
            form.add_error("code", exc.message)
            status = 429 if exc.code == Code.LOGIN_THROTTLED else 200
        else:
            if signing_in:
                request.session.pop(LOGIN_PENDING_SESSION_KEY, None)
                login(request, user, backend="django.contrib.auth.backends.ModelBackend")
                services.login_completed(user=user, device=device, address=client_address(request))
            twofactor.mark_verified(request, device)
            if isinstance(device, StaticDevice):
                left = twofactor.recovery_codes_left(user)
                messages.warning(
                    request,
                    f"You used a recovery code; {left} left. If your phone is lost, "
                    "turn two-factor off and on again with a new phone under Security.",
                )
            return redirect(target or "backups:dashboard")
    context = {"form": form, "signing_in": signing_in, "next": target or ""}
    return render(request, "accounts/verify.html", context, status=status)


@require_POST
def logout_view(request):
    logout(request)
    messages.info(request, "You have been logged out.")
    return redirect("accounts:login")


class PasswordChange(PasswordChangeView):
    template_name = "accounts/password_change.html"
    success_url = reverse_lazy("accounts:security")

    def form_valid(self, form):
        response = super().form_valid(form)  # saves, and keeps this session signed in
        revoked = services.password_changed(user=form.user, address=client_address(self.request))
        messages.success(self.request, _revoked_words("Your password has been changed.", revoked))
        return response


def _revoked_words(first: str, revoked: int) -> str:
    """What a new password ended, in words for the page."""
    signed_out = "Every other browser signed in to your account has been signed out"
    if not revoked:
        return f"{first} {signed_out}; you had no API tokens to revoke. Enrolled servers keep backing up."
    tokens = f"{revoked} API token was revoked" if revoked == 1 else f"{revoked} API tokens were revoked"
    used = "it" if revoked == 1 else "them"
    return (
        f"{first} {signed_out}, and {tokens}: agents and scripts that used {used} must log in again. "
        "Enrolled servers keep backing up."
    )


class PasswordReset(PasswordResetView):
    """Ask for a reset link: the same answer for every address, limited per address and email."""

    template_name = "accounts/password_reset.html"
    form_class = PasswordResetForm
    success_url = reverse_lazy("accounts:password-reset-sent")

    def dispatch(self, request, *args, **kwargs):
        if request.user.is_authenticated:
            return redirect("accounts:password-change")
        return super().dispatch(request, *args, **kwargs)

    def form_valid(self, form):
        address = client_address(self.request)
        email = form.cleaned_data["email"]
        address_ok, email_ok = throttle.reset_allowed(email, address)
        if not address_ok:
            form.add_error(None, "Too many reset requests from your network; try again in an hour.")
            return self.render_to_response(self.get_context_data(form=form), status=429)
        known = User.objects.filter(email__iexact=email).first()
        audit_record(
            AuditEvent.Kind.PASSWORD_RESET_REQUESTED, user=known, address=address, email=email[:254], sent=email_ok
        )
        if email_ok:
            form.save()
        return redirect(self.success_url)


class PasswordResetSent(PasswordResetDoneView):
    template_name = "accounts/password_reset_sent.html"


class PasswordResetConfirm(PasswordResetConfirmView):
    template_name = "accounts/password_reset_confirm.html"
    success_url = reverse_lazy("accounts:password-reset-complete")

    def form_valid(self, form):
        response = super().form_valid(form)
        revoked = services.password_changed(user=form.user, address=client_address(self.request), reset=True)
        self.request.session["reclo_reset_revoked"] = revoked
        return response


class PasswordResetComplete(PasswordResetCompleteView):
    template_name = "accounts/password_reset_complete.html"

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        revoked = self.request.session.pop("reclo_reset_revoked", None)
        context["revoked_words"] = _revoked_words("", revoked).strip() if revoked is not None else ""
        return context


@login_required
def security(request):
    """Password and two-factor: what is on, and the buttons to change it."""
    user = request.user
    context = {
        "enabled": twofactor.is_enabled(user),
        "codes_left": twofactor.recovery_codes_left(user),
        "zone_form": TimeZoneForm(initial={"time_zone": user.time_zone}),
    }
    return render(request, "accounts/security.html", context)


@login_required
@require_POST
def time_zone_set(request):
    """Change the zone times are shown in."""
    form = TimeZoneForm(request.POST)
    if form.is_valid():
        services.user_set_time_zone(
            user=request.user, time_zone=form.cleaned_data["time_zone"], address=client_address(request)
        )
        messages.success(request, f"Times are now shown in {request.user.time_zone}.")
    else:
        messages.error(request, "Choose a time zone from the list.")
    return redirect(reverse("accounts:security") + "#time-zone")


@login_required
def twofactor_setup(request):
    """Turn two-factor on: scan a QR code, confirm with a code, see the recovery codes once."""
    if twofactor.is_enabled(request.user):
        return redirect("accounts:security")
    device = twofactor.pending_device(request.user) if request.method == "POST" else None
    if device is None:
        device = twofactor.setup_begin(user=request.user)
    form = SetupCodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            codes = twofactor.setup_confirm(
                user=request.user, code=form.cleaned_data["code"], address=client_address(request)
            )
        except ServiceError as exc:
            form.add_error("code", exc.message)
        else:
            twofactor.mark_verified(request, twofactor.totp_device(request.user))
            return _recovery_codes_page(request, codes, first=True)
    context = {
        "form": form,
        "qr": twofactor.setup_qr_data_uri(device),
        "secret": twofactor.setup_secret(device),
        "otpauth": device.config_url,  # an app's own scheme: opened on the phone, never fetched
    }
    response = render(request, "accounts/twofactor_setup.html", context)
    response["Cache-Control"] = "no-store"  # it shows the secret
    return response


def _recovery_codes_page(request, codes, *, first: bool):
    response = render(request, "accounts/recovery_codes.html", {"codes": codes, "first": first})
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
@twofactor.require_recent_otp
def recovery_codes_new(request):
    try:
        codes = twofactor.recovery_codes_new(user=request.user, address=client_address(request))
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("accounts:security")
    return _recovery_codes_page(request, codes, first=False)


@login_required
def twofactor_disable(request):
    """Turn two-factor off: needs a code (app or recovery), emails the owner."""
    if not twofactor.is_enabled(request.user):
        return redirect("accounts:security")
    form = CodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            twofactor.disable(user=request.user, code=form.cleaned_data["code"], address=client_address(request))
        except ServiceError as exc:
            form.add_error("code", exc.message)
        else:
            messages.success(request, "Two-factor authentication is off. We emailed you about it.")
            return redirect("accounts:security")
    return render(request, "accounts/twofactor_disable.html", {"form": form})


@login_required
def tokens(request):
    form = TokenCreateForm(request.POST or None)
    new_key = None
    if request.method == "POST" and form.is_valid():
        token, new_key = services.token_create(
            user=request.user, name=form.cleaned_data["name"], address=client_address(request)
        )
        messages.success(request, f"Token “{token.name}” created. Copy it now: it will not be shown again.")
        form = TokenCreateForm()
    rows = ApiToken.objects.filter(user=request.user).select_related("server")
    response = render(request, "accounts/tokens.html", {"form": form, "tokens": rows, "new_key": new_key})
    # The page may show a fresh token: keep it out of every cache.
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_http_methods(["GET", "POST"])
@twofactor.require_recent_otp
def token_revoke(request, token_id):
    """Confirm (GET), then revoke (POST, CSRF-checked) one of the owner's API tokens."""
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    if request.method != "POST":
        return render(request, "accounts/token_revoke.html", {"token": token})
    services.token_revoke(token=token, address=client_address(request))
    messages.success(request, f"Token “{token.name}” revoked; agents using it must log in again.")
    return redirect("accounts:tokens")


@login_required
def activity(request):
    """The owner's own audit log, newest first."""
    page = Paginator(AuditEvent.objects.filter(user=request.user), 50).get_page(request.GET.get("page"))
    return render(request, "accounts/activity.html", {"page": page})
