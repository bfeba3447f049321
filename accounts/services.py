"""Account writes: registration, log-in checks, tokens. Views call these."""

import logging
import re

from django.conf import settings
from django.contrib.auth import authenticate, password_validation
from django.contrib.auth.tokens import default_token_generator
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django_otp.plugins.otp_static.models import StaticDevice

from reclo_site import cloud
from reclo_site.cloud import storage
from reclo_site.errors import Code, ServiceError
from reclo_site.localtime import valid_zone

from . import notify, throttle, twofactor
from .audit import audit_record
from .models import ApiToken, AuditEvent, User
from .tokens import hash_token, new_token

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"^[A-Za-z0-9._-]{5,150}$")
MAX_PASSWORD_LENGTH = 4096
EXPIRE_BATCH = 500


def _validate_registration(username: str, email: str, password: str) -> str:
    if not USERNAME_RE.match(username or ""):
        raise ServiceError(
            Code.BAD_USERNAME, "Username must be 5–150 characters: letters, digits, '.', '_' or '-'.", field="username"
        )
    try:
        validate_email(email or "")
    except ValidationError:
        raise ServiceError(Code.BAD_EMAIL, "Enter a valid email address.", field="email") from None
    if len(password or "") > MAX_PASSWORD_LENGTH:
        raise ServiceError(Code.BAD_PASSWORD, "Password is too long.", field="password")
    try:
        password_validation.validate_password(password or "", User(username=username, email=email))
    except ValidationError as exc:
        raise ServiceError(Code.BAD_PASSWORD, " ".join(exc.messages), field="password") from None
    return email.strip()


def user_register(*, username: str, email: str, password: str, time_zone: str = "UTC") -> User:
    """Create a user and provision their cloud storage area.

    If provisioning fails the user is deleted again and ServiceError(Code.STORAGE_PROVISIONING_FAILED) is
    raised, so nothing is left half-made. The cloud call happens after the
    user row is committed, never inside the transaction.
    """
    email = _validate_registration(username, email, password)
    if User.objects.filter(email__iexact=email).exists():
        raise ServiceError(Code.EMAIL_TAKEN, "A user with that email already exists.", field="email")
    if User.objects.filter(username__iexact=username).exists():
        raise ServiceError(Code.BAD_USERNAME, "That username is taken.", field="username")
    try:
        with transaction.atomic():
            user = User.objects.create_user(
                username=username,
                email=email,
                password=password,
                time_zone=time_zone if valid_zone(time_zone) else "UTC",
            )
    except IntegrityError:  # lost a race with an identical sign-up
        raise ServiceError(Code.EMAIL_TAKEN, "A user with that email already exists.", field="email") from None
    try:
        storage.provision_tenant(user.pk, user.username)
    except cloud.CloudError as exc:
        log.error("storage provisioning failed for new user %s: %s", user.pk, exc)
        user.delete()
        raise ServiceError(
            Code.STORAGE_PROVISIONING_FAILED, "Could not prepare cloud storage for the new account; try again later."
        ) from exc
    return user


def user_set_time_zone(*, user: User, time_zone: str, address: str = "") -> None:
    """Show `user` every time in `time_zone` from now on (pages and emails; the API stays UTC)."""
    if not valid_zone(time_zone):
        raise ServiceError(Code.MALFORMED, "Choose a time zone from the list.", field="time_zone")
    if user.time_zone == time_zone:
        return
    User.objects.filter(pk=user.pk).update(time_zone=time_zone)
    user.time_zone = time_zone
    audit_record(AuditEvent.Kind.TIME_ZONE_CHANGED, user=user, address=address, time_zone=time_zone)


def user_check_login(*, email: str, password: str, address: str) -> User:
    """Check an email and password, with the limits of accounts/throttle.py.

    Unknown emails and wrong passwords fail alike (LOGIN_FAILED) so accounts cannot be
    enumerated. Beyond the free failures of an (account, address) pair or of
    an address, attempts wait a growing delay (LOGIN_THROTTLED with Retry-After); a right
    password from an address with no failures is never refused. A burst of
    failures on an account emails its owner once. This is the first step
    only: with two-factor on, the caller asks for a code next.
    """
    if not isinstance(email, str) or not email.strip():
        raise ServiceError(Code.LOGIN_BAD_EMAIL, "Enter a valid email address.")
    try:
        validate_email(email.strip())
    except ValidationError:
        raise ServiceError(Code.LOGIN_BAD_EMAIL, "Enter a valid email address.") from None
    if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD_LENGTH:
        raise ServiceError(Code.LOGIN_BAD_PASSWORD, "Enter your password (at most 4096 characters).")
    email = email.strip()
    throttle.attempt(email, address)
    candidate = User.objects.filter(email__iexact=email).first()
    user = None
    if candidate is not None:
        # authenticate() runs the hasher (and upgrades old hashes).
        user = authenticate(username=candidate.username, password=password)
        if user is None and candidate.check_password(password) and not candidate.is_active:
            raise ServiceError(Code.ACCOUNT_DEACTIVATED, "This account is deactivated.")
    else:
        # Hash anyway so unknown emails take as long as wrong passwords.
        User().set_password(password)
    if user is None:
        if throttle.failed(email) == settings.LOGIN_ALERT_AFTER and candidate is not None:
            notify.owner_email(candidate, "login_burst", {"address": address, "what": "passwords"})
        # Attributed to the account when it exists, so its owner sees the attempt.
        audit_record(AuditEvent.Kind.LOGIN_FAILED, user=candidate, address=address, email=email[:254])
        raise ServiceError(Code.LOGIN_FAILED, "Email or password does not match.")
    throttle.succeeded(email, address)
    if not twofactor.is_enabled(user):  # else "logged in" is recorded after the code (login_completed)
        audit_record(AuditEvent.Kind.LOGIN_OK, user=user, address=address)
    return user


