"""A real browser resets a forgotten password by email, turns on two-factor and signs in with a code."""

import base64
import re
import time

import pyotp
import pytest
from django.core import mail
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import ApiToken
from reclo_site import testing

from .browser import chromium_page
from .test_browser_accounts import shot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

NEW = "amber-kettle-7730-orchard"


def test_a_forgotten_password_is_reset_by_email(live_server, user, token):
    with chromium_page() as page:
        page.goto(f"{live_server.url}/accounts/login/")
        page.click("text=Forgot your password?")
        page.fill("#id_email", user.email)
        shot(page, "password-reset")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Check your email")
        shot(page, "password-reset-sent")

        [email] = mail.outbox
        link = re.search(r"https?://\S+(/accounts/password/reset/\S+/)", email.body).group(1)
        page.goto(f"{live_server.url}{link}")
        page.wait_for_selector("text=Choose a new password")
        assert "/set-password/" in page.url  # the token left the address bar
        page.fill("#id_new_password1", NEW)
        page.fill("#id_new_password2", NEW)
        shot(page, "password-reset-confirm")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Your password is changed")
        assert "1 API token was revoked" in page.inner_text("main")
        shot(page, "password-reset-complete")
        assert ApiToken.objects.get(user=user).revoked_at is not None

        page.click("main a.button")
        page.fill("#id_email", user.email)
        page.fill("#id_password", testing.PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Email or password does not match.")
        page.fill("#id_password", NEW)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Your servers")


def test_two_factor_is_turned_on_and_asked_at_sign_in(live_server, user):
    with chromium_page() as page:
        page.goto(f"{live_server.url}/accounts/login/")
        page.fill("#id_email", user.email)
        page.fill("#id_password", testing.PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Your servers")

        page.click(f"nav >> text={user.username}")
        page.wait_for_selector("h1:has-text('Security')")
        shot(page, "security-off")
        page.click("text=Turn on two-factor")
        page.wait_for_selector("img[alt^='QR code']")
        assert page.eval_on_selector("img[alt^='QR code']", "img => img.naturalWidth") > 100  # the QR code drew
        shot(page, "twofactor-setup")
        secret = page.inner_text("[data-testid=totp-secret]").replace(" ", "")
        app = pyotp.TOTP(secret)
        assert app.secret == base64.b32encode(TOTPDevice.objects.get(user=user).bin_key).decode().rstrip("=")
        page.fill("#id_code", app.now())
        page.click("button:has-text('Turn on')")
        page.wait_for_selector("text=save your recovery codes")
        codes = page.locator("[data-testid=recovery-codes] code").all_inner_texts()
        assert len(codes) == 10
        shot(page, "recovery-codes")
        page.click("text=I have saved them")
        page.wait_for_selector("text=Recovery codes left: 10")
        shot(page, "security-on")

        page.click("text=Log out")
        page.fill("#id_email", user.email)
        page.fill("#id_password", testing.PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Two-factor sign-in")
        shot(page, "verify-sign-in")
        page.fill("#id_code", "000000")
        page.click("button[type=submit]")
        page.wait_for_selector("text=That code does not match.")
        # The app's next code (the one it shows 30 s from now is still within the tolerance).
        page.fill("#id_code", app.at(time.time() + 30))
        page.click("button[type=submit]")
        page.wait_for_selector("text=Your servers")

        page.goto(f"{live_server.url}/accounts/security/two-factor/off/")
        shot(page, "twofactor-disable")
        page.fill("#id_code", codes[0])
        page.click("button:has-text('Turn off two-factor')")
        page.wait_for_selector("text=Two-factor authentication is off.")
        assert any("turned off" in m.subject for m in mail.outbox)
