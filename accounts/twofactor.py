"""Two-factor sign-in: TOTP devices and recovery codes (django-otp), and "recent verification".

An account has two-factor on when it has a confirmed ``TOTPDevice``. Its
recovery codes are one ``StaticDevice`` whose tokens are stored hashed (the
first 16 hex digits of a SHA-256, the most django-otp's column holds), so a
database dump does not yield working codes. Each code works once.

Destructive page actions wrap their view in :func:`require_recent_otp`: with
two-factor on, a code must have been entered in this browser session within
``RECLO_OTP_RECENT`` (10 minutes), else the owner is sent to enter one first.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import re
import secrets
import time

import django_otp
import qrcode
import qrcode.image.svg
from django.conf import settings
from django.contrib import messages
from django.db import transaction
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from reclo_site.errors import Code, ServiceError

from . import notify, throttle
from .audit import audit_record
from .models import AuditEvent, User

RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i to misread
_RECOVERY_LENGTH = 12
VERIFIED_AT_SESSION_KEY = "reclo_otp_verified_at"
TOTP_NAME = "Authenticator app"
RECOVERY_NAME = "Recovery codes"


def is_enabled(user) -> bool:
    """Whether sign-in needs a code for this user."""
    return bool(getattr(user, "pk", None)) and TOTPDevice.objects.filter(user=user, confirmed=True).exists()


# --- enrolment ------------------------------------------------------------------


def setup_begin(*, user: User) -> TOTPDevice:
    """A fresh unconfirmed TOTP device for `user` (replacing any earlier unconfirmed one).

    Refused (ServiceError FORBIDDEN) while two-factor is already on: turn it off first.
    """
    if is_enabled(user):
        raise ServiceError(Code.FORBIDDEN, "Two-factor authentication is already on.")
    TOTPDevice.objects.filter(user=user, confirmed=False).delete()
    return TOTPDevice.objects.create(user=user, name=TOTP_NAME, confirmed=False)


def totp_device(user: User) -> TOTPDevice | None:
    """The confirmed TOTP device, if two-factor is on."""
    return TOTPDevice.objects.filter(user=user, confirmed=True).first()


def pending_device(user: User) -> TOTPDevice | None:
    return TOTPDevice.objects.filter(user=user, confirmed=False).order_by("-pk").first()


def setup_qr_data_uri(device: TOTPDevice) -> str:
    """The device's otpauth:// URL as an SVG QR code in a data: URI (the VPN's QR library).

    A data: URI keeps the secret out of any URL the browser fetches or logs.
    """
    image = qrcode.make(device.config_url, image_factory=qrcode.image.svg.SvgPathFillImage, box_size=8, border=2)
    out = io.BytesIO()
    image.save(out)
    return "data:image/svg+xml;base64," + base64.b64encode(out.getvalue()).decode()


def setup_secret(device: TOTPDevice) -> str:
    """The secret in base32, in groups of four, for typing into an app by hand."""
    text = base64.b32encode(device.bin_key).decode().rstrip("=")
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def setup_confirm(*, user: User, code: str, address: str = "") -> list[str]:
    """Confirm the pending device with a code from the app; returns new recovery codes (shown once).

    ServiceError LOGIN_FAILED for a wrong code, NOT_FOUND when no set-up is pending.
    """
    device = pending_device(user)
    if device is None:
        raise ServiceError(Code.NOT_FOUND, "Start the set-up again.")
    throttle.attempt(f"otp:{user.pk}", address)
    if not device.verify_token(_digits(code)):
        throttle.failed(f"otp:{user.pk}")
        raise ServiceError(
            Code.LOGIN_FAILED, "That code does not match; check the app's clock and try the newest code."
        )
    throttle.succeeded(f"otp:{user.pk}", address)
    with transaction.atomic():
        TOTPDevice.objects.filter(user=user).exclude(pk=device.pk).delete()
        TOTPDevice.objects.filter(pk=device.pk).update(confirmed=True)
        codes = _recovery_codes_replace(user)
    audit_record(AuditEvent.Kind.TWOFACTOR_ENABLED, user=user, address=address)
    return codes


def recovery_codes_new(*, user: User, address: str = "") -> list[str]:
    """Replace the account's recovery codes with fresh ones; the old ones stop working."""
    if not is_enabled(user):
        raise ServiceError(Code.FORBIDDEN, "Turn on two-factor authentication first.")
    codes = _recovery_codes_replace(user)
    audit_record(AuditEvent.Kind.RECOVERY_CODES_NEW, user=user, address=address)
    return codes


def recovery_codes_left(user: User) -> int:
    return StaticToken.objects.filter(device__user=user).count()


def _recovery_codes_replace(user: User) -> list[str]:
    codes = ["-".join(_code_groups()) for _ in range(RECOVERY_CODES)]
    with transaction.atomic():
        StaticDevice.objects.filter(user=user).delete()
        device = StaticDevice.objects.create(user=user, name=RECOVERY_NAME, confirmed=True)
        StaticToken.objects.bulk_create(StaticToken(device=device, token=_recovery_hash(c)) for c in codes)
    return codes


def _code_groups() -> list[str]:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_LENGTH))
    return [raw[i : i + 4] for i in range(0, _RECOVERY_LENGTH, 4)]


def _recovery_hash(code: str) -> str:
    normal = re.sub(r"[\s-]", "", code.lower())
    return hashlib.sha256(f"reclo-recovery:{normal}".encode()).hexdigest()[:16]


