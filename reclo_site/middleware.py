"""Request ids: one per request, in the response, the logs and the audit log."""

import contextvars
import logging
import re
import uuid

_current = contextvars.ContextVar("request_id", default="-")
# A caller-supplied id is kept only when it is short and harmless.
_VALID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def current_request_id() -> str:
    return _current.get()


class RequestIdMiddleware:
    """Takes X-Request-ID from a trusted proxy or makes one; echoes it back."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        supplied = request.headers.get("X-Request-ID", "")
        request.id = supplied if _VALID.match(supplied) else uuid.uuid4().hex
        reset = _current.set(request.id)
        try:
            response = self.get_response(request)
        finally:
            _current.reset(reset)
        response["X-Request-ID"] = request.id
        return response


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (`-` outside a request)."""

    def filter(self, record):
        record.request_id = _current.get()
        return True
