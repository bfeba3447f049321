"""Bringing a recovered server home: its disk in the cloud made a restore point, written back by the agent.

moto runs no guest and keeps its EC2 snapshots of volumes out of its EBS
direct backend: `moto_cloud_disk.CloudDisk` (see its docstring for the
AWS behaviour it stands in for) gives the recovered server a disk that
holds the failover's snapshot, lets a test write "the office's work in the
cloud" into it, and answers ListChangedBlocks as AWS documents it.
"""

import random
import uuid
from datetime import timedelta
from unittest import mock

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from reclo_agent import restore as agent_restore
from reclo_agent.errors import UsageError
from reclo_agent.progress import Reporter
from rest_framework.test import APIClient

from accounts.activity import event_sentence
from accounts.models import AuditEvent
from backups.models import Backup
from reclo_site import cloud
from reclo_site.cloud import imaging
from reclo_site.errors import Code, ServiceError
from recovery import engine, failback_services, services
from recovery.failback import FAILBACK
from recovery.models import Failback, FailbackStep, Instance

from .factories import MiB, backup_chain, recovered_instance, saved
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


def outputs(failback, step):
    return FailbackStep.objects.get(failback=failback, name=step).outputs


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
    # Only the failback's own object was read, and only its blocks written.
    assert result.layers == 1
    assert result.written == 3 * 2 * MiB  # the three 2 MiB VHD blocks holding the changes, of six
    # The five EBS blocks the office changed (one write spans two), nothing else.
    assert outputs(failback, "copying")["blocks"] == 5


def test_the_restore_point_is_verified_like_any_upload_and_the_owner_told(failed_over, cloud_disk, user, mailoutbox):
    recovery, instance, top = failed_over
    work_in_the_cloud(cloud_disk, instance, top)
    failback = drive_failback(failback_services.failback_start(user=user, recovery=recovery).pk)
    backup = Backup.objects.get(pk=failback.backup_ref)
    assert backup.verified_at and backup.vhd_unique_id and backup.version_id  # read back and pinned by the verifier
    assert backup.locked_until is not None  # locked like every verified restore point
    assert backup.server_id == recovery.server_id and backup.disk == recovery.disk
    assert backup.date_created == failback.snapshot_at
    # The pipeline's on_exit hook runs after commit (never inside a test's transaction): run it, then again
    # (a crash, a redelivery), as the engine may.
    assert imaging.snapshot_state(failback.snapshot_id)[0] == "completed"
    assert failback_services.failback_finished(failback.pk, failback.status) is True
    assert failback_services.failback_finished(failback.pk, failback.status) is False
    # The snapshot of the cloud disk is let go: the verified restore point holds it.
    with pytest.raises(cloud.ObjectNotFound):
        imaging.snapshot_state(failback.snapshot_id)
    kinds = list(AuditEvent.objects.filter(user=user).values_list("kind", flat=True))
    assert {"failback.started", "failback.ready", "backup.verified"} <= set(kinds)
    ready = AuditEvent.objects.get(user=user, kind="failback.ready")
    assert event_sentence(ready) == "front-desk brought home: its work in the cloud is a verified restore point"
    assert ready.details["backup_id"] == str(failback.backup_ref)
    mails = [m for m in mailoutbox if "saved as a restore point" in m.subject]
    assert len(mails) == 1 and str(failback.backup_ref) in mails[0].body and mails[0].to == [user.email]


def test_no_change_in_the_cloud_makes_an_empty_incremental_and_writes_nothing(failed_over, user, api, tmp_path):
    recovery, _instance, top = failed_over
    failback = drive_failback(failback_services.failback_start(user=user, recovery=recovery).pk)
    assert failback.status == "ready", failback.error
    assert outputs(failback, "copying")["blocks"] == 0
    target = tmp_path / "disk.img"
    restore_to(api, recovery.backup_ref, target)
    result = restore_to(api, failback.backup_ref, target, force=True, changed_since=str(recovery.backup_ref))
    assert result.written == 0 and target.read_bytes() == top


def test_writes_past_the_disks_end_on_the_whole_gib_volume_are_left_out(failed_over, cloud_disk, user, api, tmp_path):
    recovery, instance, top = failed_over
    worked = work_in_the_cloud(cloud_disk, instance, top)
    cloud_disk.write(instance.instance_id, len(top) + 3 * EBS_BLOCK, b"past the end" * 100)
    failback = drive_failback(failback_services.failback_start(user=user, recovery=recovery).pk)
    assert failback.status == "ready", failback.error
    assert outputs(failback, "copying")["beyond_disk"] == 1
    target = tmp_path / "disk.img"
    restore_to(api, failback.backup_ref, target)
    assert target.read_bytes() == worked


