"""Uploads: grant credentials for one object, refresh them, complete the upload."""

import base64
import functools
import hashlib
import re
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone
from reclo_agent.vhd.format import MAX_VIRTUAL_SIZE, SECTOR

from accounts.audit import audit_record
from accounts.models import AuditEvent
from reclo_site import cloud
from reclo_site.cloud import credentials, storage
from reclo_site.errors import Code, ServiceError

from ..models import AccountLimits, Backup, Server
from ..naming import InvalidName, backup_key, check_file_name, check_name
from .lifecycle import UPLOAD_GRACE, backup_fail
from .verification import storage_class_problem

SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class UploadGrant:
    """A pending upload and the credentials that may write its object."""

    backup: Backup
    credentials: credentials.TemporaryCredentials


def _upload_ttl() -> int:
    """Seconds upload credentials live (RECLO_UPLOAD_CREDENTIALS_TTL): short, since STS cannot revoke them."""
    return int(settings.RECLO_UPLOAD_CREDENTIALS_TTL.total_seconds())


def max_file_size(user) -> int:
    """The largest stored backup this account may upload, in bytes."""
    limit = AccountLimits.objects.filter(user=user).values_list("max_file_size", flat=True).first()
    return limit or settings.RECLO_MAX_BACKUP_SIZE


def _check_size(user, file_size: int) -> None:
    limit = max_file_size(user)
    if file_size > limit:
        raise ServiceError(Code.TOO_LARGE, f"The backup is {file_size} bytes; this account's limit is {limit} bytes.")


def _validated(server, disk, file_name, virtual_size, kind, file_size, sha256) -> dict:
    """The declared fields, or ServiceError(Code.MALFORMED) with a message per bad field."""
    fields = {}
    for name, value, check in (
        ("server", server, functools.partial(check_name, what="server")),
        ("disk", disk, functools.partial(check_name, what="disk")),
        ("file_name", file_name, check_file_name),
    ):
        try:
            check(value)
        except InvalidName as exc:
            fields[name] = [str(exc)]
    if not isinstance(virtual_size, int) or not 0 < virtual_size <= MAX_VIRTUAL_SIZE or virtual_size % SECTOR:
        fields["virtual_size"] = [f"A positive multiple of {SECTOR} bytes, at most {MAX_VIRTUAL_SIZE} (2040 GiB)."]
    if kind not in Backup.Kind.values:
        fields["kind"] = ["'full' or 'incremental'."]
    if file_size is not None and (not isinstance(file_size, int) or file_size <= 0):
        fields["file_size"] = ["A positive number of bytes."]
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_RE.fullmatch(sha256)):
        fields["sha256"] = ["64 hexadecimal characters."]
    if fields:
        raise ServiceError(Code.MALFORMED, "The request has invalid fields: " + ", ".join(sorted(fields)) + ".", fields)
    return {"sha256": sha256.lower() if sha256 else ""}


def _chain_parent(*, user, server: str, disk: str, kind: str, parent_id, virtual_size: int) -> Backup | None:
    """The parent an incremental builds on, checked against the chain rules (BAD_CHAIN)."""
    if kind == Backup.Kind.FULL:
        if parent_id is not None:
            raise ServiceError(
                Code.BAD_CHAIN, "A full backup has no parent; send parent_id with incremental backups only."
            )
        return None
    if parent_id is None:
        raise ServiceError(Code.BAD_CHAIN, "An incremental backup needs parent_id, the restore point it builds on.")
    parent = Backup.objects.select_related("server").filter(user=user, pk=parent_id).first()
    if parent is None or parent.deleted_at is not None:
        raise ServiceError(Code.BAD_CHAIN, "The parent backup does not exist.")
    if parent.status != Backup.Status.VERIFIED:
        raise ServiceError(Code.BAD_CHAIN, f"The parent backup is {parent.status}, not verified.")
    if parent.server.name != server or parent.disk != disk:
        raise ServiceError(Code.BAD_CHAIN, "The parent backup belongs to another server or disk.")
    if parent.virtual_size != virtual_size:
        raise ServiceError(
            Code.BAD_CHAIN,
            f"The parent backup is of a {parent.virtual_size}-byte disk, not {virtual_size} bytes; make a full backup.",
        )
    newest = (
        Backup.objects.filter(server_id=parent.server_id, disk=disk, status=Backup.Status.VERIFIED)
        .filter(deleted_at__isnull=True)
        .order_by("-date_created", "-pk")
        .values_list("pk", flat=True)
        .first()
    )
    if newest != parent.pk:
        raise ServiceError(
            Code.BAD_CHAIN,
            f"The parent is not the newest verified restore point of this disk ({newest}); make a full backup.",
        )
    return parent


