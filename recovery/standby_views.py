"""The warm standby page of a server: what it costs, shown before it is turned on, and the switch."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from backups import services as backup_services

from . import paths, selectors, staging


@login_required
@require_http_methods(["GET", "POST"])
def standby_settings(request, server_id: int):
    """GET: warm standby's monthly cost and state; POST `warm_standby` = on or off turns it on or off."""
    server = selectors.server_get(user=request.user, server_id=server_id)
    if server is None:
        raise Http404("No such server.")
    if request.method == "POST":
        choice = request.POST.get("warm_standby", "")
        if choice not in ("on", "off"):
            messages.error(request, "Choose to turn warm standby on or off.")
            response = render(request, "recovery/standby.html", _context(server), status=400)
            return response
        backup_services.server_update(user=request.user, server=server, warm_standby=choice == "on")
        if choice == "on":
            messages.success(
                request,
                f"Warm standby is on for {server.name}: its restore points are being staged as cloud snapshots.",
            )
        else:
            messages.success(request, f"Warm standby is off for {server.name}: its staged snapshots are deleted.")
        return redirect("backups:server-detail", server_id=server.pk)
    return render(request, "recovery/standby.html", _context(server))


def _context(server) -> dict:
    state = staging.standing(server)
    return {"server": server, "standby": state, "expected": paths.about(state.expected_seconds)}
