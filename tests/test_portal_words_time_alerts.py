"""The portal in plain words and local time, and the owner's alerts (issue 17, items 2, 3 and 6)."""

import re
import uuid
import zoneinfo
from datetime import UTC

import pytest
from django.urls import reverse

from accounts.models import AuditEvent
from backups import services as backup_services
from backups.models import Backup, Server
from backups.tests import vhds
from backups.tests.conftest import upload  # noqa: F401 - the fixture
from backups.tests.factories import BackupFactory
from reclo_site.localtime import when
from recovery import notify as recovery_notify
from recovery.failover import FAILOVER
from recovery.models import Recovery
from recovery.tests.factories import MiB, ServerFactory, backup_chain, recovered_instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def on_commit(django_capture_on_commit_callbacks):
    def run():
        return django_capture_on_commit_callbacks(execute=True)

    return run


def _zone(user, name):
    user.time_zone = name
    user.save(update_fields=["time_zone"])


# --- Local time -----------------------------------------------------------------------------


def test_pages_show_times_in_the_owners_zone_with_the_zone_named(owner, user, aws):
    _zone(user, "Asia/Kolkata")  # UTC+05:30 all year: "IST"
    server = ServerFactory(user=user, name="frontdesk")
    backups, _ = backup_chain(user=user, server=server, size=8 * MiB, incrementals=1)
    html = owner.get(reverse("backups:server-detail", args=[server.pk])).content.decode()
    local = backups[0].date_created.astimezone(zoneinfo.ZoneInfo("Asia/Kolkata"))
    assert f"{local:%-d %b %Y, %H:%M} IST" in html
    assert f"{backups[0].date_created.astimezone(UTC):%-d %b %Y, %H:%M} UTC" not in html
    assert "Times are shown in Asia/Kolkata" in html


def test_the_api_stays_utc_whatever_the_owners_zone(api, user, aws):
    _zone(user, "Asia/Kolkata")
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user), size=8 * MiB, incrementals=0)
    body = api.get(f"/api/v1/backups/{backups[0].pk}").json()["backup"]
    assert body["date_created"] == backups[0].date_created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_owner_changes_the_zone_in_security(owner, user):
    response = owner.post(reverse("accounts:time-zone"), {"time_zone": "Europe/Berlin"})
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.time_zone == "Europe/Berlin"
    (event,) = AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.TIME_ZONE_CHANGED)
    assert event.details["time_zone"] == "Europe/Berlin"
    assert "Time zone changed to Europe/Berlin" in owner.get(reverse("accounts:activity")).content.decode()


@pytest.mark.parametrize("bad", ["Mars/Olympus_Mons", "", "../../etc/passwd", "x" * 300])
def test_a_zone_not_in_the_list_is_refused(owner, user, bad):
    owner.post(reverse("accounts:time-zone"), {"time_zone": bad})
    user.refresh_from_db()
    assert user.time_zone == "UTC"


def test_the_time_zone_form_needs_a_login_and_a_post(client, owner):
    assert client.post(reverse("accounts:time-zone"), {"time_zone": "Europe/Berlin"}).status_code in (302, 403)
    assert owner.get(reverse("accounts:time-zone")).status_code == 405


def test_sign_up_keeps_a_known_zone_and_takes_utc_for_an_unknown_one(client, aws):
    from accounts.models import User

    base = {"password": "granite-meadow-4821-lantern", "password_again": "granite-meadow-4821-lantern"}
    client.post(reverse("accounts:signup"), {**base, "username": "dr.jones", "email": "j@x.example",
                                             "time_zone": "America/Chicago"})  # fmt: skip
    client.post(reverse("accounts:logout"))
    client.post(reverse("accounts:signup"), {**base, "username": "dr.smith", "email": "s@x.example",
                                             "time_zone": "Nowhere/Land"})  # fmt: skip
    assert User.objects.get(username="dr.jones").time_zone == "America/Chicago"
    assert User.objects.get(username="dr.smith").time_zone == "UTC"


