"""Protected servers and their restore points (backups)."""

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class Server(models.Model):
    """A protected server of one tenant, known by the name its agent reports."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="servers")
    name = models.CharField(max_length=63)
    created = models.DateTimeField(default=timezone.now)
    # The report (its status_at) whose late or silent agent the owner was last
    # emailed about: one email per incident, a new report ends the incident.
    alerted_report_at = models.DateTimeField(null=True, blank=True)
    # The host name the agent gave when it last enrolled (shown to the owner).
    hostname = models.CharField(max_length=255, blank=True)
    # Owner settings (PATCH /api/v1/servers/{server}).
    warm_standby = models.BooleanField(default=False, help_text="Keep a failover image ready for this server.")
    drill_every_days = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Run a recovery drill every this many days; empty: no scheduled drills."
    )
    drill_probe_port = models.PositiveIntegerField(
        null=True, blank=True, help_text="TCP port a drill checks on the booted server; empty: no port check."
    )
    # What the agent last reported (POST /api/v1/servers/{server}/status).
    agent_version = models.CharField(max_length=40, blank=True)
    schedule = models.CharField(max_length=40, blank=True, help_text="The agent's interval, e.g. 1h; empty: none.")
    next_run = models.DateTimeField(null=True, blank=True)
    # The last scheduled run as the agent reported it: when, "ok" or "failed", and why.
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_result = models.CharField(max_length=10, blank=True)
    last_message = models.CharField(max_length=500, blank=True)
    # The agent's bootability preflight: {"ok", "boot_mode", "kernel", "checks": [{name, status, detail, fix}]}.
    preflight = models.JSONField(null=True, blank=True)
    preflight_at = models.DateTimeField(null=True, blank=True)
    status_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="backups_server_user_name_unique")]
        ordering = ["name"]

    def __str__(self):
        return self.name


class EnrollmentKey(models.Model):
    """A one-time key that an agent trades for a server credential (`POST /api/v1/enroll`).

    Only its SHA-256 is stored, like a token's. It works once, until
    `expires`; minting a new key for the server voids the unused older ones,
    and revoking the server voids them all.
    """

    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="enrollment_keys")
    key_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=6)
    created = models.DateTimeField(default=timezone.now)
    expires = models.DateTimeField()
    # Set when the key was traded for a credential, or voided.
    used_at = models.DateTimeField(null=True, blank=True)
    voided = models.BooleanField(default=False)
    hostname = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self):
        return f"enrollment key {self.prefix}… for {self.server}"


class Backup(models.Model):
    """One restore point of one disk: a VHD stored as seekable zstd in S3.

    A row is created `pending` when upload credentials are granted; complete
    makes it `verifying`; the worker's verdict makes it `verified` or `failed`.
    """

    class Kind(models.TextChoices):
        FULL = "full"
        INCREMENTAL = "incremental"

    class Status(models.TextChoices):
        PENDING = "pending"
        VERIFYING = "verifying"
        VERIFIED = "verified"
        FAILED = "failed"

    class Consistency(models.TextChoices):
        """How the agent read the disk (see the agent's consistency module)."""

        SNAPSHOT = "snapshot", "snapshot (LVM)"
        FROZEN = "frozen", "frozen file systems"
        CRASH = "crash", "crash-consistent (in use)"
        OFFLINE = "offline", "offline (not in use)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="backups")
    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="backups")
    disk = models.CharField(max_length=63)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    parent = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="children")
    file_name = models.CharField(max_length=255)
    key = models.CharField(max_length=512, unique=True)
    virtual_size = models.BigIntegerField()
    # Declared by the agent (at start or complete); checked against storage.
    file_size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64, blank=True)
    # The S3 composite checksum the declared part checksums make ("<base64>-<parts>"):
    # with it the verifier compares checksums instead of reading the whole object.
    part_checksum = models.CharField(max_length=64, blank=True)
    # The VHD footer's unique id, read by the verifier; an incremental's
    # parent id must equal its parent's.
    vhd_unique_id = models.UUIDField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    # Agents older than the field say nothing and read disks in use as they
    # are: crash is what their restore points are.
    consistency = models.CharField(max_length=16, choices=Consistency.choices, default=Consistency.CRASH)
    failure = models.TextField(blank=True)
    date_created = models.DateTimeField(default=timezone.now, db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    # When the newest upload credentials handed out for a pending upload
    # expire: after that the agent can no longer write, and clean-up may drop it.
    credentials_expire = models.DateTimeField(null=True, blank=True)
    # The last time the weekly scrub re-read this object (oldest go first).
    scrubbed_at = models.DateTimeField(null=True, blank=True)
    # Retention's claim while it merges this restore point into its full,
    # so two workers never merge the same one.
    merge_claimed_at = models.DateTimeField(null=True, blank=True)
    # The S3 version (and its ETag) the verifier read: every later reader
    # (restores, failovers, merges, the scrub) reads exactly that version, so
    # bytes written over the key after verification are never seen. Empty on
    # an unversioned bucket: then the ETag alone pins it (a changed object is
    # refused).
    version_id = models.CharField(max_length=1024, blank=True)
    etag = models.CharField(max_length=128, blank=True)
    # The verified version's S3 Object Lock retain-until date.
    locked_until = models.DateTimeField(null=True, blank=True)
    # Deleted by the owner while still locked: hidden from every list and
    # reader, removed by `backups_purge` once the lock ends, until then
    # restorable with undelete.
    deleted_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # A worker reading this object (verifying or scrubbing) renews this every
    # few seconds: a recent one means "in progress" (a duplicate delivery
    # skips it; it counts toward the tenant's concurrent verifications), a
    # stale one a worker that died.
    read_heartbeat = models.DateTimeField(null=True, blank=True)
    # When a verification of this upload was last enqueued (completion, or the
    # beat job re-queueing one no worker is on).
    verify_queued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-date_created"]
        # The lists order by (-date_created, -id); with the id in the index
        # a page is an index walk with no sort, whatever the planner knows.
        indexes = [
            models.Index(fields=["user", "-date_created", "-id"], name="backups_user_newest_idx"),
            models.Index(fields=["server", "disk", "status"]),
            models.Index(fields=["server", "-date_created", "-id"], name="backups_server_newest_idx"),
        ]

    def __str__(self):
        return f"{self.server.name}/{self.disk} {self.kind} {self.id}"

    @property
    def file_size_mb(self) -> float | None:
        return None if self.file_size is None else round(self.file_size / (1024 * 1024), 3)

    @property
    def pinned(self) -> dict:
        """The reader arguments that read exactly the verified version (`version_id`, `etag`)."""
        return {"version_id": self.version_id or None, "etag": self.etag or None}


class AccountLimits(models.Model):
    """Per-account overrides of the backup limits; absent means the defaults."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="backup_limits")
    # Largest stored object (compressed) an upload may declare, in bytes.
    max_file_size = models.BigIntegerField(null=True, blank=True, help_text="Bytes; empty: RECLO_MAX_BACKUP_SIZE.")
    # How long each verified restore point stays locked (S3 Object Lock).
    lock_days = models.PositiveIntegerField(null=True, blank=True, help_text="Days; empty: RECLO_LOCK_DAYS.")
    # Where this account's drills boot: "local" (QEMU on ReClo's worker, free)
    # or "aws" (an isolated subnet in ReClo's AWS account, billed per drill).
    drill_sandbox = models.CharField(
        max_length=8,
        blank=True,
        choices=[("local", "Local (QEMU on the worker)"), ("aws", "AWS (an isolated subnet)")],
        help_text="Empty: RECLO_DRILL_SANDBOX.",
    )

    class Meta:
        verbose_name_plural = "account limits"

    def __str__(self):
        return f"limits of {self.user}"


class ObjectDeletion(models.Model):
    """An object to delete once nobody can still be reading it.

    Retention replaces a chain's objects while agents may hold read
    credentials for them (a restore in progress), so the old objects stay
    until those credentials have expired; failed deletions wait here too.
    """

    key = models.CharField(max_length=512, unique=True)
    not_before = models.DateTimeField(db_index=True)
    reason = models.CharField(max_length=200, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    def __str__(self):
        return self.key
