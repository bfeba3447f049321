"""Request ids: one per request, in the response, the logs and the audit log.

The id is ours unless a proxy we trust set it. A client's own
``X-Request-ID`` would otherwise let anyone choose what the audit log says
(reuse another request's id to blur an investigation, or make unrelated
events look like one request). So by default every request gets a fresh id
and a well-formed client id is kept beside it (``client_request_id`` in the
audit details), still useful for matching an agent's log to ours. Behind a
proxy that sets ``X-Request-ID`` on every request, overwriting the client's
(nginx: ``proxy_set_header X-Request-ID $request_id;``), set
``RECLO_TRUST_REQUEST_ID=true`` and its id is used end to end.
"""

import contextvars
import logging
import re
import uuid

from django.conf import settings
from django.utils import timezone

from .http import client_address

_current = contextvars.ContextVar("request_id", default="-")
_client = contextvars.ContextVar("client_request_id", default="")
_address = contextvars.ContextVar("client_address", default="")
# A supplied id is kept (trusted or not) only when it is short and harmless.
_VALID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def current_request_id() -> str:
    return _current.get()


def current_client_request_id() -> str:
    """The id the client sent, when it is well-formed and not the one we use ('' otherwise)."""
    return _client.get()


def current_address() -> str:
    """The address of the request being served ('' outside a request)."""
    return _address.get()


class RequestIdMiddleware:
    """Makes a request id (or takes a trusted proxy's); echoes it back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        supplied = request.headers.get("X-Request-ID", "")
        well_formed = bool(_VALID.match(supplied))
        if well_formed and getattr(settings, "RECLO_TRUST_REQUEST_ID", False):
            request.id, client_id = supplied, ""
        else:
            request.id, client_id = uuid.uuid4().hex, supplied if well_formed else ""
        reset = _current.set(request.id)
        reset_client = _client.set(client_id)
        reset_address = _address.set(client_address(request))
        try:
            response = self.get_response(request)
        finally:
            _current.reset(reset)
            _client.reset(reset_client)
            _address.reset(reset_address)
        response["X-Request-ID"] = request.id
        return response


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (`-` outside a request)."""

    def filter(self, record):
        record.request_id = _current.get()
        return True


class LocalTimeMiddleware:
    """Pages render times in the signed-in owner's zone; the API keeps UTC.

    Activating the zone is enough for every ``|date`` and ``|when`` in a
    template. Requests under /api/ are left in UTC: DRF formats datetimes in
    the current zone, and the API contract (docs/api.md) says UTC.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from .localtime import user_zone  # needs the app registry

        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated and not request.path.startswith("/api/"):
            timezone.activate(user_zone(user))
        else:
            timezone.deactivate()
        try:
            return self.get_response(request)
        finally:
            timezone.deactivate()