def test_when_names_a_zone_without_an_abbreviation_by_its_offset():
    from datetime import datetime

    moment = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    assert when(moment, zoneinfo.ZoneInfo("Europe/Berlin")) == "1 Jul 2026, 14:00 CEST"
    assert when(moment, zoneinfo.ZoneInfo("Asia/Dubai")) == "1 Jul 2026, 16:00 UTC+04"
    assert when(None) == ""


def test_when_reads_an_iso_time_from_a_json_field():
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    assert when("2026-07-01T12:00:00+00:00", berlin, seconds=True) == "1 Jul 2026, 14:00:00 CEST"
    assert when("not a time", berlin) == "not a time"


# --- Plain words ----------------------------------------------------------------------------


def test_a_finished_backup_is_in_the_activity_log_as_a_sentence(owner, user, upload):  # noqa: F811
    raw = vhds.raw_disk(1)
    data, info = vhds.full(raw)
    upload(data)
    full = Backup.objects.get()
    assert full.status == "verified"
    changed, _ = vhds.incremental(raw, vhds.changed(raw, 2), info)
    upload(changed, kind="incremental", parent_id=full.pk, file_name="sda-2.vhd.zst")
    (event,) = AuditEvent.objects.filter(
        user=user, kind=AuditEvent.Kind.BACKUP_VERIFIED, details__backup_kind="incremental"
    )
    html = owner.get(reverse("accounts:activity")).content.decode()
    size = len(changed)
    from django.template.defaultfilters import filesizeformat

    assert f"Backup of {full.server.name} finished: {filesizeformat(size)} of changes" in html
    assert f"Backup of {full.server.name} finished: a full copy of {filesizeformat(len(data))}" in html
    assert "Upload credentials issued" not in html  # no raw event label
    assert event.details["file_size"] == size


def test_a_failed_backup_reads_as_failed_with_the_reason(owner, user, upload):  # noqa: F811
    data, _ = vhds.full(vhds.raw_disk(1))
    upload(data, sha256="0" * 64)
    (event,) = AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.BACKUP_FAILED)
    assert "SHA-256" in event.details["reason"]
    assert "failed: " in owner.get(reverse("accounts:activity")).content.decode()


def test_the_server_page_says_full_copy_and_changes_since_and_hides_ids(owner, user, aws):
    server = ServerFactory(user=user, name="frontdesk")
    backups, _ = backup_chain(user=user, server=server, size=8 * MiB, incrementals=1)
    html = owner.get(reverse("backups:server-detail", args=[server.pk])).content.decode()
    assert "Full copy" in html and f"Changes since {when(backups[0].date_created, UTC)}" in html
    assert "ready to restore" in html
    # The ids are there, but only inside the technical details toggles.
    assert str(backups[1].pk) in html
    # The text a person reads outside those toggles (tags and their attributes dropped).
    outside = re.sub(r"<[^>]+>", " ", "".join(part.split("</details>", 1)[-1] for part in html.split("<details")))
    assert str(backups[1].pk) not in outside
    assert "incremental" not in outside.lower() and "chain" not in outside.lower()


def test_the_recovery_pages_say_your_server_in_the_cloud(owner, user, aws):
    instance = recovered_instance(user=user)
    html = owner.get(reverse("recovery:instances")).content.decode()
    assert "Your servers in the cloud" in html
    outside = re.sub(r"<[^>]+>", " ", "".join(part.split("</details>", 1)[-1] for part in html.split("<details")))
    assert instance.instance_id not in outside and "t3.medium" not in outside


# --- Alerts ---------------------------------------------------------------------------------


def test_a_ready_failover_is_told_once(user, aws, mailoutbox):
    instance = recovered_instance(user=user)
    assert recovery_notify.failover_finished(instance.recovery_id, "ready") is True
    assert recovery_notify.failover_finished(instance.recovery_id, "ready") is False  # the hook may run again
    (mail,) = mailoutbox
    assert mail.to == [user.email] and "is running in the cloud" in mail.subject
    assert f"/recovery/{instance.recovery_id}/" in mail.body
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.FAILOVER_READY, user=user).count() == 1


