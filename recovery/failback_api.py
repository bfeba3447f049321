"""Agent API: bringing a recovered server home (failback) and following it.

As in `recovery.api`: one view per route, ownership through a selector,
one service, a small output serializer; another tenant's ids answer
exactly like unknown ones (404).
"""

from drf_spectacular.utils import extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from reclo_site.api.schema import error_responses
from reclo_site.errors import Code, ServiceError

from . import failback_services, selectors
from .api import RecoveryErrorOutput
from .failback import FAILBACK_STEPS
from .models import Failback


class FailbackStepOutput(serializers.Serializer):
    name = serializers.CharField()
    title = serializers.SerializerMethodField()
    status = serializers.CharField(help_text="pending, running, waiting, done, skipped or failed")
    started = serializers.DateTimeField(allow_null=True)
    finished = serializers.DateTimeField(allow_null=True)
    attempts = serializers.IntegerField()
    detail = serializers.CharField()

    def get_title(self, step) -> str:
        return FAILBACK_STEPS.title(step.name)


class FailbackOutput(serializers.Serializer):
    failback_id = serializers.UUIDField(source="pk")
    recovery_id = serializers.UUIDField()
    server = serializers.CharField(source="server_name")
    instance_id = serializers.CharField()
    status = serializers.ChoiceField(choices=Failback.Status.values)
    kind = serializers.CharField(help_text="full or incremental; empty until the snapshot is taken")
    backup_id = serializers.UUIDField(source="backup_ref", help_text="The restore point it makes.")
    parent_id = serializers.UUIDField(
        allow_null=True, help_text="An incremental's parent: the failover's restore point (--changed-since)."
    )
    snapshot_at = serializers.DateTimeField(allow_null=True, help_text="The moment of the cloud disk it holds.")
    steps = FailbackStepOutput(many=True)
    error = serializers.SerializerMethodField()
    created = serializers.DateTimeField()
    finished = serializers.DateTimeField(allow_null=True)

    @extend_schema_field(RecoveryErrorOutput(allow_null=True))
    def get_error(self, failback):
        if failback.status != Failback.Status.FAILED:
            return None
        return {"code": failback.error_code, "message": failback.error}


def _body(failback: Failback) -> dict:
    return FailbackOutput(failback).data


class FailbackStartApi(APIView):
    @extend_schema(
        operation_id="recoveries_failback",
        tags=["recovery"],
        description="Bring the recovered server home: its disk in the cloud becomes a new, verified restore "
        "point of its server.",
        request=None,
        responses={
            202: inline_serializer(
                "FailbackStartOutput",
                {
                    "message": serializers.CharField(),
                    "failback_id": serializers.UUIDField(),
                    "status": serializers.CharField(),
                    "failback": FailbackOutput(),
                },
            ),
            **error_responses(Code.BAD_TOKEN, Code.NOT_FOUND, Code.FAILOVER_RUNNING, Code.INSTANCE_STATE_CONFLICT),
        },
    )
    def post(self, request, recovery_id):
        recovery = selectors.recovery_get(user=request.user, recovery_id=recovery_id)
        if recovery is None:
            raise ServiceError(Code.NOT_FOUND, "No failover of yours has that id.")
        failback = failback_services.failback_start(user=request.user, recovery=recovery)
        failback = failback_services.failback_get(user=request.user, failback_id=failback.pk)
        assert failback is not None  # (just made, the caller's)
        return Response(
            {
                "message": f"Bringing {recovery.server_name} home.",
                "failback_id": str(failback.pk),
                "status": failback.status,
                "failback": _body(failback),
            },
            status=status.HTTP_202_ACCEPTED,
        )


class FailbackDetailApi(APIView):
    @extend_schema(
        operation_id="failbacks_get",
        tags=["recovery"],
        responses={
            200: inline_serializer(
                "FailbackDetailOutput", {"message": serializers.CharField(), "failback": FailbackOutput()}
            ),
            **error_responses(Code.BAD_TOKEN, Code.NOT_FOUND),
        },
    )
    def get(self, request, failback_id):
        failback = failback_services.failback_get(user=request.user, failback_id=failback_id)
        if failback is None:
            raise ServiceError(Code.NOT_FOUND, "No failback of yours has that id.")
        return Response({"message": f"Failback is {failback.status}.", "failback": _body(failback)})
