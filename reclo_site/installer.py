"""The agent's installer: `GET /agent/install.sh` and the bundle it installs.

No token: the script and the bundle hold no secret (the enrollment key is
the installer's argument, never part of a URL), and a server about to be
enrolled has no credential yet. The bundle is built from the repository's
own `agent/` by `manage.py build_agent` (reclo_site.agent_bundle), so the
portal hands out the agent it was deployed with.
"""

import shlex

from django.conf import settings
from django.http import FileResponse, HttpResponse
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET

from . import agent_bundle


@require_GET
def install_script(request):
    """The installer, with this portal's address and the agent's version written in."""
    portal = settings.SITE_URL.rstrip("/")
    context = {"portal": portal, "portal_sh": shlex.quote(portal), "version": agent_bundle.agent_version()}
    script = render_to_string("agent/install.sh", context)
    response = HttpResponse(script, content_type="text/x-shellscript; charset=utf-8")
    response["Content-Disposition"] = 'inline; filename="install.sh"'
    return response


@require_GET
def agent_package(request):
    """The agent bundle `reclo-agent-<version>.tar.gz`; 503 until `manage.py build_agent` has built it."""
    path = agent_bundle.bundle_path()
    if not path.exists():
        return HttpResponse(
            "The agent bundle is not built on this portal: run `python manage.py build_agent` (the deploy does).\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    response = FileResponse(path.open("rb"), content_type="application/gzip", as_attachment=True, filename=path.name)
    response["X-Reclo-Agent-Version"] = agent_bundle.agent_version()
    return response