# When an account at its limit of pending uploads should ask again.
PENDING_RETRY_AFTER_SECONDS = 60


def _check_pending(user) -> None:
    """Refuse a new upload while the account holds RECLO_MAX_PENDING_UPLOADS live ones.

    Code 103 (429 with Retry-After) rather than a 409: nothing is wrong
    with the request, the account only has to wait until its uploads in
    flight complete or expire, and agents already back off and retry on 429.
    """
    limit = settings.RECLO_MAX_PENDING_UPLOADS
    pending = Backup.objects.filter(user=user, status=Backup.Status.PENDING, credentials_expire__gt=timezone.now())
    if pending.count() >= limit:
        raise ServiceError(
            Code.THROTTLED,
            f"This account already has {limit} uploads in progress; complete or abandon one, then try again.",
            headers={"Retry-After": str(PENDING_RETRY_AFTER_SECONDS)},
        )


def backup_start(
    *,
    user,
    server: str,
    disk: str,
    file_name: str,
    virtual_size: int,
    kind: str,
    parent_id: uuid.UUID | None = None,
    file_size: int | None = None,
    sha256: str | None = None,
    consistency: str = Backup.Consistency.CRASH,
) -> UploadGrant:
    """Record a pending upload and grant credentials that can write its one object.

    ``consistency`` is how the agent reads the disk (one of
    ``Backup.Consistency``); agents that do not say read it as it is: crash.

    Checks the names (MALFORMED), the chain rules (BAD_CHAIN) and a declared size
    against the account's limit (TOO_LARGE). STS is asked before anything is
    written, so when it fails (UPLOAD_CREDENTIALS_FAILED) no pending upload is left behind. The
    server is created on its first upload. Not idempotent: every call is a
    new upload; one an agent abandons is dropped by `uploads_clean_up`.
    """
    clean = _validated(server, disk, file_name, virtual_size, kind, file_size, sha256)
    if consistency not in Backup.Consistency.values:
        raise ServiceError(Code.MALFORMED, "consistency must be one of: " + ", ".join(Backup.Consistency.values),
                           field="consistency")  # fmt: skip
    if file_size is not None:
        _check_size(user, file_size)
    parent = _chain_parent(
        user=user, server=server, disk=disk, kind=kind, parent_id=parent_id, virtual_size=virtual_size
    )
    _check_pending(user)
    backup_id = uuid.uuid4()
    key = backup_key(user_id=user.pk, server=server, disk=disk, backup_id=backup_id)
    try:
        grant = credentials.issue(
            policy=credentials.upload_policy(key),
            session_name=f"reclo-up-{user.pk}-{backup_id.hex}",
            duration=_upload_ttl(),
        )
    except cloud.CloudError as exc:
        raise ServiceError(
            Code.UPLOAD_CREDENTIALS_FAILED, "Could not get temporary storage credentials; try again shortly."
        ) from exc
    with transaction.atomic():
        # Again under the tenant's lock: two starts at once cannot both take the last slot.
        get_user_model().objects.select_for_update().filter(pk=user.pk).first()
        _check_pending(user)
        if parent is not None:
            # The parent may have been deleted or superseded since it was checked.
            locked = (
                Backup.objects.select_for_update()
                .filter(pk=parent.pk, status=Backup.Status.VERIFIED, deleted_at__isnull=True)
                .first()
            )
            if locked is None:
                raise ServiceError(Code.BAD_CHAIN, "The parent backup is no longer a verified restore point.")
        server_row, _ = Server.objects.get_or_create(user=user, name=server)
        backup = Backup.objects.create(
            id=backup_id,
            user=user,
            server=server_row,
            disk=disk,
            kind=kind,
            parent=parent,
            file_name=file_name,
            key=key,
            virtual_size=virtual_size,
            file_size=file_size,
            sha256=clean["sha256"],
            consistency=consistency,
            credentials_expire=grant.expiration,
        )
    audit_record(AuditEvent.Kind.UPLOAD_CREDENTIALS, user=user, server=server, disk=disk, backup_id=str(backup_id),
                 object_key=key)  # fmt: skip
    return UploadGrant(backup=backup, credentials=grant)


