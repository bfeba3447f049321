"""Recovery pages: fail over, follow a failover, the instances, their VPN config."""

import io
from datetime import UTC, date, datetime, time, timedelta

import qrcode
import qrcode.image.svg
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from accounts import twofactor
from reclo_site.errors import ServiceError
from reclo_site.localtime import when

from . import drill_report, drill_services, failback_services, paths, selectors, services, sizes, staging, vpn_watch
from .api import vpn_file_name
from .drill_api import report_response
from .drills import DRILL_STEPS
from .failover import FAILOVER_STEPS
from .forms import FailoverForm
from .models import Drill, Instance, Recovery

ACTIONS = {
    "start": {
        "title": "Start",
        "service": services.instance_start,
        "done": "The server is starting; it is reachable again in a minute or two.",
        "warning": "The server runs, and is billed, until you stop it again.",
        "button": "Start the server",
        "style": "",
    },
    "stop": {
        "title": "Stop",
        "service": services.instance_stop,
        "done": "The server is stopping.",
        "warning": "Anyone using the server is cut off. A stopped server costs only its disk, and is "
        "terminated automatically after {days} days stopped.",
        "button": "Stop the server",
        "style": "secondary",
    },
    "terminate": {
        "title": "Terminate",
        "service": services.instance_terminate,
        "done": "The server is terminated.",
        "warning": "The cloud server and everything written to it since the failover are deleted for good. "
        "Your backups are not touched.",
        "button": "Terminate the server",
        "style": "danger",
    },
}


def _recovery_or_404(request, recovery_id) -> Recovery:
    recovery = selectors.recovery_get(user=request.user, recovery_id=recovery_id)
    if recovery is None:
        raise Http404("No such failover.")
    return recovery


def _instance_or_404(request, instance_id) -> Instance:
    instance = selectors.instance_get(user=request.user, instance_id=instance_id)
    if instance is None:
        raise Http404("No such instance.")
    return instance


