"""Retention merges old restore points into the full without losing any in the window."""

from datetime import timedelta

import pytest
from django.utils import timezone

from backups import services, tasks
from backups.models import Backup, ObjectDeletion
from backups.services import retention
from reclo_site import cloud
from reclo_site.cloud import storage

from . import vhds
from .conftest import stored_chain

pytestmark = pytest.mark.django_db


def verified(disk):
    return list(Backup.objects.filter(server=disk.server, disk=disk.disk, status="verified").order_by("date_created"))


def assert_restorable_bit_for_bit(disk, points):
    for point in points:
        assert vhds.restored(stored_chain(point)) == disk.raw[point.pk], f"restore point {point.pk} changed"


def exists(key):
    try:
        storage.head_object(key)
    except cloud.ObjectNotFound:
        return False
    return True


def test_merging_keeps_every_restore_point_in_the_window_restorable_bit_for_bit(disk, settings, upload):
    settings.RECLO_RETENTION_KEEP = 3
    full = disk.full()
    chain = [full] + [disk.incremental(seed) for seed in (2, 3, 4, 5)]
    old_keys = {b.pk: b.key for b in chain}

    tasks.retention_apply(disk.server.pk, "sda")  # eager: repeats itself until within the window

    window = verified(disk)
    assert [b.pk for b in window] == [b.pk for b in chain[2:]]
    new_base = window[0]
    assert (new_base.kind, new_base.parent_id) == ("full", None)
    assert new_base.vhd_unique_id == disk.info[new_base.pk].unique_id  # the next one's parent id still fits
    assert new_base.key.endswith(f"/{new_base.pk}.merged.vhd.zst")
    assert_restorable_bit_for_bit(disk, window)

    # The replaced objects stay until restores granted before could have finished.
    replaced = {
        old_keys[chain[0].pk],
        old_keys[chain[1].pk],
        old_keys[chain[2].pk],
        chain[1].key.replace(".vhd.zst", ".merged.vhd.zst"),
    }
    deferred = set(ObjectDeletion.objects.values_list("key", flat=True))
    assert deferred == replaced
    assert all(d.not_before > timezone.now() + timedelta(hours=11) for d in ObjectDeletion.objects.all())
    assert all(exists(k) for k in deferred)
    # The first merged full was locked like any restore point: its deletion waits for the lock.
    merged_once = chain[1].key.replace(".vhd.zst", ".merged.vhd.zst")
    assert ObjectDeletion.objects.get(key=merged_once).not_before > timezone.now() + timedelta(days=29)
    assert services.objects_purge(now=timezone.now() + settings.RECLO_CREDENTIALS_TTL + timedelta(minutes=1)) == 3
    assert [k for k in deferred if exists(k)] == [merged_once]
    # Even a purge that believes the lock is over cannot remove it early: S3 refuses.
    assert services.objects_purge(now=timezone.now() + timedelta(days=31)) == 0
    assert exists(merged_once) and ObjectDeletion.objects.filter(key=merged_once).exists()
    assert_restorable_bit_for_bit(disk, window)

    # The agent's next incremental builds on the newest point and verifies; retention merges again.
    tip = window[-1]
    new_raw = vhds.changed(disk.raw[tip.pk], 6)
    data, info = vhds.incremental(disk.raw[tip.pk], new_raw, disk.info[tip.pk])
    response = upload(data, kind="incremental", parent_id=tip.pk)
    newest = Backup.objects.get(pk=response.json()["backup"]["backup_id"])
    assert newest.status == "verified", newest.failure
    disk.raw[newest.pk] = bytes(new_raw)
    window = verified(disk)
    assert [b.pk for b in window] == [chain[3].pk, chain[4].pk, newest.pk]
    assert_restorable_bit_for_bit(disk, window)


def test_a_full_nothing_builds_on_is_dropped(disk, settings):
    settings.RECLO_RETENTION_KEEP = 2
    lonely = disk.full(seed=7)
    disk.full(seed=8)
    disk.incremental(9)
    assert services.retention_apply(server_id=disk.server.pk, disk="sda") == "dropped"
    assert not Backup.objects.filter(pk=lonely.pk).exists()
    assert ObjectDeletion.objects.get().key == lonely.key
    assert services.retention_apply(server_id=disk.server.pk, disk="sda") == ""


