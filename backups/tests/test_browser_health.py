"""A real browser shows the three schedule badges: no schedule installed, on schedule, late.

Each server's state is what its agent last reported (backups.health); the
frozen-time rules are in test_health.py. The screenshot goes to
RECLO_SCREENSHOTS as backups-health-badges.png.
"""

import os
from datetime import timedelta

import pytest
from django.utils import timezone

from tests.browser import chromium_page, sign_in

from .factories import BackupFactory, ServerFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")


def test_the_dashboard_shows_no_schedule_on_schedule_and_late(live_server, user, password):
    now = timezone.now()
    reports = {
        "by-hand": {},  # backed up by hand, no schedule reported
        "on-time": {
            "schedule": "1h",
            "status_at": now - timedelta(minutes=10),
            "next_run": now + timedelta(minutes=50),
        },
        "two-hours-late": {
            "schedule": "1h",
            "status_at": now - timedelta(hours=3),
            "next_run": now - timedelta(hours=2),
        },
    }
    for name, report in reports.items():
        server = ServerFactory(user=user, name=name, agent_version="0.1.0", **report)
        BackupFactory(server=server, date_created=report.get("status_at", now - timedelta(minutes=5)))
    with chromium_page(viewport=(1100, 900)) as page:
        sign_in(page, live_server.url, user.email, password)
        cards = page.locator("[data-testid=server]")
        seen = {
            cards.nth(i).locator("h2").inner_text(): (
                cards.nth(i).locator("[data-testid=health]").inner_text(),
                cards.nth(i).locator("[data-testid=health]").get_attribute("class"),
            )
            for i in range(cards.count())
        }
        assert seen == {
            "by-hand": ("no schedule installed", "badge amber"),
            "on-time": ("on schedule", "badge green"),
            "two-hours-late": ("late", "badge amber"),
        }
        assert "has not started" in cards.nth(2).locator("[data-testid=schedule]").inner_text()
        if SHOTS:
            os.makedirs(SHOTS, exist_ok=True)
            page.screenshot(path=os.path.join(SHOTS, "backups-health-badges.png"), full_page=True)
