"""A restore point's consistency (upload start, backup object, pages) and the agent's status report."""

import pytest
from django.urls import reverse

from backups.models import Backup, Server

from .conftest import START
from .factories import BackupFactory, ServerFactory

pytestmark = pytest.mark.django_db

UPLOADS = "/api/v1/backups/uploads"

GOOD_PREFLIGHT = {
    "ok": True,
    "boot_mode": "bios",
    "kernel": "6.1.0-57-amd64",
    "checks": [
        {"name": "nvme", "status": "pass", "detail": "the NVMe driver is in the initramfs", "fix": ""},
        {"name": "fstab", "status": "fail", "detail": "/etc/fstab names disks by device: /dev/sda1 (/)",
         "fix": "Replace each device name by its UUID: `blkid /dev/sda1` prints it."},
    ],
}  # fmt: skip


def status_url(server: str) -> str:
    return f"/api/v1/servers/{server}/status"


class TestConsistencyAtUploadStart:
    @pytest.mark.parametrize("value", ["snapshot", "frozen", "crash", "offline"])
    def test_it_is_recorded_and_returned_in_the_backup_object(self, api, aws, value):
        response = api.post(UPLOADS, {**START, "kind": "full", "consistency": value}, format="json")
        assert response.status_code == 201
        backup = Backup.objects.get()
        assert backup.consistency == value
        detail = api.get(f"/api/v1/backups/{backup.pk}").json()["backup"]
        assert detail["consistency"] == value
        assert api.get("/api/v1/backups").json()["backups"][0]["consistency"] == value

    def test_an_agent_that_does_not_say_gets_crash(self, api, aws):
        assert api.post(UPLOADS, {**START, "kind": "full"}, format="json").status_code == 201
        assert Backup.objects.get().consistency == "crash"

    @pytest.mark.parametrize("value", ["consistent", "", 3, None])
    def test_anything_else_is_a_malformed_request(self, api, aws, value):
        response = api.post(UPLOADS, {**START, "kind": "full", "consistency": value}, format="json")
        assert response.status_code == 400
        assert response.json()["error"] == 104 and "consistency" in response.json()["fields"]
        assert not Backup.objects.exists()


class TestStatusReport:
    def test_the_owners_agent_reports_schedule_version_and_preflight(self, api, user):
        server = ServerFactory(user=user, name="frontdesk")
        body = {"schedule": "1h", "next_run": "2026-12-01T23:00:00Z", "agent_version": "0.1.0",
                "preflight": {**GOOD_PREFLIGHT, "ok": True}}  # fmt: skip
        response = api.post(status_url("frontdesk"), body, format="json")
        assert response.status_code == 200, response.json()
        assert response.json()["preflight_ok"] is False  # a check failed, whatever the agent claimed
        server.refresh_from_db()
        assert (server.schedule, server.agent_version) == ("1h", "0.1.0")
        assert server.next_run.isoformat() == "2026-12-01T23:00:00+00:00"
        assert server.preflight["checks"][1]["name"] == "fstab" and server.preflight["ok"] is False
        assert server.preflight_at is not None

    def test_a_report_without_preflight_keeps_the_last_one(self, api, user):
        server = ServerFactory(user=user, name="frontdesk")
        api.post(status_url("frontdesk"), {"preflight": GOOD_PREFLIGHT}, format="json")
        response = api.post(status_url("frontdesk"), {"schedule": None, "agent_version": "0.2.0"}, format="json")
        assert response.status_code == 200
        server.refresh_from_db()
        assert server.agent_version == "0.2.0" and server.schedule == ""
        assert server.preflight["kernel"] == "6.1.0-57-amd64"

    def test_another_tenants_or_an_unknown_server_is_not_found(self, other_api, api, user):
        ServerFactory(user=user, name="frontdesk")
        for client, name in ((other_api, "frontdesk"), (api, "nosuch"), (api, "bad name!")):
            response = client.post(status_url(name), {"agent_version": "0.1.0"}, format="json")
            assert response.status_code == 404 and response.json()["error"] == 105
        assert Server.objects.get(name="frontdesk").status_at is None

    def test_a_bad_token_is_refused(self, anon_api, user):
        ServerFactory(user=user, name="frontdesk")
        anon_api.credentials(HTTP_AUTHORIZATION="Token " + "x" * 32)
        response = anon_api.post(status_url("frontdesk"), {}, format="json")
        assert response.status_code == 401 and response.json()["error"] == 102

    @pytest.mark.parametrize(
        "body",
        [
            ["not", "an", "object"],
            {"schedule": 60},
            {"next_run": "tomorrow"},
            {"preflight": {"checks": [{"name": "nvme", "status": "maybe", "detail": ""}]}},
            {"preflight": {"checks": "all good"}},
            {"preflight": {"ok": "yes", "checks": []}},
        ],
    )
    def test_malformed_bodies_are_refused(self, api, user, body):
        ServerFactory(user=user, name="frontdesk")
        response = api.post(status_url("frontdesk"), body, format="json")
        assert response.status_code == 400 and response.json()["error"] == 104
        assert Server.objects.get(name="frontdesk").status_at is None


