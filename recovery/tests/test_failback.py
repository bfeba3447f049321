"""Bringing a recovered server home: its disk in the cloud made a restore point, written back by the agent.

moto runs no guest and keeps its EC2 snapshots of volumes out of its EBS
direct backend: `moto_cloud_disk.CloudDisk` (see its docstring for the
AWS behaviour it stands in for) gives the recovered server a disk that
holds the failover's snapshot, lets a test write "the office's work in the
cloud" into it, and answers ListChangedBlocks as AWS documents it.
"""

import random

import pytest
from reclo_agent import restore as agent_restore
from reclo_agent.errors import UsageError
from reclo_agent.progress import Reporter

from accounts.models import AuditEvent
from backups.models import Backup
from recovery import engine, failback_services, services
from recovery.failback import FAILBACK
from recovery.models import Failback, FailbackStep, Instance

from .factories import MiB, backup_chain
from .moto_cloud_disk import EBS_BLOCK, CloudDisk

pytestmark = pytest.mark.django_db

LIST = "/api/v1/backups"


class PortalThroughApi:
    """The agent's portal client, answered by the real API view (in-process, moto behind it)."""

    def __init__(self, api):
        self.api = api

    def download(self, backup_id):
        response = self.api.post(f"{LIST}/{backup_id}/download")
        assert response.status_code == 200, response.json()
        return response.json()


def drive_failback(failback_id, *, max_goes: int = 50, until: str | None = None) -> Failback:
    """Run a failback's steps in this process, one go at a time (on_commit never fires inside a test's transaction)."""
    for _ in range(max_goes):
        failback = Failback.objects.get(pk=failback_id)
        if failback.status in Failback.FINISHED or (until and failback.status == until):
            return failback
        Failback.objects.filter(pk=failback_id).update(lease_until=None, lease_token=None)
        engine.run_step(failback_id, FAILBACK.step_for_status(failback.status), pipeline=FAILBACK)
    raise AssertionError(f"failback did not finish in {max_goes} goes")


@pytest.fixture
def cloud_disk(aws):
    with CloudDisk() as disk:
        yield disk


@pytest.fixture
def failed_over(cloud_disk, user, server, drive):
    """A chain of 12 MiB, failed over by EBS direct to a running server; (recovery, instance, disk at failover)."""
    backups, top = backup_chain(user=user, server=server, size=12 * MiB, incrementals=1)
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="ebs_direct")
    recovery = drive(recovery.pk)
    assert recovery.status == "ready", recovery.error
    instance = Instance.objects.get(recovery=recovery)
    assert cloud_disk.read(instance.instance_id, len(top)) == top  # the server boots the restore point's disk
    return recovery, instance, top


def work_in_the_cloud(cloud_disk, instance, disk: bytes, seed: int = 7) -> bytes:
    """The office writes to its server in the cloud: a few scattered changes, one across two EBS blocks."""
    rnd = random.Random(seed)
    new = bytearray(disk)
    for offset, length in [(4096, 4096), (3 * EBS_BLOCK - 1000, 3000), (9 * MiB + 512, 70000), (len(disk) - 512, 512)]:
        data = rnd.randbytes(length)
        cloud_disk.write(instance.instance_id, offset, data)
        new[offset : offset + length] = data
    return bytes(new)


def restore_to(api, backup_id, path, **kwargs):
    return agent_restore.restore(PortalThroughApi(api), str(backup_id), str(path), Reporter(quiet=True), **kwargs)


def test_failback_round_trips_the_clouds_changes_bit_for_bit_full_and_changed_since(
    failed_over, cloud_disk, user, api, tmp_path
):
    recovery, instance, top = failed_over
    worked = work_in_the_cloud(cloud_disk, instance, top)
    failback = failback_services.failback_start(user=user, recovery=recovery)
    failback = drive_failback(failback.pk)
    assert failback.status == "ready", failback.error
    backup = Backup.objects.get(pk=failback.backup_ref)
    assert backup.status == Backup.Status.VERIFIED
    assert backup.kind == Backup.Kind.INCREMENTAL and backup.parent_id == recovery.backup_ref

    full = tmp_path / "full.img"
    restore_to(api, backup.pk, full)
    assert full.read_bytes() == worked

    repaired = tmp_path / "repaired.img"
    restore_to(api, recovery.backup_ref, repaired)
    assert repaired.read_bytes() == top
    result = restore_to(api, backup.pk, repaired, force=True, changed_since=str(recovery.backup_ref))
    assert repaired.read_bytes() == worked
    assert result.layers == 1
