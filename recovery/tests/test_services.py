"""Starting a failover, and starting, stopping and terminating what it made."""

from datetime import timedelta
from unittest import mock

import pytest

from backups.models import Backup
from reclo_site.cloud import CloudUnavailable, ObjectNotFound, compute, imaging, storage
from reclo_site.errors import ServiceError
from recovery import services, steps
from recovery.models import Instance, Recovery, VpnGateway

from .cloud_inventory import inventory
from .factories import MiB, backup_chain, recovered_instance

pytestmark = pytest.mark.django_db


def test_it_starts_a_failover_of_the_restore_point(chain, user):
    backups, _ = chain
    recovery = services.recovery_start(user=user, backup_id=str(backups[-1].pk))
    assert (recovery.status, recovery.server_name, recovery.backup_ref) == ("queued", "front-desk", backups[-1].pk)
    assert recovery.instance_type == "t3.medium"
    assert recovery.import_method == "ebs_direct"
    assert [s.status for s in recovery.steps.all()] == ["pending"] * 4


def test_it_takes_the_instance_type_asked_for(chain, user):
    recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk, instance_type="t3.xlarge")
    assert recovery.instance_type == "t3.xlarge"


def test_it_refuses_an_unknown_instance_type(chain, user):
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=user, backup_id=chain[0][-1].pk, instance_type="x1e.32xlarge")
    assert (info.value.code, list(info.value.fields)) == (104, ["instance_type"])


@pytest.mark.parametrize("backup_id", ["not-a-uuid", "6f1c1c5e-0000-4000-8000-000000000000", None, 12])
def test_it_refuses_unknown_backup_ids_with_401(user, backup_id):
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=user, backup_id=backup_id)
    assert info.value.code == 401


def test_it_refuses_another_tenants_backup_with_401(chain, other_user):
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=other_user, backup_id=chain[0][-1].pk)
    assert info.value.code == 401


def test_it_refuses_a_backup_not_verified_or_with_a_broken_chain(chain, user):
    backups, _ = chain
    Backup.objects.filter(pk=backups[-1].pk).update(status=Backup.Status.VERIFYING)
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=user, backup_id=backups[-1].pk)
    assert info.value.code == 401
    Backup.objects.filter(pk=backups[0].pk).update(status=Backup.Status.FAILED)
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=user, backup_id=backups[1].pk)
    assert info.value.code == 401 and "not verified" in info.value.message


def test_a_second_failover_of_a_server_is_refused_while_one_runs(chain, user):
    backups, _ = chain
    services.recovery_start(user=user, backup_id=backups[-1].pk)
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=user, backup_id=backups[0].pk)
    assert info.value.code == 402


def test_the_database_decides_a_race_between_two_failovers(chain, user, monkeypatch):
    backups, _ = chain
    first = services.recovery_start(user=user, backup_id=backups[-1].pk)
    # A check-then-insert would miss the other click; the partial unique index does not.
    monkeypatch.setattr(Instance.objects, "filter", mock.Mock(return_value=Instance.objects.none()))
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=user, backup_id=backups[-1].pk)
    assert info.value.code == 402
    assert Recovery.objects.get() == first


def test_a_server_running_in_the_cloud_must_be_terminated_before_failing_over_again(aws, user, server, chain):
    recovered_instance(user=user, server=server)
    with pytest.raises(ServiceError) as info:
        services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    assert info.value.code == 402 and "terminate" in info.value.message


def test_a_failed_failover_can_be_tried_again(chain, user):
    first = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    Recovery.objects.filter(pk=first.pk).update(status="failed")
    assert services.recovery_start(user=user, backup_id=chain[0][-1].pk).pk != first.pk


# --- instance actions ---------------------------------------------------------------------------


def test_it_stops_and_starts_an_instance(aws, user):
    instance = recovered_instance(user=user)
    instance = services.instance_stop(instance=instance)
    assert instance.state in ("stopping", "stopped") and instance.stopped_at is not None
    assert compute.describe_instance(instance.instance_id).state == "stopped"
    assert instance.cleanup_at == instance.stopped_at + timedelta(days=14)
    Instance.objects.filter(pk=instance.pk).update(state="stopped")
    instance.refresh_from_db()
    instance = services.instance_start(instance=instance)
    assert instance.state in ("pending", "running") and instance.stopped_at is None
    assert compute.describe_instance(instance.instance_id).state == "running"


