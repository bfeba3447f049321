"""The accounts API: register, login, logout, token renew, and their error codes."""

import json
from datetime import timedelta
from unittest import mock

import pytest
import time_machine
from django.test import override_settings

from accounts.models import ApiToken, User
from accounts.tokens import hash_token
from reclo_site import cloud

pytestmark = pytest.mark.django_db

GOOD = {"username": "clinic.admin", "email": "admin@clinic.example", "password": "violet-tractor-1987-sunrise"}


def post(client, url, body, **extra):
    return client.post(url, data=json.dumps(body) if not isinstance(body, str) else body,
                       content_type="application/json", **extra)  # fmt: skip


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return body


class TestRegister:
    def test_it_creates_the_user_a_token_and_the_storage_area(self, anon_api, aws):
        from reclo_site.cloud import storage

        response = post(anon_api, "/api/v1/register", GOOD)
        assert response.status_code == 201
        body = response.json()
        user = User.objects.get(email=GOOD["email"])
        assert body["user_id"] == user.pk
        assert len(body["token"]) == 32 and body["token"].isalnum()
        assert body["token_expires"].endswith("Z")
        # Only the hash is stored.
        assert ApiToken.objects.filter(user=user, key_hash=hash_token(body["token"])).exists()
        assert not ApiToken.objects.filter(key_hash=body["token"]).exists()
        assert storage.head_object(storage.tenant_marker_key(user.pk))["size"] > 0

    def test_it_refuses_a_taken_email_with_201(self, anon_api, aws, user):
        body = assert_error(post(anon_api, "/api/v1/register", {**GOOD, "email": user.email.upper()}), 409, 201)
        assert "email" in body["fields"]

    @pytest.mark.parametrize("username", ["abc", "a" * 151, "has space", "semi;colon", "", "ünïcode"])
    def test_it_refuses_bad_usernames_with_202(self, anon_api, aws, username):
        assert_error(post(anon_api, "/api/v1/register", {**GOOD, "username": username}), 400, 202)
        assert not User.objects.exists()

    @pytest.mark.parametrize("email", ["", "not-an-email", "a@", "@b.c", "x@y"])
    def test_it_refuses_bad_emails_with_203(self, anon_api, aws, email):
        assert_error(post(anon_api, "/api/v1/register", {**GOOD, "email": email}), 400, 203)

    @pytest.mark.parametrize("password", ["short1!", "123456789012345", "qwerty123456", "clinic.admin2024", ""])
    def test_it_refuses_weak_passwords_with_204(self, anon_api, aws, password):
        assert_error(post(anon_api, "/api/v1/register", {**GOOD, "password": password}), 400, 204)

    def test_storage_failure_answers_205_and_leaves_no_user(self, anon_api, aws):
        with mock.patch("reclo_site.cloud.storage.put_object", side_effect=cloud.CloudUnavailable("s3 down")):
            assert_error(post(anon_api, "/api/v1/register", GOOD), 502, 205)
        assert not User.objects.exists()
        assert not ApiToken.objects.exists()

    def test_storage_really_failing_in_moto_answers_205(self, anon_api, aws, settings):
        settings.RECLO_BUCKET = "bucket-that-does-not-exist"
        assert_error(post(anon_api, "/api/v1/register", GOOD), 502, 205)
        assert not User.objects.exists()

    @pytest.mark.parametrize(
        "raw",
        ["not json", "[1, 2]", '"a string"', '{"username": 5, "email": "a@b.co", "password": "x"}',
         '{"username": "valid.name", "email": ["a@b.co"], "password": "violet-tractor-1987"}'],
    )  # fmt: skip
    def test_malformed_bodies_answer_104(self, anon_api, raw):
        assert_error(post(anon_api, "/api/v1/register", raw), 400, 104)

    def test_a_non_json_content_type_answers_104(self, anon_api):
        response = anon_api.post(
            "/api/v1/register", data="username=x", content_type="application/x-www-form-urlencoded"
        )
        assert_error(response, 415, 104)


