"""Backup pages."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render


@login_required
def dashboard(request):
    return render(request, "backups/dashboard.html", {"servers": []})


@login_required
def add_server(request):
    return render(request, "backups/add_server.html", {"site_url": settings.SITE_URL})
