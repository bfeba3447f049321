"""Password reset by email and password change: what they revoke, what they say, their limits."""

import re

import pytest
from django.core import mail
from django.test import Client

from accounts.models import ApiToken, AuditEvent
from accounts.tokens import hash_token

pytestmark = pytest.mark.django_db

NEW = "quiet-harbor-5512-lantern"


@pytest.fixture
def ask(client, django_capture_on_commit_callbacks):
    """Ask for a reset link as a signed-out browser; the email task runs on commit."""

    def ask(email, **extra):
        with django_capture_on_commit_callbacks(execute=True):
            return client.post("/accounts/password/reset/", {"email": email}, **extra)

    return ask


def link_in(message) -> str:
    return re.search(r"http://127\.0\.0\.1:8000(/accounts/password/reset/\S+/)", message.body).group(1)


class TestReset:
    def test_the_round_trip_sets_a_new_password_and_revokes_the_old_one_and_the_tokens(
        self, client, ask, user, password, api, token
    ):
        elsewhere = Client()
        elsewhere.force_login(user)
        asked = ask("ALICE@example.com")
        assert asked["Location"] == "/accounts/password/reset/sent/"
        [email] = mail.outbox
        assert email.to == [user.email] and email.subject == "Reset your ReClo password"
        assert "within 1 hour" in email.body

        form = client.get(link_in(email), follow=True)
        # Django moves the token out of the URL into the session before showing the form.
        assert form.redirect_chain[-1][0].endswith("/set-password/")
        assert b"Choose a new password" in form.content
        done = client.post(form.redirect_chain[-1][0], {"new_password1": NEW, "new_password2": NEW}, follow=True)
        page = done.content.decode()
        assert "Your password is changed" in page and "1 API token was revoked" in page

        user.refresh_from_db()
        assert user.check_password(NEW) and not user.check_password(password)
        assert api.post("/api/v1/token/renew").status_code == 401
        assert ApiToken.objects.get(key_hash=hash_token(token)).revoked_at is not None
        # Another browser signed in before the reset is signed out.
        assert elsewhere.get("/accounts/tokens/").status_code == 302
        # The new password works; the old one does not.
        fresh = Client()
        assert fresh.post("/accounts/login/", {"email": user.email, "password": password}).status_code == 200
        assert fresh.post("/accounts/login/", {"email": user.email, "password": NEW})["Location"] == "/"
        # The owner was told, and the audit log has both steps.
        assert any("password was reset" in m.subject for m in mail.outbox)
        kinds = set(AuditEvent.objects.filter(user=user).values_list("kind", flat=True))
        assert {AuditEvent.Kind.PASSWORD_RESET_REQUESTED, AuditEvent.Kind.PASSWORD_RESET} <= kinds

    def test_the_link_works_once(self, client, ask, user):
        ask(user.email)
        link = link_in(mail.outbox[0])
        form = client.get(link, follow=True)
        client.post(form.redirect_chain[-1][0], {"new_password1": NEW, "new_password2": NEW})
        again = Client().get(link, follow=True)
        assert b"This link does not work" in again.content

    def test_known_and_unknown_addresses_get_the_same_answer(self, client, ask, user):
        known = ask(user.email)
        unknown = ask("nobody@example.com")
        assert known.status_code == unknown.status_code == 302
        assert known["Location"] == unknown["Location"]
        assert client.get(known["Location"]).content == client.get(unknown["Location"]).content
        assert [m.to for m in mail.outbox] == [[user.email]]
        unknown_event = AuditEvent.objects.get(kind=AuditEvent.Kind.PASSWORD_RESET_REQUESTED, user=None)
        assert unknown_event.details["email"] == "nobody@example.com"

    def test_a_mailbox_gets_at_most_3_links_an_hour_with_the_same_answer(self, ask, user):
        answers = {ask(user.email, REMOTE_ADDR=f"192.0.2.{i}")["Location"] for i in range(5)}
        assert answers == {"/accounts/password/reset/sent/"}
        assert len(mail.outbox) == 3

    def test_one_address_asking_too_often_is_told_to_wait(self, ask, settings):
        settings.PASSWORD_RESETS_PER_ADDRESS = 2
        for i in range(2):
            assert ask(f"someone{i}@example.com").status_code == 302
        refused = ask("someone9@example.com")
        assert refused.status_code == 429 and b"Too many reset requests" in refused.content

    def test_signed_in_owners_are_sent_to_change_it(self, owner):
        assert owner.get("/accounts/password/reset/")["Location"] == "/accounts/password/"

    def test_the_login_page_links_to_it(self, client):
        assert b'href="/accounts/password/reset/"' in client.get("/accounts/login/").content


class TestChange:
    def test_it_keeps_this_browser_signs_out_the_others_and_revokes_tokens(self, client, user, password, api):
        elsewhere = Client()
        elsewhere.force_login(user)
        client.force_login(user)
        done = client.post(
            "/accounts/password/",
            {"old_password": password, "new_password1": NEW, "new_password2": NEW},
            follow=True,
        )
        page = done.content.decode()
        assert "Every other browser signed in to your account has been signed out" in page
        assert "1 API token was revoked" in page
        assert client.get("/accounts/tokens/").status_code == 200
        assert elsewhere.get("/accounts/tokens/").status_code == 302
        assert api.post("/api/v1/token/renew").status_code == 401
        [email] = mail.outbox
        assert email.subject == "Your ReClo password was changed"
        assert "1 API token was revoked" in " ".join(email.body.split())
        assert AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.PASSWORD_CHANGED).count() == 1

    def test_another_tenants_tokens_are_untouched(self, client, user, password, other_api):
        client.force_login(user)
        client.post("/accounts/password/", {"old_password": password, "new_password1": NEW, "new_password2": NEW})
        assert other_api.post("/api/v1/token/renew").status_code == 200


class TestResetEmailTask:
    def test_it_sends_nothing_to_a_deactivated_account_or_one_without_a_password(self, user, other_user):
        from accounts import tasks

        user.is_active = False
        user.save()
        other_user.set_unusable_password()
        other_user.save()
        assert tasks.password_reset_email_send(user.pk) is False
        assert tasks.password_reset_email_send(other_user.pk) is False
        assert tasks.password_reset_email_send(999999) is False
        assert mail.outbox == []

    def test_a_sign_in_after_the_email_voids_its_link(self, client, ask, user, password):
        ask(user.email)
        link = link_in(mail.outbox[0])
        Client().post("/accounts/login/", {"email": user.email, "password": password})
        assert b"This link does not work" in client.get(link, follow=True).content