class TestLogin:
    def test_it_issues_a_new_token(self, anon_api, user, password):
        response = post(anon_api, "/api/v1/login", {"email": user.email, "password": password})
        assert response.status_code == 200
        body = response.json()
        assert body["user_id"] == user.pk
        assert ApiToken.objects.get(key_hash=hash_token(body["token"])).user == user

    def test_email_is_case_insensitive(self, anon_api, user, password):
        assert post(anon_api, "/api/v1/login", {"email": "ALICE@example.com", "password": password}).status_code == 200

    def test_unknown_email_and_wrong_password_look_the_same(self, anon_api, user):
        wrong = assert_error(
            post(anon_api, "/api/v1/login", {"email": user.email, "password": "nope-nope-nope"}), 401, 207
        )
        unknown = assert_error(post(anon_api, "/api/v1/login", {"email": "who@example.com", "password": "x"}), 401, 207)
        assert wrong == unknown

    def test_a_deactivated_account_answers_206(self, anon_api, user, password):
        user.is_active = False
        user.save()
        assert_error(post(anon_api, "/api/v1/login", {"email": user.email, "password": password}), 403, 206)

    def test_a_deactivated_account_with_a_wrong_password_answers_207(self, anon_api, user):
        user.is_active = False
        user.save()
        assert_error(post(anon_api, "/api/v1/login", {"email": user.email, "password": "wrong-wrong-wrong"}), 401, 207)

    @pytest.mark.parametrize("email", ["", "nope", "a@"])
    def test_bad_email_format_answers_208(self, anon_api, email):
        assert_error(post(anon_api, "/api/v1/login", {"email": email, "password": "x"}), 400, 208)

    @pytest.mark.parametrize("password", ["", "x" * 4097])
    def test_bad_password_format_answers_209(self, anon_api, password):
        assert_error(post(anon_api, "/api/v1/login", {"email": "a@example.com", "password": password}), 400, 209)

    def test_wrong_types_answer_104(self, anon_api):
        assert_error(post(anon_api, "/api/v1/login", {"email": 42, "password": "x"}), 400, 104)

    @override_settings(LOGIN_FAILURES_PER_ACCOUNT=3)
    def test_failures_slow_down_that_address_and_never_lock_the_account(self, anon_api, user, password):
        wrong = {"email": user.email, "password": "bad-bad-bad"}
        with time_machine.travel("2026-11-26 10:00:00Z", tick=False) as traveller:
            for _ in range(3):
                assert_error(post(anon_api, "/api/v1/login", wrong, REMOTE_ADDR="203.0.113.5"), 401, 207)
            # Past the free ones, one guess is checked, then the address waits 1 s, 2 s, 4 s ...
            assert_error(post(anon_api, "/api/v1/login", wrong, REMOTE_ADDR="203.0.113.5"), 401, 207)
            slowed = post(anon_api, "/api/v1/login", {"email": user.email, "password": password},
                          REMOTE_ADDR="203.0.113.5")  # fmt: skip
            assert_error(slowed, 429, 210)
            assert slowed["Retry-After"] == "1"
            traveller.shift(1)
            assert_error(post(anon_api, "/api/v1/login", wrong, REMOTE_ADDR="203.0.113.5"), 401, 207)
            assert post(anon_api, "/api/v1/login", wrong, REMOTE_ADDR="203.0.113.5")["Retry-After"] == "2"
            # The owner's right password from her own address is never refused.
            mine = post(anon_api, "/api/v1/login", {"email": user.email, "password": password},
                        REMOTE_ADDR="198.51.100.9")  # fmt: skip
            assert mine.status_code == 200
            # After the wait, the right password from the slowed address works too.
            traveller.shift(2)
            again = post(anon_api, "/api/v1/login", {"email": user.email, "password": password},
                         REMOTE_ADDR="203.0.113.5")  # fmt: skip
            assert again.status_code == 200

    @override_settings(LOGIN_FAILURES_PER_ADDRESS=4, LOGIN_FAILURES_PER_ACCOUNT=100)
    def test_guessing_many_accounts_from_one_address_slows_that_address(self, anon_api, user, password):
        with time_machine.travel("2026-11-26 10:00:00Z", tick=False):
            for i in range(5):
                body = {"email": f"guess{i}@example.com", "password": "x"}
                assert_error(post(anon_api, "/api/v1/login", body, REMOTE_ADDR="203.0.113.5"), 401, 207)
            slowed = post(anon_api, "/api/v1/login", {"email": user.email, "password": password},
                          REMOTE_ADDR="203.0.113.5")  # fmt: skip
            assert_error(slowed, 429, 210)
            elsewhere = post(
                anon_api, "/api/v1/login", {"email": user.email, "password": password}, REMOTE_ADDR="192.0.2.7"
            )
            assert elsewhere.status_code == 200

    @override_settings(LOGIN_FAILURES_PER_ACCOUNT=2, LOGIN_BACKOFF_MAX=timedelta(seconds=60))
    def test_the_delay_doubles_up_to_its_cap_and_the_window_forgets(self, anon_api, user, password):
        wrong = {"email": user.email, "password": "bad-bad-bad"}
        waits = []
        with time_machine.travel("2026-11-26 10:00:00Z", tick=False) as traveller:
            for _ in range(2):
                post(anon_api, "/api/v1/login", wrong)
            for _ in range(8):
                assert post(anon_api, "/api/v1/login", wrong).status_code == 401
                wait = int(post(anon_api, "/api/v1/login", wrong)["Retry-After"])
                waits.append(wait)
                traveller.shift(wait)
            assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
            traveller.shift(15 * 60 + 1)
            # locmem's expiry follows time.time(), which time-machine moved.
            assert post(anon_api, "/api/v1/login", {"email": user.email, "password": password}).status_code == 200


