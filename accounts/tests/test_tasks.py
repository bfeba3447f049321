"""The tokens_expire beat job."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from accounts import services, tasks
from accounts.models import ApiToken

pytestmark = pytest.mark.django_db


def make_tokens(user, count, age_days):
    now = timezone.now()
    with time_machine.travel(now - timedelta(days=age_days), tick=False):
        return [services.token_create(user=user, name=f"t{age_days}-{i}")[0] for i in range(count)]


def test_it_revokes_tokens_past_60_days_and_only_those(user):
    old = make_tokens(user, 3, 61)
    young = make_tokens(user, 2, 59)
    assert tasks.tokens_expire.delay().get() == 3
    assert all(ApiToken.objects.get(pk=t.pk).revoked_at for t in old)
    assert not any(ApiToken.objects.get(pk=t.pk).revoked_at for t in young)


def test_it_is_idempotent(user):
    make_tokens(user, 2, 70)
    assert services.tokens_expire() == 2
    first = list(ApiToken.objects.values_list("revoked_at", flat=True))
    assert services.tokens_expire() == 0
    assert list(ApiToken.objects.values_list("revoked_at", flat=True)) == first


def test_it_works_in_bounded_batches(user, django_assert_max_num_queries):
    make_tokens(user, 7, 90)
    # 7 tokens in batches of 3: three batches of SELECT+UPDATE, then an empty SELECT.
    with django_assert_max_num_queries(7):
        assert services.tokens_expire(batch_size=3) == 7


def test_a_renewed_old_token_survives(user):
    (token,) = make_tokens(user, 1, 59)
    services.token_renew(token=token)
    with time_machine.travel(timezone.now() + timedelta(days=30)):
        assert services.tokens_expire() == 0


def test_it_is_in_the_beat_schedule(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["expire-tokens"]
    assert entry["task"] == "accounts.tasks.tokens_expire"
