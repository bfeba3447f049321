"""Failovers (recoveries), their steps, the instances they start, the tenant's network and VPN."""

import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .drills import DRILL
from .failback import FAILBACK
from .failover import FAILOVER, FAILOVER_STEPS


class PipelineRun(models.Model):
    """What every run of a pipeline (a failover, a drill, a failback) keeps besides its status.

    The engine (`recovery.engine`) works on the current step only while the
    run holds the lease (`lease_token` until `lease_until`), taken with a
    conditional UPDATE; `due_at` is when the step's next task should run, so
    the reconciler can re-enqueue work a dead worker or a lost message left.
    Each run declares its own `status` (its pipeline's choices), `ACTIVE`
    and Meta.
    """

    ACTIVE: tuple[str, ...] = ()
    status: str  # each run's own field

    error_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)

    lease_token = models.UUIDField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    due_at = models.DateTimeField(null=True, blank=True)

    created = models.DateTimeField(default=timezone.now, db_index=True)
    updated = models.DateTimeField(default=timezone.now)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class Recovery(PipelineRun):
    """One failover: a restore point on its way to a running server behind a VPN.

    A state machine persisted here and advanced by small Celery tasks (see
    `recovery.engine`). A worker works on the current step only while it
    holds the lease (`lease_token` until `lease_until`), taken with a
    conditional UPDATE; `due_at` is when the step's next task should run, so
    the reconciler can re-enqueue work a dead worker or a lost message left.
    """

    # queued, the steps of `FAILOVER_STEPS` in order, ready, failed.
    # django-stubs types only the two-argument functional form.
    Status = models.TextChoices("Status", FAILOVER.status_choices(), module=__name__, qualname="Recovery.Status")  # type: ignore[call-overload]

    class ImportMethod(models.TextChoices):
        EBS_DIRECT = "ebs_direct", "EBS direct"
        VM_IMPORT = "vm_import", "VM Import"

    # The steps in order; `queued` moves to the first at once.
    STEPS = FAILOVER_STEPS.names
    ACTIVE = FAILOVER.active
    FINISHED = FAILOVER.finished

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="recoveries")
    # Kept (as names and ids) when the server or backup is deleted later: a
    # running instance must still be traceable to what it came from.
    server = models.ForeignKey(
        "backups.Server", on_delete=models.SET_NULL, null=True, blank=True, related_name="recoveries"
    )
    server_name = models.CharField(max_length=63)
    backup = models.ForeignKey(
        "backups.Backup", on_delete=models.SET_NULL, null=True, blank=True, related_name="recoveries"
    )
    backup_ref = models.UUIDField(help_text="The restore point failed over from (its backup id).")
    disk = models.CharField(max_length=63)
    virtual_size = models.BigIntegerField()
    instance_type = models.CharField(max_length=32)
    import_method = models.CharField(max_length=16, choices=ImportMethod.choices)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)

    class Meta:
        ordering = ["-created"]
        verbose_name_plural = "recoveries"
        constraints = [
            # One failover in progress per server: the database decides a race
            # between two clicks (code FAILOVER_RUNNING), not a check-then-insert.
            models.UniqueConstraint(
                fields=["server"],
                condition=Q(status__in=list(FAILOVER.active)),
                name="recovery_one_active_per_server",
            ),
        ]
        indexes = [models.Index(fields=["status", "due_at"])]

    def __str__(self):
        return f"failover of {self.server_name} ({self.status})"

    @property
    def elapsed(self) -> timedelta:
        return (self.finished or timezone.now()) - self.created


