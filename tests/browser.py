"""Playwright driving Debian's Chromium, for end-to-end page tests."""

import os
from contextlib import contextmanager

import pytest
from django.db import connection

from reclo_site import testing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@contextmanager
def chromium_page(viewport=(1280, 900), timezone_id=None):
    """A fresh Chromium page; skips locally (fails in CI) without Chromium or Playwright.

    `timezone_id` (an IANA name) is the zone the page's JavaScript sees.
    """
    if not os.path.exists(CHROMIUM):
        testing.require_tool("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - requirements install it
        if testing.IN_CI:
            pytest.fail("playwright is not installed")
        pytest.skip("playwright is not installed")
    # Playwright's sync API runs its own event loop; Django must allow ORM
    # calls from this thread while it does.
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            extra = {"timezone_id": timezone_id} if timezone_id else {}
            context = browser.new_context(
                viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True, **extra
            )
            yield context.new_page()
        finally:
            # ORM calls made in Playwright's event-loop context opened a
            # connection of their own; left open, the test database stays busy.
            connection.close()
            browser.close()


def sign_in(page, portal: str, email: str, password: str) -> None:
    """Sign in on the portal's login page and wait for the dashboard."""
    page.goto(f"{portal}/accounts/login/")
    page.fill("#id_email", email)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your servers")


def shot(page, name):
    """A full-page screenshot `name`.png in $RECLO_SCREENSHOTS, when it is set (to look at new pages)."""
    folder = os.environ.get("RECLO_SCREENSHOTS", "")
    if folder:
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=os.path.join(folder, f"{name}.png"), full_page=True)
