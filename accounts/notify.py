"""Emails to an account's owner, rendered from templates (never assembled in code).

Times in them are the owner's local times (``{% load reclo %}{{ t|when }}``):
the owner's zone is active while they render.
"""

import logging

from django.conf import settings
from django.core.mail import send_mail
from django.template.loader import render_to_string
from django.utils import timezone

from reclo_site.localtime import user_zone

log = logging.getLogger(__name__)


def owner_email(user, template: str, context: dict | None = None) -> bool:
    """Send `accounts/email/<template>_subject.txt` and `<template>.txt` to the owner.

    A `template` with a slash names its own folder instead (for example
    ``"recovery/email/failover_ready"``).

    The context always has ``user``, ``site_url`` and ``now``. A mail server
    that fails is logged, never raised: a sign-in or a password change must
    not fail because the notice about it could not be sent.
    """
    if not getattr(user, "email", ""):
        return False
    context = {"user": user, "site_url": settings.SITE_URL.rstrip("/"), "now": timezone.now(), **(context or {})}
    path = template if "/" in template else f"accounts/email/{template}"
    with timezone.override(user_zone(user)):
        subject = " ".join(render_to_string(f"{path}_subject.txt", context).split())
        body = render_to_string(f"{path}.txt", context)
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [user.email])
    except Exception:  # noqa: BLE001 - any transport failure; the event is in the audit log
        log.exception("could not email %s (%s)", user.pk, template)
        return False
    return True
