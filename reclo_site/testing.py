"""Test helpers shared by every app: real services, a real Celery worker.

Integration tests run against PostgreSQL, Redis and a Celery worker started
as its own process. Locally they are skipped when those services are not
configured; under CI=true a missing service fails the run instead.
"""

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"  # noqa: S105 - the test users' password
IN_CI = os.environ.get("CI", "").lower() == "true"


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def missing_services() -> list[str]:
    """What the integration tests need and do not have, in words."""
    problems = []
    db = os.environ.get("DATABASE_URL", "")
    if not db.startswith(("postgres://", "postgresql://", "pgsql://")):
        problems.append("DATABASE_URL does not point at PostgreSQL")
    elif not _reachable(db, 5432):
        problems.append(f"PostgreSQL at {urlparse(db).hostname}:{urlparse(db).port or 5432} does not answer")
    redis = os.environ.get("REDIS_URL", "")
    if not redis:
        problems.append("REDIS_URL is not set")
    elif not _reachable(redis, 6379):
        problems.append(f"Redis at {urlparse(redis).hostname}:{urlparse(redis).port or 6379} does not answer")
    return problems


def require_services() -> None:
    """Skip (locally) or fail (CI) when PostgreSQL, Redis are missing."""
    problems = missing_services()
    if problems:
        message = "integration services missing: " + "; ".join(problems)
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of an external tool; skip locally, fail under CI, when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (CI installs it; locally: apt-get install the package that has it)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def test_database_url(connection) -> str:
    """A DATABASE_URL for the database the test run is using (test_<name>)."""
    params = connection.settings_dict
    user = params.get("USER") or ""
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    port = f":{params['PORT']}" if params.get("PORT") else ""
    return f"postgres://{auth}{params.get('HOST') or '127.0.0.1'}{port}/{params['NAME']}"


test_database_url.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


@contextmanager
def celery_worker(env_overrides: dict, *, concurrency: int = 1, queues: str | None = None):
    """A real `celery worker` process for the duration of the block.

    It consumes `queues` (comma-separated), by default both the default
    queue and the failover queue that the environment names.
    """
    from reclo_site.queues import recovery_queue_for

    env = dict(os.environ)
    # moto runs no user-data: no VPN gateway there ever reports to the portal.
    env["RECLO_VPN_GATEWAY_MUST_REPORT"] = "false"
    env.update(env_overrides)
    if queues is None:
        default = env.get("CELERY_TASK_DEFAULT_QUEUE") or "celery"
        queues = f"{default},{env.get('CELERY_RECOVERY_QUEUE') or recovery_queue_for(default)}"
    env["PYTHONUNBUFFERED"] = "1"
    log = open(ROOT / "var" / f"test-worker-{os.getpid()}.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "reclo_site", "worker", "-l", "info", "-P", "prefork",
         "--concurrency", str(concurrency), "-Q", queues, "--without-mingle", "--without-gossip"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def make_user(username: str, email: str):
    """A user with the test password."""
    from accounts.models import User

    return User.objects.create_user(username=username, email=email, password=PASSWORD)


def token_for(user) -> str:
    """A fresh API token for `user`."""
    from accounts.services import token_create

    return token_create(user=user, name="test agent")[1]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server(settings):
    """moto's server mode on a free loopback port: the AWS this process and worker processes share.

    Points `settings.AWS_ENDPOINT_URL` at it and creates the bucket. moto's
    backends live in this process, shared by every server it starts, so they
    are emptied before and after.
    """
    from moto.moto_api._internal.models import moto_api_backend
    from moto.server import ThreadedMotoServer

    from reclo_site.cloud import storage

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings.AWS_ENDPOINT_URL = f"http://127.0.0.1:{port}"
    try:
        moto_api_backend.reset()
        storage.ensure_bucket()
        yield settings.AWS_ENDPOINT_URL
    finally:
        moto_api_backend.reset()
        server.stop()


@functools.cache
def agent_bundle() -> Path:
    """The agent bundle the portal serves, built once per test run (`manage.py build_agent` does the same).

    Rebuilt only when the agent's source changed; no wheels for other Pythons (the tests run this one).
    """
    from reclo_site import agent_bundle as bundles

    return bundles.build(native_wheels=False)[0]
