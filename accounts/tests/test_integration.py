"""Accounts against the real services: PostgreSQL, Redis and a Celery worker process."""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from unittest import mock

import pytest
import time_machine
from django.db import connection, connections
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from accounts import services, tasks, throttle
from accounts.models import ApiToken, AuditEvent
from reclo_site import testing
from reclo_site.celery import app as celery_app
from reclo_site.errors import ServiceError

pytestmark = pytest.mark.integration


@pytest.fixture
def services_up():
    testing.require_services()


@pytest.fixture
def redis_cache(settings, services_up):
    settings.CACHES = {
        "default": {"BACKEND": "reclo_site.cache.RedisCache", "LOCATION": os.environ["REDIS_URL"],
                    "KEY_PREFIX": f"test-{os.getpid()}"}
    }  # fmt: skip
    from django.core.cache import cache

    cache.clear()
    yield cache
    cache.clear()


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_expires_tokens_through_redis(services_up, user):
    now = timezone.now()
    with time_machine.travel(now - timedelta(days=61), tick=False):
        old, _ = services.token_create(user=user, name="old")
    young, _ = services.token_create(user=user, name="young")
    assert connection.vendor == "postgresql"

    celery_app.conf.task_always_eager = False
    with testing.celery_worker({"DATABASE_URL": testing.test_database_url(connection)}):
        tasks.tokens_expire.delay()
        testing.wait_until(
            lambda: ApiToken.objects.get(pk=old.pk).revoked_at is not None, timeout=60, what="the worker to expire"
        )
    assert ApiToken.objects.get(pk=young.pk).revoked_at is None


@pytest.mark.django_db
def test_the_login_limiter_is_shared_across_processes(redis_cache, settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 2
    throttle.attempt("victim@example.com", "192.0.2.1")
    # A second process counts against the same Redis keys.
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'reclo_site.settings'); django.setup();"
        "from django.conf import settings; from django.core.cache import caches;"
        f"settings.CACHES['default']['KEY_PREFIX'] = 'test-{os.getpid()}';"
        "from accounts import throttle; throttle.attempt('victim@example.com', '192.0.2.1')"
    )
    subprocess.run([sys.executable, "-c", code], cwd=testing.ROOT, check=True, env=os.environ)
    assert throttle.count("victim@example.com", "192.0.2.1") == 2
    assert throttle.count("victim@example.com", "198.51.100.1") == 0


def _parallel(n, work):
    """Run `work(i)` in n threads released together; each thread closes its own DB connection."""
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        try:
            return work(i)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def _guess(email, address, password="wrong-wrong-wrong"):  # noqa: S107 - a wrong guess
    try:
        services.user_check_login(email=email, password=password, address=address)
    except ServiceError as exc:
        return int(exc.code)
    return 200


@pytest.mark.django_db(transaction=True)
def test_30_parallel_wrong_guesses_count_30_and_only_the_free_ones_are_checked(redis_cache, settings, user):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 5
    settings.LOGIN_FAILURES_PER_ADDRESS = 100
    # The first back-off is long enough that no late thread finds the slot open again.
    settings.LOGIN_BACKOFF_FIRST = timedelta(minutes=5)

    codes = _parallel(30, lambda i: _guess(user.email, "203.0.113.9"))

    assert throttle.count(user.email, "203.0.113.9") == 30
    assert redis_cache.get(throttle.scopes(user.email, "203.0.113.9")[0].key) == 30
    # Five free guesses and the one that won the back-off slot were checked; 24 waited.
    assert sorted(codes).count(207) == 6 and codes.count(210) == 24
    assert AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.LOGIN_FAILED).count() == 6


@pytest.mark.django_db(transaction=True)
def test_the_owner_signs_in_from_a_clean_address_while_a_stranger_hammers_her_account(
    redis_cache, settings, user, password, mailoutbox
):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 5
    settings.LOGIN_ALERT_AFTER = 6
    stop = threading.Event()
    tried = []

    def hammer():
        try:
            while not stop.is_set():
                tried.append(_guess(user.email, "203.0.113.66"))
        finally:
            connections.close_all()

    stranger = threading.Thread(target=hammer)
    stranger.start()
    try:
        # Five free guesses, one more after the back-off slot, then 210s for a second.
        testing.wait_until(lambda: tried.count(207) >= 6 and tried.count(210) >= 20, timeout=60, what="the guesses")
        client = APIClient()
        body = {"email": user.email, "password": password}
        mine = client.post("/api/v1/login", body, format="json", REMOTE_ADDR="198.51.100.20")
        page = Client(REMOTE_ADDR="198.51.100.21").post("/accounts/login/", body)
    finally:
        stop.set()
        stranger.join()

    assert mine.status_code == 200, mine.content
    assert page.status_code == 302 and page["Location"] == "/"
    assert 207 in tried and 210 in tried and 200 not in tried
    # The stranger's address was slowed down; the owner was told once.
    bursts = [m for m in mailoutbox if "failed sign-ins" in m.subject.lower()]
    assert len(bursts) == 1 and bursts[0].to == [user.email] and "203.0.113.66" in bursts[0].body


@pytest.mark.django_db
def test_the_api_rate_limit_counts_in_redis_and_reopens_with_the_next_window(redis_cache, api):
    from rest_framework.settings import api_settings

    from reclo_site.api.throttling import TokenRateThrottle

    rates = {**api_settings.DEFAULT_THROTTLE_RATES, "token": "3/min"}
    start = timezone.now().replace(second=5, microsecond=0) + timedelta(minutes=1)
    with mock.patch.object(TokenRateThrottle, "THROTTLE_RATES", rates), time_machine.travel(start, tick=False):
        assert [api.get("/api/v1/backups").status_code for _ in range(3)] == [200, 200, 200]
        refused = api.get("/api/v1/backups")
        assert (refused.status_code, refused.json()["error"]) == (429, 103)
        assert int(refused["Retry-After"]) == 55  # the rest of this minute's window
        # The count lives in Redis, where every web process sees it.
        client = redis_cache._cache.get_client()
        assert [int(client.get(k)) for k in client.keys("*throttle_token_*")] == [4]
    with (
        mock.patch.object(TokenRateThrottle, "THROTTLE_RATES", rates),
        time_machine.travel(start + timedelta(seconds=56), tick=False),
    ):
        assert api.get("/api/v1/backups").status_code == 200


def test_the_redis_cache_reuses_one_client_per_pool(services_up):
    from reclo_site.cache import RedisCache

    cache = RedisCache(os.environ["REDIS_URL"], {"KEY_PREFIX": f"test-client-{os.getpid()}"})
    try:
        assert cache._cache.get_client() is cache._cache.get_client(write=True)
        assert cache.add("n", 1, timeout=30) and cache.incr("n") == 2 and cache.get("n") == 2
        assert cache._cache.get_client().ttl(cache.make_key("n")) > 0
    finally:
        cache.delete("n")