def test_retention_waits_while_an_incremental_on_the_full_is_in_flight(disk, settings):
    settings.RECLO_RETENTION_KEEP = 1
    full = disk.full()
    disk.incremental(2, status="verifying")
    disk.full(seed=3, when=timezone.now())
    assert services.retention_apply(server_id=disk.server.pk, disk="sda") == ""
    assert Backup.objects.get(pk=full.pk).status == "verified"


def test_a_merge_another_worker_holds_is_left_alone(disk):
    full = disk.full()
    child = disk.incremental(2)
    Backup.objects.filter(pk=child.pk).update(merge_claimed_at=timezone.now())
    assert services.backup_merge(base_id=full.pk, child_id=child.pk) is None
    # A claim older than any merge can take belongs to a dead worker.
    Backup.objects.filter(pk=child.pk).update(merge_claimed_at=timezone.now() - retention.CLAIM_TTL - timedelta(1))
    assert services.backup_merge(base_id=full.pk, child_id=child.pk).kind == "full"


def test_a_chain_that_changes_during_the_merge_is_left_as_it_was(disk, monkeypatch):
    full = disk.full()
    child = disk.incremental(2)
    real = retention._write_merged

    def write_then_delete_the_child(base, inc, key):
        result = real(base, inc, key)
        Backup.objects.filter(pk=inc.pk).update(status="failed", failure="Being deleted at the owner's request.")
        return result

    monkeypatch.setattr(retention, "_write_merged", write_then_delete_the_child)
    assert services.backup_merge(base_id=full.pk, child_id=child.pk) is None
    assert Backup.objects.get(pk=full.pk).status == "verified"
    assert Backup.objects.get(pk=child.pk).key == child.key
    # The discarded merged full was already locked: it goes when its lock ends.
    discarded = ObjectDeletion.objects.get(key=child.key.replace(".vhd.zst", ".merged.vhd.zst"))
    assert discarded.not_before > timezone.now() + timedelta(days=29)


def test_a_source_written_over_after_verification_is_never_merged(disk):
    # The attack: the agent's upload credentials write the verified
    # incremental's key again, with a valid VHD that would pass every check.
    full = disk.full()
    child = disk.incremental(2)
    forged, _ = vhds.incremental(disk.raw[full.pk], vhds.changed(disk.raw[full.pk], 99), disk.info[full.pk])
    storage.put_object(child.key, forged)
    merged = services.backup_merge(base_id=full.pk, child_id=child.pk)
    # The merge read the verified versions: the merged full is the disk as it was verified.
    assert vhds.restored(stored_chain(merged)) == disk.raw[child.pk]


def test_a_source_changed_under_its_etag_pin_fails_the_merge_and_changes_nothing(disk):
    # A restore point verified on an unversioned bucket is pinned by its ETag only.
    full = disk.full()
    child = disk.incremental(2)
    Backup.objects.filter(pk=full.pk).update(version_id="")
    storage.put_object(full.key, b"not a vhd any more")
    with pytest.raises(services.MergeFailed, match="not the version that was verified"):
        services.backup_merge(base_id=full.pk, child_id=child.pk)
    child.refresh_from_db()
    assert (child.kind, child.parent_id, child.merge_claimed_at) == ("incremental", full.pk, None)
    assert not exists(child.key.replace(".vhd.zst", ".merged.vhd.zst"))


def test_failed_branches_on_the_old_full_go_with_it(disk, settings):
    settings.RECLO_RETENTION_KEEP = 2
    full = disk.full()
    broken = disk.incremental(2, status="failed")
    below_broken = disk.incremental(3, on=broken, status="failed")  # a scrub fails a whole branch
    disk.tip = full
    kept = [disk.incremental(4, on=full), disk.incremental(5)]
    tasks.retention_apply(disk.server.pk, "sda")
    assert [b.pk for b in verified(disk)] == [b.pk for b in kept]
    assert not Backup.objects.filter(pk__in=[full.pk, broken.pk, below_broken.pk]).exists()
    assert {broken.key, below_broken.key} <= set(ObjectDeletion.objects.values_list("key", flat=True))
    assert_restorable_bit_for_bit(disk, verified(disk))


def test_a_full_with_only_failed_branches_is_dropped_with_them(disk, settings):
    settings.RECLO_RETENTION_KEEP = 1
    old = disk.full(seed=1)
    broken = disk.incremental(2, status="failed")
    disk.incremental(3, on=broken, status="failed")
    disk.full(seed=4)
    assert services.retention_apply(server_id=disk.server.pk, disk="sda") == "dropped"
    assert list(Backup.objects.values_list("status", flat=True)) == ["verified"]
    assert not Backup.objects.filter(pk=old.pk).exists()
