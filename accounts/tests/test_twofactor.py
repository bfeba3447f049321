"""Two-factor: enrolment with a QR code, sign-in's second step, recovery codes, the API, recent verification."""

import re
import time

import pyotp
import pytest
import time_machine
from django.core import mail
from django.test import Client
from django_otp.plugins.otp_static.models import StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import twofactor
from accounts.models import ApiToken, AuditEvent
from accounts.tokens import hash_token

pytestmark = pytest.mark.django_db


def app_for(device: TOTPDevice) -> pyotp.TOTP:
    """The authenticator app: pyotp with the secret the QR code carries."""
    import base64

    return pyotp.TOTP(base64.b32encode(device.bin_key).decode())


def enable(user) -> tuple[pyotp.TOTP, list[str]]:
    """Two-factor turned on for `user` through the services, as the set-up page does."""
    device = twofactor.setup_begin(user=user)
    # Confirmed with the previous step's code (within the tolerance), so the current one is still unused.
    code = app_for(device).at(time.time() - 30)
    codes = twofactor.setup_confirm(user=user, code=code, address="192.0.2.1")
    return app_for(TOTPDevice.objects.get(user=user)), codes


def sign_in(client, user, password, code=None, **extra):
    first = client.post("/accounts/login/", {"email": user.email, "password": password}, **extra)
    if code is None:
        return first
    return client.post("/accounts/verify/", {"code": code}, **extra)


class TestEnrolment:
    def test_the_owner_scans_the_qr_code_confirms_a_code_and_sees_recovery_codes_once(self, owner, user):
        page = owner.get("/accounts/security/two-factor/")
        html = page.content.decode()
        assert page["Cache-Control"] == "no-store"
        assert 'src="data:image/svg+xml;base64,' in html
        secret = re.search(r'data-testid="totp-secret">([A-Z2-7 ]+)<', html).group(1).replace(" ", "")
        device = TOTPDevice.objects.get(user=user)
        assert not device.confirmed and pyotp.TOTP(secret).secret == app_for(device).secret
        # The QR code's URL names the issuer, for the app's list.
        assert device.config_url.startswith("otpauth://totp/ReClo%3Aalice.owner?")
        assert 'href="otpauth://totp/ReClo%3Aalice.owner?' in html  # one tap on the phone itself

        shown = owner.post("/accounts/security/two-factor/", {"code": pyotp.TOTP(secret).now()})
        codes = re.findall(r'<code class="big">([a-z0-9-]+)</code>', shown.content.decode())
        assert len(codes) == 10 and len(set(codes)) == 10
        assert shown["Cache-Control"] == "no-store"
        assert twofactor.is_enabled(user)
        # Stored hashed: the database does not hold the codes themselves.
        stored = set(StaticToken.objects.filter(device__user=user).values_list("token", flat=True))
        assert len(stored) == 10
        assert not stored & set(codes) and not stored & {c.replace("-", "") for c in codes}
        assert AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.TWOFACTOR_ENABLED).count() == 1
        # Shown once: the security page counts them but does not show them.
        again = owner.get("/accounts/security/").content.decode()
        assert "Recovery codes left: 10" in again and codes[0] not in again

    def test_a_wrong_code_does_not_turn_it_on(self, owner, user):
        owner.get("/accounts/security/two-factor/")
        response = owner.post("/accounts/security/two-factor/", {"code": "000000"})
        assert "That code does not match" in response.content.decode()
        assert not twofactor.is_enabled(user)

    def test_set_up_is_refused_while_it_is_on(self, owner, user):
        enable(user)
        assert owner.get("/accounts/security/two-factor/")["Location"] == "/accounts/security/"