def test_a_failed_failover_is_told_with_its_reason(user, aws, mailoutbox):
    server = ServerFactory(user=user, name="frontdesk")
    recovery = Recovery.objects.create(
        user=user, server=server, server_name=server.name, backup_ref=uuid.uuid4(),
        disk="sda", virtual_size=MiB, instance_type="t3.medium", import_method="ebs_direct",
        status=Recovery.Status.FAILED, error="The cloud refused the disk image.",
    )  # fmt: skip
    assert recovery_notify.failover_finished(recovery.pk, "failed")
    (mail,) = mailoutbox
    assert "failed" in mail.subject and "The cloud refused the disk image." in mail.body


def test_a_failover_still_running_is_not_told(user, aws, mailoutbox):
    server = ServerFactory(user=user)
    recovery = Recovery.objects.create(
        user=user, server=server, server_name=server.name, backup_ref=uuid.uuid4(), disk="sda",
        virtual_size=MiB, instance_type="t3.medium", import_method="ebs_direct", status=Recovery.Status.QUEUED,
    )  # fmt: skip
    assert recovery_notify.failover_finished(recovery.pk, "ready") is False and mailoutbox == []


def test_the_failover_pipeline_calls_the_alert_when_it_ends():
    from django.utils.module_loading import import_string

    assert import_string(FAILOVER.on_exit) is recovery_notify.failover_finished


def test_deleting_restore_points_emails_the_owner(api, user, aws, mailoutbox):
    backups, _ = backup_chain(user=user, server=ServerFactory(user=user, name="frontdesk"), incrementals=1)
    response = api.delete(f"/api/v1/backups/{backups[0].pk}?cascade=true")
    assert response.status_code in (200, 204), response.content
    (mail,) = mailoutbox
    assert mail.subject == "ReClo: 2 restore points of frontdesk deleted"
    assert "a full copy" in mail.body and "changes since the one before" in mail.body


def test_enrolling_and_revoking_a_server_email_the_owner(api, anon_api, user, aws, mailoutbox):
    key = api.post("/api/v1/servers/front-desk/enrollment", format="json").json()["key"]
    enrolled = anon_api.post("/api/v1/enroll", {"key": key, "hostname": "fd01"}, format="json")
    assert enrolled.status_code in (200, 201), enrolled.content
    assert [m.subject for m in mailoutbox] == ["ReClo: front-desk was connected to your account"]
    assert "(host fd01)" in mailoutbox[0].body
    server = Server.objects.get(user=user, name="front-desk")
    backup_services.server_credentials_revoke(user=user, server=server)
    assert mailoutbox[-1].subject == "ReClo: front-desk was disconnected"


# --- Remove this server ---------------------------------------------------------------------


def test_a_server_without_restore_points_can_be_removed(owner, user):
    server = ServerFactory(user=user, name="old-pc")
    html = owner.get(reverse("backups:dashboard")).content.decode()
    assert "Remove this server" in html and "being uploaded" not in html
    url = reverse("backups:server-remove", args=[server.pk])
    assert owner.get(url).status_code == 200 and Server.objects.filter(pk=server.pk).exists()
    assert owner.post(url).status_code == 302
    assert not Server.objects.filter(pk=server.pk).exists()
    assert AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.SERVER_REMOVED).count() == 1


def test_a_server_with_restore_points_is_not_removed(owner, user):
    server = ServerFactory(user=user)
    BackupFactory(server=server, status="failed")  # even a failed one: it is still a row with an object
    owner.post(reverse("backups:server-remove", args=[server.pk]))
    assert Server.objects.filter(pk=server.pk).exists()
    with pytest.raises(Exception) as refused:
        backup_services.server_remove(user=user, server=server)
    assert "restore points" in str(refused.value)


def test_another_tenants_server_cannot_be_removed(outsider, user):
    server = ServerFactory(user=user)
    assert outsider.get(reverse("backups:server-remove", args=[server.pk])).status_code == 404
    assert outsider.post(reverse("backups:server-remove", args=[server.pk])).status_code == 404
    assert Server.objects.filter(pk=server.pk).exists()
