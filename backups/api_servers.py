"""Agent API of servers: list, detail, settings, enrollment keys, enrolling, revoking.

A server credential (from `POST /api/v1/enroll`) may call none of these:
they are the owner's (`accounts.permissions.CredentialScope` refuses it
with 106, as no view here declares `server_access`). Enrolling itself
takes no token at all.
"""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from reclo_site.api.fields import StrictCharField
from reclo_site.api.schema import error_responses
from reclo_site.api.validation import valid_body
from reclo_site.errors import Code
from reclo_site.http import client_address

from . import selectors, services
from .services.servers import DRILL_EVERY_DAYS_MAX, HOSTNAME_MAX

_DATETIME = serializers.DateTimeField()


# --- output ----------------------------------------------------------------------


class DiskOutput(serializers.Serializer):
    disk = serializers.CharField()
    health = serializers.ChoiceField(choices=["green", "amber", "red"])
    health_detail = serializers.CharField(
        help_text="The health in words: on schedule, late, agent silent, no schedule installed, ..."
    )
    restore_points = serializers.IntegerField(help_text="Verified restore points of this disk.")
    stored_bytes = serializers.IntegerField()
    last_backup = serializers.DateTimeField(
        allow_null=True, help_text="When the newest verified restore point was made."
    )


class ServerOutput(serializers.Serializer):
    server = serializers.CharField(help_text="The server's name, as its agent reports it.")
    disks = DiskOutput(many=True, help_text="The server's disks with restore points, by name.")
    last_backup = serializers.DateTimeField(
        allow_null=True, help_text="When the newest verified restore point of any disk was made; null: none yet."
    )
    health = serializers.ChoiceField(
        choices=["green", "amber", "red"],
        help_text="The worst of the agent's schedule and the disks': green on schedule; amber no schedule installed, "
        "late or first backup running; red agent silent, failed or no restore point at all. From what the agent "
        "reports (POST /api/v1/servers/{server}/status), never from the gaps between restore points.",
    )
    health_detail = serializers.CharField(help_text="The health in words.")
    schedule = serializers.JSONField(
        allow_null=True,
        help_text="The backup schedule the agent last reported (POST /api/v1/servers/{server}/status); "
        "null until it reports one.",
    )
    consistency = serializers.CharField(
        allow_null=True,
        help_text="How the newest restore point's disk was read (snapshot, frozen, crash, offline); "
        "null while the agent does not report it.",
    )
    bootability = serializers.JSONField(
        allow_null=True,
        help_text="The agent's bootability preflight and the newest drill's verdict; null until either exists.",
    )
    warm_standby = serializers.BooleanField(
        help_text="Warm standby: each verified restore point is staged as an EBS snapshot (an incremental on its "
        "parent's), so its failover starts the server without writing the disk; off deletes the staged snapshots. "
        "Costs EBS snapshot storage (the server's warm standby page shows how much). Linux (EBS direct) servers only."
    )
    drill_every_days = serializers.IntegerField(
        allow_null=True, help_text="A recovery drill runs every this many days; null: no scheduled drills."
    )
    drill_probe_port = serializers.IntegerField(
        allow_null=True, help_text="TCP port a drill checks on the booted server; null: no port check."
    )
    last_drill = serializers.JSONField(allow_null=True, help_text="The newest drill of this server; null: none yet.")
    hostname = serializers.CharField(allow_null=True, help_text="The host name its agent gave when it enrolled.")
    enrolled_agents = serializers.IntegerField(help_text="Live server credentials (enrolled agents) of this server.")
    created = serializers.DateTimeField()


def _server_body(overview, credentials: int, consistency: str | None) -> dict:
    server = overview.server
    when = _DATETIME.to_representation
    schedule = None
    if server.status_at is not None:
        schedule = {"every": server.schedule or None, "next_run": when(server.next_run) if server.next_run else None,
                    "reported": when(server.status_at),
                    "last_run": when(server.last_run_at) if server.last_run_at else None,
                    "last_result": server.last_result or None}  # fmt: skip
    bootability = None
    if server.preflight:
        bootability = {"preflight": server.preflight, "checked": when(server.preflight_at)}
    return {
        "server": server.name,
        "disks": [
            {
                "disk": d.disk,
                "health": d.health,
                "health_detail": d.health_label,
                "restore_points": d.restore_points,
                "stored_bytes": d.stored_bytes,
                "last_backup": when(d.newest_verified_at),
            }
            for d in overview.disks
        ],
        "last_backup": when(overview.newest_verified_at),
        "health": overview.health,
        "health_detail": overview.health_label,
        # Null says "not known" (no status report, no restore point yet), never a guess.
        "schedule": schedule,
        "consistency": consistency,
        "bootability": bootability,
        "warm_standby": server.warm_standby,
        "drill_every_days": server.drill_every_days,
        "drill_probe_port": server.drill_probe_port,
        "last_drill": None,
        "hostname": server.hostname or None,
        "enrolled_agents": credentials,
        "created": when(server.created),
    }


def _servers(user, name: str | None = None) -> list[dict]:
    overviews = selectors.server_overview(user=user, name=name)
    ids = [o.server.pk for o in overviews]
    counts = selectors.server_credential_counts(server_ids=ids)
    consistency = selectors.newest_consistency(server_ids=ids)
    return [_server_body(o, counts.get(o.server.pk, 0), consistency.get(o.server.pk)) for o in overviews]


