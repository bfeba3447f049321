"""The API's error envelope: `{"error": <code>, "message": "..."}`.

Services and views raise `reclo_site.errors.ServiceError` (DRF raises its
own exceptions); the single exception handler below turns every one of them,
and anything unexpected, into the envelope of docs/api.md (Conventions) with
a fitting HTTP status.
"""

import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response

from reclo_site.errors import Code, ServiceError

log = logging.getLogger(__name__)

# Every code the API answers with, for the schema and the docs.
ERROR_CODES = {code.value: (code.http_status, code.text) for code in Code}


class ApiError(ServiceError, exceptions.APIException):
    """A ServiceError that DRF also sees as its own APIException: for authentication classes only.

    DRF's request marks itself unauthenticated only when an authenticator
    raises an APIException; everywhere else (services, views) raise
    ServiceError itself. The handler below maps both alike.
    """

    def __init__(self, code: Code, message: str | None = None, fields=None, *, field=None, headers=None):
        super().__init__(code, message, fields, field=field, headers=headers)
        self.status_code = self.code.http_status
        self.detail = exceptions.ErrorDetail(self.message, code=self.code.name.lower())


def error_body(code: int, message: str, fields: dict | None = None) -> dict:
    body = {"error": code, "message": message}
    if fields:
        body["fields"] = fields
    return body


def _flatten(detail) -> dict:
    """DRF validation detail as {"field": ["message", ...]}."""
    if isinstance(detail, dict):
        return {
            key: [str(m) for m in (value if isinstance(value, list) else [value])]
            if not isinstance(value, dict)
            else [str(value)]
            for key, value in detail.items()
        }
    return {"non_field_errors": [str(m) for m in (detail if isinstance(detail, list) else [detail])]}


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error, expected or not, in the envelope."""
    headers = {}
    if isinstance(exc, ServiceError):
        code, message, fields, status_code = exc.code, exc.message, exc.fields, exc.code.http_status
        headers.update(exc.headers)
        if code == Code.BAD_TOKEN:
            headers["WWW-Authenticate"] = "Token"
    elif isinstance(exc, exceptions.ValidationError):
        code, status_code = Code.MALFORMED, 400
        fields = _flatten(exc.detail)
        message = "The request has invalid fields: " + ", ".join(sorted(fields)) + "."
    elif isinstance(exc, exceptions.ParseError):
        code, message, fields, status_code = Code.MALFORMED, f"Malformed request: {exc.detail}", None, 400
    elif isinstance(exc, RequestDataTooBig):
        # Django refuses to read a body over DATA_UPLOAD_MAX_MEMORY_SIZE.
        code, fields, status_code = Code.MALFORMED, None, 413
        message = f"The request body is over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
    elif isinstance(exc, exceptions.UnsupportedMediaType):
        code, message, fields, status_code = Code.MALFORMED, "Send the body as application/json.", None, 415
    elif isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        code, fields, status_code = Code.BAD_TOKEN, None, 401
        message = (
            str(exc.detail)
            if isinstance(exc, exceptions.AuthenticationFailed)
            else ("Authentication required: send 'Authorization: Token <token>'.")
        )
        headers["WWW-Authenticate"] = "Token"
    elif isinstance(exc, exceptions.Throttled):
        code, fields, status_code = Code.THROTTLED, None, 429
        wait = int(exc.wait or 1)
        message = f"Too many requests; retry in {wait} seconds."
        headers["Retry-After"] = str(wait)
    elif isinstance(exc, (Http404, exceptions.NotFound)):
        code, message, fields, status_code = Code.NOT_FOUND, "Not found.", None, 404
    elif isinstance(exc, exceptions.MethodNotAllowed):
        code, message, fields, status_code = Code.NOT_FOUND, str(exc.detail), None, 405
    elif isinstance(exc, (PermissionDenied, exceptions.PermissionDenied)):
        code, message, fields, status_code = Code.FORBIDDEN, "You may not do that.", None, 403
    elif isinstance(exc, (OperationalError, InterfaceError)):
        log.warning("database unavailable: %s", exc.__class__.__name__)
        code, message, fields, status_code = (
            Code.DATABASE_UNAVAILABLE,
            "The database is unavailable; try again shortly.",
            None,
            503,
        )
        headers["Retry-After"] = "5"
    elif isinstance(exc, exceptions.APIException):
        code, message, fields, status_code = Code.MALFORMED, str(exc.detail), None, exc.status_code
    else:
        if isinstance(exc, DatabaseError):
            log.exception("database error in %s", context.get("view").__class__.__name__)
        else:
            log.exception("unhandled error in %s", context.get("view").__class__.__name__)
        code, message, fields, status_code = Code.INTERNAL, "Internal error; it has been logged.", None, 500
    return Response(error_body(code, message, fields), status=status_code, headers=headers)
