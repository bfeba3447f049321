"""Agent API: failovers (recoveries) and the instances they start.

One view per route; each method checks ownership through a selector, calls
one service and renders a small output serializer. Another tenant's ids
answer exactly like unknown ones (404).
"""

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from reclo_site.api.fields import StrictCharField
from reclo_site.api.schema import error_responses
from reclo_site.api.validation import valid_body
from reclo_site.errors import Code, ServiceError

from . import selectors, services, sizes
from .failover import FAILOVER_STEPS
from .models import Instance, Recovery

# --- Output serializers -------------------------------------------------------------------------


class StepOutput(serializers.Serializer):
    name = serializers.CharField()
    title = serializers.SerializerMethodField()
    status = serializers.CharField(help_text="pending, running, waiting, done, skipped or failed")
    started = serializers.DateTimeField(allow_null=True)
    finished = serializers.DateTimeField(allow_null=True)
    attempts = serializers.IntegerField()
    detail = serializers.CharField()

    def get_title(self, step) -> str:
        return FAILOVER_STEPS.title(step.name)


class RecoveryErrorOutput(serializers.Serializer):
    code = serializers.IntegerField(help_text="A code of the 4xx table.")
    message = serializers.CharField()


class RecoveryOutput(serializers.Serializer):
    recovery_id = serializers.UUIDField(source="pk")
    backup_id = serializers.UUIDField(source="backup_ref")
    server = serializers.CharField(source="server_name")
    disk = serializers.CharField()
    status = serializers.ChoiceField(choices=Recovery.Status.values)
    instance_type = serializers.CharField()
    import_method = serializers.CharField()
    steps = StepOutput(many=True)
    instance_id = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()
    created = serializers.DateTimeField()
    finished = serializers.DateTimeField(allow_null=True)
    elapsed_seconds = serializers.SerializerMethodField()

    def get_instance_id(self, recovery) -> str | None:
        """The EC2 instance id, once the server was launched."""
        try:
            return recovery.instance.instance_id
        except Instance.DoesNotExist:
            return None

    @extend_schema_field(RecoveryErrorOutput(allow_null=True))
    def get_error(self, recovery):
        if recovery.status != Recovery.Status.FAILED:
            return None
        return {"code": recovery.error_code, "message": recovery.error}

    def get_elapsed_seconds(self, recovery) -> int:
        return int(recovery.elapsed.total_seconds())


class InstanceOutput(serializers.Serializer):
    instance_id = serializers.CharField()
    recovery_id = serializers.UUIDField()
    server = serializers.CharField(source="recovery.server_name")
    state = serializers.ChoiceField(choices=Instance.State.values)
    instance_type = serializers.CharField()
    private_ip = serializers.CharField(allow_blank=True)
    public_ip = serializers.CharField(allow_blank=True)
    launched = serializers.DateTimeField()
    stopped_at = serializers.DateTimeField(allow_null=True)
    cleanup_at = serializers.DateTimeField(
        allow_null=True, help_text="When a stopped instance will be terminated if it stays stopped."
    )
    vpn_ready = serializers.SerializerMethodField()

    def get_vpn_ready(self, instance) -> bool:
        return instance.recovery.status == Recovery.Status.READY and instance.state != Instance.State.TERMINATED


def _recovery_body(recovery) -> dict:
    return RecoveryOutput(recovery).data


# --- Recoveries ---------------------------------------------------------------------------------


class RecoveryStartInput(serializers.Serializer):
    backup_id = StrictCharField(help_text="The restore point to fail over from (a verified backup).")
    instance_type = StrictCharField(
        required=False,
        allow_blank=True,
        allow_null=True,
        default="",
        help_text="One of " + ", ".join(sizes.BY_TYPE) + "; by default a size fitting the disk.",
    )


class RecoveryListApi(APIView):
    @extend_schema(
        operation_id="recoveries_list",
        tags=["recovery"],
        responses={
            200: inline_serializer(
                "RecoveryListOutput", {"message": serializers.CharField(), "recoveries": RecoveryOutput(many=True)}
            ),
            **error_responses(Code.BAD_TOKEN),
        },
    )
    def get(self, request):
        recoveries = selectors.recovery_list(user=request.user)
        return Response(
            {"message": "Your failovers, newest first.", "recoveries": [_recovery_body(r) for r in recoveries]}
        )

    @extend_schema(
        operation_id="recoveries_start",
        tags=["recovery"],
        request=RecoveryStartInput,
        responses={
            202: inline_serializer(
                "RecoveryStartOutput",
                {
                    "message": serializers.CharField(),
                    "recovery_id": serializers.UUIDField(),
                    "status": serializers.CharField(),
                    "recovery": RecoveryOutput(),
                },
            ),
            **error_responses(Code.BAD_TOKEN, Code.MALFORMED, Code.NO_RESTORABLE_BACKUP, Code.FAILOVER_RUNNING),
        },
    )
    def post(self, request):
        data = valid_body(RecoveryStartInput, request)
        recovery = services.recovery_start(
            user=request.user, backup_id=data["backup_id"], instance_type=data["instance_type"] or None
        )
        recovery = selectors.recovery_get(user=request.user, recovery_id=recovery.pk)
        return Response(
            {
                "message": "Failover started.",
                "recovery_id": str(recovery.pk),
                "status": recovery.status,
                "recovery": _recovery_body(recovery),
            },
            status=status.HTTP_202_ACCEPTED,
        )