ServerListOutput = inline_serializer(
    "ServerListOutput", {"message": serializers.CharField(), "servers": ServerOutput(many=True)}
)
ServerDetailOutput = inline_serializer(
    "ServerDetailOutput", {"message": serializers.CharField(), "server": ServerOutput()}
)


class EnrollmentKeyOutput(serializers.Serializer):
    message = serializers.CharField()
    server = serializers.CharField()
    key = serializers.CharField(help_text="The one-time enrollment key; shown only here. Works once, for 24 hours.")
    expires = serializers.DateTimeField()
    install_command = serializers.CharField(help_text="One line for the server: installs the agent and enrols it.")
    enroll_command = serializers.CharField(help_text="For a server whose agent is already installed.")


class EnrollOutput(serializers.Serializer):
    message = serializers.CharField()
    server = serializers.CharField()
    token = serializers.CharField(
        help_text="The server credential: 32 alphanumeric characters, shown only here. It may only list and read "
        "this server's backups, upload, download its chains and report its status."
    )
    token_expires = serializers.DateTimeField()


RevokeOutput = inline_serializer(
    "ServerRevokeOutput",
    {"message": serializers.CharField(), "revoked": serializers.IntegerField(help_text="Credentials stopped.")},
)


# --- input -----------------------------------------------------------------------


class NullableStrictIntegerField(serializers.IntegerField):
    """An integer or null; `"7"`, `true` and `1.5` are malformed (104)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """true or false, and nothing DRF would coerce (`"yes"`, `1`)."""

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class ServerUpdateInput(serializers.Serializer):
    warm_standby = StrictBooleanField(required=False)
    drill_every_days = NullableStrictIntegerField(
        required=False, allow_null=True, min_value=1, max_value=DRILL_EVERY_DAYS_MAX
    )
    drill_probe_port = NullableStrictIntegerField(required=False, allow_null=True, min_value=1, max_value=65535)


class EnrollInput(serializers.Serializer):
    key = StrictCharField(max_length=200, help_text="The one-time key from the portal's Add a server.")
    hostname = StrictCharField(required=False, default="", allow_blank=True, max_length=HOSTNAME_MAX)


# --- views -----------------------------------------------------------------------


class ServerListApi(APIView):
    @extend_schema(
        operation_id="servers_list",
        tags=["servers"],
        responses={200: ServerListOutput, **error_responses(Code.BAD_TOKEN, Code.FORBIDDEN)},
    )
    def get(self, request):
        servers = _servers(request.user)
        return Response({"message": f"{len(servers)} server(s).", "servers": servers})


class ServerDetailApi(APIView):
    @extend_schema(
        operation_id="servers_detail",
        tags=["servers"],
        responses={200: ServerDetailOutput, **error_responses(Code.BAD_TOKEN, Code.NOT_FOUND, Code.FORBIDDEN)},
    )
    def get(self, request, server: str):
        services.server_get(user=request.user, name=server)
        return Response({"message": f"Server {server}.", "server": _servers(request.user, server)[0]})

    @extend_schema(
        operation_id="servers_update",
        tags=["servers"],
        request=ServerUpdateInput,
        responses={
            200: ServerDetailOutput,
            **error_responses(Code.BAD_TOKEN, Code.MALFORMED, Code.NOT_FOUND, Code.FORBIDDEN),
        },
    )
    def patch(self, request, server: str):
        row = services.server_get(user=request.user, name=server)
        data = valid_body(ServerUpdateInput, request)
        services.server_update(user=request.user, server=row, **data)
        return Response({"message": f"Server {server} updated.", "server": _servers(request.user, server)[0]})


class EnrollmentKeyApi(APIView):
    @extend_schema(
        operation_id="servers_enrollment",
        tags=["servers"],
        request=None,
        responses={201: EnrollmentKeyOutput, **error_responses(Code.BAD_TOKEN, Code.MALFORMED, Code.FORBIDDEN)},
    )
    def post(self, request, server: str):
        grant = services.enrollment_key_create(user=request.user, server=server)
        body = {
            "message": "Run the install command on the server within 24 hours; the key works once.",
            "server": grant.server.name,
            "key": grant.key,
            "expires": grant.expires,
            "install_command": grant.install_command,
            "enroll_command": grant.enroll_command,
        }
        return Response(EnrollmentKeyOutput(body).data, status=status.HTTP_201_CREATED)


class EnrollApi(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="enroll",
        tags=["servers"],
        request=EnrollInput,
        responses={201: EnrollOutput, **error_responses(Code.MALFORMED, Code.BAD_ENROLLMENT_KEY)},
        auth=[],
    )
    def post(self, request):
        address = client_address(request)
        data = valid_body(EnrollInput, request)
        server, token, raw = services.server_enroll(key=data["key"], hostname=data["hostname"], address=address)
        body = {
            "message": f"Enrolled as server {server.name}.",
            "server": server.name,
            "token": raw,
            "token_expires": token.expires,
        }
        return Response(EnrollOutput(body).data, status=status.HTTP_201_CREATED)


class ServerCredentialsApi(APIView):
    @extend_schema(
        operation_id="servers_revoke",
        tags=["servers"],
        request=None,
        responses={200: RevokeOutput, **error_responses(Code.BAD_TOKEN, Code.NOT_FOUND, Code.FORBIDDEN)},
    )
    def delete(self, request, server: str):
        row = services.server_get(user=request.user, name=server)
        revoked = services.server_credentials_revoke(user=request.user, server=row, address=client_address(request))
        return Response({"message": f"Every credential of server {server} stopped working.", "revoked": revoked})
