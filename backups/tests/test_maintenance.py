"""Beat jobs: upload clean-up, deferred deletions, and the schedule itself (the late and silent emails: test_health)."""

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from backups import services
from backups.models import Backup, ObjectDeletion
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
