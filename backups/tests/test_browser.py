"""A real browser deletes a locked restore point, sees it scheduled for removal, and undoes it."""

import os
from datetime import timedelta

import pytest
from django.utils import timezone

from backups.models import Backup
from tests.browser import chromium_page

from .factories import BackupFactory, ServerFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")


def shot(page, name):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"backups-{name}.png"), full_page=True)


def test_delete_a_locked_restore_point_then_undo_it(live_server, user, password):
    server = ServerFactory(user=user, name="fileserver")
    until = timezone.now() + timedelta(days=20)
    full = BackupFactory(server=server, date_created=timezone.now() - timedelta(hours=2), locked_until=until)
    tip = BackupFactory(server=server, kind="incremental", parent=full, date_created=timezone.now(), locked_until=until)
    with chromium_page() as page:
        page.goto(f"{live_server.url}/accounts/login/")
        page.fill("#id_email", user.email)
        page.fill("#id_password", password)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        page.goto(f"{live_server.url}/backups/{tip.pk}/delete/")
        assert "you can undo the deletion until then" in page.locator("[data-testid=lock-note]").inner_text()
        page.click("button.danger")
        page.wait_for_load_state()
        assert page.locator("[data-testid=scheduled]").count() == 1
        assert "scheduled for removal" in page.content()
        shot(page, "scheduled-for-removal")
        page.click("[data-testid=undo]")
        page.wait_for_load_state()
        assert page.locator("[data-testid=scheduled]").count() == 0
        assert "is back" in page.content()
        shot(page, "undone")
    assert Backup.objects.get(pk=tip.pk).deleted_at is None
