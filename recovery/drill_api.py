"""Agent API: drills (test failovers of one restore point in an isolated sandbox).

One view per route; each checks ownership through a selector, calls one
service and renders an output serializer. Another tenant's ids answer
exactly like unknown ones (404, code NO_DRILL).
"""

from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from reclo_site.api.fields import StrictCharField
from reclo_site.api.schema import error_responses
from reclo_site.api.validation import valid_body
from reclo_site.errors import Code, ServiceError

from . import drill_report, drill_services, selectors
from .drills import DRILL_STEPS
from .models import Drill


class DrillStepOutput(serializers.Serializer):
    name = serializers.CharField()
    title = serializers.SerializerMethodField()
    status = serializers.CharField(help_text="pending, running, waiting, done, skipped or failed")
    started = serializers.DateTimeField(allow_null=True)
    finished = serializers.DateTimeField(allow_null=True)

    def get_title(self, step) -> str:
        return DRILL_STEPS.title(step.name)


class CheckOutput(serializers.Serializer):
    name = serializers.CharField()
    passed = serializers.BooleanField()
    detail = serializers.CharField(help_text="The evidence: what the console or the port showed.")


class DrillOutput(serializers.Serializer):
    drill_id = serializers.UUIDField(source="pk")
    backup_id = serializers.UUIDField(source="backup_ref")
    server = serializers.CharField(source="server_name")
    sandbox = serializers.ChoiceField(choices=Drill.Sandbox.values)
    trigger = serializers.ChoiceField(choices=Drill.Trigger.values)
    status = serializers.ChoiceField(choices=Drill.Status.values)
    steps = DrillStepOutput(many=True)
    checks = CheckOutput(many=True)
    rto_seconds = serializers.FloatField(allow_null=True, help_text='From the click to "server answers".')
    console_excerpt = serializers.CharField()
    screenshot_url = serializers.SerializerMethodField()
    report_url = serializers.SerializerMethodField()
    started = serializers.DateTimeField(source="created")
    finished = serializers.DateTimeField(allow_null=True)
    error = serializers.SerializerMethodField()

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_screenshot_url(self, drill) -> str | None:
        if not drill.screenshot_key:
            return None
        return self._absolute(reverse("recovery:drill-screenshot", args=[drill.pk]))

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_report_url(self, drill) -> str | None:
        if drill.is_active:
            return None
        return self._absolute(reverse("api:drill-report", args=[drill.pk]))

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_error(self, drill) -> str | None:
        return drill.error or None

    def _absolute(self, path: str) -> str:
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path


class DrillStartInput(serializers.Serializer):
    backup_id = StrictCharField(help_text="The restore point to boot (a verified backup).")
    probe_port = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=1, max_value=65535,
        help_text="A TCP port that must answer on the booted server; by default the server's drill port.",
    )  # fmt: skip


def _drill(request, drill_id) -> Drill:
    drill = selectors.drill_get(user=request.user, drill_id=drill_id)
    if drill is None:
        raise ServiceError(Code.NO_DRILL, "No drill of yours has that id.")
    return drill


class DrillListApi(APIView):
    @extend_schema(
        operation_id="drills_list",
        tags=["drills"],
        responses={
            200: inline_serializer(
                "DrillListOutput", {"message": serializers.CharField(), "drills": DrillOutput(many=True)}
            ),
            **error_responses(Code.BAD_TOKEN),
        },
    )
    def get(self, request):
        drills = selectors.drill_list(user=request.user, server=request.query_params.get("server") or None)
        body = DrillOutput(drills[:200], many=True, context={"request": request}).data
        return Response({"message": "Your drills, newest first.", "drills": body})

    @extend_schema(
        operation_id="drills_start",
        tags=["drills"],
        request=DrillStartInput,
        responses={
            202: inline_serializer(
                "DrillStartOutput",
                {
                    "message": serializers.CharField(),
                    "drill_id": serializers.UUIDField(),
                    "status": serializers.CharField(),
                },
            ),
            **error_responses(
                Code.BAD_TOKEN, Code.MALFORMED, Code.NO_RESTORABLE_BACKUP, Code.DRILL_RUNNING, Code.SANDBOX_FAILED
            ),  # fmt: skip
        },
    )
    def post(self, request):
        data = valid_body(DrillStartInput, request)
        drill = drill_services.drill_start(
            user=request.user, backup_id=data["backup_id"], probe_port=data["probe_port"], trigger=Drill.Trigger.API
        )
        return Response(
            {"message": "Drill started.", "drill_id": str(drill.pk), "status": drill.status},
            status=status.HTTP_202_ACCEPTED,
        )


class DrillDetailApi(APIView):
    @extend_schema(
        operation_id="drills_get",
        tags=["drills"],
        responses={
            200: inline_serializer("DrillDetailOutput", {"message": serializers.CharField(), "drill": DrillOutput()}),
            **error_responses(Code.BAD_TOKEN, Code.NO_DRILL),
        },
    )
    def get(self, request, drill_id):
        drill = _drill(request, drill_id)
        body = DrillOutput(drill, context={"request": request}).data
        return Response({"message": f"Drill is {drill.status}.", "drill": body})


class DrillReportApi(APIView):
    @extend_schema(
        operation_id="drills_report",
        tags=["drills"],
        responses={
            (200, "application/pdf"): OpenApiResponse(OpenApiTypes.BINARY, description="The drill's report."),
            **error_responses(Code.BAD_TOKEN, Code.NO_DRILL),
        },
    )
    def get(self, request, drill_id):
        return report_response(_drill(request, drill_id))


def report_response(drill: Drill) -> HttpResponse:
    """The drill's PDF as a download (made now from the record; the stored copy is the auditor's)."""
    response = HttpResponse(drill_report.render_pdf(drill), content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="reclo-drill-{drill.server_name}-{drill.pk}.pdf"'
    return response
