"""Recovery pages."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render


@login_required
def instances(request):
    return render(request, "recovery/instances.html", {"instances": []})
