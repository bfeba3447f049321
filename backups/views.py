"""Backup pages: the dashboard, a server's restore points, deleting one, adding and revoking a server."""

import shlex

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from accounts import twofactor
from reclo_site.errors import Code, ServiceError
from reclo_site.http import client_address
from recovery import selectors as drill_selectors

from . import selectors, services
from .forms import AddServerForm, BackupDeleteForm
from .models import Server


@login_required
def dashboard(request):
    servers = selectors.server_overview(user=request.user)
    standing = drill_selectors.drill_standing(servers=[row.server for row in servers])
    for row in servers:
        row.drills = standing[row.server.pk]
    return render(request, "backups/dashboard.html", {"servers": servers})


@login_required
def server_detail(request, server_id: int):
    found = selectors.server_timeline(user=request.user, server_id=server_id)
    if found is None:
        raise Http404("No such server.")
    overview, timelines = found
    agents = selectors.server_credential_counts(server_ids=[server_id]).get(server_id, 0)
    # Disks whose newest restore point was read in use, neither frozen nor snapshotted.
    crash_disks = [
        t.state.disk for t in timelines if t.chains and t.chains[0] and t.chains[0][-1].consistency == "crash"
    ]
    drills = drill_selectors.drill_standing(servers=[overview.server])[overview.server.pk]
    for timeline in timelines:
        for chain in timeline.chains:
            for backup in chain:
                backup.newest_drill = drills.by_backup.get(backup.pk)  # type: ignore[attr-defined]  # for the template
    context = {
        "overview": overview,
        "server": overview.server,
        "timelines": timelines,
        "agents": agents,
        "crash_disks": crash_disks,
        "preflight": overview.server.preflight,
        "drills": drills,
    }
    return render(request, "backups/server.html", context)


@login_required
@twofactor.require_recent_otp
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


@never_cache  # the page shows a one-time key: no cache may keep a copy
@login_required
def add_server(request):
    """Name a server, get its one-time enrollment key and the one line that installs and enrols the agent."""
    form = AddServerForm(request.POST or None, initial={"name": request.GET.get("name", "")})
    grant = None
    if request.method == "POST" and form.is_valid():
        try:
            grant = services.enrollment_key_create(user=request.user, server=form.cleaned_data["name"])
        except ServiceError as exc:
            form.add_error("name", exc.message)
    portal, email = shlex.quote(settings.SITE_URL), shlex.quote(request.user.email)
    commands = {
        "install": "python3 -m venv /opt/reclo-agent\n/opt/reclo-agent/bin/pip install ./agent\n"
        "ln -s /opt/reclo-agent/bin/reclo-agent /usr/local/bin/reclo-agent",
        "login": f"reclo-agent login --portal {portal} --email {email}",
        "backup": "reclo-agent backup /dev/sda --disk sda",
        "schedule": "reclo-agent schedule install --every 1h",
        "check": "reclo-agent list\nreclo-agent restore BACKUP_ID /dev/sdb",
    }
    context = {"form": form, "grant": grant, "commands": commands, "site_url": settings.SITE_URL}
    return render(request, "backups/add_server.html", context)


@login_required
@twofactor.require_recent_otp
def server_revoke(request, server_id: int):
    """Confirm, then stop every credential of the server at once (its restore points stay)."""
    server = Server.objects.filter(user=request.user, pk=server_id).first()
    if server is None:
        raise Http404("No such server.")
    # The POST is the confirmation (CSRF-checked); a GET only shows what it would do.
    if request.method == "POST":
        revoked = services.server_credentials_revoke(user=request.user, server=server, address=client_address(request))
        messages.success(
            request,
            f"Revoked {server.name}: {revoked} agent credential{'s' if revoked != 1 else ''} stopped working. "
            "Its restore points stay. To protect it again, make a new key with Add a server.",
        )
        return redirect("backups:server-detail", server_id=server.pk)
    agents = selectors.server_credential_counts(server_ids=[server.pk]).get(server.pk, 0)
    return render(request, "backups/server_revoke.html", {"server": server, "agents": agents})
