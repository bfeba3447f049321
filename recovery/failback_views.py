"""Failback pages: "Bring it home" on a recovered server, and the failback's progress and restore commands."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from reclo_site.errors import ServiceError

from . import failback_services, selectors
from .failback import FAILBACK_STEPS
from .models import Failback, Instance


def _steps(failback: Failback) -> list[dict]:
    return [
        {"name": step.name, "title": FAILBACK_STEPS.title(step.name), "status": step.status, "detail": step.detail}
        for step in failback.steps.all()
    ]


@login_required
@require_http_methods(["GET", "POST"])
def failback_start(request, recovery_id):
    """Explain (GET) and start (POST) bringing a recovered server's disk home as a restore point."""
    recovery = selectors.recovery_get(user=request.user, recovery_id=recovery_id)
    if recovery is None:
        raise Http404("No such failover.")
    instance = Instance.objects.filter(recovery=recovery).select_related("recovery").first()
    if request.method == "POST":
        try:
            failback = failback_services.failback_start(user=request.user, recovery=recovery)
        except ServiceError as exc:
            messages.error(request, exc.message)
            return redirect("recovery:failback-start", recovery.pk)
        messages.success(request, f"Bringing {recovery.server_name} home: its disk is being saved as a restore point.")
        return redirect("recovery:failback", failback.pk)
    return render(
        request,
        "recovery/failback_start.html",
        {
            "recovery": recovery,
            "instance": instance,
            "allowed": failback_services.can_bring_home(instance),
            "earlier": recovery.failbacks.all()[:10],
        },
    )


@login_required
def failback_detail(request, failback_id):
    failback = failback_services.failback_get(user=request.user, failback_id=failback_id)
    if failback is None:
        raise Http404("No such failback.")
    return render(
        request,
        "recovery/failback.html",
        {"failback": failback, "steps": _steps(failback), "backup_id": str(failback.backup_ref)},
    )