class RecoveryDetailApi(APIView):
    @extend_schema(
        operation_id="recoveries_get",
        tags=["recovery"],
        responses={
            200: inline_serializer(
                "RecoveryDetailOutput", {"message": serializers.CharField(), "recovery": RecoveryOutput()}
            ),
            **error_responses(Code.BAD_TOKEN, Code.NOT_FOUND),
        },
    )
    def get(self, request, recovery_id):
        recovery = selectors.recovery_get(user=request.user, recovery_id=recovery_id)
        if recovery is None:
            raise ServiceError(Code.NOT_FOUND, "No failover of yours has that id.")
        return Response({"message": f"Failover is {recovery.status}.", "recovery": _recovery_body(recovery)})


# --- Instances ----------------------------------------------------------------------------------


def _instance(request, instance_id) -> Instance:
    instance = selectors.instance_get(user=request.user, instance_id=instance_id)
    if instance is None:
        raise ServiceError(Code.NO_INSTANCE, "No instance of yours has that id.")
    return instance


def _instance_action(request, instance_id, action, message: str) -> Response:
    """Run one instance action service for the caller's instance; 202 with the instance after it."""
    instance = _instance(request, instance_id)
    instance = action(instance=instance)
    return Response({"message": message, "instance": InstanceOutput(instance).data}, status=status.HTTP_202_ACCEPTED)


InstanceBody = inline_serializer(
    "InstanceActionOutput", {"message": serializers.CharField(), "instance": InstanceOutput()}
)


class InstanceListApi(APIView):
    @extend_schema(
        operation_id="instances_list",
        tags=["recovery"],
        responses={
            200: inline_serializer(
                "InstanceListOutput", {"message": serializers.CharField(), "instances": InstanceOutput(many=True)}
            ),
            **error_responses(Code.BAD_TOKEN),
        },
    )
    def get(self, request):
        instances = selectors.instance_list(user=request.user)
        return Response(
            {
                "message": "Your recovery instances, newest first.",
                "instances": InstanceOutput(instances, many=True).data,
            }
        )


class InstanceDetailApi(APIView):
    @extend_schema(
        operation_id="instances_get",
        tags=["recovery"],
        responses={200: InstanceBody, **error_responses(Code.BAD_TOKEN, Code.NO_INSTANCE)},
    )
    def get(self, request, instance_id):
        instance = _instance(request, instance_id)
        return Response({"message": f"Instance is {instance.state}.", "instance": InstanceOutput(instance).data})

    @extend_schema(
        operation_id="instances_terminate",
        tags=["recovery"],
        description="Terminate the instance; its Elastic IP and image are released, and the VPN gateway "
        "when no other instance uses it.",
        responses={
            202: InstanceBody,
            **error_responses(
                Code.BAD_TOKEN, Code.NO_INSTANCE, Code.INSTANCE_STATE_CONFLICT, Code.INSTANCE_ACTION_FAILED
            ),
        },
    )
    def delete(self, request, instance_id):
        return _instance_action(request, instance_id, services.instance_terminate, "Instance terminated.")


class InstanceStartApi(APIView):
    @extend_schema(
        operation_id="instances_start",
        tags=["recovery"],
        request=None,
        responses={
            202: InstanceBody,
            **error_responses(Code.BAD_TOKEN, Code.LAUNCH_FAILED, Code.NO_INSTANCE, Code.INSTANCE_STATE_CONFLICT),
        },
    )
    def post(self, request, instance_id):
        return _instance_action(request, instance_id, services.instance_start, "Instance starting.")


class InstanceStopApi(APIView):
    @extend_schema(
        operation_id="instances_stop",
        tags=["recovery"],
        request=None,
        responses={
            202: InstanceBody,
            **error_responses(
                Code.BAD_TOKEN, Code.NO_INSTANCE, Code.INSTANCE_STATE_CONFLICT, Code.INSTANCE_ACTION_FAILED
            ),
        },
    )
    def post(self, request, instance_id):
        return _instance_action(request, instance_id, services.instance_stop, "Instance stopping.")


class InstanceVpnApi(APIView):
    @extend_schema(
        operation_id="instances_vpn_config",
        tags=["recovery"],
        description="The WireGuard client config (text/plain) that routes to the recovered server's private "
        "address. It holds a private key: keep it like a password.",
        responses={
            (200, "text/plain"): OpenApiResponse(OpenApiTypes.STR, description="A wg-quick config file."),
            **error_responses(Code.BAD_TOKEN, Code.NO_INSTANCE, Code.INSTANCE_STATE_CONFLICT),
        },
    )
    def get(self, request, instance_id):
        instance = _instance(request, instance_id)
        if instance.state == Instance.State.TERMINATED:
            raise ServiceError(Code.INSTANCE_STATE_CONFLICT, "The instance is terminated; it has no VPN any more.")
        config = selectors.vpn_client_config(instance=instance)
        if config is None:
            raise ServiceError(
                Code.INSTANCE_STATE_CONFLICT, "The VPN is not ready yet; wait until the failover is ready."
            )
        response = HttpResponse(config, content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{vpn_file_name(instance)}"'
        response["Cache-Control"] = "no-store"
        return response


def vpn_file_name(instance: Instance) -> str:
    """`reclo-<server>.conf`: wg-quick takes the interface name from the file name (at most 15 characters)."""
    safe = "".join(c for c in instance.recovery.server_name if c.isalnum() or c in "-_")[:9] or "server"
    return f"reclo-{safe}.conf"
