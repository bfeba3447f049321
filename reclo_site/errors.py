"""The API's error codes (docs/api.md, Error codes), and the one exception services refuse with.

This module is plain Python (no Django REST Framework): services raise
:class:`ServiceError` without knowing about HTTP, and the API's exception
handler (``reclo_site/api/errors.py``) turns it into the envelope
``{"error": code, "message": ..., "fields": ...}`` with the code's HTTP status.
The codes are documented in ``docs/api.md``; the agent mirrors them in
``agent/reclo_agent/codes.py``.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """An error code of the API contract, with its HTTP status and default text.

    The numbers are the contract (1xx system, 2xx accounts, 3xx backups, 4xx
    recovery); 401–408 are *not* HTTP statuses: ``Code.NO_RESTORABLE_BACKUP``
    (401) answers HTTP 404.
    """

    # Set per member by __new__; annotated here so type checkers know them.
    http_status: int
    text: str

    def __new__(cls, value: int, http_status: int, text: str):
        member = int.__new__(cls, value)
        member._value_ = value
        member.http_status = http_status
        member.text = text
        return member

    @classmethod
    def of(cls, value: int) -> Code:
        """The member numbered `value` (``Code(value)`` does the same; type checkers take it for the constructor)."""
        return cls(value)  # type: ignore[call-arg]

    # 1xx: system
    INTERNAL = 100, 500, "internal error"
    DATABASE_UNAVAILABLE = 101, 503, "cannot connect to database"
    BAD_TOKEN = 102, 401, "invalid, expired or revoked token"
    THROTTLED = 103, 429, "too many requests"
    MALFORMED = 104, 400, "malformed request"
    NOT_FOUND = 105, 404, "no such endpoint or object"
    FORBIDDEN = 106, 403, "this credential may not do that"
    # 2xx: accounts
    EMAIL_TAKEN = 201, 409, "user with that email already exists"
    BAD_USERNAME = 202, 400, "invalid username format"
    BAD_EMAIL = 203, 400, "invalid email format"
    BAD_PASSWORD = 204, 400, "invalid password format"
    STORAGE_PROVISIONING_FAILED = 205, 502, "failed to provision cloud storage for the new user"
    ACCOUNT_DEACTIVATED = 206, 403, "account is deactivated"
    LOGIN_FAILED = 207, 401, "email or password does not match"
    LOGIN_BAD_EMAIL = 208, 400, "invalid email format"
    LOGIN_BAD_PASSWORD = 209, 400, "invalid password format"
    LOGIN_THROTTLED = 210, 429, "too many failed logins; try later"
    TOKEN_DEACTIVATION_FAILED = 211, 500, "failed to deactivate token"
    BAD_ENROLLMENT_KEY = 212, 401, "invalid, used or expired enrollment key"
    # 3xx: backups
    BACKUP_LIST_FAILED = 301, 503, "failed to get list of backups"
    UPLOAD_CREDENTIALS_FAILED = 303, 502, "unable to get temporary S3 credentials"
    UPLOAD_COMPLETE_FAILED = 304, 502, "failed to complete upload"
    NO_UPLOAD = 305, 404, "no upload found"
    OBJECT_MISSING = 306, 409, "failed to get backup information"
    VERIFICATION_FAILED = 307, 422, "could not verify backup"
    DELETE_LOOKUP_FAILED = 308, 500, "failed to obtain file name to delete"
    NO_BACKUP_TO_DELETE = 309, 404, "no backup to delete"
    DELETE_FAILED = 310, 502, "failed to delete backup"
    HAS_DEPENDENTS = 311, 409, "backup has dependent incremental backups"
    BAD_CHAIN = 312, 409, "invalid backup chain"
    TOO_LARGE = 313, 413, "declared file size over the account's limit"
    NO_SUCH_PATH = 314, 404, "no such partition or path in the restore point"
    FILESYSTEM_UNREADABLE = 315, 422, "the restore point's file system cannot be read"
    LOCKED = 316, 409, "the restore point is locked and cannot be removed sooner"
    # 4xx: recovery (these are not HTTP statuses)
    NO_RESTORABLE_BACKUP = 401, 404, "no restorable backup with that id"
    FAILOVER_RUNNING = 402, 409, "a failover for this server is already running"
    IMPORT_FAILED = 403, 502, "failed to import the backup as a cloud image"
    LAUNCH_FAILED = 404, 502, "failed to start the instance"
    NO_INSTANCE = 405, 404, "no instance with that id"
    INSTANCE_STATE_CONFLICT = 406, 409, "the instance's state does not allow that action"
    VPN_FAILED = 407, 502, "failed to provision the VPN"
    INSTANCE_ACTION_FAILED = 408, 502, "failed to stop or terminate the instance"
    DRILL_RUNNING = 409, 409, "a drill or failover of this server is already running"
    NO_DRILL = 410, 404, "no drill with that id"
    SANDBOX_FAILED = 411, 502, "the drill sandbox could not be started"
    NO_VPN_DEVICE = 412, 404, "no VPN device with that id"

    @property
    def default_message(self) -> str:
        return self.text[0].upper() + self.text[1:] + "."


class ServiceError(Exception):
    """A refused operation: a contract ``code``, a message for people, and per-field messages.

    Pages show ``message``; the API answers the envelope with ``code``'s HTTP
    status. ``fields`` maps a field name to its messages (``{"email": [...]}``);
    ``field=`` is the shorthand for one field whose message is ``message``.
    ``headers`` are added to the API response (``Retry-After``).
    """

    def __init__(
        self,
        code: Code,
        message: str | None = None,
        fields: dict[str, list[str]] | None = None,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.code = code
        self.message = message or self.code.default_message
        if field and not fields:
            fields = {field: [self.message]}
        self.fields = fields
        self.headers = headers or {}
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"
