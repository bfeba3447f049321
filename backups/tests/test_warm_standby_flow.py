"""A verified upload of a warm-standby server is staged by the worker (eager Celery here), end to end.

moto ignores StartSnapshot's ParentSnapshotId; `recovery.tests.moto_ebs_parents`
(a documented extension) gives it AWS's parent semantics, so the staged
incremental reads back as its disk.
"""

import pytest

from backups.models import Backup, Server
from reclo_site.cloud import imaging
from recovery.models import StagedSnapshot
from recovery.tests.moto_ebs_parents import ebs_parents

from . import vhds

pytestmark = pytest.mark.django_db


def read_back(snapshot_id: str, size: int) -> bytes:
    disk = bytearray(size)
    for index, data in imaging.snapshot_blocks(snapshot_id):
        disk[index * imaging.EBS_BLOCK_SIZE : (index + 1) * imaging.EBS_BLOCK_SIZE] = data
    return bytes(disk[:size])


def test_each_verified_upload_of_a_warm_standby_server_is_staged(user, upload):
    Server.objects.create(user=user, name="fileserver", warm_standby=True)
    raw = vhds.raw_disk(3)
    data, info = vhds.full(raw)
    new = vhds.changed(raw, 4)
    with ebs_parents() as parents:
        upload(data)
        full = Backup.objects.get()
        assert full.status == "verified"
        staged_full = StagedSnapshot.objects.get(backup=full)
        assert staged_full.state == "completed"
        child_data, _ = vhds.incremental(raw, new, info)
        upload(child_data, kind="incremental", parent_id=full.pk, file_name="sda-2.vhd.zst")
        child = Backup.objects.get(kind="incremental")
        assert child.status == "verified"
        staged_child = StagedSnapshot.objects.get(backup=child)
        assert staged_child.state == "completed"
        assert parents == {staged_child.snapshot_id: staged_full.snapshot_id}
        assert read_back(staged_full.snapshot_id, len(raw)) == bytes(raw)
        assert read_back(staged_child.snapshot_id, len(new)) == bytes(new)


def test_nothing_is_staged_without_warm_standby(user, upload):
    data, _ = vhds.full(vhds.raw_disk(3))
    upload(data)
    assert Backup.objects.get().status == "verified"
    assert not StagedSnapshot.objects.exists()