def test_a_full_restore_point_when_the_failovers_point_has_a_newer_backup_on_it(
    failed_over, cloud_disk, user, api, tmp_path
):
    recovery, instance, top = failed_over
    # The office made one more backup before it failed over from the older point: the failback cannot fork it.
    backups, _ = backup_chain(user=user, server=recovery.server, size=12 * MiB, incrementals=0, seed=5, disk_name="sdz")
    newer = backups[0]
    Backup.objects.filter(pk=newer.pk).update(disk=recovery.disk, kind="incremental", parent=recovery.backup_ref)
    worked = work_in_the_cloud(cloud_disk, instance, top, seed=11)
    failback = drive_failback(failback_services.failback_start(user=user, recovery=recovery).pk)
    assert failback.status == "ready", failback.error
    assert failback.kind == "full" and failback.parent_id is None
    backup = Backup.objects.get(pk=failback.backup_ref)
    assert backup.kind == "full" and backup.parent_id is None and backup.status == "verified"
    target = tmp_path / "disk.img"
    restore_to(api, backup.pk, target)
    assert target.read_bytes() == worked


def test_a_full_restore_point_after_a_vm_import_failover(failed_over, cloud_disk, user):
    recovery, instance, top = failed_over
    # VM Import installs drivers into the disk it imports: its snapshot is not the restore point's disk.
    type(recovery).objects.filter(pk=recovery.pk).update(import_method="vm_import")
    failback = drive_failback(failback_services.failback_start(user=user, recovery=recovery).pk)
    assert failback.status == "ready", failback.error
    assert failback.kind == "full"
    assert "VM Import" in outputs(failback, "snapshotting")["why"]


class Killed(BaseException):
    """A worker killed mid-step: nothing after this point ran, not even except clauses."""


