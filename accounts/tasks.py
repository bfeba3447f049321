"""Beat jobs of the accounts app."""

import logging

from celery import shared_task

from . import services

log = logging.getLogger(__name__)


@shared_task
def tokens_expire() -> int:
    """Deactivate agent tokens past their 60 days (idempotent, bounded batches)."""
    count = services.tokens_expire()
    if count:
        log.info("expired %d API tokens", count)
    return count


@shared_task
def password_reset_email_send(user_id: int) -> bool:
    """Email a password-reset link (a repeat sends one more link; each works until used)."""
    return services.password_reset_email_send(user_id=user_id)
