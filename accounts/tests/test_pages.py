"""Account pages through Django's test client: sign-up, log-in, tokens."""

import pytest

from accounts.models import ApiToken, User
from accounts.tokens import hash_token

pytestmark = pytest.mark.django_db

SIGNUP = {
    "username": "frontdesk",
    "email": "frontdesk@clinic.example",
    "password": "violet-tractor-1987-sunrise",
    "password_again": "violet-tractor-1987-sunrise",
}


class TestSignup:
    def test_it_creates_the_account_and_logs_in(self, client, aws):
        response = client.post("/accounts/signup/", SIGNUP, follow=True)
        assert response.redirect_chain[-1][0] == "/"
        assert User.objects.filter(email=SIGNUP["email"]).exists()
        assert b"Welcome to ReClo, frontdesk" in response.content

    def test_errors_stand_next_to_their_fields_and_keep_the_input(self, client, aws):
        response = client.post("/accounts/signup/", {**SIGNUP, "password": "short", "password_again": "short"})
        assert response.status_code == 200
        html = response.content.decode()
        assert "field has-error" in html
        assert "too short" in html
        assert 'value="frontdesk@clinic.example"' in html
        assert not User.objects.exists()

    def test_a_taken_email_is_an_error_on_the_email_field(self, client, aws, user):
        response = client.post("/accounts/signup/", {**SIGNUP, "email": user.email})
        assert "A user with that email already exists." in response.content.decode()

    def test_mismatched_passwords_are_refused(self, client, aws):
        response = client.post("/accounts/signup/", {**SIGNUP, "password_again": "something-else-entirely"})
        assert "The two passwords differ." in response.content.decode()
        assert not User.objects.exists()

    def test_a_storage_failure_shows_a_friendly_message(self, client, aws, settings):
        settings.RECLO_BUCKET = "missing-bucket"
        response = client.post("/accounts/signup/", SIGNUP)
        assert response.status_code == 200
        assert "Could not prepare cloud storage" in response.content.decode()
        assert not User.objects.exists()


class TestLogin:
    def test_it_logs_in_with_email_and_password(self, client, user, password):
        response = client.post("/accounts/login/", {"email": user.email, "password": password})
        assert response.status_code == 302
        assert client.get("/accounts/tokens/").status_code == 200

    def test_a_wrong_password_shows_one_message(self, client, user):
        response = client.post("/accounts/login/", {"email": user.email, "password": "wrong-wrong"})
        assert "Email or password does not match." in response.content.decode()

    def test_it_follows_a_safe_next_only(self, client, user, password):
        ok = client.post("/accounts/login/?next=/accounts/tokens/", {"email": user.email, "password": password,
                                                                     "next": "/accounts/tokens/"})  # fmt: skip
        assert ok["Location"] == "/accounts/tokens/"
        client.logout()
        evil = client.post(
            "/accounts/login/", {"email": user.email, "password": password, "next": "https://evil.example/"}
        )
        assert evil["Location"] == "/"

    def test_the_session_lasts_12_hours(self, client, user, password):
        client.post("/accounts/login/", {"email": user.email, "password": password})
        assert client.session.get_expiry_age() == 12 * 60 * 60
        cookie = client.cookies["sessionid"]
        assert cookie["httponly"]

    def test_logout_needs_post(self, client, user):
        client.force_login(user)
        assert client.get("/accounts/logout/").status_code == 405
        assert client.post("/accounts/logout/").status_code == 302
        assert client.get("/accounts/tokens/").status_code == 302

    def test_pages_need_a_login(self, client):
        for url in ("/", "/accounts/tokens/", "/accounts/password/"):
            response = client.get(url)
            assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


class TestPasswordChange:
    def test_it_changes_the_password(self, client, user, password):
        client.force_login(user)
        response = client.post("/accounts/password/", {
            "old_password": password, "new_password1": "new-lamp-orbit-4471", "new_password2": "new-lamp-orbit-4471",
        })  # fmt: skip
        assert response.status_code == 302
        user.refresh_from_db()
        assert user.check_password("new-lamp-orbit-4471")

    def test_a_wrong_old_password_is_a_field_error(self, client, user):
        client.force_login(user)
        response = client.post("/accounts/password/", {
            "old_password": "nope", "new_password1": "new-lamp-orbit-4471", "new_password2": "new-lamp-orbit-4471",
        })  # fmt: skip
        assert "field has-error" in response.content.decode()


class TestTokens:
    def test_it_creates_a_token_and_shows_it_once(self, client, user):
        client.force_login(user)
        response = client.post("/accounts/tokens/", {"name": "front-desk-server"})
        html = response.content.decode()
        token = ApiToken.objects.get(user=user)
        key = html.split('data-testid="new-token">')[1].split("<")[0]
        assert hash_token(key) == token.key_hash
        assert response["Cache-Control"] == "no-store"
        again = client.get("/accounts/tokens/").content.decode()
        assert key not in again and "front-desk-server" in again and token.prefix in again

    def test_it_lists_only_the_users_tokens(self, client, user, other_user):
        from accounts.services import token_create

        token_create(user=other_user, name="bobs-secret-box")
        client.force_login(user)
        assert "bobs-secret-box" not in client.get("/accounts/tokens/").content.decode()

    def test_a_server_credential_says_whose_it_is(self, client, user, token):
        from backups.services import enrollment_key_create, server_enroll

        server_enroll(key=enrollment_key_create(user=user, server="front-desk").key)
        client.force_login(user)
        html = client.get("/accounts/tokens/").content.decode()
        assert html.count('data-testid="server-credential"') == 1
        assert "server credential of front-desk" in html

    def test_revoke_stops_the_token(self, client, user, api, token):
        client.force_login(user)
        row = ApiToken.objects.get(key_hash=hash_token(token))
        client.post(f"/accounts/tokens/{row.pk}/revoke/")
        row.refresh_from_db()
        assert row.revoked_at is not None
        assert api.post("/api/v1/token/renew").status_code == 401

    def test_an_outsider_cannot_revoke_anothers_token(self, client, other_user, token):
        client.force_login(other_user)
        row = ApiToken.objects.get(key_hash=hash_token(token))
        assert client.post(f"/accounts/tokens/{row.pk}/revoke/").status_code == 404
        row.refresh_from_db()
        assert row.revoked_at is None

    def test_revoke_asks_first_and_a_get_changes_nothing(self, client, user, token):
        client.force_login(user)
        row = ApiToken.objects.get(key_hash=hash_token(token))
        page = client.get(f"/accounts/tokens/{row.pk}/revoke/")
        assert page.status_code == 200
        html = page.content.decode()
        assert "Revoke this token" in html and row.prefix in html
        row.refresh_from_db()
        assert row.revoked_at is None
        assert client.put(f"/accounts/tokens/{row.pk}/revoke/").status_code == 405

    def test_the_token_list_links_to_the_confirmation(self, client, user, token):
        client.force_login(user)
        row = ApiToken.objects.get(key_hash=hash_token(token))
        html = client.get("/accounts/tokens/").content.decode()
        assert f'href="/accounts/tokens/{row.pk}/revoke/"' in html