def test_a_worker_killed_mid_copy_resumes_from_the_same_snapshot(
    failed_over, cloud_disk, user, api, tmp_path, monkeypatch, django_capture_on_commit_callbacks
):
    from reclo_site.cloud import volumes

    recovery, instance, top = failed_over
    worked = work_in_the_cloud(cloud_disk, instance, top)
    failback = failback_services.failback_start(user=user, recovery=recovery)
    real = volumes._get_block
    reads = []

    def die_on_the_third(snapshot_id, index, token):
        reads.append(index)
        if len(reads) == 3:
            raise Killed("worker killed mid-copy")
        return real(snapshot_id, index, token)

    monkeypatch.setattr(volumes, "_get_block", die_on_the_third)
    with pytest.raises(Killed):
        drive_failback(failback.pk)
    assert Failback.objects.get(pk=failback.pk).status == "copying"
    assert not Backup.objects.filter(pk=failback.backup_ref).exists()
    # The reconciler takes the step over once the dead worker's lease ran out.
    Failback.objects.filter(pk=failback.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    with mock.patch.object(engine, "enqueue") as sent, django_capture_on_commit_callbacks(execute=True):
        assert engine.reconcile(pipeline=FAILBACK) == 1
    assert sent.call_args.args[:2] == (failback.pk, "copying")
    failback = drive_failback(failback.pk)
    assert failback.status == "ready", failback.error
    assert len(cloud_disk.snapshots_of_volumes) == 1  # no second snapshot
    target = tmp_path / "disk.img"
    restore_to(api, failback.backup_ref, target)
    assert target.read_bytes() == worked


def test_a_worker_killed_right_after_the_snapshot_call_finds_it_by_its_tag(failed_over, cloud_disk, user, monkeypatch):
    from reclo_site.cloud import volumes

    recovery, _instance, _top = failed_over
    failback = failback_services.failback_start(user=user, recovery=recovery)
    real = volumes.create_snapshot

    called = []

    def then_die(*args, **kwargs):
        called.append(timezone.now())
        real(*args, **kwargs)
        raise Killed("killed before the id was saved")

    monkeypatch.setattr(volumes, "create_snapshot", then_die)
    with pytest.raises(Killed):
        drive_failback(failback.pk)
    monkeypatch.setattr(volumes, "create_snapshot", real)
    failback = drive_failback(failback.pk)
    assert failback.status == "ready", failback.error
    assert len(cloud_disk.snapshots_of_volumes) == 1
    assert failback.snapshot_id == cloud_disk.snapshots_of_volumes[0]
    assert failback.snapshot_at <= called[0]  # dated no later than the disk it holds, though found after a crash


def test_a_failback_of_a_terminated_server_is_refused(failed_over, user):
    recovery, instance, _top = failed_over
    Instance.objects.filter(pk=instance.pk).update(state="terminated")
    with pytest.raises(ServiceError) as caught:
        failback_services.failback_start(user=user, recovery=recovery)
    assert caught.value.code == Code.INSTANCE_STATE_CONFLICT and "terminated" in caught.value.message


def test_one_failback_at_a_time(failed_over, user):
    recovery, _instance, _top = failed_over
    failback_services.failback_start(user=user, recovery=recovery)
    with pytest.raises(ServiceError) as caught:
        failback_services.failback_start(user=user, recovery=recovery)
    assert caught.value.code == Code.FAILOVER_RUNNING


def test_a_server_gone_from_the_cloud_fails_the_failback_readably(failed_over, user):
    from reclo_site.cloud import compute

    recovery, instance, _top = failed_over
    failback = failback_services.failback_start(user=user, recovery=recovery)
    compute.terminate_instance(instance.instance_id)
    with mock.patch("reclo_site.cloud.volumes.root_volume", side_effect=cloud.ObjectNotFound("gone", "x")):
        failback = drive_failback(failback.pk)
    assert failback.status == "failed" and "gone" in failback.error


# --- the agent's --changed-since ----------------------------------------------------------------


@pytest.fixture
def brought_home(failed_over, cloud_disk, user):
    recovery, instance, top = failed_over
    worked = work_in_the_cloud(cloud_disk, instance, top)
    failback = drive_failback(failback_services.failback_start(user=user, recovery=recovery).pk)
    return recovery, failback, top, worked


def test_changed_since_a_point_not_in_the_chain_is_refused_before_writing(brought_home, api, tmp_path):
    _recovery, failback, top, _worked = brought_home
    target = tmp_path / "disk.img"
    target.write_bytes(top)
    with pytest.raises(UsageError, match="not one that"):
        restore_to(api, failback.backup_ref, target, force=True, changed_since="0123456789abcdef")
    with pytest.raises(UsageError, match="itself"):
        restore_to(api, failback.backup_ref, target, force=True, changed_since=str(failback.backup_ref))
    assert target.read_bytes() == top


def test_changed_since_needs_a_target_that_can_hold_the_earlier_point(brought_home, api, tmp_path):
    recovery, failback, top, _worked = brought_home
    with pytest.raises(UsageError, match="does not exist"):
        restore_to(api, failback.backup_ref, tmp_path / "none.img", force=True, changed_since=str(recovery.backup_ref))
    small = tmp_path / "small.img"
    small.write_bytes(top[: len(top) // 2])
    with pytest.raises(UsageError, match="cannot hold"):
        restore_to(api, failback.backup_ref, small, force=True, changed_since=str(recovery.backup_ref))
    assert small.read_bytes() == top[: len(top) // 2]
    whole = tmp_path / "whole.img"
    whole.write_bytes(top)
    with pytest.raises(UsageError, match="--force"):
        restore_to(api, failback.backup_ref, whole, changed_since=str(recovery.backup_ref))


def test_the_command_line_takes_changed_since(monkeypatch):
    from reclo_agent import cli

    seen = {}
    monkeypatch.setattr(cli, "_load_config", lambda args: None)
    monkeypatch.setattr(cli, "_client", lambda config: None)
    monkeypatch.setattr(cli, "_resolve_backup_id", lambda client, given: f"full-{given}")

    def fake_restore(client, backup_id, target, reporter, *, force, changed_since):
        seen.update(backup_id=backup_id, target=target, force=force, changed_since=changed_since)
        return agent_restore.RestoreResult(backup_id, 1, 1, 0, 0)

    monkeypatch.setattr(cli, "restore", fake_restore)
    assert cli.main(["restore", "abc", "/dev/sdb", "--force", "--changed-since", "def"]) == 0
    assert seen == {"backup_id": "full-abc", "target": "/dev/sdb", "force": True, "changed_since": "full-def"}


# --- the pages ----------------------------------------------------------------------------------


def test_bring_it_home_from_the_recovery_page_to_the_restore_commands(failed_over, cloud_disk, owner, user):
    recovery, instance, top = failed_over
    page = owner.get(reverse("recovery:detail", args=[recovery.pk])).content.decode()
    start = reverse("recovery:failback-start", args=[recovery.pk])
    assert start in page and 'data-testid="bring-home-link"' in page
    confirm = owner.get(start).content.decode()
    assert "Bring front-desk home?" in confirm and 'data-testid="bring-home"' in confirm
    response = owner.post(start)
    failback = Failback.objects.get(recovery=recovery)
    assert response.status_code == 302 and response["Location"] == reverse("recovery:failback", args=[failback.pk])
    page = owner.get(response["Location"]).content.decode()
    assert "Snapshotting the cloud server" in page and "restore-full" not in page
    work_in_the_cloud(cloud_disk, instance, top)
    drive_failback(failback.pk)
    page = owner.get(response["Location"]).content.decode()
    assert f"reclo-agent restore {failback.backup_ref} /dev/sdX --force --changed-since {recovery.backup_ref}" in page
    assert f"reclo-agent restore {failback.backup_ref} /dev/sdX --force</pre>" in page


def test_bring_it_home_is_refused_kindly_for_a_terminated_server(failed_over, owner):
    recovery, instance, _top = failed_over
    Instance.objects.filter(pk=instance.pk).update(state="terminated")
    start = reverse("recovery:failback-start", args=[recovery.pk])
    page = owner.get(start).content.decode()
    assert 'data-testid="not-allowed"' in page and "this one is terminated" in page
    assert "bring-home-link" not in owner.get(reverse("recovery:detail", args=[recovery.pk])).content.decode()
    response = owner.post(start, follow=True)
    assert "Only a running or stopped server" in response.content.decode()
    assert not Failback.objects.exists()


def test_another_tenant_gets_404_on_the_failback_pages(failed_over, outsider, user):
    recovery, _instance, _top = failed_over
    failback = failback_services.failback_start(user=user, recovery=recovery)
    for url in [
        reverse("recovery:failback-start", args=[recovery.pk]),
        reverse("recovery:failback", args=[failback.pk]),
    ]:
        assert outsider.get(url).status_code == 404, url
        assert outsider.post(url).status_code in (404, 405), url
    assert Failback.objects.count() == 1


def test_unknown_and_malformed_failback_ids_are_404_and_pages_need_a_login(owner, client, aws):
    assert owner.get(reverse("recovery:failback", args=[uuid.uuid4()])).status_code == 404
    assert owner.get(reverse("recovery:failback-start", args=[uuid.uuid4()])).status_code == 404
    assert owner.get("/recovery/failbacks/not-a-uuid/").status_code == 404
    assert failback_services.failback_get(user=None, failback_id="'; drop table") is None
    client.logout()
    response = client.get(reverse("recovery:failback", args=[uuid.uuid4()]))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_bring_it_home_needs_the_forms_csrf_token(failed_over, user):
    recovery, _instance, _top = failed_over
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    assert browser.post(reverse("recovery:failback-start", args=[recovery.pk])).status_code == 403
    assert not Failback.objects.exists()


def test_terminate_asks_for_the_typed_name_while_the_cloud_holds_unsaved_work(owner, aws, user):
    instance = recovered_instance(user=user)
    name = instance.recovery.server_name
    url = reverse("recovery:instance-action", args=[instance.instance_id, "terminate"])
    page = owner.get(url).content.decode()
    assert 'data-testid="unsaved-warning"' in page and 'data-testid="confirm-name"' in page
    assert reverse("recovery:failback-start", args=[instance.recovery_id]) in page
    empty = owner.post(url)
    assert empty.status_code == 400 and f"Type the server&#x27;s name, {name}, to confirm." in empty.content.decode()
    wrong = owner.post(url, {"server_name": name.upper()})
    assert wrong.status_code == 400 and "That is not the server&#x27;s name." in wrong.content.decode()
    assert 'aria-invalid="true"' in wrong.content.decode()
    assert Instance.objects.get(pk=instance.pk).state == "running"
    right = owner.post(url, {"server_name": f" {name} "})
    assert right.status_code == 302 and Instance.objects.get(pk=instance.pk).state == "terminated"


def test_terminate_asks_nothing_more_once_the_stopped_server_was_brought_home(owner, aws, user):
    instance = recovered_instance(user=user, state="stopped")
    saved(instance, at=timezone.now() + timedelta(seconds=1))
    assert failback_services.unsaved_changes(instance) is False
    url = reverse("recovery:instance-action", args=[instance.instance_id, "terminate"])
    page = owner.get(url).content.decode()
    assert "unsaved-warning" not in page and "confirm-name" not in page
    response = owner.post(url)
    assert response.status_code == 302 and Instance.objects.get(pk=instance.pk).state == "terminated"


def test_work_after_the_last_failback_is_unsaved_again(aws, user):
    instance = recovered_instance(user=user, state="stopped")
    saved(instance, at=instance.stopped_at - timedelta(minutes=5))  # brought home while it still ran, then stopped
    assert failback_services.unsaved_changes(instance) is True
    saved(instance, at=instance.stopped_at + timedelta(minutes=1))
    assert failback_services.unsaved_changes(instance) is False
    # Started again: whatever it writes from now on is in no restore point.
    Instance.objects.filter(pk=instance.pk).update(state="running", running_since=timezone.now() + timedelta(minutes=2))
    instance.refresh_from_db()
    assert failback_services.unsaved_changes(instance) is True
    # A failed failback saves nothing.
    Failback.objects.update(status=Failback.Status.FAILED)
    Instance.objects.filter(pk=instance.pk).update(state="stopped")
    instance.refresh_from_db()
    assert failback_services.unsaved_changes(instance) is True


# --- the API ------------------------------------------------------------------------------------


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"] == code and body["message"]


def test_the_api_brings_a_server_home_and_follows_it(failed_over, cloud_disk, api):
    recovery, instance, top = failed_over
    work_in_the_cloud(cloud_disk, instance, top)
    response = api.post(f"/api/v1/recoveries/{recovery.pk}/failback")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "queued" and body["failback"]["recovery_id"] == str(recovery.pk)
    assert [s["name"] for s in body["failback"]["steps"]] == ["snapshotting", "copying", "verifying"]
    drive_failback(body["failback_id"])
    failback = api.get(f"/api/v1/failbacks/{body['failback_id']}").json()["failback"]
    assert failback["status"] == "ready" and failback["kind"] == "incremental" and failback["error"] is None
    assert failback["parent_id"] == str(recovery.backup_ref) and failback["snapshot_at"]
    assert api.get(f"/api/v1/backups/{failback['backup_id']}").json()["backup"]["status"] == "verified"


def test_the_api_refuses_what_cannot_be_brought_home(failed_over, api):
    recovery, instance, _top = failed_over
    assert api.post(f"/api/v1/recoveries/{recovery.pk}/failback").status_code == 202
    assert_error(api.post(f"/api/v1/recoveries/{recovery.pk}/failback"), 409, 402)
    Failback.objects.update(status=Failback.Status.FAILED)
    Instance.objects.filter(pk=instance.pk).update(state="terminated")
    assert_error(api.post(f"/api/v1/recoveries/{recovery.pk}/failback"), 409, 406)


def test_the_api_answers_404_for_another_tenants_unknown_and_malformed_ids(failed_over, user, other_api, api):
    recovery, _instance, _top = failed_over
    failback = failback_services.failback_start(user=user, recovery=recovery)
    assert_error(other_api.post(f"/api/v1/recoveries/{recovery.pk}/failback"), 404, 105)
    assert_error(other_api.get(f"/api/v1/failbacks/{failback.pk}"), 404, 105)
    assert_error(api.get(f"/api/v1/failbacks/{uuid.uuid4()}"), 404, 105)
    assert_error(api.get("/api/v1/failbacks/not-a-uuid"), 404, 105)
    assert_error(api.post("/api/v1/recoveries/not-a-uuid/failback"), 404, 105)
    assert Failback.objects.count() == 1


def test_the_api_needs_a_valid_token(failed_over, anon_api):
    recovery, _instance, _top = failed_over
    forged = APIClient()
    forged.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    for client in (anon_api, forged):
        assert_error(client.post(f"/api/v1/recoveries/{recovery.pk}/failback"), 401, 102)
        assert_error(client.get(f"/api/v1/failbacks/{uuid.uuid4()}"), 401, 102)
    assert not Failback.objects.exists()


def test_a_disk_that_ends_inside_a_block_round_trips_too(cloud_disk, user, server, drive, api, tmp_path):
    size = 5 * MiB + 256 * 1024  # ends inside a VHD block and inside an EBS block
    backups, top = backup_chain(user=user, server=server, size=size, incrementals=1)
    recovery = drive(services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="ebs_direct").pk)
    assert recovery.status == "ready", recovery.error
    instance = Instance.objects.get(recovery=recovery)
    worked = bytearray(top)
    for offset in (0, size - 700):
        cloud_disk.write(instance.instance_id, offset, b"\xa5" * 600)
        worked[offset : offset + 600] = b"\xa5" * 600
    failback = drive_failback(failback_services.failback_start(user=user, recovery=recovery).pk)
    assert failback.status == "ready", failback.error
    target = tmp_path / "disk.img"
    restore_to(api, recovery.backup_ref, target)
    restore_to(api, failback.backup_ref, target, force=True, changed_since=str(recovery.backup_ref))
    assert target.read_bytes() == bytes(worked)
    restore_to(api, failback.backup_ref, target, force=True)
    assert target.read_bytes() == bytes(worked)
