"""Emails to an account's owner about its security, rendered from templates/accounts/email/."""

import logging

from django.conf import settings
from django.core.mail import send_mail
from django.template.loader import render_to_string
from django.utils import timezone

log = logging.getLogger(__name__)


def owner_email(user, template: str, context: dict | None = None) -> bool:
    """Send `accounts/email/<template>_subject.txt` and `<template>.txt` to the owner.

    The context always has ``user``, ``site_url`` and ``now``. A mail server
    that fails is logged, never raised: a sign-in or a password change must
    not fail because the notice about it could not be sent.
    """
    if not getattr(user, "email", ""):
        return False
    context = {"user": user, "site_url": settings.SITE_URL.rstrip("/"), "now": timezone.now(), **(context or {})}
    subject = " ".join(render_to_string(f"accounts/email/{template}_subject.txt", context).split())
    body = render_to_string(f"accounts/email/{template}.txt", context)
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [user.email])
    except Exception:  # noqa: BLE001 - any transport failure; the event is in the audit log
        log.exception("could not email %s (%s)", user.pk, template)
        return False
    return True