def _pending_upload(user, upload_id) -> Backup:
    backup = Backup.objects.select_related("server").filter(user=user, pk=upload_id).first()
    if backup is None:
        raise ServiceError(Code.NO_UPLOAD, "No upload with that id.")
    return backup


def _expired(backup: Backup) -> bool:
    return backup.credentials_expire is None or backup.credentials_expire + UPLOAD_GRACE <= timezone.now()


def backup_credentials_refresh(*, user, upload_id) -> UploadGrant:
    """Fresh credentials for the same key, while the upload is pending (else NO_UPLOAD).

    Refused once the upload is completed: from then on nothing may write
    the key, and the last credentials handed out expire within
    RECLO_UPLOAD_CREDENTIALS_TTL (their write-once condition already stops
    them replacing the stored object).

    Idempotent in effect: each call grants another set for the same one key.
    """
    backup = _pending_upload(user, upload_id)
    if backup.status != Backup.Status.PENDING:
        raise ServiceError(Code.NO_UPLOAD, "That upload is already completed.")
    if _expired(backup):
        raise ServiceError(Code.NO_UPLOAD, "That upload has expired; start a new one.")
    try:
        grant = credentials.issue(
            policy=credentials.upload_policy(backup.key),
            session_name=f"reclo-up-{user.pk}-{backup.pk.hex}",
            duration=_upload_ttl(),
        )
    except cloud.CloudError as exc:
        raise ServiceError(
            Code.UPLOAD_CREDENTIALS_FAILED, "Could not get temporary storage credentials; try again shortly."
        ) from exc
    expires = max(grant.expiration, backup.credentials_expire) if backup.credentials_expire else grant.expiration
    changed = Backup.objects.filter(pk=backup.pk, status=Backup.Status.PENDING).update(credentials_expire=expires)
    if not changed:
        raise ServiceError(Code.NO_UPLOAD, "That upload is already completed.")
    backup.credentials_expire = expires
    audit_record(AuditEvent.Kind.UPLOAD_CREDENTIALS, user=user, server=backup.server.name, disk=backup.disk,
                 backup_id=str(backup.pk), object_key=backup.key, refresh=True)  # fmt: skip
    return UploadGrant(backup=backup, credentials=grant)


def _declared(at_start, at_complete, what: str):
    if at_start and at_complete is not None and at_start != at_complete:
        raise ServiceError(
            Code.VERIFICATION_FAILED,
            f"The {what} sent now ({at_complete}) differs from the one declared at start ({at_start}).",
        )
    value = at_complete if at_complete is not None else at_start
    if value in (None, ""):
        raise ServiceError(
            Code.MALFORMED, f"Send {what}: it was not declared at start.", {what: ["This field is required."]}
        )
    return value


def _composite(part_sha256: list | None) -> str:
    """S3's composite SHA-256 of a multipart object made of parts with these digests: base64(SHA-256 of them)-N."""
    if not part_sha256:
        return ""
    if not all(isinstance(h, str) and SHA256_RE.fullmatch(h) for h in part_sha256):
        raise ServiceError(
            Code.MALFORMED,
            "The request has invalid fields: part_sha256.",
            {"part_sha256": ["A list of 64-hexadecimal-character digests."]},
        )
    joined = b"".join(bytes.fromhex(h) for h in part_sha256)
    return f"{base64.b64encode(hashlib.sha256(joined).digest()).decode()}-{len(part_sha256)}"


