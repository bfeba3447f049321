"""The portal's URLs plus /bench/ping, a bare Django view returning a constant.

The load bench serves this urlconf (through bench/load_settings.py) so that
the framework's ceiling is measured by the same gunicorn, settings and
middleware as the portal, in the same run.
"""

from django.http import HttpResponse
from django.urls import path

from reclo_site import urls as site_urls


def ping(request):
    return HttpResponse(b"pong", content_type="text/plain")


urlpatterns = [path("bench/ping", ping), *site_urls.urlpatterns]

handler404 = site_urls.handler404
handler500 = site_urls.handler500