def login_completed(*, user: User, device, address: str) -> None:
    """Record a sign-in that passed both steps (the password, then `device`'s code)."""
    factor = "recovery code" if isinstance(device, StaticDevice) else "authenticator app"
    audit_record(AuditEvent.Kind.LOGIN_OK, user=user, address=address, second_factor=factor)


def user_credentials_revoke(*, user: User) -> int:
    """After a password change or reset: end every way into the account but the caller's browser.

    - API tokens: every live token of the account is revoked (one UPDATE;
      returns how many), so agents and scripts must log in with the new
      password. Server credentials — tokens bound to one enrolled server,
      which act for that server only — are kept, so backups do not stop.
    - Browser sessions: Django binds each session to a hash of the password,
      so every other session ends at its next request once the password has
      changed. The caller keeps its own with ``update_session_auth_hash``
      (password change) or has none (reset).

    Idempotent: a second call finds no live token.
    """
    tokens = ApiToken.objects.filter(user=user, revoked_at__isnull=True)
    if any(field.name == "server" for field in ApiToken._meta.get_fields()):
        tokens = tokens.filter(server__isnull=True)
    return tokens.update(revoked_at=timezone.now())


def password_changed(*, user: User, address: str = "", reset: bool = False) -> int:
    """Record a new password (changed or reset): revoke the rest, audit, email the owner.

    Returns how many API tokens were revoked (see user_credentials_revoke).
    """
    revoked = user_credentials_revoke(user=user)
    kind = AuditEvent.Kind.PASSWORD_RESET if reset else AuditEvent.Kind.PASSWORD_CHANGED
    audit_record(kind, user=user, address=address, revoked=revoked)
    notify.owner_email(user, "password_changed", {"address": address, "reset": reset, "revoked": revoked})
    return revoked


def password_reset_email_send(*, user_id: int) -> bool:
    """Email the reset link to an active user with a usable password; False when there is none.

    Runs in a worker so a known address answers as fast as an unknown one.
    The link carries Django's own reset token, which a password change or a
    sign-in voids, and works for PASSWORD_RESET_TIMEOUT (an hour).
    """
    user = User.objects.filter(pk=user_id, is_active=True).first()
    if user is None or not user.has_usable_password():
        return False
    context = {
        "uid": urlsafe_base64_encode(force_bytes(user.pk)),
        "token": default_token_generator.make_token(user),
        "hours": settings.PASSWORD_RESET_TIMEOUT // 3600,
    }
    return notify.owner_email(user, "password_reset", context)


def token_create(*, user: User, name: str, address: str = "", server=None) -> tuple[ApiToken, str]:
    """Issue a token for `user`. Returns the row and the token itself, shown once.

    With `server` (a `backups.Server` of the user) it is a server credential,
    limited to that server (`accounts.permissions.CredentialScope`).
    """
    key = new_token()
    now = timezone.now()
    token = ApiToken.objects.create(
        user=user,
        server=server,
        name=(name or "agent").strip()[:100] or "agent",
        key_hash=hash_token(key),
        prefix=key[:6],
        created=now,
        expires=now + settings.API_TOKEN_LIFETIME,
    )
    audit_record(AuditEvent.Kind.TOKEN_CREATED, user=user, address=address, token_name=token.name,
                 token_prefix=token.prefix, **({"server": server.name} if server else {}))  # fmt: skip
    return token, key


def token_revoke(*, token: ApiToken, address: str = "") -> None:
    """Revoke a token. Idempotent: revoking twice keeps the first time (and logs once)."""
    if ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
        audit_record(AuditEvent.Kind.TOKEN_REVOKED, user=token.user, address=address, token_name=token.name,
                     token_prefix=token.prefix)  # fmt: skip


def token_renew(*, token: ApiToken) -> ApiToken:
    """Extend a live token to 60 days from now."""
    token.expires = timezone.now() + settings.API_TOKEN_LIFETIME
    ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(expires=token.expires)
    return token


def tokens_expire(*, batch_size: int = EXPIRE_BATCH, max_batches: int = 100) -> int:
    """Revoke tokens past their expiry, in bounded batches. Idempotent.

    Each batch is a conditional UPDATE on ids picked in the same statement's
    filter, so two overlapping runs never count a token twice.
    """
    total = 0
    for _ in range(max_batches):
        now = timezone.now()
        ids = list(
            ApiToken.objects.filter(revoked_at__isnull=True, expires__lte=now).values_list("pk", flat=True)[:batch_size]
        )
        if not ids:
            break
        total += ApiToken.objects.filter(pk__in=ids, revoked_at__isnull=True).update(revoked_at=now)
    return total
