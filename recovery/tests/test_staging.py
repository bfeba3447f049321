"""Warm standby against moto: each verified restore point staged as an EBS snapshot, and kept in step.

moto ignores StartSnapshot's `ParentSnapshotId`; `moto_ebs_parents` (a
documented extension, see there) gives it the parent semantics AWS
documents, so a staged chain is read back through ListSnapshotBlocks and
GetSnapshotBlock and compared with each restore point's disk. What we send
to AWS for the parent is checked with botocore's Stubber.
"""

import hashlib
import threading
import uuid
from datetime import timedelta

import pytest
from botocore.stub import ANY, Stubber
from django.utils import timezone
from reclo_agent.vhd.format import DEFAULT_BLOCK_SIZE, SECTOR

from backups import services as backup_services
from backups.models import Backup
from backups.naming import backup_key
from backups.services import retention
from reclo_site import cloud
from reclo_site.cloud import imaging, storage
from reclo_site.cloud.clients import client
from recovery import services, snapshot_write, staging
from recovery.models import RecoveryStep, StagedSnapshot

from .factories import MiB, change_pages, make_disk, store_full, store_incremental
from .moto_ebs_parents import ebs_parents as moto_ebs_parents

pytestmark = pytest.mark.django_db

EBS = imaging.EBS_BLOCK_SIZE
SIZE = 8 * MiB


@pytest.fixture
def ebs_parents(aws):
    with moto_ebs_parents() as parents:
        yield parents


@pytest.fixture
def standby(server):
    server.warm_standby = True
    server.save(update_fields=["warm_standby"])
    return server


