"""S3 access with the portal's temporary credentials.

The portal hands out STS credentials limited to one object key (an upload)
or one chain's keys (a restore), with an ``Expiration``. An upload can
outlive them (12 hours at most; 1 hour on some set-ups), so
:class:`S3Access` asks for fresh ones through a callback when they are
close to expiring -- before a request, not after a failure -- and also when
S3 answers ``ExpiredToken`` anyway (a skewed clock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .errors import TokenRejected, Unreachable

log = logging.getLogger(__name__)

# Refresh when less than this is left (or a quarter of the lifetime, for
# short-lived test credentials), so no part upload starts with credentials
# that could expire while it is in flight.
REFRESH_MARGIN = 10 * 60
EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired"}


_session = None
_session_lock = threading.Lock()


def _boto_session():
    """One boto3 session per process: creating clients from it reuses the
    parsed service models (a fresh session parses them again, ~0.2 s)."""
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session


def parse_expiration(value) -> float:
    """Unix time of an ``Expiration`` (RFC 3339 string or datetime)."""
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def is_expired_error(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in EXPIRED_CODES


class S3Access:
    """A boto3 S3 client for one grant, renewed before its credentials expire.

    ``grant`` has docs/api.md's ``bucket, region, endpoint_url,
    credentials``; ``refresh`` returns a fresh ``credentials`` object (or is
    None when the grant cannot be renewed, as for downloads). Thread-safe:
    several part uploads share it.
    """

    def __init__(
        self,
        grant: dict,
        refresh: Callable[[], dict] | None = None,
        *,
        max_connections: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket = grant["bucket"]
        self.region = grant.get("region") or "us-east-1"
        self.endpoint_url = grant.get("endpoint_url") or None
        self._refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        # Each part carries its SHA-256 in x-amz-checksum-sha256, which S3
        # checks; signing the payload too would make botocore read (and
        # throttle) every part twice on plain-HTTP endpoints.
        s3_options: dict[str, bool | str] = {"payload_signing_enabled": False}
        if self.endpoint_url:
            # Emulators and S3-compatible stores behind a custom endpoint
            # rarely resolve bucket sub-domains; path style always works.
            s3_options["addressing_style"] = "path"
        self._config = Config(
            region_name=self.region,
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=max_connections,
            connect_timeout=15,
            read_timeout=120,
            s3=s3_options,
            # We send our own SHA-256 per part; botocore need not add CRCs.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.refreshes = 0
        self._set(grant["credentials"])

    def _set(self, credentials: dict) -> None:
        self._credentials = credentials
        self._expires = parse_expiration(credentials["Expiration"])
        self._issued = self._clock()
        session = _boto_session()
        with _session_lock:  # client creation from a shared session is not thread-safe
            self._client = session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=credentials["AccessKeyId"],
                aws_secret_access_key=credentials["SecretAccessKey"],
                aws_session_token=credentials.get("SessionToken"),
                config=self._config,
            )

    def _margin(self) -> float:
        return min(REFRESH_MARGIN, max(1.0, (self._expires - self._issued) / 4))

    def client(self):
        """The current client, refreshed first if its credentials expire soon."""
        with self._lock:
            if self._refresh is not None and self._expires - self._clock() < self._margin():
                self._renew()
            return self._client

    def force_refresh(self, stale_client) -> None:
        """Renew after S3 said the credentials expired (unless another thread did)."""
        with self._lock:
            if self._client is stale_client and self._refresh is not None:
                self._renew()

    def _renew(self) -> None:
        if self._refresh is None:
            return  # credentials nobody can renew: the calls fail once they expire
        log.info("upload credentials expire soon; asking the portal for fresh ones")
        self._set(self._refresh())
        self.refreshes += 1

    def call(self, operation: str, **kwargs):
        """``client.<operation>(Bucket=..., **kwargs)``, renewing expired credentials once."""
        for attempt in (1, 2):
            client = self.client()
            try:
                return getattr(client, operation)(Bucket=self.bucket, **kwargs)
            except ClientError as exc:
                if attempt == 1 and is_expired_error(exc) and self._refresh is not None:
                    self.force_refresh(client)
                    continue
                raise storage_error(exc, operation) from exc
            except BotoCoreError as exc:
                raise storage_error(exc, operation) from exc
        raise AssertionError("unreachable")


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "")
    return ""


def storage_error(exc: BaseException, what: str) -> Exception:
    """An actionable error for a failed S3 call (the original stays as __cause__)."""
    code = error_code(exc)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or code in EXPIRED_CODES:
        return TokenRejected(
            f"Cloud storage refused the agent's temporary credentials ({code} on {what}). "
            "Run the command again; if it keeps failing, log in again."
        )
    if isinstance(exc, ClientError):
        return StorageError(f"Cloud storage failed {what}: {code or exc}", code)
    return Unreachable(f"Cannot reach the cloud storage ({type(exc).__name__} on {what}); check the network.")


class StorageError(Unreachable):
    """S3 answered an error other than access or expiry (``code`` says which)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
