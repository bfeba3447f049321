"""Verifications are fair between tenants, never run twice at once, and are never left behind.

A worker reading an object renews the backup's `read_heartbeat`; these tests
set heartbeats directly to stand for workers running elsewhere (fresh) or
killed (stale), and run the real task and services on real uploads.
"""

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from backups import services, tasks
from backups.models import Backup
from reclo_site.cloud import storage

from . import vhds
from .conftest import START
from .factories import BackupFactory, ServerFactory

pytestmark = pytest.mark.django_db


def running_elsewhere(user, count: int, *, age: timedelta = timedelta(seconds=5)) -> list[Backup]:
    """`count` verifications of `user` whose workers beat `age` ago."""
    server = ServerFactory(user=user)
    return [BackupFactory(server=server, status="verifying", read_heartbeat=timezone.now() - age) for _ in range(count)]


@pytest.fixture
def completed(api, aws, django_capture_on_commit_callbacks):
    """A completed upload of a real full restore point whose verification has not run yet."""

    def make(client=None):
        data, _ = vhds.full(vhds.raw_disk(1))
        with django_capture_on_commit_callbacks(execute=False):  # the worker's run is the test's
            response = (client or api).post("/api/v1/backups/uploads", {**START, "kind": "full"}, format="json")
            assert response.status_code == 201, response.json()
            storage.put_object(response.json()["key"], data)
            done = (client or api).post(
                f"/api/v1/backups/uploads/{response.json()['upload_id']}/complete",
                {"file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
                format="json",
            )
            assert done.status_code == 202
        return Backup.objects.get(pk=response.json()["upload_id"])

    return make


def test_a_tenant_with_its_share_running_waits_while_another_tenant_is_verified(completed, user, other_api, settings):
    settings.RECLO_MAX_CONCURRENT_VERIFICATIONS = 2
    running_elsewhere(user, 2)
    mine = completed()
    queued_before = mine.verify_queued_at

    assert tasks.backup_verify.apply(args=[str(mine.pk)]).get() == "deferred"
    mine.refresh_from_db()
    assert (mine.status, mine.read_heartbeat) == ("verifying", None)
    assert mine.verify_queued_at > queued_before  # sent again: the beat job leaves it be

    theirs = completed(client=other_api)
    assert tasks.backup_verify.apply(args=[str(theirs.pk)]).get() == "verified"

    # One of the owner's workers finishes: the waiting verification runs.
    Backup.objects.filter(user=user, status="verifying").exclude(pk=mine.pk).first().delete()
    assert tasks.backup_verify.apply(args=[str(mine.pk)]).get() == "verified"


def test_dead_workers_do_not_count_toward_the_share(completed, user, settings):
    settings.RECLO_MAX_CONCURRENT_VERIFICATIONS = 1
    running_elsewhere(user, 3, age=settings.RECLO_VERIFY_STALE_AFTER + timedelta(seconds=1))
    mine = completed()
    assert tasks.backup_verify.apply(args=[str(mine.pk)]).get() == "verified"


def test_a_duplicate_delivery_leaves_a_live_worker_alone_and_takes_over_a_dead_ones(completed, settings):
    backup = completed()
    Backup.objects.filter(pk=backup.pk).update(read_heartbeat=timezone.now())
    assert tasks.backup_verify.apply(args=[str(backup.pk)]).get() == "deferred"  # nothing done, back later
    backup.refresh_from_db()
    assert backup.status == "verifying" and backup.read_heartbeat is not None

    stale = timezone.now() - settings.RECLO_VERIFY_STALE_AFTER - timedelta(seconds=1)
    Backup.objects.filter(pk=backup.pk).update(read_heartbeat=stale)
    assert tasks.backup_verify.apply(args=[str(backup.pk)]).get() == "verified"
    backup.refresh_from_db()
    assert backup.read_heartbeat is None  # released with the verdict


def test_the_heartbeat_is_renewed_while_the_object_is_read(completed, monkeypatch):
    backup = completed()
    beats = []
    real_call = services.verification.Heartbeat.__call__

    def counting(self):
        beats.append(timezone.now())
        real_call(self)

    monkeypatch.setattr(services.verification.Heartbeat, "__call__", counting)
    monkeypatch.setattr(services.verification.Heartbeat, "EVERY", timedelta(0))
    assert tasks.backup_verify.apply(args=[str(backup.pk)]).get() == "verified"
    assert beats  # one per ranged GET


class TestRequeue:
    def test_a_verification_no_worker_is_on_is_sent_again_once(self, completed, settings):
        backup = completed()
        long_ago = timezone.now() - timedelta(minutes=20)
        Backup.objects.filter(pk=backup.pk).update(verify_queued_at=long_ago, completed_at=long_ago)
        assert services.verifications_requeue() == 1
        backup.refresh_from_db()
        assert backup.status == "verified", backup.failure  # eager: it ran at once

    def test_a_killed_workers_verification_is_sent_again(self, completed, settings):
        backup = completed()
        long_ago = timezone.now() - timedelta(minutes=20)
        dead = timezone.now() - settings.RECLO_VERIFY_STALE_AFTER - timedelta(seconds=1)
        Backup.objects.filter(pk=backup.pk).update(verify_queued_at=long_ago, read_heartbeat=dead)
        assert services.verifications_requeue() == 1
        assert Backup.objects.get(pk=backup.pk).status == "verified"

    def test_live_recent_and_finished_ones_are_left_alone(self, user, aws, settings):
        server = ServerFactory(user=user)
        long_ago = timezone.now() - timedelta(minutes=20)
        BackupFactory(server=server, status="verifying", verify_queued_at=long_ago, read_heartbeat=timezone.now())
        BackupFactory(server=server, status="verifying", verify_queued_at=timezone.now() - timedelta(minutes=5))
        BackupFactory(server=server, status="verified", verify_queued_at=long_ago)
        assert services.verifications_requeue() == 0

    def test_a_second_run_does_not_send_it_again(self, user, aws, monkeypatch):
        sent = []
        monkeypatch.setattr(tasks, "enqueue", lambda task, *args: sent.append(args))
        server = ServerFactory(user=user)
        stuck = BackupFactory(server=server, status="verifying", verify_queued_at=timezone.now() - timedelta(hours=1))
        assert services.verifications_requeue() == 1
        assert services.verifications_requeue() == 0
        assert sent == [(str(stuck.pk),)]
        # ... until its new stamp is itself old.
        assert services.verifications_requeue(now=timezone.now() + timedelta(minutes=16)) == 1

    def test_the_batch_is_bounded(self, user, aws, monkeypatch):
        monkeypatch.setattr(tasks, "enqueue", lambda task, *args: None)
        monkeypatch.setattr(services.lifecycle, "CLEAN_UP_BATCH", 3)
        server = ServerFactory(user=user)
        for _ in range(5):
            BackupFactory(server=server, status="verifying", verify_queued_at=timezone.now() - timedelta(hours=1))
        assert services.verifications_requeue() == 3
        assert services.verifications_requeue() == 2
