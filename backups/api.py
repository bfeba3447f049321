"""Agent API of backups: list, detail, delete, uploads, download grants.

One view per operation (the detail and delete of one backup share a URL,
so they share one view class with a method each), small input and output
serializers, and services doing the work.
"""

import uuid

from django.conf import settings
from django.db import DatabaseError
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import credential_server, server_credential_may, server_in_body, server_in_query
from reclo_site.api.fields import StrictCharField, StrictIntegerField
from reclo_site.api.schema import error_responses
from reclo_site.api.validation import valid_body
from reclo_site.cloud import storage
from reclo_site.errors import Code, ServiceError

from . import selectors, services
from .models import Backup
from .naming import InvalidName, check_name
from .permissions import backup_in_url

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


# --- output ----------------------------------------------------------------------


class BootableOutput(serializers.Serializer):
    verified = serializers.BooleanField()
    drill_id = serializers.UUIDField()
    at = serializers.DateTimeField(help_text="When the drill that booted it finished.")


class BackupOutput(serializers.Serializer):
    backup_id = serializers.UUIDField(source="id")
    server = serializers.CharField(source="server.name")
    disk = serializers.CharField()
    kind = serializers.ChoiceField(choices=Backup.Kind.choices)
    parent_id = serializers.UUIDField(allow_null=True)
    file_name = serializers.CharField()
    file_size = serializers.IntegerField(allow_null=True, help_text="Bytes of the stored (compressed) object.")
    file_size_mb = serializers.FloatField(allow_null=True)
    virtual_size = serializers.IntegerField(help_text="Bytes of the disk.")
    sha256 = serializers.SerializerMethodField()
    status = serializers.ChoiceField(choices=Backup.Status.choices)
    consistency = serializers.ChoiceField(
        choices=Backup.Consistency.choices,
        help_text="How the disk was read: snapshot, frozen, crash (in use, neither), offline (not in use).",
    )
    failure = serializers.SerializerMethodField()
    date_created = serializers.DateTimeField()
    completed_at = serializers.DateTimeField(allow_null=True)
    verified_at = serializers.DateTimeField(allow_null=True)
    bootable = serializers.SerializerMethodField(
        help_text="Set when the restore point's newest drill passed: it was booted and answered."
    )

    @extend_schema_field(BootableOutput(allow_null=True))
    def get_bootable(self, backup) -> dict | None:
        """`{"verified": true, "drill_id", "at"}` from the newest drill of this restore point, if it passed."""
        from recovery import selectors as drills  # recovery builds on backups, not the other way round

        newest = self.context.get("drills")
        if newest is None:
            newest = drills.newest_drills_by_backup([backup.pk])
        found = drills.bootable(newest.get(backup.pk))
        return found and {**found, "at": _DATETIME.to_representation(found["at"])}

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_sha256(self, backup) -> str | None:
        return backup.sha256 or None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_failure(self, backup) -> str | None:
        """Why the backup failed; null unless `status` is `failed`."""
        return backup.failure or None

    def to_representation(self, backup) -> dict:
        # The fields above document the shape (OpenAPI); this builds it
        # directly. DRF's generic walk over the fields costs ~0.1 ms per
        # backup, most of a list response's time; a test keeps both equal.
        when = _DATETIME.to_representation
        return {
            "backup_id": str(backup.pk),
            "server": backup.server.name,
            "disk": backup.disk,
            "kind": str(backup.kind),
            "parent_id": None if backup.parent_id is None else str(backup.parent_id),
            "file_name": backup.file_name,
            "file_size": backup.file_size,
            "file_size_mb": backup.file_size_mb,
            "virtual_size": backup.virtual_size,
            "sha256": backup.sha256 or None,
            "status": str(backup.status),
            "consistency": str(backup.consistency),
            "failure": backup.failure or None,
            "date_created": when(backup.date_created),
            "completed_at": when(backup.completed_at),
            "verified_at": when(backup.verified_at),
            "bootable": self.get_bootable(backup),
        }


_DATETIME = serializers.DateTimeField()


class CredentialsOutput(serializers.Serializer):
    AccessKeyId = serializers.CharField()  # noqa: N815 - boto3's own names, as docs/api.md says
    SecretAccessKey = serializers.CharField()  # noqa: N815
    SessionToken = serializers.CharField()  # noqa: N815
    Expiration = serializers.CharField(help_text="RFC 3339 UTC; at most 12 hours away.")


class UploadOutput(serializers.Serializer):
    message = serializers.CharField()
    upload_id = serializers.UUIDField()
    backup_id = serializers.UUIDField(help_text="The same id: the backup this upload becomes.")
    bucket = serializers.CharField()
    key = serializers.CharField(help_text="The one object key the credentials may write.")
    region = serializers.CharField()
    endpoint_url = serializers.CharField(allow_null=True, help_text="The S3 endpoint to use; null for AWS itself.")
    credentials = CredentialsOutput()


