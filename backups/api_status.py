"""`POST /api/v1/servers/{server}/status`: the agent reports its schedule, last run, version and preflight."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import server_credential_may, server_in_url
from reclo_site.api.fields import StrictCharField
from reclo_site.api.schema import error_responses
from reclo_site.api.validation import valid_body

from .services.status import server_status_record


class StrictBooleanField(serializers.BooleanField):
    """true or false, not "yes" or 1."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class PreflightCheckInput(serializers.Serializer):
    name = StrictCharField(max_length=40, help_text="nvme, ena, fstab, boot_mode, boot_loader, ...")
    status = serializers.ChoiceField(choices=["pass", "fail", "unknown"])
    detail = StrictCharField(max_length=1000, allow_blank=True)
    fix = StrictCharField(max_length=1000, allow_blank=True, required=False, default="")


class PreflightInput(serializers.Serializer):
    ok = StrictBooleanField(required=False, help_text="Recomputed by the portal: no check failed.")
    boot_mode = serializers.ChoiceField(choices=["bios", "uefi"], required=False, allow_null=True, default=None)
    kernel = StrictCharField(max_length=200, required=False, allow_null=True, default=None)
    # many=True makes a ListSerializer, which takes max_length (django-stubs types the child).
    checks = PreflightCheckInput(many=True, max_length=30)  # type: ignore[call-arg]


class ServerStatusInput(serializers.Serializer):
    schedule = StrictCharField(max_length=40, required=False, allow_null=True, allow_blank=True, default=None,
                               help_text="The agent's interval, e.g. 1h; null: no schedule.")  # fmt: skip
    next_run = serializers.DateTimeField(required=False, allow_null=True, default=None)
    agent_version = StrictCharField(max_length=40, required=False, allow_blank=True, default="")
    last_run_at = serializers.DateTimeField(required=False, allow_null=True, default=None,
                                            help_text="When the last scheduled run ended; null: none yet.")  # fmt: skip
    last_result = serializers.ChoiceField(choices=["ok", "failed"], required=False, allow_null=True, default=None,
                                          help_text="How the last scheduled run ended.")  # fmt: skip
    last_message = StrictCharField(max_length=500, required=False, allow_blank=True, default="",
                                   help_text="Why the last scheduled run failed, in the agent's words.")  # fmt: skip
    preflight = PreflightInput(required=False, allow_null=True, default=None,
                               help_text="The bootability preflight (Linux agents); null keeps the last.")  # fmt: skip


ServerStatusOutput = inline_serializer(
    "ServerStatusOutput",
    {
        "message": serializers.CharField(),
        "server": serializers.CharField(),
        "status_at": serializers.DateTimeField(),
        "preflight_ok": serializers.BooleanField(allow_null=True),
    },
)


class ServerStatusApi(APIView):
    # The one owner-side write a server credential may make: its own server's status.
    server_access = server_credential_may(POST=server_in_url("server"))

    @extend_schema(
        operation_id="servers_status",
        request=ServerStatusInput,
        responses={200: ServerStatusOutput, **error_responses(102, 104, 105)},
    )
    def post(self, request, server: str):
        row = server_status_record(user=request.user, server=server, **valid_body(ServerStatusInput, request))
        return Response(
            {
                "message": "Status recorded.",
                "server": row.name,
                "status_at": serializers.DateTimeField().to_representation(row.status_at) if row.status_at else None,
                "preflight_ok": row.preflight["ok"] if row.preflight else None,
            }
        )