class TestLogoutAndRenew:
    def test_logout_stops_the_calling_token(self, api, token):
        response = api.post("/api/v1/logout")
        assert response.status_code == 200 and response.json()["message"]
        assert_error(api.post("/api/v1/token/renew"), 401, 102)
        assert ApiToken.objects.get(key_hash=hash_token(token)).revoked_at is not None

    def test_logout_keeps_the_users_other_tokens(self, api, user):
        from reclo_site.testing import token_for

        other_key = token_for(user)
        api.post("/api/v1/logout")
        assert ApiToken.objects.get(key_hash=hash_token(other_key)).revoked_at is None

    def test_logout_failure_answers_211(self, api):
        with mock.patch("accounts.services.token_revoke", side_effect=RuntimeError("db gone")):
            assert_error(api.post("/api/v1/logout"), 500, 211)

    def test_renew_extends_to_60_days_from_now(self, api, token):
        import time_machine

        row = ApiToken.objects.get(key_hash=hash_token(token))
        with time_machine.travel(row.created + __import__("datetime").timedelta(days=59), tick=False):
            response = api.post("/api/v1/token/renew")
            assert response.status_code == 200
        row.refresh_from_db()
        assert (row.expires - row.created).days == 59 + 60
        assert response.json()["token_expires"] == row.expires.strftime("%Y-%m-%dT%H:%M:%SZ")

    @pytest.mark.parametrize("url", ["/api/v1/logout", "/api/v1/token/renew"])
    def test_they_need_a_token(self, anon_api, url):
        assert_error(anon_api.post(url), 401, 102)

    @pytest.mark.parametrize("url", ["/api/v1/logout", "/api/v1/token/renew"])
    def test_they_refuse_get(self, api, url):
        assert_error(api.get(url), 405, 105)


class TestEnvelope:
    def test_unknown_api_urls_answer_json_404(self, anon_api):
        for url in ("/api/v1/nope", "/api/v2/login", "/api/v1/login/extra", "/api/"):
            assert_error(anon_api.get(url), 404, 105)

    def test_unknown_api_urls_answer_json_even_with_debug(self, anon_api, settings):
        settings.DEBUG = True
        assert_error(anon_api.post("/api/v1/nope"), 404, 105)

    def test_a_database_outage_answers_101(self, api):
        from django.db import OperationalError

        with mock.patch("accounts.services.token_renew", side_effect=OperationalError("connection refused")):
            response = api.post("/api/v1/token/renew")
        assert_error(response, 503, 101)

    def test_an_unexpected_error_answers_json_500_without_a_trace(self, api):
        with mock.patch("accounts.services.token_renew", side_effect=KeyError("secret detail")):
            body = assert_error(api.post("/api/v1/token/renew"), 500, 100)
        assert "secret detail" not in json.dumps(body) and "Traceback" not in json.dumps(body)

    def test_the_general_rate_limit_answers_103(self, api, settings):
        from rest_framework.settings import api_settings

        from reclo_site.api.throttling import TokenRateThrottle

        with mock.patch.object(
            TokenRateThrottle, "THROTTLE_RATES", {**api_settings.DEFAULT_THROTTLE_RATES, "token": "2/min"}
        ):
            api.post("/api/v1/token/renew")
            api.post("/api/v1/token/renew")
            response = api.post("/api/v1/token/renew")
        assert_error(response, 429, 103)
        assert int(response["Retry-After"]) > 0


class TestSchema:
    def test_the_schema_describes_the_accounts_calls_and_error_codes(self, anon_api):
        response = anon_api.get("/api/v1/schema")
        assert response.status_code == 200
        schema = response.json()
        for path in ("/api/v1/register", "/api/v1/login", "/api/v1/logout", "/api/v1/token/renew"):
            assert path in schema["paths"], path
        assert "| 207 | 401 |" in schema["info"]["description"]
        login_responses = schema["paths"]["/api/v1/login"]["post"]["responses"]
        assert {"200", "400", "401", "403", "429"} <= set(login_responses)
        assert schema["components"]["securitySchemes"]["tokenAuth"]["in"] == "header"

    def test_the_docs_page_renders(self, client):
        response = client.get("/api/v1/docs")
        assert response.status_code == 200
        assert b"/api/v1/schema" in response.content
        # Its scripts are served by us, not fetched from a CDN.
        assert b"drf_spectacular_sidecar" in response.content and b"cdn." not in response.content
