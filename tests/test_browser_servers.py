"""A real browser adds a server, sees its one-time key, and revokes the server."""

import os

import pytest
from rest_framework.test import APIClient

from accounts.models import ApiToken
from accounts.tokens import hash_token
from backups.models import EnrollmentKey, Server
from reclo_site import testing

from .browser import chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")


def shot(page, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


def test_add_a_server_see_the_key_once_and_revoke_it(live_server, user, settings):
    settings.SITE_URL = live_server.url
    with chromium_page() as page:
        page.goto(f"{live_server.url}/accounts/login/")
        page.fill("#id_email", user.email)
        page.fill("#id_password", testing.PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_selector("text=Your servers")

        page.click("nav >> text=Add a server")
        page.fill("#id_name", "bad/name")
        page.click("text=Make an enrollment key")
        assert page.locator(".field.has-error").count() == 1
        shot(page, "add-server-form")
        page.fill("#id_name", "front-desk")
        page.click("text=Make an enrollment key")
        key = page.locator("[data-testid=key]").inner_text().strip()
        assert len(key) == 32 and key.isalnum()
        install = page.locator("[data-testid=install-command]").inner_text().strip()
        assert install == f"curl -fsSL {live_server.url}/agent/install.sh | sudo sh -s -- --key {key}"
        page.click("text=Already installed, or uninstalling")  # the enrol line sits in a folded section
        enroll = page.locator("[data-testid=enroll-command]").inner_text().strip()
        assert enroll == f"reclo-agent enroll --portal {live_server.url} --key {key}"
        assert "UTC" in page.locator("[data-testid=expires]").inner_text()
        # Every command block has a copy button (navigator.clipboard exists on http://127.0.0.1).
        assert page.locator("button.copy").count() >= 4
        shot(page, "add-server-key")
        assert EnrollmentKey.objects.get(server__name="front-desk").key_hash == hash_token(key)

        # The agent on the server trades the key for its credential.
        body = APIClient().post("/api/v1/enroll", {"key": key, "hostname": "frontdesk"}, format="json").json()
        credential = body["token"]

        server = Server.objects.get(name="front-desk")
        page.goto(f"{live_server.url}/servers/{server.pk}/")
        page.wait_for_selector("text=1 enrolled agent")
        assert key not in page.content()
        page.click("[data-testid=revoke]")
        page.wait_for_selector("text=Revoke front-desk?")
        shot(page, "server-revoke")
        page.click("[data-testid=revoke-confirm]")
        page.wait_for_selector("text=1 agent credential stopped working")
        shot(page, "server-revoked")
        assert ApiToken.objects.get(key_hash=hash_token(credential)).revoked_at is not None
        answer = APIClient(HTTP_AUTHORIZATION=f"Token {credential}").get("/api/v1/backups")
        assert (answer.status_code, answer.json()["error"]) == (401, 102)
