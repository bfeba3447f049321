"""A real browser browses a restore point to a file and downloads it; and the same pages at phone width."""

import pytest

from backups.models import Backup
from backups.tests import vhds
from backups.tests.conftest import Disk
from reclo_site import testing
from reclo_site.testing_fsimages import expected_files, fs_disks

from .browser import chromium_page, shot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def restore_point(user, aws):
    raw = fs_disks()["mbr-2"].read_bytes()
    data, info = vhds.full(raw)
    return Disk(user)._store(data, info, kind=Backup.Kind.FULL, parent=None, status=Backup.Status.VERIFIED, when=None)


def log_in(page, live_server, user):
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_email", user.email)
    page.fill("#id_password", testing.PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your servers")


@pytest.mark.parametrize("width", [1280, 390])
def test_browse_to_a_file_and_download_it(live_server, user, restore_point, tmp_path, width):
    want = expected_files(2)
    with chromium_page(viewport=(width, 844)) as page:
        log_in(page, live_server, user)
        page.goto(f"{live_server.url}/servers/{restore_point.server_id}/")
        page.click("[data-testid=browse-files]")
        assert page.locator("[data-testid=partition]").count() == 2
        shot(page, f"files-partitions-{width}")
        page.click("text=Partition 2")  # NTFS
        names = page.locator("[data-testid=entry] td.name").all_inner_texts()
        assert names[0].startswith("📁 docs")  # folders first
        assert any("Ünïcode café.txt" in n for n in names) and not any("delete-me" in n for n in names)
        page.click("[data-testid=entry] >> text=docs")
        page.wait_for_selector("[data-testid=breadcrumbs] >> text=docs")
        crumbs = page.locator("[data-testid=breadcrumbs]").inner_text()
        assert "Partitions" in crumbs and "Partition 2 (ntfs)" in crumbs and "docs" in crumbs
        size = page.locator("[data-testid=entry]", has_text="scan.bin").locator("td.size").inner_text()
        assert size.strip() == "3.0\xa0MB"
        page.fill("[data-testid=files-search]", "SCAN")
        page.press("[data-testid=files-search]", "Enter")
        page.wait_for_selector("text=1 of 3 entries match")
        assert page.locator("[data-testid=entry]").count() == 1
        shot(page, f"files-folder-{width}")
        with page.expect_download() as caught:
            page.locator("[data-testid=entry]", has_text="scan.bin").locator("[data-testid=download]").click()
        download = caught.value
        assert download.suggested_filename == "scan.bin"
        target = tmp_path / "scan.bin"
        download.save_as(target)
        assert target.read_bytes() == want["docs/scan.bin"]
        # The page never scrolls sideways at phone width.
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_an_unreadable_partition_says_so(live_server, user, restore_point):
    with chromium_page() as page:
        log_in(page, live_server, user)
        page.goto(f"{live_server.url}/backups/{restore_point.pk}/files/?partition=3&path=/")
        assert "no partition 3" in page.locator("[data-testid=files-error]").inner_text()


def test_another_tenants_restore_point_is_not_found(client, other_user, restore_point):
    client.force_login(other_user)
    assert client.get(f"/backups/{restore_point.pk}/files/").status_code == 404
    assert client.get(f"/backups/{restore_point.pk}/files/download/?partition=1&path=/readme.txt").status_code == 404