class PipelineStep(models.Model):
    """One step of a run of a pipeline (a failover or a drill): when it ran, how often, what it made.

    The fields the engine (`recovery.engine`) reads and writes; each
    pipeline's step model adds the foreign key to its run.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        WAITING = "waiting"  # on AWS (an import, an instance booting) or a guest; a task re-checks later
        DONE = "done"
        SKIPPED = "skipped"  # nothing to do (the merged disk already existed)
        FAILED = "failed"

    name = models.CharField(max_length=20)
    position = models.PositiveSmallIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    # Tasks that worked on this step; transient cloud errors in a row.
    attempts = models.PositiveIntegerField(default=0)
    retries = models.PositiveIntegerField(default=0)
    # Seconds spent waiting on AWS (import tasks, instance states), for the benchmark.
    waited = models.FloatField(default=0)
    outputs = models.JSONField(default=dict, blank=True)  # what it made (cloud ids, figures)
    detail = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        abstract = True
        ordering = ["position"]

    def __str__(self):
        return f"{self.name} ({self.status})"


class RecoveryStep(PipelineStep):
    """One step of a failover."""

    recovery = models.ForeignKey(Recovery, on_delete=models.CASCADE, related_name="steps")

    class Meta(PipelineStep.Meta):
        constraints = [models.UniqueConstraint(fields=["recovery", "name"], name="recovery_step_unique")]


class RecoveryNetwork(models.Model):
    """A tenant's recovery network (VPC, subnet, internet route, security groups), made once and reused."""

    class VpnDns(models.TextChoices):
        SERVER = "server", "the recovered server"
        CUSTOM = "custom", "addresses or names the owner gives"
        NONE = "none", "none"

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="recovery_network")
    vpc_id = models.CharField(max_length=32, blank=True)
    igw_id = models.CharField(max_length=32, blank=True)
    subnet_id = models.CharField(max_length=32, blank=True)
    route_table_id = models.CharField(max_length=32, blank=True)
    server_group_id = models.CharField(max_length=32, blank=True)
    gateway_group_id = models.CharField(max_length=32, blank=True)
    # What goes in every device's config as `DNS =`, so `\\SERVER` names and
    # domain logons resolve: by default the recovered server's address (a
    # small office's server is usually its DNS), else the owner's `vpn_dns`
    # (DNS server addresses and search domains, comma-separated), or nothing.
    vpn_dns_mode = models.CharField(max_length=8, choices=VpnDns.choices, default=VpnDns.SERVER)
    vpn_dns = models.CharField(max_length=255, blank=True)
    ready = models.BooleanField(default=False)
    lease_token = models.UUIDField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"recovery network of user {self.user_id}"


class VpnGateway(models.Model):
    """The WireGuard gateway into a tenant's recovery network.

    The portal makes its key pair (X25519) and its peer-sync credential.
    The private key and the credential are stored encrypted with
    RECLO_VPN_KEYS (Fernet), so a retried launch renders the same user-data;
    the credential is looked up by its SHA-256 (`agent_token_hash`).
    `last_report` is the agent's last call; `down_since` (the last report
    before a silence) is set when the watcher, a beat job, finds the reports
    stopped and tells the owner, and cleared when they are back: one email
    each way per incident. A released
    gateway (no instance left using it) gets fresh keys when it is needed
    again (`generation` keeps the ClientTokens of the old and new apart).
    """

    class State(models.TextChoices):
        NEW = "new"
        PROVISIONING = "provisioning"
        READY = "ready"
        RELEASING = "releasing"
        RELEASED = "released"

    network = models.OneToOneField(RecoveryNetwork, on_delete=models.CASCADE, related_name="gateway")
    generation = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=16, choices=State.choices, default=State.NEW)
    instance_id = models.CharField(max_length=32, blank=True)
    allocation_id = models.CharField(max_length=32, blank=True)
    public_ip = models.CharField(max_length=45, blank=True)
    private_ip = models.CharField(max_length=45, blank=True)
    gateway_public_key = models.CharField(max_length=44)
    gateway_private_key_enc = models.TextField()
    agent_token_enc = models.TextField()
    agent_token_hash = models.CharField(max_length=64, unique=True)
    last_report = models.DateTimeField(null=True, blank=True)
    down_since = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)
    released = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"VPN gateway {self.instance_id or '(none)'} ({self.state})"


