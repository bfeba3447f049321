"""Files in a restore point: list partitions and folders, download a file or a folder (a zip).

The web process only checks the request and waits: the reading is done by a
worker and a confined child process (see backups/services/files.py).
"""

import uuid
from datetime import datetime
from urllib.parse import quote

from django.http import StreamingHttpResponse
from django.utils.http import http_date
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import server_credential_may
from reclo_site.api.schema import error_responses
from reclo_site.errors import Code, ServiceError

from . import services
from .permissions import backup_in_url


class PartitionOutput(serializers.Serializer):
    partition = serializers.IntegerField(help_text="1-based, in table order; give it as `partition=`.")
    filesystem = serializers.CharField(help_text="ext2, ext3, ext4, xfs, ntfs, fat12, fat16, fat32, exfat or unknown.")
    size = serializers.IntegerField(help_text="Bytes.")
    # A field named like Field.label: DRF's metaclass takes it out of the class, so nothing is shadowed.
    label = serializers.CharField(help_text="The partition's name (GPT) or type (MBR).")  # type: ignore[assignment]


class EntryOutput(serializers.Serializer):
    name = serializers.CharField()
    type = serializers.CharField(help_text="dir, file, symlink or other.")
    size = serializers.IntegerField(help_text="Bytes (0 for a folder).")
    modified = serializers.DateTimeField(allow_null=True)
    mode = serializers.IntegerField(allow_null=True, help_text="Unix permission bits where the file system has them.")


class FilesOutput(serializers.Serializer):
    message = serializers.CharField()
    partitions = PartitionOutput(many=True, required=False)
    filesystem = serializers.CharField(required=False)
    entries = EntryOutput(many=True, required=False, help_text="Folders first, then files, by name.")


PARAMETERS = [
    OpenApiParameter("partition", int, description="The partition (from the list without `partition`)."),
    OpenApiParameter("path", str, description="An absolute path in that partition (default `/`)."),
]
ERRORS = (Code.BAD_TOKEN, Code.MALFORMED, Code.NOT_FOUND, Code.NO_RESTORABLE_BACKUP, Code.NO_SUCH_PATH,
          Code.FILESYSTEM_UNREADABLE)  # fmt: skip


def _query(request, *, need_partition: bool) -> tuple[int | None, str]:
    raw, path = request.query_params.get("partition"), request.query_params.get("path", "/")
    fields = {}
    partition = None
    if raw is None:
        if need_partition:
            fields["partition"] = ["Required."]
    elif not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 128:
        fields["partition"] = ["A partition number from 1 to 128."]
    else:
        partition = int(raw)
    if not path.startswith("/") or len(path) > 4096 or "\x00" in path:
        fields["path"] = ["An absolute path, at most 4,096 characters."]
    if fields:
        raise ServiceError(
            Code.MALFORMED, "The request has invalid fields: " + ", ".join(sorted(fields)) + ".", fields=fields
        )
    return partition, path


class FilesApi(APIView):
    # A server's own credential may browse its own restore points (reclo-agent files).
    server_access = server_credential_may(GET=backup_in_url("backup_id"))

    @extend_schema(
        operation_id="backups_files",
        parameters=PARAMETERS,
        responses={200: FilesOutput, **error_responses(*ERRORS)},
    )
    def get(self, request, backup_id: uuid.UUID):
        services.files_check(user=request.user, backup_id=backup_id)
        partition, path = _query(request, need_partition=False)
        found = services.files_browse(user=request.user, backup_id=backup_id, partition=partition, path=path)
        if partition is None:
            body = {"message": f"{len(found['partitions'])} partition(s).", **found}
        else:
            body = {"message": f"{len(found['entries'])} entries in {path}.", **found}
        return Response(FilesOutput(body).data)


class FileContentApi(APIView):
    server_access = server_credential_may(GET=backup_in_url("backup_id"))

    @extend_schema(
        operation_id="backups_files_content",
        parameters=PARAMETERS,
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The file, or a folder as a zip; streamed."
            ),
            **error_responses(*ERRORS),
        },
    )
    def get(self, request, backup_id: uuid.UUID):
        services.files_check(user=request.user, backup_id=backup_id)
        partition, path = _query(request, need_partition=True)
        assert partition is not None  # _query answered 104 without one
        download = services.files_download(
            user=request.user, backup_id=backup_id, partition=partition, path=path, request=request
        )
        return file_response(download)


def file_response(download) -> StreamingHttpResponse:
    """The streamed answer of a download, with its name, size and time (shared with the page)."""
    kind = "application/zip" if download.kind == "zip" else "application/octet-stream"
    response = StreamingHttpResponse(download.chunks, content_type=kind)
    ascii_name = download.name.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    response["Content-Disposition"] = f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(download.name)}"
    if download.size is not None:
        response["Content-Length"] = str(download.size)
    if download.modified:
        response["Last-Modified"] = http_date(
            datetime.fromisoformat(download.modified.replace("Z", "+00:00")).timestamp()
        )
    if download.mode is not None:
        response["X-File-Mode"] = oct(download.mode)[2:]
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    return response
