"""The portal's settings, unchanged, with bench/load_ceiling_urls.py as the root urlconf.

Only the load bench's gunicorn uses this (DJANGO_SETTINGS_MODULE=bench.load_settings);
everything else about the portal stays configured from the environment.
"""

from reclo_site.settings import *  # noqa: F403

ROOT_URLCONF = "bench.load_ceiling_urls"
