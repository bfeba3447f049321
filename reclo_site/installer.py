"""The agent's installer: `GET /agent/install.sh` and the package it installs.

No token: the script and the package hold no secret (the enrollment key is
the installer's argument, never part of a URL), and a server about to be
enrolled has no credential yet. The package is the repository's own
`agent/` folder as a source archive, built once per process, so the portal
always hands out the agent it was deployed with.
"""

import functools
import io
import shlex
import tarfile
import tomllib
from pathlib import Path

from django.conf import settings
from django.http import HttpResponse
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET

AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
# What an installable source archive needs; tests and caches stay out.
_INCLUDE = ("pyproject.toml", "README.md", "reclo_agent")
_SKIP = {"__pycache__", ".pytest_cache", ".hypothesis"}


@require_GET
def install_script(request):
    """The installer, with this portal's address written in."""
    portal = settings.SITE_URL.rstrip("/")
    script = render_to_string("agent/install.sh", {"portal": portal, "portal_sh": shlex.quote(portal)})
    response = HttpResponse(script, content_type="text/x-shellscript; charset=utf-8")
    response["Content-Disposition"] = 'inline; filename="install.sh"'
    return response


@functools.cache
def agent_archive() -> tuple[str, bytes]:
    """(file name, bytes) of the agent as a source archive `reclo-agent-<version>.tar.gz`."""
    version = tomllib.loads((AGENT_DIR / "pyproject.toml").read_text())["project"]["version"]
    top = f"reclo-agent-{version}"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in _INCLUDE:
            archive.add(AGENT_DIR / name, arcname=f"{top}/{name}", filter=_keep)
    return f"{top}.tar.gz", buffer.getvalue()


def _keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = set(Path(info.name).parts)
    if parts & _SKIP or info.name.endswith((".pyc", ".egg-info")):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


@require_GET
def agent_package(request):
    """The agent's source archive, which `pip install URL` builds and installs."""
    name, data = agent_archive()
    response = HttpResponse(data, content_type="application/gzip")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
