"""The weekly scrub re-reads stored restore points and marks broken chains."""

from datetime import timedelta

import pytest
from django.utils import timezone

from backups import services, tasks
from backups.models import Backup
from reclo_site.cloud import storage

from . import vhds

pytestmark = pytest.mark.django_db


@pytest.fixture
def chain(disk):
    return [disk.full(), disk.incremental(2), disk.incremental(3)]


def test_a_sound_restore_point_passes_and_is_stamped(chain):
    assert services.backup_scrub(backup_id=chain[1].pk) == ""
    chain[1].refresh_from_db()
    assert chain[1].status == "verified" and chain[1].scrubbed_at is not None


def test_a_deleted_object_breaks_its_chain_and_the_owner_is_told(chain, mailoutbox, user):
    storage.delete_object(chain[1].key)
    gone = "The verified version of the object is not in storage."
    assert services.backup_scrub(backup_id=chain[1].pk) == gone
    statuses = {b.pk: (b.status, b.failure) for b in Backup.objects.all()}
    assert statuses[chain[0].pk] == ("verified", "")
    assert statuses[chain[1].pk] == ("failed", f"Scrub: {gone}")
    assert statuses[chain[2].pk][0] == "failed" and str(chain[1].pk) in statuses[chain[2].pk][1]
    (mail,) = mailoutbox
    assert mail.to == [user.email]
    assert "fileserver" in mail.subject and "1 newer restore point" in mail.body
    assert f"/servers/{chain[0].server_id}/" in mail.body


def test_an_object_written_over_after_verification_does_not_touch_the_restore_point(chain):
    data, _ = vhds.full(vhds.raw_disk(9))  # a valid VHD, but not the one that was verified
    storage.put_object(chain[0].key, data)
    # The scrub reads the verified version, which the new one did not change.
    assert services.backup_scrub(backup_id=chain[0].pk) == ""
    assert set(Backup.objects.values_list("status", flat=True)) == {"verified"}


def test_an_altered_object_pinned_by_its_etag_only_is_found(chain):
    # A restore point verified on an unversioned bucket is pinned by its ETag.
    Backup.objects.filter(pk=chain[0].pk).update(version_id="")
    data, _ = vhds.full(vhds.raw_disk(9))
    storage.put_object(chain[0].key, data)
    problem = services.backup_scrub(backup_id=chain[0].pk)
    assert problem == "The object in storage is not the version that was verified (it was replaced since)."
    assert set(Backup.objects.values_list("status", flat=True)) == {"failed"}


def test_a_flipped_byte_is_found(chain):
    Backup.objects.filter(pk=chain[2].pk).update(version_id="")
    with storage.ObjectReader(chain[2].key) as reader:
        data = bytearray(reader.read())
    data[len(data) // 2] ^= 1
    storage.put_object(chain[2].key, bytes(data))
    assert services.backup_scrub(backup_id=chain[2].pk)
    assert Backup.objects.get(pk=chain[2].pk).status == "failed"
    assert Backup.objects.get(pk=chain[1].pk).status == "verified"


def test_a_restore_point_verified_before_versions_were_recorded_is_pinned_and_locked(chain):
    Backup.objects.filter(pk=chain[0].pk).update(version_id="", etag="")
    assert services.backup_scrub(backup_id=chain[0].pk) == ""
    point = Backup.objects.get(pk=chain[0].pk)
    stored = storage.head_object(point.key)
    assert (point.version_id, point.etag) == (stored["version_id"], stored["etag"])
    assert point.locked_until and stored["lock_mode"] == "COMPLIANCE"


def test_the_weekly_job_reads_the_least_recently_checked_first(chain, settings):
    settings.RECLO_SCRUB_SAMPLE = 2
    Backup.objects.filter(pk=chain[0].pk).update(scrubbed_at=timezone.now() - timedelta(days=1))
    assert set(services.backups_scrub_pick()) == {chain[1].pk, chain[2].pk}
    assert tasks.backups_scrub() == 2  # eager: each one is scrubbed inline
    assert Backup.objects.filter(scrubbed_at__gt=timezone.now() - timedelta(minutes=1)).count() == 2
