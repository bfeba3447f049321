"""The Celery app; its configuration is the CELERY_* part of settings."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reclo_site.settings")

app = Celery("reclo_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