def _digits(code: str) -> str:
    return re.sub(r"\s", "", code or "")


# --- verification ----------------------------------------------------------------


def verify(*, user: User, code: str, address: str):
    """Check a code from the app, or a recovery code (used up by this); returns the device.

    Counted by accounts/throttle.py per (account, address) and per address,
    like passwords: ServiceError LOGIN_THROTTLED while an address must wait, LOGIN_FAILED for a
    wrong code. django-otp's own checks refuse a TOTP code used before.
    """
    if not isinstance(code, str) or not code.strip() or len(code) > 64:
        raise ServiceError(Code.LOGIN_FAILED, "Enter the 6-digit code from your authenticator app.")
    account = f"otp:{user.pk}"
    throttle.attempt(account, address)
    device = _match(user, code)
    if device is None:
        if throttle.failed(account) == settings.LOGIN_ALERT_AFTER:
            notify.owner_email(user, "login_burst", {"address": address, "what": "two-factor codes"})
        audit_record(AuditEvent.Kind.LOGIN_FAILED, user=user, address=address, step="two-factor")
        raise ServiceError(Code.LOGIN_FAILED, "That code does not match.")
    throttle.succeeded(account, address)
    if isinstance(device, StaticDevice):
        audit_record(AuditEvent.Kind.RECOVERY_CODE_USED, user=user, address=address, left=recovery_codes_left(user))
    return device


def _match(user: User, code: str):
    digits = _digits(code)
    if digits.isdigit() and len(digits) == 6:
        for device in TOTPDevice.objects.filter(user=user, confirmed=True):
            # verify_token() locks the row (select_for_update), so one code cannot be used twice at once.
            verified = django_otp.verify_token(user, device.persistent_id, digits)
            if verified is not None:
                return verified
        return None
    hashed = _recovery_hash(code)
    for device in StaticDevice.objects.filter(user=user, confirmed=True):
        verified = django_otp.verify_token(user, device.persistent_id, hashed)
        if verified is not None:
            return verified
    return None


def disable(*, user: User, code: str, address: str) -> None:
    """Turn two-factor off after a right code (app or recovery); emails the owner.

    Deletes the TOTP device and every recovery code. Idempotent only in that
    a second call finds nothing on and refuses (FORBIDDEN).
    """
    if not is_enabled(user):
        raise ServiceError(Code.FORBIDDEN, "Two-factor authentication is not on.")
    verify(user=user, code=code, address=address)
    with transaction.atomic():
        TOTPDevice.objects.filter(user=user).delete()
        StaticDevice.objects.filter(user=user).delete()
    audit_record(AuditEvent.Kind.TWOFACTOR_DISABLED, user=user, address=address)
    notify.owner_email(user, "twofactor_disabled", {"address": address})


# --- sessions ----------------------------------------------------------------------


def mark_verified(request, device) -> None:
    """Record in the session that this browser just passed the second factor."""
    django_otp.login(request, device)
    request.session[VERIFIED_AT_SESSION_KEY] = time.time()


def is_recent(request) -> bool:
    """Whether a code was entered in this session within ``RECLO_OTP_RECENT``."""
    at = request.session.get(VERIFIED_AT_SESSION_KEY)
    return at is not None and time.time() - float(at) <= settings.RECLO_OTP_RECENT.total_seconds()


def needs_code(request) -> bool:
    """Whether a destructive action by this request's user must first ask for a code."""
    user = request.user
    return user.is_authenticated and is_enabled(user) and not is_recent(request)


def verify_url(next_url: str) -> str:
    return reverse("accounts:verify") + "?" + urlencode({"next": next_url})


def ask_for_code(request):
    """None when this request may destroy something; else the redirect that asks for a code first.

    For views where only some requests are destructive (terminate, not
    start): ``if (asked := ask_for_code(request)): return asked``. The rules
    are those of :func:`require_recent_otp`.
    """
    if not needs_code(request):
        return None
    from reclo_site.http import client_address

    posted = request.POST.get("otp_code", "") if request.method == "POST" else ""
    if posted:
        try:
            device = verify(user=request.user, code=posted, address=client_address(request))
        except ServiceError as exc:
            messages.error(request, exc.message)
        else:
            mark_verified(request, device)
            return None
    if request.method == "GET":
        back = request.get_full_path()
    else:
        referer = request.headers.get("Referer", "")
        safe = url_has_allowed_host_and_scheme(referer, {request.get_host()}, request.is_secure())
        back = referer if referer and safe else reverse(settings.LOGIN_REDIRECT_URL)
    if not posted:
        messages.info(request, "To confirm this, enter a code from your authenticator app first.")
    return redirect(verify_url(back))


def require_recent_otp(view):
    """Decorate a page view that destroys something (delete, terminate, revoke, unlock).

    With two-factor off, it does nothing. With it on, the view runs only if
    this session entered a code within ``RECLO_OTP_RECENT`` (10 minutes), or
    the POST itself carries a right one in an ``otp_code`` field. Otherwise
    the owner is redirected to enter a code and then brought back: to this
    page for a GET (a confirmation page), to the page the POST came from
    (its Referer, when it is ours) for a POST, which she then submits again.
    Put it *below* ``@login_required``.
    """

    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        asked = ask_for_code(request)
        return asked if asked is not None else view(request, *args, **kwargs)

    return wrapper