def zero_a_piece(disk: bytearray) -> tuple[bytearray, dict]:
    """A copy with one whole EBS block of data turned to zeros (a deleted file's blocks wiped)."""
    new = bytearray(disk)
    at = next(n * EBS for n in range(len(disk) // EBS) if any(disk[n * EBS : (n + 1) * EBS]))
    new[at : at + EBS] = bytes(EBS)
    index, within = divmod(at, DEFAULT_BLOCK_SIZE)
    return new, {index: [(within // SECTOR, EBS // SECTOR)]}


def build_chain(user, server, *, incrementals: int = 3, seed: int = 5, zero_last: bool = True):
    """A verified chain in the database and moto's S3: (backups, each one's disk, each incremental's runs)."""
    disk = make_disk(SIZE, seed)
    disks, runs_of = [bytes(disk)], [None]
    stored = [store_full(disk)]
    for n in range(incrementals):
        if zero_last and n == incrementals - 1:
            disk, runs = zero_a_piece(disk)
        else:
            disk, runs = change_pages(disk, seed * 100 + n, count=4)
        stored.append(store_incremental(disk, runs, stored[-1].info, f"restore-{n}.vhd"))
        disks.append(bytes(disk))
        runs_of.append(runs)
    backups: list[Backup] = []
    now = timezone.now()
    for n, item in enumerate(stored):
        backup_id = uuid.uuid4()
        key = backup_key(user_id=user.pk, server=server.name, disk="sda", backup_id=backup_id)
        stored_as = storage.put_object(key, item.data)
        backups.append(
            Backup.objects.create(
                id=backup_id, user=user, server=server, disk="sda",
                kind=Backup.Kind.FULL if n == 0 else Backup.Kind.INCREMENTAL, parent=backups[-1] if n else None,
                file_name=f"restore-{n}.vhd", key=key, virtual_size=SIZE, file_size=len(item.data),
                sha256=hashlib.sha256(item.data).hexdigest(), vhd_unique_id=item.info.unique_id,
                status=Backup.Status.VERIFIED, date_created=now - timedelta(hours=len(stored) - n),
                completed_at=now, verified_at=now, version_id=stored_as["version_id"], etag=stored_as["etag"],
            )
        )  # fmt: skip
    return backups, disks, runs_of


def read_back(snapshot_id: str, size: int = SIZE) -> bytes:
    disk = bytearray(size)
    for index, data in imaging.snapshot_blocks(snapshot_id):
        disk[index * EBS : (index + 1) * EBS] = data
    return bytes(disk[:size])


def touched_pieces(runs: dict) -> set[int]:
    """The EBS blocks an incremental's changed sectors fall in."""
    per = DEFAULT_BLOCK_SIZE // EBS
    found = set()
    for index, sector_runs in runs.items():
        for first, count in sector_runs:
            for sector in range(first, first + count):
                found.add(index * per + sector * SECTOR // EBS)
    return found


def snapshot_exists(snapshot_id: str) -> bool:
    try:
        imaging.snapshot_state(snapshot_id)
    except cloud.ObjectNotFound:
        return False
    return True


def tagged(backup) -> list:
    return imaging.find_snapshots({staging.TAG: str(backup.pk)})


class Puts:
    """Every PutSnapshotBlock sent, as (snapshot id, block index); `fail_after` makes the later ones raise."""

    def __init__(self, monkeypatch, fail_after: int | None = None, error: type[BaseException] = RuntimeError):
        self.sent: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        real = imaging.put_snapshot_block

        def put(snapshot_id, index, data):
            with self._lock:
                if fail_after is not None and len(self.sent) >= fail_after:
                    raise error("killed mid-staging")
                self.sent.append((snapshot_id, index))
            real(snapshot_id, index, data)

        monkeypatch.setattr(imaging, "put_snapshot_block", put)

    def of(self, snapshot_id: str) -> set[int]:
        return {index for sid, index in self.sent if sid == snapshot_id}


# --- Staging --------------------------------------------------------------------------------


def test_each_staged_restore_point_reads_back_as_its_disk(ebs_parents, user, standby, monkeypatch):
    backups, disks, runs_of = build_chain(user, standby, incrementals=3)
    puts = Puts(monkeypatch)
    outcome = staging.stage_server(standby.pk)
    assert (outcome.staged, outcome.again) == (4, False)
    rows = [StagedSnapshot.objects.get(backup=b) for b in backups]
    assert {row.state for row in rows} == {"completed"}
    # Each incremental is an incremental snapshot of its parent's.
    assert [row.parent_snapshot_id for row in rows] == ["", *(row.snapshot_id for row in rows[:-1])]
    assert ebs_parents == {rows[n].snapshot_id: rows[n - 1].snapshot_id for n in range(1, 4)}
    for row, disk in zip(rows, disks, strict=True):
        assert read_back(row.snapshot_id) == disk
    # The full wrote its non-zero blocks; each incremental only the EBS blocks its changed pages touch,
    # the last one's zeros included (they hide its parent's data).
    full = disks[0]
    assert puts.of(rows[0].snapshot_id) == {n for n in range(SIZE // EBS) if any(full[n * EBS : (n + 1) * EBS])}
    for row, runs in zip(rows[1:], runs_of[1:], strict=True):
        assert puts.of(row.snapshot_id) == touched_pieces(runs)
        assert row.changed_blocks == len(touched_pieces(runs))
    assert all(len(puts.of(row.snapshot_id)) <= 4 for row in rows[1:])  # 4 pages changed, 16 blocks on the disk
    # Staging again writes nothing.
    before = len(puts.sent)
    assert staging.stage_server(standby.pk).staged == 0
    assert len(puts.sent) == before


def test_the_incrementals_snapshot_is_started_on_its_parents_as_aws_expects_it(aws, user, standby):
    """Stubber: moto ignores ParentSnapshotId, so what StartSnapshot is sent is checked here.

    The stubbed StartSnapshot answers with a real (moto) pending snapshot;
    the first PutSnapshotBlock then fails: the snapshot's id was recorded
    before any block was written.
    """
    backups, _disks, _runs = build_chain(user, standby, incrementals=1, zero_last=False)
    staging.stage(backups[0])  # the full, on moto
    parent = StagedSnapshot.objects.get(backup=backups[0]).snapshot_id
    pending = imaging.start_snapshot(volume_size_gib=1, client_token="t", tags={}, description="stand-in")
    ebs = client("ebs")
    with Stubber(ebs) as stub:
        stub.add_response(
            "start_snapshot",
            {"SnapshotId": pending, "Status": "pending"},
            {
                "VolumeSize": 1,
                "ParentSnapshotId": parent,
                "ClientToken": f"reclo-staged-{backups[1].pk}-0",
                "Timeout": 24 * 60,
                "Encrypted": True,
                "Tags": ANY,
                "Description": ANY,
            },
        )
        stub.add_client_error("put_snapshot_block", "InternalServerException", http_status_code=500)
        with pytest.raises(cloud.CloudError):
            staging.stage(backups[1])
    row = StagedSnapshot.objects.get(backup=backups[1])
    assert (row.snapshot_id, row.parent_snapshot_id, row.state) == (pending, parent, "writing")
    assert row.lease_until is None  # let go: the next run carries on in the same snapshot


def test_a_worker_killed_mid_staging_is_resumed_in_the_same_snapshot(ebs_parents, user, standby, monkeypatch):
    """A SIGKILL leaves the row as it was at the last checkpoint, its lease held: simulated as that state.

    (A BaseException out of a block write stops the writer where a kill
    would; the lease it released on the way out is put back, as a killed
    worker leaves it.) The next worker waits for the lease, then writes on
    from the checkpoints into the same snapshot: no second one is made.
    """
    monkeypatch.setattr(snapshot_write, "CHECKPOINT_BLOCKS", 1)
    monkeypatch.setattr(snapshot_write, "PUTS", 2)
    backups, disks, _runs = build_chain(user, standby, incrementals=0)
    full = backups[0]
    total = sum(1 for n in range(SIZE // EBS) if any(disks[0][n * EBS : (n + 1) * EBS]))
    with monkeypatch.context() as m:
        Puts(m, fail_after=total // 2, error=KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            staging.stage(full)
    row = StagedSnapshot.objects.get(backup=full)
    assert row.state == "writing" and row.snapshot_id and 0 < row.changed_blocks < total
    first_snapshot = row.snapshot_id
    StagedSnapshot.objects.filter(pk=row.pk).update(lease_until=timezone.now() + staging.lease())
    with pytest.raises(staging.Busy):
        staging.stage(full)  # the dead worker's lease still holds
    StagedSnapshot.objects.filter(pk=row.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    puts = Puts(monkeypatch)
    staging.stage(full)
    row.refresh_from_db()
    assert (row.state, row.snapshot_id) == ("completed", first_snapshot)
    assert [s["snapshot_id"] for s in tagged(full)] == [first_snapshot]
    assert len(puts.sent) < total  # carried on from the checkpoints
    assert read_back(first_snapshot) == disks[0]


def test_a_worker_killed_before_recording_the_snapshot_id_finds_it_by_its_tag(ebs_parents, user, standby, monkeypatch):
    backups, disks, _runs = build_chain(user, standby, incrementals=0)
    real = imaging.start_snapshot

    def start_then_die(**kwargs):
        real(**kwargs)
        raise KeyboardInterrupt("killed after StartSnapshot")

    with monkeypatch.context() as m:
        m.setattr(imaging, "start_snapshot", start_then_die)
        with pytest.raises(KeyboardInterrupt):
            staging.stage(backups[0])
    assert StagedSnapshot.objects.get(backup=backups[0]).snapshot_id == ""
    (made,) = tagged(backups[0])
    row = staging.stage(backups[0])
    assert row.snapshot_id == made["snapshot_id"]
    assert len(tagged(backups[0])) == 1
    assert read_back(row.snapshot_id) == disks[0]


def test_a_snapshot_aws_gave_up_on_is_replaced_cleanly(ebs_parents, user, standby, monkeypatch):
    backups, disks, _runs = build_chain(user, standby, incrementals=0)
    real_state = imaging.snapshot_state
    with monkeypatch.context() as m:
        m.setattr(imaging, "snapshot_state", lambda sid: ("error", "the snapshot timed out"))
        staging.stage(backups[0])
    row = StagedSnapshot.objects.get(backup=backups[0])
    assert (row.state, row.error) == ("failed", "The snapshot failed before it was written: the snapshot timed out.")
    failed = row.snapshot_id
    assert imaging.snapshot_state is real_state
    row = staging.stage(backups[0])
    assert row.state == "completed" and row.snapshot_id != failed and row.restarts == 1
    assert not snapshot_exists(failed)
    assert read_back(row.snapshot_id) == disks[0]


def test_nothing_is_staged_with_warm_standby_off_or_for_a_windows_server(ebs_parents, user, server, monkeypatch):
    build_chain(user, server, incrementals=1)
    assert staging.stage_server(server.pk).staged == 0
    server.warm_standby = True
    server.preflight = {"os": "windows", "boot_mode": "uefi"}
    server.save()
    assert staging.stage_server(server.pk).staged == 0  # VM Import takes the merged VHD, not a snapshot
    assert not StagedSnapshot.objects.exists()


# --- Failover of a staged point -------------------------------------------------------------


def test_a_failover_of_a_staged_point_writes_no_blocks(ebs_parents, user, standby, drive, monkeypatch):
    backups, disks, _runs = build_chain(user, standby, incrementals=2)
    staging.stage_server(standby.pk)
    staged = StagedSnapshot.objects.get(backup=backups[-1]).snapshot_id
    puts = Puts(monkeypatch)
    started, registered = [], []
    monkeypatch.setattr(imaging, "start_snapshot", lambda **kw: started.append(kw))
    events = client("ec2").meta.events
    spy = lambda params, **_: registered.append(dict(params))  # noqa: E731 - moto ignores the mapping: check what is sent
    events.register("provide-client-params.ec2.RegisterImage", spy)
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk)
    try:
        done = drive(recovery.pk)
    finally:
        events.unregister("provide-client-params.ec2.RegisterImage", spy)
    assert done.status == "ready"
    assert (puts.sent, started) == ([], [])
    steps = {s.name: s for s in RecoveryStep.objects.filter(recovery=recovery)}
    assert steps["consolidating"].status == "skipped"
    assert steps["importing"].outputs["snapshot_id"] == staged
    assert steps["importing"].outputs["staged"] is True
    (params,) = registered
    assert params["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == staged
    # Terminating the recovered server keeps the staged snapshot (it is the restore point's).
    instance = done.instance
    services.instance_terminate(instance=instance)
    services.instance_release(instance_pk=instance.pk)
    assert snapshot_exists(staged)
    assert read_back(staged) == disks[-1]


def test_a_failover_of_an_unstaged_point_still_writes_its_disk(ebs_parents, user, standby, drive):
    backups, disks, _runs = build_chain(user, standby, incrementals=1)
    staging.stage(backups[0])  # only the full
    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk)
    drive(recovery.pk, until="launching")
    out = RecoveryStep.objects.get(recovery=recovery, name="importing").outputs
    assert "staged" not in out
    assert read_back(out["snapshot_id"]) == disks[-1]


# --- In step with the restore points --------------------------------------------------------


def test_a_deleted_restore_points_snapshot_goes_and_the_others_stay(ebs_parents, user, standby):
    backups, disks, _runs = build_chain(user, standby, incrementals=2, zero_last=False)
    staging.stage_server(standby.pk)
    rows = {b.pk: StagedSnapshot.objects.get(backup=b).snapshot_id for b in backups}
    backup_services.backup_delete(user=user, backup_id=backups[-1].pk)
    assert staging.sweep()
    assert not snapshot_exists(rows[backups[-1].pk])
    assert not StagedSnapshot.objects.filter(snapshot_id=rows[backups[-1].pk]).exists()
    for backup, disk in zip(backups[:-1], disks[:-1], strict=True):
        assert read_back(rows[backup.pk]) == disk


def test_retention_drops_the_fulls_snapshot_and_the_childs_stays_whole(ebs_parents, user, standby, settings):
    """AWS keeps in a child snapshot what it needs when its parent is deleted: the child is not kept back."""
    backups, disks, _runs = build_chain(user, standby, incrementals=2, zero_last=False)
    staging.stage_server(standby.pk)
    rows = [StagedSnapshot.objects.get(backup=b).snapshot_id for b in backups]
    settings.RECLO_RETENTION_KEEP = 2
    assert retention.retention_apply(server_id=standby.pk, disk="sda") == "merged"
    assert not Backup.objects.filter(pk=backups[0].pk).exists()
    assert staging.sweep()
    assert not snapshot_exists(rows[0])
    # The first incremental is now the chain's full; its staged snapshot still reads as its disk.
    assert Backup.objects.get(pk=backups[1].pk).kind == "full"
    assert StagedSnapshot.objects.get(backup=backups[1]).snapshot_id == rows[1]
    assert read_back(rows[1]) == disks[1]
    assert read_back(rows[2]) == disks[2]
    assert staging.stage_server(standby.pk).staged == 0  # nothing to restage


def test_a_restore_point_hidden_under_its_lock_loses_its_snapshot_until_brought_back(ebs_parents, user, standby):
    backups, disks, _runs = build_chain(user, standby, incrementals=1, zero_last=False)
    staging.stage_server(standby.pk)
    top = StagedSnapshot.objects.get(backup=backups[-1]).snapshot_id
    Backup.objects.filter(pk=backups[-1].pk).update(locked_until=timezone.now() + timedelta(days=3))
    done = backup_services.backup_delete(user=user, backup_id=backups[-1].pk)
    assert done.scheduled == [backups[-1].pk]
    staging.sweep()
    assert not snapshot_exists(top)
    assert staging.servers_to_stage() == []
    backup_services.backup_undelete(user=user, backup_id=backups[-1].pk)
    assert staging.servers_to_stage() == [standby.pk]
    assert staging.stage_server(standby.pk).staged == 1
    again = StagedSnapshot.objects.get(backup=backups[-1])
    assert again.snapshot_id != top
    assert again.parent_snapshot_id == StagedSnapshot.objects.get(backup=backups[0]).snapshot_id
    assert read_back(again.snapshot_id) == disks[-1]


def test_turning_warm_standby_off_deletes_the_staged_snapshots(
    ebs_parents, user, standby, django_capture_on_commit_callbacks
):
    backups, _disks, _runs = build_chain(user, standby, incrementals=1, zero_last=False)
    staging.stage_server(standby.pk)
    snapshots = list(StagedSnapshot.objects.values_list("snapshot_id", flat=True))
    assert len(snapshots) == 2
    sent = []
    from recovery import standby_tasks as tasks

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tasks.standby_stage, "delay", lambda server_id: sent.append(server_id))
        with django_capture_on_commit_callbacks(execute=True):
            backup_services.server_update(user=user, server=standby, warm_standby=False)
    assert sent == [standby.pk]
    assert staging.stage_server(standby.pk) == staging.Outcome(staged=0, again=False)
    assert not StagedSnapshot.objects.exists()
    assert not any(snapshot_exists(s) for s in snapshots)


def test_staged_snapshot_of_another_server_or_tenant_is_never_used(ebs_parents, user, other_user, standby):
    backups, _disks, _runs = build_chain(user, standby, incrementals=0)
    staging.stage(backups[0])
    assert staging.staged_snapshot(backups[0])
    standby.warm_standby = False
    standby.save()
    assert staging.staged_snapshot(backups[0]) == ""  # off: a failover writes its disk as before
    assert staging.staged_snapshot(None) == ""


def test_the_monthly_cost_counts_each_disk_and_the_incrementals_changes(aws, user, server):
    backups, _disks, _runs = build_chain(user, server, incrementals=2, zero_last=False)
    cost = staging.monthly_cost(server)
    changes = 2 * sum(b.file_size for b in backups[1:])
    assert cost.stored_bytes == SIZE + changes
    assert cost.monthly_usd == staging.sizes.snapshot_monthly(SIZE + changes)
    assert staging.sizes.snapshot_monthly(100 * 1000**3) == 5  # $0.05 per GB-month


def test_the_sweep_waits_for_a_worker_still_staging_the_point(ebs_parents, user, standby):
    backups, _disks, _runs = build_chain(user, standby, incrementals=0)
    row = staging.stage(backups[0])
    StagedSnapshot.objects.filter(pk=row.pk).update(lease_until=timezone.now() + staging.lease())
    Backup.objects.filter(pk=backups[0].pk).update(deleted_at=timezone.now())
    assert staging.sweep() is False
    assert snapshot_exists(row.snapshot_id)
    StagedSnapshot.objects.filter(pk=row.pk).update(lease_until=None)
    assert staging.sweep() is True
    assert not snapshot_exists(row.snapshot_id)


def test_a_point_aws_keeps_failing_is_given_up_after_a_few_new_snapshots(ebs_parents, user, standby, monkeypatch):
    backups, disks, _runs = build_chain(user, standby, incrementals=1, zero_last=False)
    real_state = imaging.snapshot_state
    full_snapshots: set = set()

    def state(snapshot_id):  # AWS fails every snapshot of the full
        if snapshot_id in full_snapshots or not StagedSnapshot.objects.filter(backup=backups[1]).exists():
            full_snapshots.add(snapshot_id)
            return "error", "broken"
        return real_state(snapshot_id)

    monkeypatch.setattr(imaging, "snapshot_state", state)
    outcomes = [staging.stage_server(standby.pk) for _ in range(staging.MAX_RESTARTS)]
    assert [o.again for o in outcomes] == [True] * staging.MAX_RESTARTS
    assert not StagedSnapshot.objects.filter(backup=backups[1]).exists()  # its child waits meanwhile
    assert staging.stage_server(standby.pk) == staging.Outcome(staged=1, again=False)
    row = StagedSnapshot.objects.get(backup=backups[0])
    assert (row.state, row.restarts) == ("failed", staging.MAX_RESTARTS)
    child = StagedSnapshot.objects.get(backup=backups[1])
    assert (child.state, child.parent_snapshot_id) == ("completed", "")  # staged whole
    assert read_back(child.snapshot_id) == disks[1]
    assert staging.stage_server(standby.pk) == staging.Outcome(staged=0, again=False)
    # Each failed snapshot of the full was deleted when it was given up for a new one.
    assert len(imaging.find_snapshots({staging.TAG: str(backups[0].pk)})) == 1
