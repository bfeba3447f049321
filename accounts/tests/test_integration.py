"""Accounts against the real services: PostgreSQL, Redis and a Celery worker process."""

import os
import subprocess
import sys
from datetime import timedelta
from unittest import mock

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from accounts import services, tasks, throttle
from accounts.models import ApiToken
from reclo_site import testing
from reclo_site.celery import app as celery_app

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
        tasks.expire_tokens.delay()
        testing.wait_until(
            lambda: ApiToken.objects.get(pk=old.pk).revoked_at is not None, timeout=60, what="the worker to expire"
        )
    assert ApiToken.objects.get(pk=young.pk).revoked_at is None


@pytest.mark.django_db
def test_the_login_limiter_is_shared_across_processes(redis_cache, settings):
    settings.LOGIN_FAILURES_PER_ACCOUNT = 2
    throttle.record_failure("victim@example.com", "192.0.2.1")
    # A second process counts against the same Redis keys.
    code = (
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'reclo_site.settings'); django.setup();"
        "from django.conf import settings; from django.core.cache import caches;"
        f"settings.CACHES['default']['KEY_PREFIX'] = 'test-{os.getpid()}'; settings.LOGIN_FAILURES_PER_ACCOUNT = 2;"
        "from accounts import throttle; throttle.record_failure('victim@example.com', '192.0.2.2')"
    )
    subprocess.run([sys.executable, "-c", code], cwd=testing.ROOT, check=True, env=os.environ)
    assert throttle.retry_after("victim@example.com", "198.51.100.1") > 0


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
