"""Root URLs: pages at /, the agent API under /api/v1/."""

from csp.constants import SELF, UNSAFE_INLINE
from csp.decorators import csp_update
from django.contrib import admin
from django.urls import URLPattern, URLResolver, include, path, re_path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularRedocView

from . import installer, views

api_v1: list[URLPattern | URLResolver] = [
    path("", include("accounts.api_urls")),
    path("", include("backups.api_urls")),
    path("", include("recovery.api_urls")),
    path("schema", SpectacularJSONAPIView.as_view(), name="schema"),
    # Redoc styles itself inline and searches in a blob: web worker.
    path(
        "docs",
        csp_update({"style-src": [UNSAFE_INLINE], "worker-src": [SELF, "blob:"]})(
            SpectacularRedocView.as_view(url_name="api:schema")
        ),
        name="docs",
    ),
]

urlpatterns = [
    path("api/v1/", include((api_v1, "api"))),
    path("accounts/", include("accounts.urls")),
    path("", include("backups.urls")),
    path("recovery/", include("recovery.urls")),
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("agent/install.sh", installer.install_script, name="agent-install"),
    path("agent/reclo-agent.tar.gz", installer.agent_package, name="agent-package"),
    path("favicon.ico", views.favicon),
    # Anything else under /api/ answers the JSON envelope, even with DEBUG on.
    re_path(r"^api/", views.api_not_found),
]

handler404 = "reclo_site.views.not_found"
handler500 = "reclo_site.views.server_error"
