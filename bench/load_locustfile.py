"""Locust users for bench/load_bench.py (run through it; it starts the portal first).

Four user classes, picked on locust's command line:

- ``CeilingUser``: GET /bench/ping as fast as it can, the framework's ceiling
  (a bare Django view behind the same gunicorn, middleware and settings);
- ``AgentUser`` (200): one task is one whole backup, as the agent does it: list
  the server's backups, start an upload, PUT a real seekable-zstd VHD into S3
  (moto) with the temporary credentials through boto3, complete it with
  file_size and sha256, then poll the backup until it is verified or failed.
  The first backup of an agent is a full one, the next ones incrementals on
  the last verified one (a new full after a failure);
- ``AgentApiUser``: the agent endpoints back to back, as many users as the
  ceiling's (list, start an upload, two status reads; no S3 upload);
- ``BrowserUser`` (20): logs in through the page (CSRF token from the form),
  then looks at the dashboard and its server's page.

Configuration comes from the environment (load_bench.py sets it):
LOAD_SEED (the seeded accounts, JSON), LOAD_OUT (where to write what was
measured), LOAD_AGENTS, LOAD_BROWSERS, LOAD_AGENT_PACING, LOAD_POLL_INTERVAL,
LOAD_VERIFY_TIMEOUT, LOAD_MAX_BACKUPS, LOAD_BROWSER_WAIT_MIN/MAX.

Every request's start time, latency and outcome is kept (not only locust's
rounded histogram), so the bench computes exact percentiles per endpoint
group over the steady window (all users spawned, before the stop).
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import random
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import boto3
import gevent
from botocore.config import Config
from locust import FastHttpUser, between, constant, events, task
from locust.exception import StopUser
from reclo_agent.vhd import SeekableZstdWriter, VHDWriter, make_bitmap, write_dynamic_from_raw

SEED = json.loads(Path(os.environ["LOAD_SEED"]).read_text()) if os.environ.get("LOAD_SEED") else {}
OUT = os.environ.get("LOAD_OUT", "")
POLL_INTERVAL = float(os.environ.get("LOAD_POLL_INTERVAL", "0.5"))
VERIFY_TIMEOUT = float(os.environ.get("LOAD_VERIFY_TIMEOUT", "120"))
MAX_BACKUPS = int(os.environ.get("LOAD_MAX_BACKUPS", "0"))  # 0: no limit but time
BROWSER_WAIT = (
    float(os.environ.get("LOAD_BROWSER_WAIT_MIN", "1")),
    float(os.environ.get("LOAD_BROWSER_WAIT_MAX", "3")),
)
# Seconds from one backup's start to the next one's of the same agent (0: back to back).
AGENT_PACING = float(os.environ.get("LOAD_AGENT_PACING", "0"))
AGENTS = int(os.environ.get("LOAD_AGENTS", "200"))
BROWSERS = int(os.environ.get("LOAD_BROWSERS", "20"))

DISK_SIZE = 4 * 1024 * 1024  # a 4 MiB disk: two 2 MiB VHD blocks, one of them used
BLOCK = 2 * 1024 * 1024
PAGE = 4096

# --- what was measured ------------------------------------------------------------

RECORDS: list[tuple[float, float, str, bool]] = []  # (start, ms, name, ok)
ERRORS: Counter = Counter()  # (name, what) -> count
LEDGER: dict[int, dict] = {}  # agent user id -> {"started": [...], "completed": [...], "final": {id: status}}
MARKS: dict[str, float] = {}
BACKUPS_STARTED = itertools.count(1)


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception=None, start_time=None, response=None,
            **_kwargs):  # fmt: skip
    start = start_time if start_time is not None else time.time() - response_time / 1000
    RECORDS.append((start, response_time, name, exception is None))
    if exception is not None:
        what = str(exception)
        if response is not None and getattr(response, "status_code", None):
            body = (getattr(response, "text", "") or "")[:300]
            what = f"HTTP {response.status_code}: {body}" if body else f"HTTP {response.status_code}: {what}"
        ERRORS[(name, re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", what)[:400])] += 1


@events.spawning_complete.add_listener
def _spawned(user_count, **_kwargs):
    MARKS.setdefault("steady_from", time.time())


@events.test_stopping.add_listener
def _stopping(**_kwargs):
    MARKS.setdefault("steady_to", time.time())


@events.quitting.add_listener
def _dump(environment, **_kwargs):
    MARKS["end"] = time.time()
    if not OUT:
        return
    data = {
        "marks": MARKS,
        "records": RECORDS,
        "errors": [[name, what, count] for (name, what), count in ERRORS.most_common()],
        "ledger": LEDGER,
    }
    Path(OUT).write_text(json.dumps(data))


def _fail(response, what: str) -> None:
    response.failure(f"{what}: HTTP {response.status_code} {(response.text or '')[:300]}")


# --- users -------------------------------------------------------------------------


class CeilingUser(FastHttpUser):
    """The framework's ceiling: a bare view returning a constant, no think time."""

    wait_time = constant(0)

    @task
    def ping(self):
        with self.client.get("/bench/ping", name="ceiling: GET /bench/ping", catch_response=True) as response:
            if response.status_code != 200 or response.content != b"pong":
                _fail(response, "not pong")


