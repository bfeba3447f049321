"""Request ids: one per request, in the response, the logs and the audit log."""

import contextvars
import logging
import re
import uuid

from .http import client_address

_current = contextvars.ContextVar("request_id", default="-")
_address = contextvars.ContextVar("client_address", default="")
# A caller-supplied id is kept only when it is short and harmless.
_VALID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def current_request_id() -> str:
    return _current.get()


def current_address() -> str:
    """The address of the request being served ('' outside a request)."""
    return _address.get()


class RequestIdMiddleware:
    """Takes X-Request-ID from a trusted proxy or makes one; echoes it back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        supplied = request.headers.get("X-Request-ID", "")
        request.id = supplied if _VALID.match(supplied) else uuid.uuid4().hex
        reset = _current.set(request.id)
        reset_address = _address.set(client_address(request))
        try:
            response = self.get_response(request)
        finally:
            _current.reset(reset)
            _address.reset(reset_address)
        response["X-Request-ID"] = request.id
        return response


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (`-` outside a request)."""

    def filter(self, record):
        record.request_id = _current.get()
        return True
