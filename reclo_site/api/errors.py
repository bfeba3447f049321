"""The API's error envelope: `{"error": <code>, "message": "..."}`.

Services raise `ApiError` subclasses (or DRF's own exceptions); the single
exception handler below turns every one of them, and anything unexpected,
into the contract's envelope with a fitting HTTP status.
"""

import logging

from django.core.exceptions import PermissionDenied
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response

log = logging.getLogger(__name__)

# Every code the API answers with, for the schema and the docs.
ERROR_CODES = {
    100: (500, "internal error"),
    101: (503, "cannot connect to database"),
    102: (401, "invalid, expired or revoked token"),
    103: (429, "too many requests"),
    104: (400, "malformed request"),
    105: (404, "no such endpoint"),
    106: (405, "method not allowed"),
    201: (409, "user with that email already exists"),
    202: (400, "invalid username format"),
    203: (400, "invalid email format"),
    204: (400, "invalid password format"),
    205: (502, "failed to provision cloud storage for the new user"),
    206: (403, "account is deactivated"),
    207: (401, "email or password does not match"),
    208: (400, "invalid email format"),
    209: (400, "invalid password format"),
    210: (429, "too many failed logins; try later"),
    211: (500, "failed to deactivate token"),
    301: (503, "failed to get list of backups"),
    303: (502, "unable to get temporary S3 credentials"),
    304: (502, "failed to complete upload"),
    305: (404, "no upload found"),
    306: (409, "failed to get backup information"),
    307: (422, "could not verify backup"),
    308: (500, "failed to obtain file name to delete"),
    309: (404, "no backup to delete"),
    310: (502, "failed to delete backup"),
    311: (409, "backup has dependent incremental backups"),
    312: (409, "invalid backup chain"),
    313: (413, "declared file size over the account's limit"),
    401: (404, "no restorable backup with that id"),
    402: (409, "a failover for this server is already running"),
    403: (502, "failed to import the backup as a cloud image"),
    404: (502, "failed to start the instance"),
    405: (404, "no instance with that id"),
    406: (409, "the instance's state does not allow that action"),
    407: (502, "failed to provision the VPN"),
    408: (502, "failed to stop or terminate the instance"),
}


class ApiError(exceptions.APIException):
    """An error with one of the contract's codes; the status comes from the table."""

    def __init__(self, code: int, message: str | None = None, *, fields: dict | None = None, headers=None):
        self.error_code = code
        self.status_code = ERROR_CODES[code][0]
        self.fields = fields
        self.headers = headers or {}
        super().__init__(message or ERROR_CODES[code][1].capitalize() + ".")


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
    if isinstance(exc, ApiError):
        code, message, fields, status_code = exc.error_code, str(exc.detail), exc.fields, exc.status_code
        headers.update(exc.headers)
        if code == 102:
            headers["WWW-Authenticate"] = "Token"
    elif isinstance(exc, exceptions.ValidationError):
        code, status_code = 104, 400
        fields = _flatten(exc.detail)
        message = "The request has invalid fields: " + ", ".join(sorted(fields)) + "."
    elif isinstance(exc, exceptions.ParseError):
        code, message, fields, status_code = 104, f"Malformed request: {exc.detail}", None, 400
    elif isinstance(exc, exceptions.UnsupportedMediaType):
        code, message, fields, status_code = 104, "Send the body as application/json.", None, 415
    elif isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        code, fields, status_code = 102, None, 401
        message = (
            str(exc.detail)
            if isinstance(exc, exceptions.AuthenticationFailed)
            else ("Authentication required: send 'Authorization: Token <token>'.")
        )
        headers["WWW-Authenticate"] = "Token"
    elif isinstance(exc, exceptions.Throttled):
        code, fields, status_code = 103, None, 429
        wait = int(exc.wait or 1)
        message = f"Too many requests; retry in {wait} seconds."
        headers["Retry-After"] = str(wait)
    elif isinstance(exc, (Http404, exceptions.NotFound)):
        code, message, fields, status_code = 105, "Not found.", None, 404
    elif isinstance(exc, exceptions.MethodNotAllowed):
        code, message, fields, status_code = 106, str(exc.detail), None, 405
    elif isinstance(exc, (PermissionDenied, exceptions.PermissionDenied)):
        code, message, fields, status_code = 104, "You may not do that.", None, 403
    elif isinstance(exc, (OperationalError, InterfaceError)):
        log.warning("database unavailable: %s", exc.__class__.__name__)
        code, message, fields, status_code = 101, "The database is unavailable; try again shortly.", None, 503
        headers["Retry-After"] = "5"
    elif isinstance(exc, exceptions.APIException):
        code, message, fields, status_code = 104, str(exc.detail), None, exc.status_code
    else:
        if isinstance(exc, DatabaseError):
            log.exception("database error in %s", context.get("view").__class__.__name__)
        else:
            log.exception("unhandled error in %s", context.get("view").__class__.__name__)
        code, message, fields, status_code = 100, "Internal error; it has been logged.", None, 500
    return Response(error_body(code, message, fields), status=status_code, headers=headers)