class ChainEntryOutput(serializers.Serializer):
    backup_id = serializers.UUIDField(source="id")
    kind = serializers.ChoiceField(choices=Backup.Kind.choices)
    key = serializers.CharField()
    file_size = serializers.IntegerField()
    sha256 = serializers.CharField()
    version_id = serializers.CharField(
        allow_null=True, help_text="The S3 version that was verified: read exactly this one (VersionId)."
    )
    etag = serializers.CharField(
        allow_null=True, help_text="Its ETag: send it as If-Match, so a changed object is refused."
    )

    def to_representation(self, backup) -> dict:
        data = super().to_representation(backup)
        data["version_id"] = backup.version_id or None
        data["etag"] = backup.etag or None
        return data


class DownloadOutput(serializers.Serializer):
    message = serializers.CharField()
    chain = ChainEntryOutput(many=True, help_text="Base first; restore by applying each in order.")
    bucket = serializers.CharField()
    region = serializers.CharField()
    endpoint_url = serializers.CharField(allow_null=True)
    credentials = CredentialsOutput()


BackupListOutput = inline_serializer(
    "BackupListOutput",
    {
        "message": serializers.CharField(),
        "count": serializers.IntegerField(help_text="Backups matching, over all pages."),
        "next": serializers.URLField(allow_null=True, help_text="The next page, or null on the last one."),
        "previous": serializers.URLField(allow_null=True),
        "backups": BackupOutput(many=True),
    },
)
BackupDetailOutput = inline_serializer(
    "BackupDetailOutput", {"message": serializers.CharField(), "backup": BackupOutput()}
)
MessageOutput = inline_serializer("BackupMessageOutput", {"message": serializers.CharField()})
DeleteOutput = inline_serializer(
    "BackupDeleteOutput",
    {"message": serializers.CharField(), "deleted": serializers.ListField(child=serializers.UUIDField())},
)
ScheduledDeleteOutput = inline_serializer(
    "BackupScheduledDeleteOutput",
    {
        "message": serializers.CharField(),
        "locked_until": serializers.DateTimeField(help_text="When the lock ends and the restore point is removed."),
        "scheduled": serializers.ListField(child=serializers.UUIDField(), help_text="Hidden until then."),
    },
)


def _storage_place() -> dict:
    return {"bucket": storage.bucket_name(), "region": settings.AWS_REGION, "endpoint_url": settings.AWS_ENDPOINT_URL}


# --- input -----------------------------------------------------------------------