@login_required
def instances(request):
    rows = selectors.instance_list(user=request.user)
    in_progress = selectors.recovery_list_unfinished_or_failed(user=request.user)
    return render(
        request,
        "recovery/instances.html",
        {
            "instances": rows,
            "live": [i for i in rows if i.state != Instance.State.TERMINATED],
            "terminated": [i for i in rows if i.state == Instance.State.TERMINATED][:10],
            "recoveries": in_progress,
            "lifetime_days": settings.RECLO_STOPPED_INSTANCE_LIFETIME.days,
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def failover_start(request, server_id: int):
    server = selectors.server_get(user=request.user, server_id=server_id)
    if server is None:
        raise Http404("No such server.")
    form = FailoverForm(request.POST or None, server=server)
    path = paths.image_path(server)
    latest = form.points.first()
    expected = (
        paths.about(
            paths.expected_seconds(path.method, latest.virtual_size, selectors.measured_failovers(method=path.method))
        )
        if latest
        else ""
    )
    # Warm standby: the newest point's disk is in a snapshot already; only the fixed part is left.
    staged = bool(latest and path.method == paths.EBS_DIRECT and staging.staged_snapshot(latest))
    if staged:
        expected = paths.about(paths.DEFAULT_FIXED_SECONDS[paths.EBS_DIRECT])
    if request.method == "POST" and form.is_valid():
        try:
            recovery = services.recovery_start(
                user=request.user,
                backup_id=form.cleaned_data["backup"].pk,
                instance_type=form.cleaned_data["instance_type"],
            )
        except ServiceError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, f"Failover of {server.name} started.")
            return redirect("recovery:detail", recovery_id=recovery.pk)
    return render(
        request,
        "recovery/failover.html",
        {
            "server": server,
            "form": form,
            "has_points": form.points.exists(),
            "path": path,
            "expected": expected,
            "staged": staged,
            "extras": {
                "gateway": sizes.VPN_GATEWAY_HOURLY_USD,
                "addresses": 2 * sizes.PUBLIC_IPV4_HOURLY_USD,
            },
        },
    )


def _progress(recovery: Recovery) -> dict:
    """What the recovery page shows and its script polls, ready to render."""
    steps = [
        {
            "name": step.name,
            "title": FAILOVER_STEPS.title(step.name),
            "status": step.status,
            "detail": step.error or step.detail,
            "started": step.started.isoformat() if step.started else None,
            "finished": step.finished.isoformat() if step.finished else None,
            "seconds": int(((step.finished or timezone.now()) - step.started).total_seconds())
            if step.started
            else None,
        }
        for step in recovery.steps.all()
    ]
    return {
        "status": recovery.status,
        "status_label": recovery.get_status_display(),
        "active": recovery.is_active,
        "elapsed_seconds": int(recovery.elapsed.total_seconds()),
        "error": recovery.error if recovery.status == Recovery.Status.FAILED else "",
        "steps": steps,
    }


def _minutes_seconds(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


@login_required
def recovery_detail(request, recovery_id):
    recovery = _recovery_or_404(request, recovery_id)
    instance = Instance.objects.filter(recovery=recovery).first()
    vpn_ready = bool(instance and instance.state != Instance.State.TERMINATED and selectors.vpn_client_config(
        instance=instance))  # fmt: skip
    return render(
        request,
        "recovery/recovery.html",
        {
            "recovery": recovery,
            "progress": _progress(recovery),
            "method_label": recovery.get_import_method_display(),
            "expected": paths.about(
                paths.expected_seconds(
                    recovery.import_method,
                    recovery.virtual_size,
                    selectors.measured_failovers(method=recovery.import_method),
                )
            ),
            "measured": _minutes_seconds(recovery.elapsed.total_seconds()),
            "instance": instance,
            "vpn_ready": vpn_ready,
            "vpn_health": vpn_watch.gateway_health(request.user.pk) if vpn_ready else None,
            "vpn_file": vpn_file_name(instance) if instance else "",
            "can_bring_home": failback_services.can_bring_home(instance),
        },
    )


@login_required
@require_GET
def recovery_status(request, recovery_id):
    """The recovery's progress as JSON, for the page's polling script."""
    recovery = _recovery_or_404(request, recovery_id)
    response = JsonResponse(_progress(recovery))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_http_methods(["GET", "POST"])
def instance_action(request, instance_id, action):
    """Confirm (GET) and do (POST) start, stop or terminate: works without JavaScript."""
    if action not in ACTIONS:
        raise Http404("No such action.")
    instance = _instance_or_404(request, instance_id)
    if action == "terminate" and (asked := twofactor.ask_for_code(request)) is not None:
        return asked
    spec = ACTIONS[action]
    allowed = instance.state in services.ALLOWED[action]
    # Work done in the cloud that no restore point holds: the name, typed, confirms it is let go.
    unsaved = action == "terminate" and allowed and failback_services.unsaved_changes(instance)
    name_error = ""
    if request.method == "POST":
        typed = request.POST.get("server_name", "")
        if unsaved and typed.strip() != instance.recovery.server_name:
            name_error = (
                f"That is not the server's name. Type {instance.recovery.server_name} exactly to terminate it, "
                "or bring it home first."
                if typed
                else f"Type the server's name, {instance.recovery.server_name}, to confirm."
            )
        else:
            try:
                spec["service"](instance=instance)
            except ServiceError as exc:
                messages.error(request, exc.message)
            else:
                messages.success(request, spec["done"])
            return redirect("recovery:instances")
    return render(
        request,
        "recovery/instance_action.html",
        {
            "instance": instance,
            "action": action,
            "spec": spec,
            "warning": spec["warning"].format(days=settings.RECLO_STOPPED_INSTANCE_LIFETIME.days),
            "allowed": allowed,
            "unsaved": unsaved,
            "last_saved": failback_services.last_saved(instance) if unsaved else None,
            "name_error": name_error,
        },
        status=400 if name_error else 200,
    )


def _config_or_404(request, instance_id) -> tuple[Instance, str]:
    instance = _instance_or_404(request, instance_id)
    config = selectors.vpn_client_config(instance=instance) if instance.state != Instance.State.TERMINATED else None
    if config is None:
        raise Http404("The VPN is not ready.")
    return instance, config


@login_required
@require_GET
def vpn_config(request, instance_id):
    instance, config = _config_or_404(request, instance_id)
    response = HttpResponse(config, content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{vpn_file_name(instance)}"'
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def vpn_qr(request, instance_id):
    """The client config as a QR code (SVG) for the WireGuard app on a phone or tablet."""
    _instance, config = _config_or_404(request, instance_id)
    image = qrcode.make(config, image_factory=qrcode.image.svg.SvgPathFillImage, box_size=8, border=2)
    out = io.BytesIO()
    image.save(out)
    response = HttpResponse(out.getvalue(), content_type="image/svg+xml")
    response["Cache-Control"] = "no-store"
    return response


# --- Drills ---------------------------------------------------------------------------------


def _drill_or_404(request, drill_id) -> Drill:
    drill = selectors.drill_get(user=request.user, drill_id=drill_id)
    if drill is None:
        raise Http404("No such drill.")
    return drill


@login_required
@require_http_methods(["POST"])
def drill_start(request, server_id: int):
    """The server page's "Test failover": a drill of its newest verified restore point."""
    server = selectors.server_get(user=request.user, server_id=server_id)
    if server is None:
        raise Http404("No such server.")
    newest = selectors.newest_verified_backup(server=server)
    if newest is None:
        messages.error(request, f"{server.name} has no verified restore point to test yet.")
        return redirect("backups:server-detail", server_id=server.pk)
    try:
        drill = drill_services.drill_start(user=request.user, backup_id=newest.pk, trigger=Drill.Trigger.PORTAL)
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("backups:server-detail", server_id=server.pk)
    messages.success(request, f"Test failover of {server.name} started: it boots in an isolated sandbox.")
    return redirect("recovery:drill", drill_id=drill.pk)


def _drill_progress(drill: Drill) -> dict:
    """What the drill page shows and its script polls: the verdict so far, each step with its times as written."""
    steps = [
        {
            "name": step.name,
            "title": DRILL_STEPS.title(step.name),
            "status": step.status,
            "started": when(step.started, seconds=True),
            "finished": when(step.finished, seconds=True),
            "detail": step.error or step.detail,
        }
        for step in drill.steps.all()
    ]
    return {
        "status": drill.status,
        "status_label": drill.get_status_display(),
        "active": drill.is_active,
        "passed": drill.passed,
        "rto_seconds": None if drill.rto_seconds is None else round(drill.rto_seconds),
        "error": drill.error,
        "steps": steps,
    }


@login_required
@require_GET
def drill_detail(request, drill_id):
    drill = _drill_or_404(request, drill_id)
    return render(request, "recovery/drill.html", {"drill": drill, "progress": _drill_progress(drill)})


@login_required
@require_GET
def drill_status(request, drill_id):
    """The drill's progress as JSON, for the drill page's polling script (static/js/drill.js)."""
    response = JsonResponse(_drill_progress(_drill_or_404(request, drill_id)))
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def drill_screenshot(request, drill_id):
    drill = _drill_or_404(request, drill_id)
    png = drill_report.screenshot_bytes(drill)
    if png is None:
        raise Http404("This drill has no screenshot.")
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "private, max-age=3600"
    return response


@login_required
@require_GET
def drill_report_pdf(request, drill_id):
    return report_response(_drill_or_404(request, drill_id))


@login_required
@require_GET
def contingency_report(request):
    """Every finished drill over a date range (default: the last 90 days), as a page or (?format=pdf) a PDF."""
    today = timezone.now().date()
    start = _date(request.GET.get("from"), today - timedelta(days=90))
    end = _date(request.GET.get("to"), today)
    error = ""
    if start is None or end is None or start > end:
        error = "Give the dates as YYYY-MM-DD, the first not after the last."
        start, end = today - timedelta(days=90), today
    since = datetime.combine(start, time.min, tzinfo=UTC)
    until = datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC)
    rows = drill_report.contingency_rows(selectors.drills_between(user=request.user, start=since, end=until))
    if request.GET.get("format") == "pdf" and not error:
        pdf = drill_report.render_contingency_pdf(user=request.user, start=since, end=until, rows=rows)
        response = HttpResponse(pdf, content_type="application/pdf")
        response["Content-Disposition"] = f'attachment; filename="reclo-contingency-tests-{start}-{end}.pdf"'
        return response
    return render(
        request,
        "recovery/contingency.html",
        {
            "rows": rows,
            "start": start,
            "end": end,
            "error": error,
            "passed": sum(r["result"] == "passed" for r in rows),
        },
    )


def _date(raw: str | None, default):
    if not raw:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        return None
