"""The portal's HTTP API, as the agent uses it (docs/api.md in the ReClo repository).

One :class:`PortalClient` per run. It sends the token in the
``Authorization`` header (never in a URL, never logged), turns the
error envelope (docs/api.md, Conventions) into :mod:`.errors` exceptions a person can act
on, and retries what is safe to retry: throttling (429, after its
``Retry-After``), and for idempotent calls, connection failures and 502/503.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests

from . import __version__
from .codes import Code
from .errors import PortalError, TokenRejected, Unreachable, UsageError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
TIMEOUT = (10, 120)  # connect, read: verification answers may take a while
RETRY_STATUSES = {502, 503, 504}


def normalize_portal_url(url: str) -> str:
    """``https://host[:port][/prefix]`` without a trailing slash, or UsageError."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"The portal URL must look like https://reclo.example.com, not {url!r}.")
    if parts.query or parts.fragment:
        raise UsageError("The portal URL must not have a query or fragment.")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)]
    return url


class PortalClient:
    """Calls of the API (docs/api.md). Methods return the decoded JSON body."""

    def __init__(self, portal: str, token: str = "", *, retries: int = 3, backoff: float = 1.0) -> None:
        self.portal = normalize_portal_url(portal)
        self._retries = retries
        self._backoff = backoff
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"reclo-agent/{__version__}"
        self._session.headers["Accept"] = "application/json"
        if token:
            self._session.headers["Authorization"] = f"Token {token}"

    def close(self) -> None:
        self._session.close()

    # --- transport ------------------------------------------------------------

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.portal}{API_PREFIX}{path}"

    def request(self, method: str, path: str, *, json=None, params=None, idempotent: bool = True) -> dict:
        url = self._url(path)
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._session.request(method, url, json=json, params=params, timeout=TIMEOUT)
            except requests.exceptions.SSLError as exc:
                raise Unreachable(f"TLS error talking to the portal {self.portal}: {exc}") from exc
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                # A request that never connected was never sent: safe to repeat.
                never_sent = isinstance(exc, requests.exceptions.ConnectTimeout) or (
                    isinstance(exc, requests.exceptions.ConnectionError)
                    and not isinstance(exc, requests.exceptions.ReadTimeout)
                    and "Connection refused" in str(exc)
                )
                if attempt <= self._retries and (idempotent or never_sent):
                    self._sleep(attempt, None)
                    continue
                raise Unreachable(
                    f"Cannot reach the portal at {self.portal} ({type(exc).__name__}). "
                    "Check the network and the portal URL (reclo-agent status shows it)."
                ) from exc
            if resp.status_code == 429 and attempt <= self._retries:
                self._sleep(attempt, resp.headers.get("Retry-After"))
                continue
            if resp.status_code in RETRY_STATUSES and idempotent and attempt <= self._retries:
                self._sleep(attempt, resp.headers.get("Retry-After"))
                continue
            return self._decode(resp)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self._backoff * 2 ** (attempt - 1)
        if retry_after and retry_after.isdigit():
            delay = max(delay, min(int(retry_after), 300))
        log.debug("portal busy or unreachable; retrying in %.1fs", delay)
        time.sleep(delay)

    def _decode(self, resp: requests.Response) -> dict:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.ok and isinstance(body, dict):
            return body
        if resp.ok:
            raise Unreachable(
                f"The portal at {self.portal} answered {resp.status_code} without JSON; is the URL right?"
            )
        if not isinstance(body, dict) or "error" not in body:
            if resp.status_code >= 500:
                raise Unreachable(f"The portal at {self.portal} failed (HTTP {resp.status_code}); try again later.")
            raise PortalError(
                f"The portal answered HTTP {resp.status_code} to {resp.request.method} "
                f"{urlsplit(resp.url).path}; is {self.portal} a ReClo portal?",
                status=resp.status_code,
            )
        code, message = body.get("error"), str(body.get("message") or "").strip()
        if code == Code.BAD_TOKEN or (
            resp.status_code == 401 and code not in (Code.LOGIN_FAILED, Code.BAD_ENROLLMENT_KEY)
        ):
            raise TokenRejected(
                f"The portal refused the agent's token ({message or 'invalid or expired'}). "
                "Log in again: reclo-agent login --portal URL --email EMAIL, or enrol again with a new key "
                "from the portal's Add a server: reclo-agent enroll --portal URL --key KEY"
            )
        if (
            code in (Code.DATABASE_UNAVAILABLE, Code.UPLOAD_CREDENTIALS_FAILED, Code.UPLOAD_COMPLETE_FAILED)
            or resp.status_code in RETRY_STATUSES
        ):
            raise Unreachable(f"The portal could not do it right now: {message} (error {code}); try again later.")
        fields = body.get("fields") or {}
        detail = "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in fields.items()) if fields else ""
        text = f"{message} (error {code})" + (f" -- {detail}" if detail else "")
        raise PortalError(text, code=code, status=resp.status_code, fields=fields)

    # --- accounts -------------------------------------------------------------

    def login(self, email: str, password: str, token_name: str, otp: str = "") -> dict:
        """``user_id, token, token_expires``; wrong credentials raise PortalError (207).

        With two-factor on, ``otp`` is the authenticator app's code (or a
        recovery code); without it the 207 carries ``fields["otp"]``.
        """
        body = {"email": email, "password": password, "token_name": token_name}
        if otp:
            body["otp"] = otp
        return self.request("POST", "/login", json=body, idempotent=False)

    def enroll(self, key: str, hostname: str) -> dict:
        """``server, token, token_expires``: a server credential; a bad key raises PortalError (212)."""
        return self.request("POST", "/enroll", json={"key": key, "hostname": hostname}, idempotent=False)

    def renew_token(self) -> dict:
        return self.request("POST", "/token/renew", idempotent=True)

    def logout(self) -> dict:
        return self.request("POST", "/logout", idempotent=True)

    # --- backups --------------------------------------------------------------

    def iter_backups(self, server: str | None = None) -> Iterator[dict]:
        """Every backup (newest first), following the pagination's ``next``."""
        path: str | None = "/backups"
        params = {"server": server} if server else None
        while path:
            body = self.request("GET", path, params=params)
            yield from body.get("backups") or []
            path, params = body.get("next"), None

    def get_backup(self, backup_id: str) -> dict:
        return self.request("GET", f"/backups/{backup_id}")["backup"]

    def create_upload(self, **fields) -> dict:
        """``upload_id, bucket, key, region, endpoint_url, credentials``."""
        return self.request("POST", "/backups/uploads", json=fields, idempotent=False)

    def upload_credentials(self, upload_id: str) -> dict:
        return self.request("POST", f"/backups/uploads/{upload_id}/credentials")["credentials"]

    def complete_upload(self, upload_id: str, *, file_size: int, sha256: str, part_sha256: list | None = None) -> dict:
        """The ``backup`` (its status ``verifying``, or final). Idempotent (docs/api.md, Uploading).

        ``part_sha256``: the hex SHA-256 of each part of a multipart upload,
        in order; with it the portal verifies without reading the whole object.
        """
        body = {"file_size": file_size, "sha256": sha256}
        if part_sha256:
            body["part_sha256"] = part_sha256
        return self.request("POST", f"/backups/uploads/{upload_id}/complete", json=body)["backup"]

    def report_status(self, server: str, **fields) -> dict:
        """``POST /servers/{server}/status``: schedule, next_run, agent_version, preflight."""
        return self.request("POST", f"/servers/{server}/status", json=fields)

    def files(self, backup_id: str, partition: int | None = None, path: str = "/") -> dict:
        """``partitions`` without a partition, else ``entries`` of the folder ``path`` (docs/api.md)."""
        params = None if partition is None else {"partition": partition, "path": path}
        return self.request("GET", f"/backups/{backup_id}/files", params=params)

    def file_content(self, backup_id: str, partition: int, path: str) -> requests.Response:
        """The streamed answer of ``files/content`` (a file, or a folder as a zip); errors raise as ``request``."""
        url = self._url(f"/backups/{backup_id}/files/content")
        try:
            params = {"partition": str(partition), "path": path}
            resp = self._session.get(url, params=params, stream=True, timeout=TIMEOUT)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise Unreachable(f"Cannot reach the portal at {self.portal} ({type(exc).__name__}).") from exc
        if not resp.ok:
            with resp:
                self._decode(resp)
        return resp

    def download(self, backup_id: str) -> dict:
        """``chain`` (base first), ``bucket, region, endpoint_url, credentials``."""
        return self.request("POST", f"/backups/{backup_id}/download")
