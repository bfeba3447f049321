"""Beat jobs: instances_free (stopped for 14 days, brought home first), instances_sync, with frozen time."""

from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
import time_machine

from reclo_site.cloud import compute
from reclo_site.cloud.clients import client
from recovery import services, tasks
from recovery.models import Failback, Instance

from .factories import GATEWAY_AMI_PARAMETER, recovered_instance, saved

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 1, 9, 30, tzinfo=UTC)


def untagged_stopped_instance() -> str:
    """Somebody else's instance in the same account: no ReClo tags."""
    ec2 = client("ec2")
    image = compute.latest_image_from_parameter(GATEWAY_AMI_PARAMETER)
    instance_id = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro")["Instances"][0][
        "InstanceId"
    ]
    ec2.stop_instances(InstanceIds=[instance_id])
    return instance_id


def stopped_and_saved(user, server=None) -> Instance:
    """One of ours stopped at T0 whose work was brought home just after (nothing left to save)."""
    with time_machine.travel(T0, tick=False):
        instance = recovered_instance(user=user, server=server, state="stopped")
    saved(instance, at=T0 + timedelta(minutes=10))
    return instance


@pytest.fixture
def stopped_at_t0(aws, user, server):
    """Instances stopped at T0: one of ours (in the database, its work brought home) and one untagged."""
    ours = stopped_and_saved(user, server)
    with time_machine.travel(T0, tick=False):
        theirs = untagged_stopped_instance()
    return ours, theirs


def test_an_instance_stopped_for_15_days_is_terminated(stopped_at_t0, django_capture_on_commit_callbacks):
    ours, theirs = stopped_at_t0
    with time_machine.travel(T0 + timedelta(days=15)), django_capture_on_commit_callbacks(execute=True):
        assert tasks.instances_free() == [ours.instance_id]
    ours.refresh_from_db()
    assert ours.state == "terminated" and ours.released
    assert compute.describe_instance(ours.instance_id).state == "terminated"
    assert compute.describe_address(ours.allocation_id) is None
    assert compute.describe_instance(theirs).state == "stopped"


def test_an_instance_stopped_for_13_days_and_untagged_ones_are_untouched(stopped_at_t0):
    ours, theirs = stopped_at_t0
    with time_machine.travel(T0 + timedelta(days=13, hours=23)):
        assert tasks.instances_free() == []
    assert Instance.objects.get(pk=ours.pk).state == "stopped"
    assert compute.describe_instance(ours.instance_id).state == "stopped"
    assert compute.describe_instance(theirs).state == "stopped"


def test_running_instances_are_never_freed(aws, user):
    with time_machine.travel(T0, tick=False):
        running = recovered_instance(user=user, state="running")
    with time_machine.travel(T0 + timedelta(days=400)):
        assert tasks.instances_free() == []
    assert compute.describe_instance(running.instance_id).state == "running"


def test_a_tagged_instance_the_portal_lost_track_of_goes_by_the_clouds_stop_time(aws, user):
    with time_machine.travel(T0, tick=False):
        orphan = recovered_instance(user=user, state="stopped")
    Instance.objects.filter(pk=orphan.pk).delete()  # e.g. a restored database backup
    with time_machine.travel(T0 + timedelta(days=13)):
        assert tasks.instances_free() == []
    with time_machine.travel(T0 + timedelta(days=15)):
        assert tasks.instances_free() == [orphan.instance_id]


def test_it_works_in_bounded_batches(aws, user):
    ids = {stopped_and_saved(user).instance_id for _ in range(3)}
    with time_machine.travel(T0 + timedelta(days=15)):
        first = services.instances_free(batch_size=2)
        second = services.instances_free(batch_size=2)
    assert len(first) == 2 and len(second) == 1
    assert set(first) | set(second) == ids


def test_overlapping_runs_terminate_each_instance_once(stopped_at_t0, monkeypatch):
    ours, _ = stopped_at_t0
    real = compute.terminate_instance
    terminated = []

    def terminate_while_another_run_starts(instance_id):
        terminated.append(instance_id)
        if len(terminated) == 1:
            assert services.instances_free() == []  # the overlapping run finds it claimed
        return real(instance_id)

    monkeypatch.setattr(compute, "terminate_instance", terminate_while_another_run_starts)
    with time_machine.travel(T0 + timedelta(days=15)):
        assert services.instances_free() == [ours.instance_id]
    assert terminated == [ours.instance_id]


def test_a_failed_terminate_is_left_for_the_next_run(stopped_at_t0, monkeypatch):
    ours, _ = stopped_at_t0
    monkeypatch.setattr(compute, "terminate_instance", mock.Mock(side_effect=compute.CloudError("boom")))
    with time_machine.travel(T0 + timedelta(days=15)):
        assert services.instances_free() == []
    assert Instance.objects.get(pk=ours.pk).state == "stopped"


