"""Token authentication: format, hashing, expiry, revocation, URL refusal, last use."""

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from accounts import services
from accounts.models import ApiToken
from accounts.tokens import TOKEN_RE, hash_token, new_token

pytestmark = pytest.mark.django_db


def renew(client):
    return client.post("/api/v1/token/renew")


def test_tokens_are_32_alphanumerics_and_unique():
    keys = {new_token() for _ in range(200)}
    assert len(keys) == 200
    assert all(TOKEN_RE.match(k) for k in keys)


def test_only_the_hash_is_stored(user):
    token, key = services.token_create(user=user, name="x")
    stored = ApiToken.objects.values_list("key_hash", "prefix").get(pk=token.pk)
    assert stored == (hash_token(key), key[:6])
    assert key not in str(ApiToken.objects.filter(pk=token.pk).values().get())


@pytest.mark.parametrize(
    "header",
    ["Token", "Token a b", "Token " + "x" * 31, "Token " + "!" * 32, "Token " + "a" * 32, "Token ünïcødé"],
)
def test_bad_headers_answer_102(anon_api, header, db):
    anon_api.credentials(HTTP_AUTHORIZATION=header)
    response = renew(anon_api)
    assert response.status_code == 401 and response.json()["error"] == 102
    assert response["WWW-Authenticate"] == "Token"


def test_a_token_expires_60_days_after_issue(api, token):
    created = ApiToken.objects.get(key_hash=hash_token(token)).created
    with time_machine.travel(created + timedelta(days=60) - timedelta(seconds=1), tick=False):
        assert api.get("/api/v1/backups").status_code != 401 or renew(api).status_code == 200
    with time_machine.travel(created + timedelta(days=60), tick=False):
        response = renew(api)
    assert response.status_code == 401 and response.json()["error"] == 102
    assert "log in again" in response.json()["message"]


def test_renewal_moves_the_expiry(api, token):
    created = ApiToken.objects.get(key_hash=hash_token(token)).created
    with time_machine.travel(created + timedelta(days=50), tick=False):
        assert renew(api).status_code == 200
    with time_machine.travel(created + timedelta(days=100), tick=False):
        assert renew(api).status_code == 200
    with time_machine.travel(created + timedelta(days=161), tick=False):
        assert renew(api).status_code == 401


def test_a_revoked_token_answers_102(api, token):
    services.token_revoke(token=ApiToken.objects.get(key_hash=hash_token(token)))
    response = renew(api)
    assert response.status_code == 401 and response.json()["error"] == 102


def test_a_deactivated_users_token_answers_206(api, user):
    user.is_active = False
    user.save()
    response = renew(api)
    assert response.status_code == 403 and response.json()["error"] == 206


@pytest.mark.parametrize("param", ["token", "auth_token", "api_key", "TOKEN", "access_token"])
def test_a_token_in_the_url_is_refused(anon_api, token, param):
    response = anon_api.post(f"/api/v1/token/renew?{param}={token}")
    assert response.status_code == 401 and response.json()["error"] == 102
    assert "URL" in response.json()["message"]


def test_a_token_in_the_url_is_refused_even_beside_a_good_header(api, token):
    response = api.post(f"/api/v1/token/renew?token={token}")
    assert response.status_code == 401


def test_last_used_is_written_at_most_once_a_minute(api, token, django_assert_num_queries):
    row = ApiToken.objects.get(key_hash=hash_token(token))
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        renew(api)
        row.refresh_from_db()
        assert row.last_used == start
    with time_machine.travel(start + timedelta(seconds=30), tick=False):
        # One SELECT for the token and one UPDATE for renew; no last_used write.
        with django_assert_num_queries(2):
            renew(api)
        row.refresh_from_db()
        assert row.last_used == start
    with time_machine.travel(start + timedelta(seconds=61), tick=False):
        renew(api)
        row.refresh_from_db()
        assert row.last_used == start + timedelta(seconds=61)
