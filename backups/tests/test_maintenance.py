"""Beat jobs: upload clean-up, deferred deletions, overdue emails, and the schedule itself."""

import zoneinfo
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from backups import services
from backups.models import Backup, ObjectDeletion, Server
from reclo_site import cloud
from reclo_site.celery import app as celery_app
from reclo_site.cloud import clients, storage

from .factories import BackupFactory, ServerFactory
from .test_api_uploads import failing_client

pytestmark = pytest.mark.django_db


def exists(key):
    try:
        storage.head_object(key)
    except cloud.ObjectNotFound:
        return False
    return True


def test_every_beat_entry_names_a_registered_task():
    import backups.tasks  # noqa: F401 - registers the tasks

    for name, entry in django_settings.CELERY_BEAT_SCHEDULE.items():
        if entry["task"].startswith("backups."):
            assert entry["task"] in celery_app.tasks, name


class TestUploadsCleanUp:
    def test_it_drops_stale_pending_uploads_with_their_parts_and_objects(self, user, aws):
        server = ServerFactory(user=user)
        stale = BackupFactory(server=server, status="pending", credentials_expire=timezone.now() - timedelta(hours=2))
        alive = BackupFactory(server=server, status="pending", credentials_expire=timezone.now() + timedelta(hours=2))
        s3 = clients.client("s3")
        s3.create_multipart_upload(Bucket="reclo-test", Key=stale.key)
        s3.create_multipart_upload(Bucket="reclo-test", Key=alive.key)
        storage.put_object(stale.key, b"half")
        counts = services.uploads_clean_up()
        assert counts["dropped"] == 1
        assert not Backup.objects.filter(pk=stale.pk).exists() and not exists(stale.key)
        assert Backup.objects.filter(pk=alive.pk).exists()
        assert [key for key, _ in storage.multipart_uploads(prefix="backups/")] == [alive.key]

    def test_it_aborts_multipart_uploads_no_pending_upload_explains(self, aws):
        clients.client("s3").create_multipart_upload(Bucket="reclo-test", Key="backups/1/x/y/orphan.vhd.zst")
        assert services.uploads_clean_up()["aborted"] == 1
        assert storage.multipart_uploads(prefix="backups/") == []

    def test_it_resends_verifications_a_lost_worker_left(self, user, aws):
        stuck = BackupFactory(server=ServerFactory(user=user), status="verifying",
                              completed_at=timezone.now() - timedelta(hours=5))  # fmt: skip
        recent = BackupFactory(server=stuck.server, status="verifying", completed_at=timezone.now())
        assert services.uploads_clean_up()["requeued"] == 1
        stuck.refresh_from_db()
        assert stuck.status == "failed"  # eager: verified again at once (its object never existed)
        assert Backup.objects.get(pk=recent.pk).status == "verifying"

    def test_a_storage_failure_keeps_the_upload_for_the_next_run(self, user, aws, monkeypatch):
        stale = BackupFactory(server=ServerFactory(user=user), status="pending",
                              credentials_expire=timezone.now() - timedelta(hours=2))  # fmt: skip
        failing_client(monkeypatch, storage, "s3", "list_multipart_uploads")
        assert services.uploads_clean_up()["dropped"] == 0
        assert Backup.objects.filter(pk=stale.pk).exists()


class TestObjectsPurge:
    def test_it_deletes_due_objects_only(self, aws):
        now = timezone.now()
        for key in ("backups/1/due", "backups/1/later"):
            storage.put_object(key, b"x")
        ObjectDeletion.objects.create(key="backups/1/due", not_before=now - timedelta(minutes=1))
        ObjectDeletion.objects.create(key="backups/1/later", not_before=now + timedelta(hours=1))
        assert services.objects_purge() == 1
        assert not exists("backups/1/due") and exists("backups/1/later")
        assert list(ObjectDeletion.objects.values_list("key", flat=True)) == ["backups/1/later"]

    def test_it_never_deletes_an_object_a_live_backup_uses(self, user, aws):
        backup = BackupFactory(server=ServerFactory(user=user))
        storage.put_object(backup.key, b"x")
        ObjectDeletion.objects.create(key=backup.key, not_before=timezone.now())
        services.objects_purge()
        assert exists(backup.key) and not ObjectDeletion.objects.exists()

    def test_a_failure_is_counted_and_retried_next_time(self, aws, monkeypatch):
        ObjectDeletion.objects.create(key="backups/1/due", not_before=timezone.now())
        failing_client(monkeypatch, storage, "s3", "delete_objects")
        assert services.objects_purge() == 0
        assert ObjectDeletion.objects.get().attempts == 1


class TestOverdueEmails:
    @pytest.fixture
    def hourly(self, user):
        """A server backed up every hour until three hours ago."""
        server = ServerFactory(user=user, name="fileserver")
        last = timezone.now() - timedelta(hours=3)
        for n in range(5):
            BackupFactory(server=server, date_created=last - timedelta(hours=n))
        return server

    def test_the_owner_is_told_once_per_silence(self, hourly, user, mailoutbox):
        assert services.overdue_notify() == 1
        (mail,) = mailoutbox
        assert mail.to == [user.email] and "fileserver" in mail.subject
        assert "- sda: the newest restore point is from " in mail.body
        assert "(3\xa0hours ago; usually one every 1 hour)" in mail.body
        assert services.overdue_notify() == 0
        # A new backup ends the silence; the next silence is told again.
        now = timezone.now()
        BackupFactory(server=hourly, date_created=now + timedelta(minutes=30))
        assert services.overdue_notify(now=now + timedelta(hours=1)) == 0
        assert services.overdue_notify(now=now + timedelta(hours=3)) == 1

    def test_the_email_gives_the_time_in_the_owners_zone(self, hourly, user, mailoutbox):
        user.time_zone = "Asia/Kolkata"  # UTC+05:30 all year, abbreviated IST
        user.save(update_fields=["time_zone"])
        newest = hourly.backups.order_by("-date_created").first().date_created
        services.overdue_notify()
        local = newest.astimezone(zoneinfo.ZoneInfo("Asia/Kolkata"))
        assert f"from {local:%-d %b %Y, %H:%M} IST" in mailoutbox[0].body

    def test_a_server_on_schedule_is_not_mentioned(self, user, mailoutbox):
        server = ServerFactory(user=user)
        for n in range(3):
            BackupFactory(server=server, date_created=timezone.now() - timedelta(hours=n, minutes=10))
        assert services.overdue_notify() == 0 and mailoutbox == []

    def test_without_history_the_default_interval_applies(self, user, settings, mailoutbox):
        settings.RECLO_DEFAULT_BACKUP_INTERVAL = timedelta(hours=24)
        server = ServerFactory(user=user)
        BackupFactory(server=server, date_created=timezone.now() - timedelta(hours=30))
        assert services.overdue_notify() == 0
        Backup.objects.update(date_created=timezone.now() - timedelta(hours=49))
        assert services.overdue_notify() == 1

    def test_deactivated_accounts_get_no_email(self, hourly, user, mailoutbox):
        user.is_active = False
        user.save()
        assert services.overdue_notify() == 0

    def test_a_failed_send_is_tried_again(self, hourly, mailoutbox, monkeypatch):
        from accounts import notify

        def broken(*args, **kwargs):
            raise OSError("smtp down")

        monkeypatch.setattr(notify, "send_mail", broken)
        assert services.overdue_notify() == 0
        assert Server.objects.get().overdue_notified_at is None
        monkeypatch.undo()
        assert services.overdue_notify() == 1
