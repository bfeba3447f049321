"""Backup pages: the dashboard, a server's restore points, deleting one, adding a server."""

import shlex

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from reclo_site.errors import Code, ServiceError

from . import selectors, services
from .forms import BackupDeleteForm


@login_required
def dashboard(request):
    servers = selectors.server_overview(user=request.user)
    return render(request, "backups/dashboard.html", {"servers": servers})


@login_required
def server_detail(request, server_id: int):
    found = selectors.server_timeline(user=request.user, server_id=server_id)
    if found is None:
        raise Http404("No such server.")
    overview, timelines = found
    return render(
        request,
        "backups/server.html",
        {"overview": overview, "server": overview.server, "timelines": timelines},
    )


@login_required
def backup_delete(request, backup_id):
    found = selectors.backup_delete_preview(user=request.user, backup_id=backup_id)
    if found is None:
        raise Http404("No such backup.")
    backup, dependents = found
    form = BackupDeleteForm(request.POST or None, dependents=len(dependents))
    if request.method == "POST":
        if form.is_valid():
            try:
                done = services.backup_delete(user=request.user, backup_id=backup.pk, cascade=True)
            except ServiceError as exc:
                messages.error(request, exc.message)
            else:
                where = f"{backup.server.name} / {backup.disk}"
                if done.scheduled:
                    until = timezone.localtime(done.locked_until).strftime("%Y-%m-%d %H:%M")
                    messages.success(
                        request,
                        f"{len(done.scheduled)} restore point(s) of {where} are scheduled for removal: they are "
                        f"locked until {until} and removed then. Undo brings them back until that time.",
                    )
                else:
                    messages.success(request, f"Deleted {len(done.deleted)} restore point(s) of {where}.")
                return redirect("backups:server-detail", server_id=backup.server_id)
        else:
            # Show why, with a fresh form that carries what the page shows now.
            messages.warning(request, " ".join(form.non_field_errors()) or "Confirm the deletion again.")
        form = BackupDeleteForm(dependents=len(dependents))
    return render(
        request,
        "backups/backup_delete.html",
        {"backup": backup, "dependents": dependents, "form": form, "now": timezone.now()},
    )


@login_required
@require_POST
def backup_undelete(request, backup_id):
    """The Undo of a restore point scheduled for removal (a POST with the CSRF token)."""
    try:
        backup = services.backup_undelete(user=request.user, backup_id=backup_id)
    except ServiceError as exc:
        if exc.code == Code.NO_BACKUP_TO_DELETE:
            raise Http404("No such backup.") from None
        messages.error(request, exc.message)
        return redirect("backups:dashboard")
    messages.success(request, f"The restore point of {backup.date_created:%Y-%m-%d %H:%M} is back.")
    return redirect("backups:server-detail", server_id=backup.server_id)


@login_required
def add_server(request):
    portal, email = shlex.quote(settings.SITE_URL), shlex.quote(request.user.email)
    commands = {
        "install": "python3 -m venv /opt/reclo-agent\n/opt/reclo-agent/bin/pip install ./agent\n"
        "ln -s /opt/reclo-agent/bin/reclo-agent /usr/local/bin/reclo-agent",
        "login": f"reclo-agent login --portal {portal} --email {email}",
        "backup": 'reclo-agent backup /dev/sda --server "$(hostname -s)" --disk sda',
        "schedule": "reclo-agent schedule install --every 1h",
        "check": "reclo-agent list\nreclo-agent restore BACKUP_ID /dev/sdb",
    }
    return render(request, "backups/add_server.html", {"commands": commands, "site_url": settings.SITE_URL})