class TestSignIn:
    def test_the_password_alone_does_not_sign_in_and_the_apps_code_does(self, client, user, password):
        app, _ = enable(user)
        first = sign_in(client, user, password)
        assert first["Location"] == "/accounts/verify/"
        assert client.get("/accounts/tokens/").status_code == 302  # not signed in yet
        assert not AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.LOGIN_OK).exists()
        done = client.post("/accounts/verify/", {"code": app.now()})
        assert done["Location"] == "/"
        assert client.get("/accounts/tokens/").status_code == 200
        event = AuditEvent.objects.get(user=user, kind=AuditEvent.Kind.LOGIN_OK)
        assert event.details == {"second_factor": "authenticator app"}

    def test_a_code_is_not_accepted_twice(self, client, user, password):
        app, _ = enable(user)
        code = app.now()
        assert sign_in(client, user, password, code)["Location"] == "/"
        client.post("/accounts/logout/")
        again = sign_in(client, user, password, code)
        assert again.status_code == 200 and "That code does not match." in again.content.decode()

    def test_a_recovery_code_works_once(self, client, user, password):
        _, codes = enable(user)
        done = sign_in(client, user, password, codes[3].upper().replace("-", " "))  # as typed from paper
        assert done["Location"] == "/"
        assert "You used a recovery code; 9 left." in client.get("/").content.decode()
        client.post("/accounts/logout/")
        again = sign_in(client, user, password, codes[3])
        assert "That code does not match." in again.content.decode()
        assert AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.RECOVERY_CODE_USED).count() == 1

    def test_the_code_must_follow_the_password_within_5_minutes(self, client, user, password):
        with time_machine.travel("2026-11-26 10:00:00Z", tick=False) as traveller:
            app, _ = enable(user)
            sign_in(client, user, password)
            traveller.shift(5 * 60 + 1)
            late = client.post("/accounts/verify/", {"code": app.now()})
        assert late["Location"] == "/accounts/login/"
        assert client.get("/accounts/tokens/").status_code == 302

    def test_without_a_password_first_the_code_page_sends_to_sign_in(self, client):
        assert client.get("/accounts/verify/")["Location"] == "/accounts/login/"

    def test_wrong_codes_slow_down_the_address_not_the_owner(self, settings, user, password):
        settings.LOGIN_FAILURES_PER_ACCOUNT = 3
        stranger = Client(REMOTE_ADDR="203.0.113.5")
        with time_machine.travel("2026-11-26 10:00:00Z", tick=False):
            app, _ = enable(user)
            sign_in(stranger, user, password)
            for _ in range(4):
                assert "does not match" in stranger.post("/accounts/verify/", {"code": "123456"}).content.decode()
            slowed = stranger.post("/accounts/verify/", {"code": app.now()})
            assert slowed.status_code == 429 and "Too many failed sign-ins" in slowed.content.decode()
            owner = Client(REMOTE_ADDR="198.51.100.9")
            assert sign_in(owner, user, password, app.now())["Location"] == "/"

    def test_a_burst_of_wrong_codes_tells_the_owner_her_password_is_known(self, settings, user, password):
        settings.LOGIN_ALERT_AFTER = 3
        enable(user)
        for i in range(5):
            stranger = Client(REMOTE_ADDR=f"203.0.113.{i}")
            sign_in(stranger, user, password)
            stranger.post("/accounts/verify/", {"code": "123456"})
        [alert] = [m for m in mail.outbox if "failed sign-ins" in m.subject]
        assert alert.to == [user.email] and "got your password right" in alert.body

    def test_a_next_page_survives_the_second_step(self, client, user, password):
        app, _ = enable(user)
        client.post("/accounts/login/?next=/accounts/tokens/", {"email": user.email, "password": password,
                                                                "next": "/accounts/tokens/"})  # fmt: skip
        assert client.post("/accounts/verify/", {"code": app.now()})["Location"] == "/accounts/tokens/"


class TestApiLogin:
    def test_without_a_code_it_answers_207_saying_what_is_missing(self, anon_api, user, password):
        enable(user)
        response = anon_api.post("/api/v1/login", {"email": user.email, "password": password}, format="json")
        assert response.status_code == 401
        body = response.json()
        assert body["error"] == 207 and "'otp'" in body["message"] and "otp" in body["fields"]
        assert not ApiToken.objects.filter(user=user).exists()

    def test_with_the_apps_code_or_a_recovery_code_it_issues_a_token(self, anon_api, user, password):
        app, codes = enable(user)
        body = {"email": user.email, "password": password}
        ok = anon_api.post("/api/v1/login", {**body, "otp": app.now()}, format="json")
        assert ok.status_code == 200 and len(ok.json()["token"]) == 32
        ok2 = anon_api.post("/api/v1/login", {**body, "otp": codes[0]}, format="json")
        assert ok2.status_code == 200
        again = anon_api.post("/api/v1/login", {**body, "otp": codes[0]}, format="json")
        assert (again.status_code, again.json()["error"]) == (401, 207)

    def test_a_wrong_code_is_207_and_a_non_string_is_104(self, anon_api, user, password):
        enable(user)
        body = {"email": user.email, "password": password}
        wrong = anon_api.post("/api/v1/login", {**body, "otp": "000000"}, format="json")
        assert (wrong.status_code, wrong.json()["error"]) == (401, 207)
        bad = anon_api.post("/api/v1/login", {**body, "otp": 123456}, format="json")
        assert (bad.status_code, bad.json()["error"]) == (400, 104)

    def test_accounts_without_two_factor_ignore_the_field(self, anon_api, user, password):
        body = {"email": user.email, "password": password, "otp": "whatever"}
        assert anon_api.post("/api/v1/login", body, format="json").status_code == 200


