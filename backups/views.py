"""Backup pages: the dashboard, a server's restore points, deleting one, adding and revoking a server."""

import shlex
from datetime import datetime
from urllib.parse import quote

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from accounts import twofactor
from reclo_site.errors import Code, ServiceError
from reclo_site.http import client_address
from recovery import selectors as drill_selectors
from recovery import staging

from . import selectors, services
from .api_files import file_response
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
        "standby": staging.standing(overview.server),
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
        "uninstall": "sudo /opt/reclo-agent/bin/reclo-agent-uninstall",
        "login": f"reclo-agent login --portal {portal} --email {email}",
        "backup": "reclo-agent backup /dev/sda",
        "schedule": "reclo-agent status",
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


@login_required
@twofactor.require_recent_otp
def server_remove(request, server_id: int):
    """Confirm, then remove a server with no restore points (and its credentials)."""
    server = get_object_or_404(Server, user=request.user, pk=server_id)
    has_points = server.backups.exists()
    if request.method == "POST" and not has_points:
        try:
            services.server_remove(user=request.user, server=server, address=client_address(request))
        except ServiceError as exc:
            messages.error(request, exc.message)
            return redirect("backups:server-detail", server_id=server.pk)
        messages.success(request, f"Removed {server.name}.")
        return redirect("backups:dashboard")
    return render(request, "backups/server_remove.html", {"server": server, "has_points": has_points})


def _place(request) -> tuple[int | None, str]:
    raw = request.GET.get("partition", "")
    partition = int(raw) if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 128 else None
    path = request.GET.get("path") or "/"
    if not path.startswith("/") or len(path) > 4096 or "\x00" in path:
        path = "/"
    return partition, path


def _crumbs(path: str) -> list[tuple[str, str]]:
    """(name, path) of each folder from the root down to `path`."""
    crumbs, at = [], ""
    for part in [p for p in path.split("/") if p]:
        at += "/" + part
        crumbs.append((part, at))
    return crumbs


@login_required
def backup_files(request, backup_id):
    """Browse files: a restore point's partitions, then its folders (read by a worker, see services.files)."""
    backup = selectors.backup_get(user=request.user, backup_id=backup_id)
    if backup is None or backup.deleted_at is not None:
        raise Http404("No such restore point.")
    partition, path = _place(request)
    query = request.GET.get("q", "").strip()[:200]
    context = {"backup": backup, "partition": partition, "path": path, "query": query, "crumbs": _crumbs(path)}
    try:
        found = services.files_browse(user=request.user, backup_id=backup.pk, partition=partition, path=path)
    except ServiceError as exc:
        context["error"] = exc.message
        return render(request, "backups/files.html", context, status=exc.code.http_status)
    if partition is None:
        context["partitions"] = found["partitions"]
    else:
        entries = found["entries"]
        for e in entries:
            e["modified_at"] = datetime.fromisoformat(e["modified"].replace("Z", "+00:00")) if e["modified"] else None
            e["path"] = path.rstrip("/") + "/" + e["name"]
        context["total"] = len(entries)
        if query:
            entries = [e for e in entries if query.casefold() in e["name"].casefold()]
        context["entries"] = entries
        context["filesystem"] = found["filesystem"]
    return render(request, "backups/files.html", context)


@login_required
def backup_file_download(request, backup_id):
    """A file, or a folder as a zip, streamed (audit-logged by the service)."""
    if selectors.backup_get(user=request.user, backup_id=backup_id) is None:
        raise Http404("No such restore point.")
    partition, path = _place(request)
    if partition is None:  # nothing to download: the partitions to choose from
        return redirect("backups:backup-files", backup_id=backup_id)
    try:
        download = services.files_download(
            user=request.user, backup_id=backup_id, partition=partition, path=path, request=request
        )
    except ServiceError as exc:
        if exc.code in (Code.NOT_FOUND, Code.NO_RESTORABLE_BACKUP):
            raise Http404(exc.message) from exc
        messages.error(request, exc.message)
        parent = path.rsplit("/", 1)[0] or "/"
        return redirect(f"{request.path.rsplit('download/', 1)[0]}?partition={partition}&path={quote(parent)}")
    return file_response(download)
