"""Account writes: registration, log-in checks, tokens. Views call these."""

import logging
import re

from django.conf import settings
from django.contrib.auth import authenticate, password_validation
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone

from reclo_site import cloud
from reclo_site.cloud import storage
from reclo_site.errors import Code, ServiceError

from . import throttle
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


def user_register(*, username: str, email: str, password: str) -> User:
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
            user = User.objects.create_user(username=username, email=email, password=password)
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


def user_check_login(*, email: str, password: str, address: str) -> User:
    """Check an email and password, with throttling per account and address.

    Unknown emails and wrong passwords fail alike (LOGIN_FAILED) so accounts cannot be
    enumerated; too many failures answer LOGIN_THROTTLED until the window passes.
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
    wait = throttle.retry_after(email, address)
    if wait:
        raise ServiceError(
            Code.LOGIN_THROTTLED,
            f"Too many failed logins; try again in {wait} seconds.",
            headers={"Retry-After": str(wait)},
        )
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
        throttle.record_failure(email, address)
        # Attributed to the account when it exists, so its owner sees the attempt.
        audit_record(AuditEvent.Kind.LOGIN_FAILED, user=candidate, address=address, email=email[:254])
        raise ServiceError(Code.LOGIN_FAILED, "Email or password does not match.")
    throttle.clear_account(email)
    audit_record(AuditEvent.Kind.LOGIN_OK, user=user, address=address)
    return user


def token_create(*, user: User, name: str, address: str = "") -> tuple[ApiToken, str]:
    """Issue a token for `user`. Returns the row and the token itself, shown once."""
    key = new_token()
    now = timezone.now()
    token = ApiToken.objects.create(
        user=user,
        name=(name or "agent").strip()[:100] or "agent",
        key_hash=hash_token(key),
        prefix=key[:6],
        created=now,
        expires=now + settings.API_TOKEN_LIFETIME,
    )
    audit_record(AuditEvent.Kind.TOKEN_CREATED, user=user, address=address, token_name=token.name,
                 token_prefix=token.prefix)  # fmt: skip
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