class TestRecentVerification:
    def test_revoking_a_token_asks_for_a_code_after_10_minutes(self, client, user, password, token):
        row = ApiToken.objects.get(key_hash=hash_token(token))
        with time_machine.travel("2026-11-26 10:00:00Z", tick=False) as traveller:
            app, _ = enable(user)
            sign_in(client, user, password, app.now())
            traveller.shift(11 * 60)
            asked = client.post(f"/accounts/tokens/{row.pk}/revoke/", HTTP_REFERER="http://testserver/accounts/tokens/")
            assert asked["Location"] == "/accounts/verify/?next=http%3A%2F%2Ftestserver%2Faccounts%2Ftokens%2F"
            row.refresh_from_db()
            assert row.revoked_at is None
            traveller.shift(30)
            back = client.post("/accounts/verify/", {"code": app.now(), "next": "http://testserver/accounts/tokens/"})
            assert back["Location"] == "http://testserver/accounts/tokens/"
            client.post(f"/accounts/tokens/{row.pk}/revoke/")
        row.refresh_from_db()
        assert row.revoked_at is not None

    def test_a_code_in_the_form_itself_is_enough(self, client, user, password, token):
        row = ApiToken.objects.get(key_hash=hash_token(token))
        with time_machine.travel("2026-11-26 10:00:00Z", tick=False) as traveller:
            app, _ = enable(user)
            sign_in(client, user, password, app.now())
            traveller.shift(11 * 60)
            client.post(f"/accounts/tokens/{row.pk}/revoke/", {"otp_code": app.now()})
        row.refresh_from_db()
        assert row.revoked_at is not None

    def test_without_two_factor_nothing_is_asked(self, owner, token):
        row = ApiToken.objects.get(key_hash=hash_token(token))
        assert owner.post(f"/accounts/tokens/{row.pk}/revoke/")["Location"] == "/accounts/tokens/"
        row.refresh_from_db()
        assert row.revoked_at is not None


class TestDisable:
    def test_it_needs_a_right_code_and_emails_the_owner(self, client, user, password):
        app, codes = enable(user)
        sign_in(client, user, password, app.now())
        mail.outbox.clear()
        wrong = client.post("/accounts/security/two-factor/off/", {"code": "000000"})
        assert "does not match" in wrong.content.decode() and twofactor.is_enabled(user)
        done = client.post("/accounts/security/two-factor/off/", {"code": codes[1]})
        assert done["Location"] == "/accounts/security/"
        assert not twofactor.is_enabled(user)
        assert not StaticToken.objects.filter(device__user=user).exists()
        [email] = mail.outbox
        assert email.to == [user.email] and "turned off" in email.subject and "password alone" in email.body
        assert AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.TWOFACTOR_DISABLED).count() == 1
        # Signing in needs the password only again.
        client.post("/accounts/logout/")
        assert sign_in(client, user, password)["Location"] == "/"

    def test_new_recovery_codes_replace_the_old(self, client, user, password):
        app, old = enable(user)
        sign_in(client, user, password, app.now())
        page = client.post("/accounts/security/recovery-codes/").content.decode()
        new = re.findall(r'<code class="big">([a-z0-9-]+)</code>', page)
        assert len(new) == 10 and not set(new) & set(old)
        client.post("/accounts/logout/")
        assert "does not match" in sign_in(client, user, password, old[0]).content.decode()
        assert sign_in(client, user, password, new[0])["Location"] == "/"


class TestDestructivePages:
    """Deleting a restore point and terminating an instance ask for a code; stopping does not."""

    def test_deleting_a_restore_point_asks_for_a_code_first(self, owner, user, aws):
        from backups.models import Backup
        from backups.tests.factories import BackupFactory, ServerFactory
        from reclo_site.cloud import storage

        app, _ = enable(user)
        point = BackupFactory(server=ServerFactory(user=user, name="fileserver"), disk="sda")
        storage.put_object(point.key, b"vhd")
        url = f"/backups/{point.pk}/delete/"
        asked = owner.get(url)
        assert asked["Location"] == "/accounts/verify/?next=%2Fbackups%2F" + f"{point.pk}%2Fdelete%2F"
        assert owner.post(url, {"dependents": "0"}).status_code == 302 and Backup.objects.filter(pk=point.pk).exists()
        back = owner.post("/accounts/verify/", {"code": app.now(), "next": url})
        assert back["Location"] == url
        assert b"Delete this restore point?" in owner.get(url).content
        owner.post(url, {"dependents": "0"})
        assert not Backup.objects.filter(pk=point.pk).exists()

    def test_terminating_asks_for_a_code_and_stopping_does_not(self, owner, user, aws):
        from recovery.models import Instance
        from recovery.tests.factories import recovered_instance

        app, _ = enable(user)
        instance = recovered_instance(user=user)
        terminate = f"/recovery/instances/{instance.instance_id}/terminate/"
        stop = f"/recovery/instances/{instance.instance_id}/stop/"
        assert owner.get(terminate)["Location"].startswith("/accounts/verify/?next=")
        owner.post(terminate)
        assert Instance.objects.get(pk=instance.pk).state == "running"
        assert owner.get(stop).status_code == 200
        owner.post(terminate, {"otp_code": app.now(), "server_name": instance.recovery.server_name})
        assert Instance.objects.get(pk=instance.pk).state == "terminated"

    def test_revoking_a_server_asks_for_a_code_first(self, owner, user):
        from accounts.models import ApiToken
        from accounts.services import token_create
        from backups.tests.factories import ServerFactory

        app, _ = enable(user)
        server = ServerFactory(user=user, name="frontdesk")
        credential, _ = token_create(user=user, name="agent", server=server)
        url = f"/servers/{server.pk}/revoke/"
        assert owner.get(url)["Location"].startswith("/accounts/verify/?next=")
        owner.post(url)
        assert ApiToken.objects.get(pk=credential.pk).revoked_at is None
        owner.post(url, {"otp_code": app.now()})
        assert ApiToken.objects.get(pk=credential.pk).revoked_at is not None
