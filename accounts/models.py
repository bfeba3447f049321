"""Users and their agent API tokens."""

from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone


class User(AbstractUser):
    """A ReClo customer. Logs in with email; the email is unique (case-insensitive)."""

    email = models.EmailField("email address", unique=True)
    # An IANA zone name (the browser's, detected at sign-up; changeable in
    # Security settings). Pages and emails show times in it; the API stays UTC.
    time_zone = models.CharField(max_length=64, default="UTC")

    class Meta:
        constraints = [
            models.UniqueConstraint(Lower("email"), name="accounts_user_email_ci_unique"),
        ]


class ApiTokenQuerySet(models.QuerySet):
    def active(self):
        return self.filter(revoked_at__isnull=True, expires__gt=timezone.now())


class ApiToken(models.Model):
    """An agent's credential. Only the SHA-256 of the token is stored.

    The token itself is 32 random alphanumeric characters (~190 bits), so a
    fast hash is enough: nothing can be brute-forced back from the digest.

    With `server` set it is a *server credential*, minted by enrollment for
    the agent of that one server: the API's default permission
    (`accounts.permissions.CredentialScope`) lets it do only what a view
    allows server credentials, on that server only.
    """

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="api_tokens")
    server = models.ForeignKey(
        "backups.Server",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="credentials",
        help_text="Set for a server credential (from enrollment); empty for the owner's own tokens.",
    )
    name = models.CharField(max_length=100)
    key_hash = models.CharField(max_length=64, unique=True)
    # The first characters, so people can tell their tokens apart.
    prefix = models.CharField(max_length=6)
    created = models.DateTimeField(default=timezone.now)
    expires = models.DateTimeField(db_index=True)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and self.expires > timezone.now()

    @property
    def is_server_credential(self) -> bool:
        return self.server_id is not None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.expires > timezone.now() else "expired"


class AuditEvent(models.Model):
    """Something a tenant (or someone trying to be one) did. Never holds a secret."""

    class Kind(models.TextChoices):
        LOGIN_OK = "login.ok", "Logged in"
        LOGIN_FAILED = "login.failed", "Failed login"
        TOKEN_CREATED = "token.created", "API token created"
        TOKEN_REVOKED = "token.revoked", "API token revoked"
        UPLOAD_CREDENTIALS = "upload.credentials", "Upload credentials issued"
        BACKUP_DELETED = "backup.deleted", "Backup deleted"
        BACKUP_VERIFIED = "backup.verified", "Backup finished"
        BACKUP_FAILED = "backup.failed", "Backup failed"
        FILES_DOWNLOADED = "files.downloaded", "Files downloaded from a restore point"
        FAILOVER_STARTED = "failover.started", "Failover started"
        FAILOVER_READY = "failover.ready", "Failover ready"
        FAILOVER_FAILED = "failover.failed", "Failover failed"
        FAILBACK_STARTED = "failback.started", "Bringing a server home started"
        FAILBACK_READY = "failback.ready", "Server's cloud disk saved as a restore point"
        FAILBACK_FAILED = "failback.failed", "Bringing a server home failed"
        INSTANCE_STARTED = "instance.started", "Instance started"
        INSTANCE_STOPPED = "instance.stopped", "Instance stopped"
        INSTANCE_TERMINATED = "instance.terminated", "Instance terminated"
        ENROLLMENT_KEY_CREATED = "enrollment.created", "Enrollment key created"
        SERVER_ENROLLED = "server.enrolled", "Server enrolled"
        ENROLLMENT_FAILED = "enrollment.failed", "Failed enrollment"
        SERVER_REVOKED = "server.revoked", "Server credentials revoked"
        SERVER_REMOVED = "server.removed", "Server removed"
        TIME_ZONE_CHANGED = "account.time_zone", "Time zone changed"
        PASSWORD_CHANGED = "password.changed", "Password changed"
        PASSWORD_RESET_REQUESTED = "password.reset_requested", "Password reset asked for"
        PASSWORD_RESET = "password.reset", "Password reset"
        TWOFACTOR_ENABLED = "twofactor.enabled", "Two-factor authentication turned on"
        TWOFACTOR_DISABLED = "twofactor.disabled", "Two-factor authentication turned off"
        RECOVERY_CODE_USED = "twofactor.recovery_used", "Recovery code used"
        RECOVERY_CODES_NEW = "twofactor.recovery_new", "New recovery codes made"

    user = models.ForeignKey(User, on_delete=models.CASCADE, null=True, blank=True, related_name="audit_events")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    created = models.DateTimeField(default=timezone.now)
    address = models.CharField(max_length=64, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        indexes = [models.Index(fields=["user", "-created"])]

    def __str__(self):
        return f"{self.created:%Y-%m-%d %H:%M:%S} {self.kind} user={self.user_id}"