class StrictUUIDField(serializers.UUIDField):
    """A UUID given as a string (DRF's own would also take an integer)."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class UploadStartInput(serializers.Serializer):
    server = StrictCharField(max_length=200, trim_whitespace=False, help_text="1–63 of A-Z a-z 0-9 . _ -")
    disk = StrictCharField(max_length=200, trim_whitespace=False, help_text="1–63 of A-Z a-z 0-9 . _ -")
    file_name = StrictCharField(max_length=300, trim_whitespace=False)
    virtual_size = StrictIntegerField(min_value=1)
    kind = serializers.ChoiceField(choices=Backup.Kind.choices)
    parent_id = StrictUUIDField(required=False, allow_null=True, default=None)
    file_size = StrictIntegerField(required=False, allow_null=True, default=None, min_value=1)
    sha256 = StrictCharField(required=False, allow_null=True, default=None, max_length=64, min_length=64)
    consistency = serializers.ChoiceField(
        choices=Backup.Consistency.choices,
        required=False,
        default=Backup.Consistency.CRASH,
        help_text="How the agent reads the disk; agents that do not say read it in use as it is (crash).",
    )


class UploadCompleteInput(serializers.Serializer):
    file_size = StrictIntegerField(required=False, allow_null=True, default=None, min_value=1)
    sha256 = StrictCharField(required=False, allow_null=True, default=None, max_length=64, min_length=64)
    part_sha256 = serializers.ListField(
        child=StrictCharField(max_length=64, min_length=64),
        required=False,
        allow_null=True,
        default=None,
        min_length=1,
        max_length=10_000,
        help_text="Optional: the SHA-256 (hex) of each part of a multipart upload made with "
        "ChecksumAlgorithm=SHA256, in part order. The verifier then compares them with the object's "
        "composite checksum instead of reading the whole object.",
    )


def _upload_body(grant, message: str) -> dict:
    return {
        "message": message,
        "upload_id": grant.backup.pk,
        "backup_id": grant.backup.pk,
        **_storage_place(),
        "key": grant.backup.key,
        "credentials": grant.credentials.as_api(),
    }


# --- views -----------------------------------------------------------------------


class BackupListApi(APIView):
    # A server credential lists its own server's backups (no ?server= means its own).
    server_access = server_credential_may(GET=server_in_query("server"))

    @extend_schema(
        operation_id="backups_list",
        parameters=[
            OpenApiParameter("server", str, description="Only this server's backups (its name)."),
            OpenApiParameter("page", int, description="1-based page number."),
            OpenApiParameter(
                "page_size",
                int,
                description=f"Backups per page (default {DEFAULT_PAGE_SIZE}, at most {MAX_PAGE_SIZE}).",
            ),
        ],
        responses={200: BackupListOutput, **error_responses(Code.BAD_TOKEN, Code.MALFORMED, Code.BACKUP_LIST_FAILED)},
    )
    def get(self, request):
        own = credential_server(request)
        server = request.query_params.get("server", own.name if own is not None else None)
        fields = {}
        if server is not None:
            try:
                check_name(server, "server")
            except InvalidName as exc:
                fields["server"] = [str(exc)]
        page = _positive(request.query_params.get("page", "1"), "page", fields)
        size = _positive(request.query_params.get("page_size", str(DEFAULT_PAGE_SIZE)), "page_size", fields)
        if size and size > MAX_PAGE_SIZE:
            fields["page_size"] = [f"At most {MAX_PAGE_SIZE}."]
        if fields:
            raise ServiceError(
                Code.MALFORMED, "The request has invalid fields: " + ", ".join(sorted(fields)) + ".", fields=fields
            )
        try:
            qs = selectors.backup_list(user=request.user, server=server)
            start = (page - 1) * size
            backups = list(qs[start : start + size])
            # A short page is the last one, so it tells the count (an agent's
            # list of one server nearly always fits one page): no COUNT query.
            short = len(backups) < size and (backups or start == 0)
            count = start + len(backups) if short else qs.count()
        except DatabaseError as exc:
            raise ServiceError(
                Code.BACKUP_LIST_FAILED, "Could not read the list of backups; try again shortly."
            ) from exc
        return Response(
            {
                "message": f"{count} backup(s).",
                "count": count,
                "next": _page_url(request, page + 1) if start + size < count else None,
                "previous": _page_url(request, page - 1) if page > 1 and count else None,
                "backups": BackupOutput(backups, many=True, context={"drills": _newest_drills(backups)}).data,
            }
        )


def _newest_drills(backups) -> dict:
    from recovery.selectors import newest_drills_by_backup

    return newest_drills_by_backup([b.pk for b in backups])


def _positive(raw: str, name: str, fields: dict) -> int:
    if raw.isascii() and raw.isdigit() and 0 < int(raw) < 10**9:
        return int(raw)
    fields[name] = ["A positive whole number."]
    return 0


def _page_url(request, page: int) -> str:
    query = request.query_params.copy()
    query["page"] = str(page)
    return request.build_absolute_uri(request.path + "?" + query.urlencode())


class BackupDetailApi(APIView):
    # A server credential reads its own server's backups; deleting is the owner's alone.
    server_access = server_credential_may(GET=backup_in_url("backup_id"))

    @extend_schema(
        operation_id="backups_detail",
        responses={200: BackupDetailOutput, **error_responses(Code.BAD_TOKEN, Code.NOT_FOUND)},
    )
    def get(self, request, backup_id: uuid.UUID):
        backup = selectors.backup_get(user=request.user, backup_id=backup_id)
        if backup is None:
            raise ServiceError(Code.NOT_FOUND, "No backup with that id.")
        return Response({"message": f"Backup {backup.pk}.", "backup": BackupOutput(backup).data})

    @extend_schema(
        operation_id="backups_delete",
        parameters=[
            OpenApiParameter(
                "cascade", bool, description="Also delete the incremental backups built on this one, newest first."
            )
        ],
        responses={
            200: DeleteOutput,
            202: ScheduledDeleteOutput,
            **error_responses(
                Code.BAD_TOKEN,
                Code.MALFORMED,
                Code.DELETE_LOOKUP_FAILED,
                Code.NO_BACKUP_TO_DELETE,
                Code.DELETE_FAILED,
                Code.HAS_DEPENDENTS,
            ),
        },
        description="A restore point still under its retention lock cannot be removed yet: it is hidden at once "
        "and removed when the lock ends (202 with `locked_until`); `.../undelete` brings it back until then.",
    )
    def delete(self, request, backup_id: uuid.UUID):
        raw = request.query_params.get("cascade", "false").lower()
        if raw not in ("true", "false", "1", "0"):
            raise ServiceError(Code.MALFORMED, "cascade must be true or false.", fields={"cascade": ["true or false."]})
        try:
            done = services.backup_delete(user=request.user, backup_id=backup_id, cascade=raw in ("true", "1"))
        except DatabaseError as exc:
            # docs/api.md's code for a delete that cannot read what to delete.
            raise ServiceError(
                Code.DELETE_LOOKUP_FAILED, "Could not read the backup to delete; try again shortly."
            ) from exc
        if done.scheduled and done.locked_until is not None:
            until = _DATETIME.to_representation(done.locked_until)
            return Response(
                {
                    "message": f"{len(done.scheduled)} restore point(s) hidden; they are locked until {until} "
                    "and removed then. Undelete brings them back until that time.",
                    "locked_until": until,
                    "scheduled": done.scheduled,
                },
                status=status.HTTP_202_ACCEPTED,
            )
        return Response({"message": f"Deleted {len(done.deleted)} backup(s).", "deleted": done.deleted})


class BackupUndeleteApi(APIView):
    @extend_schema(
        operation_id="backups_undelete",
        request=None,
        responses={200: BackupDetailOutput, **error_responses(Code.BAD_TOKEN, Code.NO_BACKUP_TO_DELETE, Code.LOCKED)},
    )
    def post(self, request, backup_id: uuid.UUID):
        backup = services.backup_undelete(user=request.user, backup_id=backup_id)
        shown = selectors.backup_get(user=request.user, backup_id=backup.pk) or backup  # with its annotations
        return Response({"message": "The restore point is back.", "backup": BackupOutput(shown).data})


class UploadStartApi(APIView):
    server_access = server_credential_may(POST=server_in_body("server"))

    @extend_schema(
        operation_id="uploads_start",
        request=UploadStartInput,
        responses={
            201: UploadOutput,
            **error_responses(
                Code.BAD_TOKEN, Code.MALFORMED, Code.UPLOAD_CREDENTIALS_FAILED, Code.BAD_CHAIN, Code.TOO_LARGE
            ),
        },
    )
    def post(self, request):
        data = valid_body(UploadStartInput, request)
        grant = services.backup_start(user=request.user, **data)
        body = _upload_body(grant, "Upload granted: write the object, then complete the upload.")
        return Response(UploadOutput(body).data, status=status.HTTP_201_CREATED)


class UploadCredentialsApi(APIView):
    server_access = server_credential_may(POST=backup_in_url("upload_id"))

    @extend_schema(
        operation_id="uploads_credentials",
        request=None,
        responses={
            200: UploadOutput,
            **error_responses(Code.BAD_TOKEN, Code.UPLOAD_CREDENTIALS_FAILED, Code.NO_UPLOAD),
        },
    )
    def post(self, request, upload_id: uuid.UUID):
        grant = services.backup_credentials_refresh(user=request.user, upload_id=upload_id)
        return Response(UploadOutput(_upload_body(grant, "Fresh credentials for the same key.")).data)


class UploadCompleteApi(APIView):
    server_access = server_credential_may(POST=backup_in_url("upload_id"))

    @extend_schema(
        operation_id="uploads_complete",
        request=UploadCompleteInput,
        responses={
            202: BackupDetailOutput,
            **error_responses(
                Code.BAD_TOKEN,
                Code.MALFORMED,
                Code.UPLOAD_COMPLETE_FAILED,
                Code.NO_UPLOAD,
                Code.OBJECT_MISSING,
                Code.VERIFICATION_FAILED,
                Code.TOO_LARGE,
            ),
        },
    )
    def post(self, request, upload_id: uuid.UUID):
        data = valid_body(UploadCompleteInput, request)
        backup = services.backup_complete(user=request.user, upload_id=upload_id, **data)
        message = {
            Backup.Status.VERIFYING: "Upload complete; the backup is being verified.",
            Backup.Status.VERIFIED: "The backup is verified.",
            Backup.Status.FAILED: "The backup failed verification.",
        }.get(Backup.Status(backup.status), "")
        return Response({"message": message, "backup": BackupOutput(backup).data}, status=status.HTTP_202_ACCEPTED)


class BackupDownloadApi(APIView):
    server_access = server_credential_may(POST=backup_in_url("backup_id"))

    @extend_schema(
        operation_id="backups_download",
        request=None,
        responses={
            200: DownloadOutput,
            **error_responses(
                Code.BAD_TOKEN, Code.UPLOAD_CREDENTIALS_FAILED, Code.VERIFICATION_FAILED, Code.NO_RESTORABLE_BACKUP
            ),
        },
    )
    def post(self, request, backup_id: uuid.UUID):
        grant = services.backup_download_grant(user=request.user, backup_id=backup_id)
        body = {
            "message": f"Read-only credentials for the {len(grant.chain)} object(s) of this restore point's chain.",
            "chain": grant.chain,
            **_storage_place(),
            "credentials": grant.credentials.as_api(),
        }
        return Response(DownloadOutput(body).data)