def test_a_stopped_server_with_unsaved_work_is_brought_home_before_it_is_terminated(aws, user):
    with time_machine.travel(T0, tick=False):
        instance = recovered_instance(user=user, state="stopped")
    with time_machine.travel(T0 + timedelta(days=15)):
        assert tasks.instances_free() == []
        (failback,) = Failback.objects.filter(recovery=instance.recovery)
        assert failback.status == "queued" and failback.instance_id == instance.instance_id
        assert tasks.instances_free() == []  # on its way: not a second one, still not terminated
        assert Failback.objects.filter(recovery=instance.recovery).count() == 1
    assert compute.describe_instance(instance.instance_id).state == "stopped"
    assert Instance.objects.get(pk=instance.pk).state == "stopped"

    # Brought home: the next run terminates it.
    Failback.objects.filter(pk=failback.pk).update(status="ready", snapshot_at=T0 + timedelta(days=15))
    with time_machine.travel(T0 + timedelta(days=15, hours=1)):
        assert tasks.instances_free() == [instance.instance_id]
    assert compute.describe_instance(instance.instance_id).state == "terminated"


def test_a_server_that_cannot_be_brought_home_is_terminated_after_three_failed_tries(aws, user):
    with time_machine.travel(T0, tick=False):
        instance = recovered_instance(user=user, state="stopped")
    saved(instance, at=T0 - timedelta(days=1), status="failed")  # before the stop: not a try for this one
    for hour in (1, 2):
        saved(instance, at=T0 + timedelta(hours=hour), status="failed")
    with time_machine.travel(T0 + timedelta(days=15)):
        assert tasks.instances_free() == []  # two failed since the stop: a third try
        Failback.objects.filter(status="queued").update(status="failed")
        assert tasks.instances_free() == [instance.instance_id]
    assert Failback.objects.filter(recovery=instance.recovery).count() == 4


def test_a_server_removed_from_the_portal_is_terminated_without_a_failback(aws, user, server):
    with time_machine.travel(T0, tick=False):
        instance = recovered_instance(user=user, server=server, state="stopped")
    server.delete()  # its recovery keeps the name; nothing to make a restore point of
    with time_machine.travel(T0 + timedelta(days=15)):
        assert tasks.instances_free() == [instance.instance_id]
    assert not Failback.objects.exists()


# --- instances_sync -------------------------------------------------------------------------------


def test_an_instance_stopped_outside_the_portal_shows_as_stopped(aws, user):
    instance = recovered_instance(user=user)
    with time_machine.travel(T0, tick=False):
        client("ec2").stop_instances(InstanceIds=[instance.instance_id])
    with time_machine.travel(T0 + timedelta(minutes=5)):
        assert tasks.instances_sync() == 1
    instance.refresh_from_db()
    assert instance.state == "stopped"
    assert instance.stopped_at == T0  # from AWS's "User initiated (...)" reason
    assert instance.running_since is None and instance.synced is not None


def test_an_instance_terminated_outside_the_portal_is_released(aws, user, django_capture_on_commit_callbacks):
    instance = recovered_instance(user=user)
    client("ec2").terminate_instances(InstanceIds=[instance.instance_id])
    with django_capture_on_commit_callbacks(execute=True):
        tasks.instances_sync()
    instance.refresh_from_db()
    assert instance.state == "terminated" and instance.terminated_at and instance.released
    assert compute.describe_address(instance.allocation_id) is None


def test_an_instance_started_outside_the_portal_shows_as_running(aws, user):
    instance = recovered_instance(user=user, state="stopped")
    client("ec2").start_instances(InstanceIds=[instance.instance_id])
    tasks.instances_sync()
    instance.refresh_from_db()
    assert instance.state == "running" and instance.stopped_at is None and instance.running_since


def test_sync_never_overwrites_a_change_made_while_it_looked(aws, user, monkeypatch):
    instance = recovered_instance(user=user)
    real = compute.describe_instances

    def meanwhile_the_user_clicks_stop(ids):
        found = real(ids)
        Instance.objects.filter(pk=instance.pk).update(state="stopping")
        return found

    monkeypatch.setattr(compute, "describe_instances", meanwhile_the_user_clicks_stop)
    assert services.instances_sync() == 0
    assert Instance.objects.get(pk=instance.pk).state == "stopping"


def test_the_beat_schedule_runs_the_jobs(settings):
    tasks_in_beat = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {"recovery.tasks.instances_free", "recovery.tasks.instances_sync",
            "recovery.tasks.failovers_reconcile"} <= tasks_in_beat  # fmt: skip
