"""The portal's error codes, as the agent compares them.

The same names and numbers as the portal's ``reclo_site.errors.Code`` (the
agent must not import the portal, so they are repeated here; a portal test
checks that both agree). The codes are documented in the portal's
``docs/api.md``. 401–408 are not HTTP statuses.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """An error code of the portal's API (docs/api.md; the ``error`` of its error envelope)."""

    # 1xx: system
    INTERNAL = 100  # internal error
    DATABASE_UNAVAILABLE = 101  # cannot connect to database
    BAD_TOKEN = 102  # invalid, expired or revoked token
    THROTTLED = 103  # too many requests
    MALFORMED = 104  # malformed request
    NOT_FOUND = 105  # no such endpoint or object
    FORBIDDEN = 106  # this credential may not do that
    # 2xx: accounts
    EMAIL_TAKEN = 201  # user with that email already exists
    BAD_USERNAME = 202  # invalid username format
    BAD_EMAIL = 203  # invalid email format
    BAD_PASSWORD = 204  # invalid password format
    STORAGE_PROVISIONING_FAILED = 205  # failed to provision cloud storage for the new user
    ACCOUNT_DEACTIVATED = 206  # account is deactivated
    LOGIN_FAILED = 207  # email or password does not match
    LOGIN_BAD_EMAIL = 208  # invalid email format
    LOGIN_BAD_PASSWORD = 209  # invalid password format
    LOGIN_THROTTLED = 210  # too many failed logins; try later
    TOKEN_DEACTIVATION_FAILED = 211  # failed to deactivate token
    BAD_ENROLLMENT_KEY = 212  # invalid, used or expired enrollment key
    # 3xx: backups
    BACKUP_LIST_FAILED = 301  # failed to get list of backups
    UPLOAD_CREDENTIALS_FAILED = 303  # unable to get temporary S3 credentials
    UPLOAD_COMPLETE_FAILED = 304  # failed to complete upload
    NO_UPLOAD = 305  # no upload found
    OBJECT_MISSING = 306  # failed to get backup information
    VERIFICATION_FAILED = 307  # could not verify backup
    DELETE_LOOKUP_FAILED = 308  # failed to obtain file name to delete
    NO_BACKUP_TO_DELETE = 309  # no backup to delete
    DELETE_FAILED = 310  # failed to delete backup
    HAS_DEPENDENTS = 311  # backup has dependent incremental backups
    BAD_CHAIN = 312  # invalid backup chain
    TOO_LARGE = 313  # declared file size over the account's limit
    NO_SUCH_PATH = 314  # no such partition or path in the restore point
    FILESYSTEM_UNREADABLE = 315  # the restore point's file system cannot be read
    LOCKED = 316  # the restore point is locked and cannot be removed sooner
    # 4xx: recovery
    NO_RESTORABLE_BACKUP = 401  # no restorable backup with that id
    FAILOVER_RUNNING = 402  # a failover for this server is already running
    IMPORT_FAILED = 403  # failed to import the backup as a cloud image
    LAUNCH_FAILED = 404  # failed to start the instance
    NO_INSTANCE = 405  # no instance with that id
    INSTANCE_STATE_CONFLICT = 406  # the instance's state does not allow that action
    VPN_FAILED = 407  # failed to provision the VPN
    INSTANCE_ACTION_FAILED = 408  # failed to stop or terminate the instance
    DRILL_RUNNING = 409  # a drill or failover of this server is already running
    NO_DRILL = 410  # no drill with that id
    SANDBOX_FAILED = 411  # the drill sandbox could not be started
    NO_VPN_DEVICE = 412  # no VPN device with that id