def backup_complete(
    *, user, upload_id, file_size: int | None = None, sha256: str | None = None, part_sha256: list | None = None
) -> Backup:
    """Check the uploaded object at once and hand it to the verifier.

    NO_UPLOAD for an unknown, another tenant's, expired or meanwhile deleted upload; OBJECT_MISSING when the
    object is not in storage (the upload stays pending: finish it and call
    again); VERIFICATION_FAILED when its size differs from the declared one or it is
    not in the STANDARD storage class (the backup fails and the object is deleted)
    or the declarations disagree; TOO_LARGE over
    the account's limit; UPLOAD_COMPLETE_FAILED when storage cannot be asked. Otherwise the
    backup becomes `verifying` and the verification is enqueued after the
    commit. Idempotent: a completed upload is returned as it stands.

    `part_sha256` (optional): each part's SHA-256, in order; recorded as the
    composite checksum S3 gives such an object, which the verifier compares
    (docs/api.md, Uploading).
    """
    backup = _pending_upload(user, upload_id)
    if backup.status != Backup.Status.PENDING:
        return backup
    if _expired(backup):
        raise ServiceError(Code.NO_UPLOAD, "That upload has expired; start a new one.")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256_RE.fullmatch(sha256)):
        raise ServiceError(
            Code.MALFORMED, "The request has invalid fields: sha256.", {"sha256": ["64 hexadecimal characters."]}
        )
    if file_size is not None and (not isinstance(file_size, int) or file_size <= 0):
        raise ServiceError(
            Code.MALFORMED, "The request has invalid fields: file_size.", {"file_size": ["A positive number of bytes."]}
        )
    size = _declared(backup.file_size, file_size, "file_size")
    digest = _declared(backup.sha256, sha256.lower() if sha256 else None, "sha256")
    composite = _composite(part_sha256)
    _check_size(user, size)
    try:
        stored = storage.head_object(backup.key)
    except cloud.ObjectNotFound:
        if not Backup.objects.filter(pk=backup.pk).exists():
            raise ServiceError(Code.NO_UPLOAD, "That upload was deleted while it was being completed.") from None
        raise ServiceError(
            Code.OBJECT_MISSING, "The backup is not in storage yet; finish the upload, then complete it."
        ) from None
    except cloud.CloudError as exc:
        raise ServiceError(
            Code.UPLOAD_COMPLETE_FAILED, "Could not check the upload in storage; try again shortly."
        ) from exc
    if stored["size"] != size:
        reason = f"The stored object is {stored['size']} bytes; {size} were declared."
        backup_fail(backup=backup, reason=reason, from_statuses=(Backup.Status.PENDING,))
        raise ServiceError(Code.VERIFICATION_FAILED, reason)
    if stored["storage_class"] != storage.STANDARD:
        reason = storage_class_problem(stored["storage_class"])
        backup_fail(backup=backup, reason=reason, from_statuses=(Backup.Status.PENDING,))
        raise ServiceError(Code.VERIFICATION_FAILED, reason)

    from .. import tasks  # tasks import the services; this breaks the cycle

    with transaction.atomic():
        changed = Backup.objects.filter(pk=backup.pk, status=Backup.Status.PENDING).update(
            status=Backup.Status.VERIFYING,
            file_size=size,
            sha256=digest,
            part_checksum=composite,
            completed_at=timezone.now(),
            verify_queued_at=timezone.now(),
        )
        if changed:
            # Enqueued only once the row says `verifying`, or the worker
            # could read the row before the commit and do nothing.
            transaction.on_commit(functools.partial(tasks.enqueue, tasks.backup_verify, str(backup.pk)))
    # The owner may have deleted the backup while storage was being asked
    # (no lock is held across that call, by the house rule).
    current = Backup.objects.select_related("server").filter(pk=backup.pk).first()
    if current is None:
        raise ServiceError(Code.NO_UPLOAD, "That upload was deleted while it was being completed.")
    return current
