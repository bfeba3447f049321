"""A real browser signs up, logs out, logs in and creates an API token."""

import os

import pytest

from accounts.models import ApiToken
from accounts.tokens import hash_token

from .browser import chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")


def shot(page, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def test_sign_up_log_in_and_create_a_token(live_server, aws):
    with chromium_page() as page:
        page.goto(f"{live_server.url}/accounts/signup/")
        shot(page, "signup")
        page.fill("#id_username", "dr.jones")
        page.fill("#id_email", "jones@clinic.example")
        page.fill("#id_password", "short")
        page.fill("#id_password_again", "short")
        page.click("button[type=submit]")
        assert page.locator(".field.has-error").count() >= 1
        shot(page, "signup-errors")
        page.fill("#id_password", "granite-meadow-4821-lantern")
        page.fill("#id_password_again", "granite-meadow-4821-lantern")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Welcome to ReClo, dr.jones")
        shot(page, "dashboard-empty")

        page.click("text=Log out")
        page.wait_for_url(f"{live_server.url}/accounts/login/")
        page.fill("#id_email", "jones@clinic.example")
        page.fill("#id_password", "granite-meadow-4821-lantern")
        shot(page, "login")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Your servers")

        page.click("nav >> text=API tokens")
        page.fill("#id_name", "front-desk-server")
        page.click("text=Create token")
        key = page.locator("[data-testid=new-token]").inner_text().strip()
        shot(page, "tokens")
        assert len(key) == 32
        assert ApiToken.objects.get(key_hash=hash_token(key)).name == "front-desk-server"
        page.click("text=Revoke…")
        page.wait_for_selector("text=Revoke the token “front-desk-server”?")
        assert ApiToken.objects.get(key_hash=hash_token(key)).revoked_at is None  # it asks first
        page.click("[data-testid=revoke-confirm]")
        page.wait_for_selector("text=revoked")
        assert ApiToken.objects.get(key_hash=hash_token(key)).revoked_at is not None