class TestServerPage:
    def test_every_restore_point_shows_its_consistency_and_a_crash_newest_warns(self, owner, user):
        server = ServerFactory(user=user, name="frontdesk")
        full = BackupFactory(server=server, consistency="frozen")
        BackupFactory(server=server, kind="incremental", parent=full, consistency="crash")
        page = owner.get(reverse("backups:server-detail", args=[server.pk])).content.decode()
        assert page.count('data-testid="consistency"') == 2
        assert ">frozen file systems<" in page and ">crash-consistent (in use)<" in page
        assert 'data-testid="crash-warning"' in page and "--freeze" in page

    def test_no_warning_when_the_newest_was_snapshotted(self, owner, user):
        server = ServerFactory(user=user, name="frontdesk")
        full = BackupFactory(server=server, consistency="crash")
        BackupFactory(server=server, kind="incremental", parent=full, consistency="snapshot")
        page = owner.get(reverse("backups:server-detail", args=[server.pk])).content.decode()
        assert 'data-testid="crash-warning"' not in page

    def test_the_preflight_is_a_checklist_with_the_fix_of_each_failure(self, owner, user, api):
        server = ServerFactory(user=user, name="frontdesk")
        BackupFactory(server=server, consistency="offline")
        api.post(status_url("frontdesk"), {"preflight": GOOD_PREFLIGHT}, format="json")
        page = owner.get(reverse("backups:server-detail", args=[server.pk])).content.decode()
        assert page.count('data-testid="preflight-check"') == 2
        assert "needs fixing" in page
        assert "Fix: Replace each device name by its UUID" in page
        assert "Fix: " not in page.split("nvme")[1].split("fstab")[0]  # a passing check has no fix line


def test_the_failover_page_names_each_restore_points_consistency(owner, user):
    from recovery.forms import FailoverForm

    server = ServerFactory(user=user, name="frontdesk")
    BackupFactory(server=server, consistency="snapshot")
    labels = [label for _, label in FailoverForm(server=server).fields["backup"].choices]
    assert len(labels) == 1 and " · snapshot (LVM) · " in labels[0]


def test_the_delete_page_names_the_restore_points_consistency(owner, user):
    server = ServerFactory(user=user, name="frontdesk")
    backup = BackupFactory(server=server, consistency="frozen")
    page = owner.get(reverse("backups:backup-delete", args=[backup.pk])).content.decode()
    assert 'data-testid="consistency">frozen file systems<' in page


def test_the_server_page_shows_what_the_agent_reported(owner, user, api):
    server = ServerFactory(user=user, name="frontdesk")
    BackupFactory(server=server)
    body = {"schedule": "6h", "next_run": "2026-12-02T04:00:00Z", "agent_version": "0.3.1"}
    assert api.post(status_url("frontdesk"), body, format="json").status_code == 200
    page = owner.get(reverse("backups:server-detail", args=[server.pk])).content.decode()
    assert "Agent 0.3.1" in page and "backs up every 6h" in page and "2026-12-02" in page