class VpnDevice(models.Model):
    """A PC, laptop or phone of the office with its own WireGuard key pair and tunnel address.

    The private key is kept (encrypted with RECLO_VPN_KEYS, Fernet) rather
    than shown once: the owner downloads the config or scans its QR code on
    each device when needed, and the same device's config must come out
    the same every time. A database dump alone does not yield it. Revoking
    deletes the row; the gateway drops the peer at its next sync.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="vpn_devices")
    name = models.CharField(max_length=63)
    address = models.GenericIPAddressField(protocol="IPv4")
    public_key = models.CharField(max_length=44)
    private_key_enc = models.TextField()
    created = models.DateTimeField(default=timezone.now)
    last_handshake = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created", "address"]
        constraints = [
            # Two devices added at once cannot get the same address: the insert loses and takes the next.
            models.UniqueConstraint(fields=["user", "address"], name="vpn_device_unique_address"),
        ]

    def __str__(self):
        return f"VPN device {self.name} ({self.address})"


class Instance(models.Model):
    """A recovered server running (or stopped) in the cloud, as the portal last saw it."""

    class State(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        STOPPING = "stopping"
        STOPPED = "stopped"
        SHUTTING_DOWN = "shutting-down"
        TERMINATED = "terminated"

    instance_id = models.CharField(max_length=32, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="instances")
    recovery = models.OneToOneField(Recovery, on_delete=models.CASCADE, related_name="instance")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING, db_index=True)
    instance_type = models.CharField(max_length=32)
    image_id = models.CharField(max_length=32, blank=True)
    private_ip = models.CharField(max_length=45, blank=True)
    public_ip = models.CharField(max_length=45, blank=True)
    allocation_id = models.CharField(max_length=32, blank=True)
    launched = models.DateTimeField(default=timezone.now)
    running_since = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    terminated_at = models.DateTimeField(null=True, blank=True)
    # Set once the Elastic IP, image and (if unused) the VPN gateway are let go.
    released = models.DateTimeField(null=True, blank=True)
    synced = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-launched"]

    def __str__(self):
        return f"{self.instance_id} ({self.state})"

    @property
    def cleanup_at(self):
        """When `instances_free` will terminate this instance if it stays stopped."""
        if self.state not in (self.State.STOPPING, self.State.STOPPED) or self.stopped_at is None:
            return None
        return self.stopped_at + settings.RECLO_STOPPED_INSTANCE_LIFETIME

    @property
    def uptime(self) -> timedelta | None:
        if self.state != self.State.RUNNING or self.running_since is None:
            return None
        return timezone.now() - self.running_since


class Drill(PipelineRun):
    """One drill: a restore point booted in an isolated sandbox, checked, and torn down.

    Persisted and advanced by the engine like a failover (`recovery.drills.DRILL`).
    `checks` are the verdict's checks (`[{name, passed, detail}]`);
    `rto_seconds` is from the click (`created`) to "server answers";
    `resources` lists what the sandbox made and when each was removed;
    `torn_down` is set once the teardown ran; `evidence` names the stored
    (and locked) versions of its screenshot, console log, PDF and JSON.
    """

    Status = models.TextChoices("Status", DRILL.status_choices(), module=__name__, qualname="Drill.Status")  # type: ignore[call-overload]

    class Sandbox(models.TextChoices):
        LOCAL = "local", "Local (QEMU on the worker)"
        AWS = "aws", "AWS (an isolated subnet)"

    class Trigger(models.TextChoices):
        API = "api", "API"
        PORTAL = "portal", "Test failover button"
        SCHEDULE = "schedule", "Schedule"

    ACTIVE = DRILL.active
    FINISHED = DRILL.finished

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="drills")
    server = models.ForeignKey(
        "backups.Server", on_delete=models.SET_NULL, null=True, blank=True, related_name="drills"
    )
    server_name = models.CharField(max_length=63)
    backup = models.ForeignKey(
        "backups.Backup", on_delete=models.SET_NULL, null=True, blank=True, related_name="drills"
    )
    backup_ref = models.UUIDField(help_text="The restore point drilled (its backup id).")
    backup_created = models.DateTimeField(help_text="When the restore point was taken (its age at the drill).")
    sandbox = models.CharField(max_length=8, choices=Sandbox.choices, default=Sandbox.LOCAL)
    trigger = models.CharField(max_length=8, choices=Trigger.choices, default=Trigger.API)
    probe_port = models.PositiveIntegerField(null=True, blank=True)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)

    checks = models.JSONField(default=list, blank=True)
    rto_seconds = models.FloatField(null=True, blank=True)
    console_excerpt = models.TextField(blank=True)
    screenshot_key = models.CharField(max_length=512, blank=True)
    report_key = models.CharField(max_length=512, blank=True)
    # What is stored with the account's backups, each version locked like a
    # restore point: {name: {key, version_id, etag, locked_until}}.
    evidence = models.JSONField(default=dict, blank=True)
    resources = models.JSONField(default=list, blank=True)
    torn_down = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            # One drill at a time per server (code DRILL_RUNNING); the database
            # decides a race between two clicks.
            models.UniqueConstraint(
                fields=["server"], condition=Q(status__in=list(DRILL.active)), name="drill_one_active_per_server"
            ),
        ]
        indexes = [models.Index(fields=["status", "due_at"])]

    def __str__(self):
        return f"drill of {self.server_name} ({self.status})"

    @property
    def passed(self) -> bool:
        return self.status == self.Status.PASSED

    @property
    def restore_point_age(self) -> timedelta:
        """How old the restore point was when the drill started."""
        return self.created - self.backup_created


class DrillStep(PipelineStep):
    """One step of a drill."""

    drill = models.ForeignKey(Drill, on_delete=models.CASCADE, related_name="steps")

    class Meta(PipelineStep.Meta):
        constraints = [models.UniqueConstraint(fields=["drill", "name"], name="drill_step_unique")]


class Failback(PipelineRun):
    """One "Bring it home": the recovered server's disk in the cloud made a restore point of its server.

    Advanced by the engine like a failover (`recovery.failback.FAILBACK`).
    `kind` is decided by the first step: `incremental` (a differencing VHD
    on `parent`, the failover's restore point, holding only the blocks
    changed in the cloud) when the failover wrote its disk by EBS direct
    (so the imported snapshot holds exactly that restore point) and the
    point is still there with nothing verified on it since; else `full`.
    `backup_ref` is the id the new restore point gets; `snapshot_id` the
    snapshot of the cloud server's volume, and `snapshot_at` when it was
    taken: what the cloud had written by then is what comes home.
    """

    Status = models.TextChoices("Status", FAILBACK.status_choices(), module=__name__, qualname="Failback.Status")  # type: ignore[call-overload]

    class Kind(models.TextChoices):
        FULL = "full"
        INCREMENTAL = "incremental"

    ACTIVE = FAILBACK.active
    FINISHED = FAILBACK.finished

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="failbacks")
    recovery = models.ForeignKey(Recovery, on_delete=models.CASCADE, related_name="failbacks")
    server = models.ForeignKey(
        "backups.Server", on_delete=models.SET_NULL, null=True, blank=True, related_name="failbacks"
    )
    server_name = models.CharField(max_length=63)
    instance_id = models.CharField(max_length=32)
    kind = models.CharField(max_length=16, choices=Kind.choices, blank=True)
    parent = models.ForeignKey(
        "backups.Backup", on_delete=models.SET_NULL, null=True, blank=True, related_name="failback_children"
    )
    backup_ref = models.UUIDField(default=uuid.uuid4, help_text="The id of the restore point it makes.")
    snapshot_id = models.CharField(max_length=32, blank=True)
    snapshot_at = models.DateTimeField(null=True, blank=True)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)

    class Meta:
        ordering = ["-created"]
        constraints = [
            # One failback at a time per recovered server (code FAILOVER_RUNNING).
            models.UniqueConstraint(
                fields=["recovery"], condition=Q(status__in=list(FAILBACK.active)), name="failback_one_active"
            ),
        ]
        indexes = [models.Index(fields=["status", "due_at"])]

    def __str__(self):
        return f"failback of {self.server_name} ({self.status})"


class FailbackStep(PipelineStep):
    """One step of a failback."""

    failback = models.ForeignKey(Failback, on_delete=models.CASCADE, related_name="steps")

    class Meta(PipelineStep.Meta):
        constraints = [models.UniqueConstraint(fields=["failback", "name"], name="failback_step_unique")]


class StagedSnapshot(models.Model):
    """A restore point of a warm-standby server, kept ready as a completed EBS snapshot (`recovery.staging`).

    The snapshot id is recorded before any block is written, so a worker
    killed mid-staging is followed by one that writes into the same
    snapshot (from `spans`, the writer's checkpoints) instead of starting a
    second one. `backup` is SET_NULL: whatever removes a restore point
    (deletion, retention, the purge) leaves its staged snapshot behind with
    no backup, and the sweep (`staging.sweep`) deletes it from AWS.
    """

    class State(models.TextChoices):
        STARTING = "starting"  # no snapshot id known yet
        WRITING = "writing"  # the snapshot is started (its id recorded); blocks are being written
        SEALING = "sealing"  # CompleteSnapshot was called; AWS is sealing it
        COMPLETED = "completed"  # ready: a failover registers an image from it
        FAILED = "failed"  # the snapshot went to error; the next try starts a new one cleanly

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="staged_snapshots")
    backup = models.OneToOneField(
        "backups.Backup", on_delete=models.SET_NULL, null=True, blank=True, related_name="staged"
    )
    backup_ref = models.UUIDField(help_text="The restore point's id, kept when its row goes.")
    state = models.CharField(max_length=12, choices=State.choices, default=State.STARTING)
    snapshot_id = models.CharField(max_length=64, blank=True)
    parent_snapshot_id = models.CharField(max_length=64, blank=True)
    volume_gib = models.PositiveIntegerField()
    # The one-pass writer's checkpoints ([first, end, next block, pieces written] per span).
    spans = models.JSONField(null=True, blank=True)
    changed_blocks = models.PositiveIntegerField(default=0)
    # Bumped when a failed snapshot is given up for a new one: the new StartSnapshot's ClientToken.
    restarts = models.PositiveSmallIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    # A worker staging it holds this and renews it while it writes; an old one is a dead worker's.
    lease_until = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)
    started = models.DateTimeField(null=True, blank=True)
    completed = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created"]

    def __str__(self):
        return f"staged {self.backup_ref} ({self.state} {self.snapshot_id or '-'})"
