"""Errors a person can act on, each with its own exit code.

Every failure the agent expects ends as an :class:`AgentError`: the command
line prints its message (one or two sentences saying what to do) and exits
with its code, so scripts and the scheduler can tell "log in again" from
"the disk is unreadable" without parsing text. Anything else is a bug and
exits 1 with the exception shown only under ``--verbose``.
"""

from __future__ import annotations

# Exit codes (documented in agent/README.md; keep them stable for scripts).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_AUTH = 3  # not logged in, or the token is invalid, expired or revoked
EXIT_UNREACHABLE = 4  # the portal or the cloud storage cannot be reached
EXIT_DISK = 5  # the source disk cannot be read, or the target cannot be written
EXIT_NO_SPACE = 6  # out of space on the restore target or in the state folder
EXIT_VERIFY = 7  # the portal refused the backup, or a restore failed its checks
EXIT_BUSY = 8  # another backup holds the state folder's lock
EXIT_INTERRUPTED = 130


class AgentError(Exception):
    """An expected failure: ``str(error)`` is shown to the person as is."""

    exit_code = EXIT_FAILURE


class UsageError(AgentError):
    """The command line or the configuration asks for something impossible."""

    exit_code = EXIT_USAGE


class NotLoggedIn(AgentError):
    exit_code = EXIT_AUTH


class TokenRejected(AgentError):
    """The portal answered 401 (code 102): the token is invalid, expired or revoked."""

    exit_code = EXIT_AUTH


class Unreachable(AgentError):
    """The portal or the storage did not answer (network, DNS, TLS, 5xx)."""

    exit_code = EXIT_UNREACHABLE


class PortalError(AgentError):
    """The portal answered with an error envelope other than 102.

    ``code`` is the portal's error code (docs/api.md, Error codes), ``status`` the HTTP
    status; ``fields`` the per-field validation messages, if any.
    """

    def __init__(self, message: str, *, code: int | None = None, status: int | None = None, fields=None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.fields = fields or {}


class DiskError(AgentError):
    """The source cannot be read (missing, permission, I/O error) or the target written."""

    exit_code = EXIT_DISK


class NoSpace(AgentError):
    exit_code = EXIT_NO_SPACE


class VerificationFailed(AgentError):
    exit_code = EXIT_VERIFY


class Busy(AgentError):
    exit_code = EXIT_BUSY