_agent_numbers = itertools.count()
_browser_numbers = itertools.count()
_boto = boto3.session.Session()
_S3_CONFIG = Config(
    retries={"max_attempts": 1},  # an S3 error is counted, not hidden by a retry
    s3={"addressing_style": "path", "payload_signing_enabled": False},
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)


class DiskImage:
    """A small raw disk that changes a little between backups, as a VHD chain."""

    def __init__(self, seed: int):
        self.raw = bytearray(DISK_SIZE)
        self.raw[: 4 * PAGE] = os.urandom(4 * PAGE)
        self.parent = None  # VHDInfo of the last verified backup, for the next incremental
        self._next_page = 4 + seed % 64

    def full(self) -> tuple[bytes, object]:
        out = io.BytesIO()
        with SeekableZstdWriter(out) as stored:
            info = write_dynamic_from_raw(io.BytesIO(bytes(self.raw)), stored)
        return out.getvalue(), info

    def incremental(self, parent_name: str) -> tuple[bytes, object]:
        page = self._next_page % (BLOCK // PAGE)
        self._next_page += 1
        self.raw[page * PAGE : (page + 1) * PAGE] = os.urandom(PAGE)
        runs = {0: [(page * PAGE // 512, PAGE // 512)]}
        out = io.BytesIO()
        with SeekableZstdWriter(out) as stored:
            writer = VHDWriter(stored, DISK_SIZE, runs, parent=self.parent.as_parent(parent_name))
            writer.write_block(0, bytes(self.raw[:BLOCK]), make_bitmap(runs[0], 512))
            info = writer.close()
        return out.getvalue(), info


class AgentUser(FastHttpUser):
    """One agent of one account: a backup per task, back to back unless paced."""

    fixed_count = AGENTS

    def on_start(self):
        n = next(_agent_numbers)
        account = SEED["agents"][n % len(SEED["agents"])]
        self.user_id = account["user_id"]
        self.headers = {"Authorization": f"Token {account['token']}"}
        self.server = f"srv-{n:03d}"
        self.disk = DiskImage(n)
        self.parent_id = None
        self.parent_name = ""
        self.ledger = LEDGER.setdefault(self.user_id, {"started": [], "completed": [], "final": {}})
        if AGENT_PACING:
            # Scheduled agents do not start on the same second: the agent's
            # own schedule picks a random minute. Each first backup starts at
            # a random point of the first period, then one every period after
            # it (locust's constant_pacing would line them all up again).
            gevent.sleep(random.uniform(0, AGENT_PACING))
        self.next_start = time.monotonic()

    def wait_time(self) -> float:
        if not AGENT_PACING:
            return 0
        self.next_start += AGENT_PACING
        return max(0.0, self.next_start - time.monotonic())

    def _api(self, method: str, path: str, name: str, expect: int, **kwargs) -> dict | None:
        with self.client.request(
            method, "/api/v1/" + path, name="agent: " + name, headers=self.headers, catch_response=True, **kwargs
        ) as response:
            if response.status_code != expect:
                _fail(response, f"expected {expect}")
                return None
            try:
                return response.json()
            except ValueError:
                response.failure("not JSON")
                return None

    @task
    def backup(self):
        if MAX_BACKUPS and next(BACKUPS_STARTED) > MAX_BACKUPS:
            raise StopUser()
        listed = self._api("GET", f"backups?server={self.server}", "GET /backups", 200)
        if listed is None:
            return
        newest = next((b for b in listed["backups"] if b["status"] == "verified"), None)
        if self.parent_id and (newest is None or newest["backup_id"] != self.parent_id):
            self.parent_id = None  # the portal does not list our parent as newest: start a new chain
        kind = "incremental" if self.parent_id else "full"
        data, info = self.disk.incremental(self.parent_name) if kind == "incremental" else self.disk.full()
        file_name = f"sda-{uuid.uuid4().hex[:12]}.vhd.zst"
        body = {"server": self.server, "disk": "sda", "file_name": file_name, "virtual_size": DISK_SIZE, "kind": kind}
        if kind == "incremental":
            body["parent_id"] = self.parent_id
        grant = self._api("POST", "backups/uploads", "POST /backups/uploads", 201, json=body)
        if grant is None:
            return
        upload_id = grant["upload_id"]
        self.ledger["started"].append(upload_id)
        if not self._put(grant, data):
            return
        digest = hashlib.sha256(data).hexdigest()
        done = self._api(
            "POST", f"backups/uploads/{upload_id}/complete", "POST /backups/uploads/{id}/complete", 202,
            json={"file_size": len(data), "sha256": digest},
        )  # fmt: skip
        if done is None:
            return
        backup = done["backup"]
        self.ledger["completed"].append(backup["backup_id"])
        deadline = time.monotonic() + VERIFY_TIMEOUT
        while backup["status"] not in ("verified", "failed"):
            if time.monotonic() > deadline:
                events.request.fire(
                    request_type="VERIFY", name="agent: verdict", response_time=VERIFY_TIMEOUT * 1000,
                    response_length=0, exception=TimeoutError(f"still {backup['status']} after {VERIFY_TIMEOUT}s"),
                )  # fmt: skip
                break
            gevent.sleep(POLL_INTERVAL)  # not self.wait(): a stopping run lets the backup finish
            polled = self._api("GET", f"backups/{upload_id}", "GET /backups/{id}", 200)
            if polled is None:
                break
            backup = polled["backup"]
        self.ledger["final"][backup["backup_id"]] = backup["status"]
        if backup["status"] == "verified":
            self.parent_id, self.parent_name, self.disk.parent = backup["backup_id"], file_name, info
        else:
            self.parent_id = None
            if backup["status"] == "failed":
                events.request.fire(
                    request_type="VERIFY", name="agent: verdict", response_time=0, response_length=0,
                    exception=RuntimeError(f"backup failed: {backup.get('failure')}"),
                )  # fmt: skip

    def _put(self, grant: dict, data: bytes) -> bool:
        creds = grant["credentials"]
        started, t0 = time.time(), time.perf_counter()
        error = None
        try:
            s3 = _boto.client(
                "s3",
                endpoint_url=grant["endpoint_url"],
                region_name=grant["region"],
                aws_access_key_id=creds["AccessKeyId"],
                aws_secret_access_key=creds["SecretAccessKey"],
                aws_session_token=creds["SessionToken"],
                config=_S3_CONFIG,
            )
            s3.put_object(
                Bucket=grant["bucket"],
                Key=grant["key"],
                Body=data,
                ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode(),
            )
        except Exception as exc:  # noqa: BLE001 - counted as this request's error
            error = exc
        events.request.fire(
            request_type="PUT", name="s3: PUT object (boto3)", response_time=(time.perf_counter() - t0) * 1000,
            response_length=len(data), exception=error, start_time=started,
        )  # fmt: skip
        return error is None


class AgentApiUser(FastHttpUser):
    """The agent endpoints saturated, measured the way the ceiling is: no think time.

    Each task is the portal's part of a backup as an agent makes it, without
    the S3 upload in between: list its server's backups, start an upload
    (the portal writes the row and mints STS credentials), then two status
    reads of that upload, as the agent's poll does. Those uploads are left
    pending, as an agent's that never uploaded; the audit expects exactly that.
    """

    wait_time = constant(0)

    def on_start(self):
        n = next(_agent_numbers)
        account = SEED["agents"][n % len(SEED["agents"])]
        self.headers = {"Authorization": f"Token {account['token']}"}
        self.server = f"srv-{n % len(SEED['agents']):03d}"
        self.ledger = LEDGER.setdefault(account["user_id"], {"started": [], "completed": [], "final": {}})

    _api = AgentUser._api

    @task
    def calls(self):
        if self._api("GET", f"backups?server={self.server}", "GET /backups", 200) is None:
            return
        body = {"server": self.server, "disk": "sdz", "file_name": f"sdz-{uuid.uuid4().hex[:12]}.vhd.zst",
                "virtual_size": DISK_SIZE, "kind": "full"}  # fmt: skip
        grant = self._api("POST", "backups/uploads", "POST /backups/uploads", 201, json=body)
        if grant is None:
            return
        self.ledger["started"].append(grant["upload_id"])
        for _ in range(2):
            if self._api("GET", f"backups/{grant['upload_id']}", "GET /backups/{id}", 200) is None:
                return


_CSRF_RE = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


class BrowserUser(FastHttpUser):
    """A person in the portal: logs in once, then the dashboard and the server's page."""

    fixed_count = BROWSERS
    wait_time = between(*BROWSER_WAIT)

    def on_start(self):
        account = SEED["browsers"][next(_browser_numbers) % len(SEED["browsers"])]
        self.server_id = account["server_id"]
        self.server_name = account["server_name"]
        with self.client.get("/accounts/login/", name="pages: GET /accounts/login/", catch_response=True) as r:
            match = _CSRF_RE.search(r.text or "")
            if r.status_code != 200 or not match:
                _fail(r, "no login form")
                raise StopUser()
        form = {"email": account["email"], "password": account["password"], "csrfmiddlewaretoken": match.group(1)}
        with self.client.post(
            "/accounts/login/", data=form, name="pages: POST /accounts/login/", allow_redirects=False,
            catch_response=True,
        ) as r:  # fmt: skip
            if r.status_code != 302:
                _fail(r, "login refused")
                raise StopUser()

    def _page(self, path: str, name: str):
        with self.client.get(path, name=name, allow_redirects=False, catch_response=True) as r:
            if r.status_code != 200 or self.server_name not in (r.text or ""):
                _fail(r, "not the logged-in page")

    @task
    def dashboard(self):
        self._page("/", "pages: GET /")

    @task
    def server_page(self):
        self._page(f"/servers/{self.server_id}/", "pages: GET /servers/{id}/")