@pytest.mark.parametrize(
    ("state", "action"),
    [("running", "start"), ("stopped", "stop"), ("terminated", "stop"), ("terminated", "start"),
     ("terminated", "terminate"), ("shutting-down", "terminate"), ("stopping", "start")],
)  # fmt: skip
def test_actions_the_state_forbids_answer_406(aws, user, state, action):
    instance = recovered_instance(user=user)
    Instance.objects.filter(pk=instance.pk).update(state=state)
    instance.refresh_from_db()
    with pytest.raises(ServiceError) as info:
        getattr(services, f"instance_{action}")(instance=instance)
    assert info.value.code == 406
    assert Instance.objects.get(pk=instance.pk).state == state


@pytest.mark.parametrize(("action", "code"), [("stop", 408), ("terminate", 408), ("start", 404)])
def test_a_cloud_failure_answers_its_code_and_keeps_the_state(aws, user, monkeypatch, action, code):
    instance = recovered_instance(user=user, state="stopped" if action == "start" else "running")
    before = instance.state
    monkeypatch.setattr(compute, f"{action}_instance", mock.Mock(side_effect=CloudUnavailable("down")))
    with pytest.raises(ServiceError) as info:
        getattr(services, f"instance_{action}")(instance=instance)
    assert info.value.code == code
    assert Instance.objects.get(pk=instance.pk).state == before


def test_terminating_releases_the_address_image_merged_disk_and_unused_gateway(
    chain, user, drive, django_capture_on_commit_callbacks
):
    recovery = drive(services.recovery_start(user=user, backup_id=chain[0][-1].pk).pk)
    instance = Instance.objects.get(recovery=recovery)
    image_id = recovery.steps.get(name="importing").outputs["image_id"]
    key = steps.merged_key(recovery)  # none for EBS direct; a VM Import's would be removed too
    with django_capture_on_commit_callbacks(execute=True):
        services.instance_terminate(instance=instance)
    instance.refresh_from_db()
    assert instance.state == "terminated" and instance.terminated_at and instance.released
    assert compute.describe_instance(instance.instance_id).state == "terminated"
    assert compute.describe_address(instance.allocation_id) is None
    with pytest.raises(ObjectNotFound):
        imaging.image_state(image_id)
    with pytest.raises(ObjectNotFound):
        storage.head_object(key)
    gateway = VpnGateway.objects.get()
    assert gateway.state == "released"
    assert compute.describe_instance(gateway.instance_id).state == "terminated"
    assert inventory() == {"servers": 0, "gateways": 0, "images": 0, "snapshots": 0, "addresses": 0, "vpcs": 1}


def test_the_gateway_stays_while_another_instance_uses_it(chain, user, drive, django_capture_on_commit_callbacks):
    first = drive(services.recovery_start(user=user, backup_id=chain[0][-1].pk).pk)
    other, _ = backup_chain(user=user, size=4 * MiB, incrementals=0, seed=3)
    drive(services.recovery_start(user=user, backup_id=other[-1].pk).pk)
    with django_capture_on_commit_callbacks(execute=True):
        services.instance_terminate(instance=Instance.objects.get(recovery=first))
    assert VpnGateway.objects.get().state == "ready"
    assert inventory()["gateways"] == 1


def test_releasing_twice_is_harmless(aws, user):
    instance = recovered_instance(user=user)
    services.instance_terminate(instance=instance)
    assert services.instance_release(instance_pk=instance.pk)
    assert services.instance_release(instance_pk=instance.pk)
    assert compute.describe_address(instance.allocation_id) is None


def test_a_stop_is_followed_until_the_instance_has_stopped(aws, user, django_capture_on_commit_callbacks):
    instance = recovered_instance(user=user)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.instance_stop(instance=instance).state == "stopping"  # what StopInstances answers
    assert Instance.objects.get(pk=instance.pk).state == "stopped"  # the watch task saw it settle


def test_a_start_while_stopping_asks_to_try_again_shortly(aws, user, django_capture_on_commit_callbacks):
    instance = recovered_instance(user=user)
    services.instance_stop(instance=instance)  # the row says "stopping" until the watch task looks
    with pytest.raises(ServiceError) as info:
        services.instance_start(instance=instance)
    assert info.value.code == 406 and "Try again in a few seconds" in info.value.message
    services.instance_watch(instance_pk=instance.pk, polls_left=1)
    assert services.instance_start(instance=instance).state in ("pending", "running")


def test_the_watch_gives_up_after_its_polls(aws, user, monkeypatch):
    instance = recovered_instance(user=user)
    Instance.objects.filter(pk=instance.pk).update(state="stopping")
    stuck = compute.InstanceInfo(instance.instance_id, "stopping", "t3.medium")
    looked = []
    monkeypatch.setattr(compute, "describe_instances", lambda ids: looked.append(ids) or {ids[0]: stuck})
    assert services.instance_watch(instance_pk=instance.pk, polls_left=3) == "stopping"
    assert len(looked) == 3  # it re-scheduled itself twice (eager here), then left it to instances_sync
