"""The audit log: who did what, when, from where, under which request id."""

import logging

from reclo_site.http import client_address
from reclo_site.middleware import current_address, current_client_request_id, current_request_id

from .models import AuditEvent

log = logging.getLogger("reclo.audit")

# Detail keys that could carry a credential; dropped whatever their value.
_SECRET_WORDS = ("token", "password", "secret", "key", "credential", "session")
_SAFE_KEYS = frozenset({"token_name", "token_prefix", "key_prefix", "object_key"})


def _clean(details: dict) -> dict:
    return {k: v for k, v in details.items() if k in _SAFE_KEYS or not any(word in k.lower() for word in _SECRET_WORDS)}


def audit_record(kind: str, *, user=None, request=None, address: str = "", **details) -> AuditEvent:
    """Record one event. `details` are plain JSON values; secrets are dropped.

    The address and request id default to those of the request being served.
    """
    if request is not None and not address:
        address = client_address(request)
    address = address or current_address()
    clean = _clean(details)
    if current_client_request_id():
        # The caller's own id, never taken as ours (see reclo_site/middleware.py).
        clean["client_request_id"] = current_client_request_id()
    event = AuditEvent.objects.create(
        user=user if getattr(user, "pk", None) else None,
        kind=kind,
        address=address[:64],
        request_id=current_request_id() if current_request_id() != "-" else "",
        details=clean,
    )
    log.info("%s user=%s address=%s %s", kind, event.user_id, event.address, clean)
    return event
