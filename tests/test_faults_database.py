"""PostgreSQL drops the portal's connection during an API request.

The request answers 503 with error 101 in the envelope of docs/api.md (never a
stack trace), nothing is half-written, and the next request on the same
process works: Django drops the broken connection when the request ends,
and with CONN_HEALTH_CHECKS a connection that died between requests is
replaced before a request uses it.

Requests go through Django's WSGI handler in this thread, as gunicorn's
sync worker calls it: unlike Django's test client, which switches it off,
the per-request connection clean-up (`close_old_connections` on
request_started and request_finished) runs, and the request uses this
thread's connection, whose server process the test can terminate with
`pg_terminate_backend` from a second connection, at the query it chooses.
"""

import io
import json
import time
from wsgiref.util import setup_testing_defaults

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection, connections

from accounts.models import ApiToken
from reclo_site import testing
from recovery import engine
from recovery.models import Recovery, RecoveryStep
from recovery.tests.factories import MiB, ServerFactory, backup_chain

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

DATABASE_DOWN = {"error": 101, "message": "The database is unavailable; try again shortly."}


@pytest.fixture(autouse=True)
def postgresql():
    testing.require_services()
    assert connection.vendor == "postgresql"
    assert connection.settings_dict["CONN_HEALTH_CHECKS"] and connection.settings_dict["CONN_MAX_AGE"]


@pytest.fixture
def portal():
    """Call the portal as a WSGI server would: (status, headers, JSON body)."""
    handler = WSGIHandler()

    def call(method: str, path: str, token: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else b""
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "HTTP_AUTHORIZATION": f"Token {token}",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(data)),
            "wsgi.input": io.BytesIO(data),
        }
        setup_testing_defaults(environ)
        started = {}

        def start_response(status, headers, exc_info=None):
            started["status"], started["headers"] = int(status.split()[0]), dict(headers)

        response = handler(environ, start_response)
        try:
            content = b"".join(response)
        finally:
            response.close()  # request_finished: Django's connection clean-up, as the server triggers it
        return started["status"], started["headers"], json.loads(content)

    return call


def backend_pid() -> int | None:
    """The server process behind this thread's connection; None when it has none open."""
    if connection.connection is None:
        return None
    with connection.connection.cursor() as cursor:  # the raw connection: no Django bookkeeping
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def terminate(pid: int) -> None:
    """Terminate a server process from a second connection, and wait until it is gone."""
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
            assert cursor.fetchone()[0], f"no server process {pid}"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
                if cursor.fetchone()[0] == 0:
                    return
                time.sleep(0.02)
            pytest.fail(f"server process {pid} did not end")
    finally:
        other.close()


class DropAt:
    """A query wrapper that terminates the connection just before the first query containing `marker`."""

    def __init__(self, marker: str):
        self.marker = marker
        self.dropped_pid = None

    def __call__(self, execute, sql, params, many, context):
        if self.dropped_pid is None and self.marker in sql:
            self.dropped_pid = backend_pid()
            terminate(self.dropped_pid)
        return execute(sql, params, many, context)


@pytest.fixture
def sent(monkeypatch):
    """The failover steps the portal would send to the broker."""
    calls = []
    monkeypatch.setattr(
        engine, "enqueue", lambda recovery_id, step, countdown=None, pipeline=None: calls.append((recovery_id, step))
    )
    return calls


def test_a_read_whose_connection_drops_answers_101_and_the_next_request_works(portal, token):
    status, _, body = portal("GET", "/api/v1/recoveries", token)
    assert status == 200, body
    before = backend_pid()

    drop = DropAt('FROM "recovery_recovery"')  # after the token was checked, in the view's own query
    with connection.execute_wrapper(drop):
        status, headers, body = portal("GET", "/api/v1/recoveries", token)

    assert drop.dropped_pid == before
    assert (status, body) == (503, DATABASE_DOWN)
    assert headers["Content-Type"] == "application/json" and headers["Retry-After"] == "5"
    assert connection.connection is None  # the request's end dropped the broken connection

    status, _, body = portal("GET", "/api/v1/recoveries", token)
    assert status == 200, body
    assert body["recoveries"] == []
    assert backend_pid() not in (None, before)


def test_a_write_whose_connection_drops_mid_transaction_leaves_nothing_and_sends_nothing(portal, user, token, sent):
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user), size=4 * MiB, incrementals=1, upload=False)

    # Inside recovery_start's transaction, at the insert of the recovery row.
    drop = DropAt('INSERT INTO "recovery_recovery"')
    with connection.execute_wrapper(drop):
        status, _, body = portal("POST", "/api/v1/recoveries", token, {"backup_id": str(backups[-1].pk)})

    assert drop.dropped_pid is not None
    assert (status, body) == (503, DATABASE_DOWN)
    assert Recovery.objects.count() == 0 and RecoveryStep.objects.count() == 0
    assert sent == []

    # The agent retries: one failover, queued once.
    status, _, body = portal("POST", "/api/v1/recoveries", token, {"backup_id": str(backups[-1].pk)})
    assert status == 202, body
    recovery = Recovery.objects.get()
    assert (body["recovery_id"], body["status"]) == (str(recovery.pk), "queued")
    assert recovery.steps.count() == len(Recovery.STEPS)
    assert sent == [(recovery.pk, "consolidating")]


def test_a_connection_that_died_between_requests_is_replaced_before_the_next_one_uses_it(portal, token):
    status, _, _ = portal("POST", "/api/v1/token/renew", token)
    assert status == 200
    before = backend_pid()
    renewed = ApiToken.objects.get().expires

    terminate(before)  # e.g. PostgreSQL restarted, or an idle connection cut by a firewall

    status, _, body = portal("POST", "/api/v1/token/renew", token)
    assert status == 200, body  # not a 503: the health check found it dead and reconnected
    assert backend_pid() not in (None, before)
    assert ApiToken.objects.get().expires >= renewed
