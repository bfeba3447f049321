"""Site-wide views: error pages (JSON under /api/), health check."""

from django.db import connection
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.templatetags.static import static
from django.views.decorators.csrf import csrf_exempt

from reclo_site.errors import Code

from .api.errors import error_body


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def not_found(request, exception=None):
    if _is_api(request):
        return JsonResponse(
            error_body(Code.NOT_FOUND, f"No such endpoint: {request.method} {request.path}"), status=404
        )
    return render(request, "errors/404.html", status=404)


def server_error(request):
    if _is_api(request):
        return JsonResponse(error_body(Code.INTERNAL, "Internal error; it has been logged."), status=500)
    return render(request, "errors/500.html", status=500)


@csrf_exempt
def api_not_found(request, *args, **kwargs):
    return not_found(request)


def healthz(request):
    """Liveness for load balancers: the database answers."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - any failure means unhealthy
        return JsonResponse(error_body(Code.DATABASE_UNAVAILABLE, "Database unavailable."), status=503)
    return JsonResponse({"message": "ok"})


def favicon(request):
    """Browsers ask for /favicon.ico whatever the page says; send them to ours."""
    return redirect(static("favicon.svg"), permanent=True)
