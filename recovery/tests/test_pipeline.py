"""The engine runs any pipeline: its own step table, its own end status, its exit hook on every end."""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from reclo_site.errors import Code
from recovery import engine
from recovery.failover import FAILOVER, FAILOVER_STEPS
from recovery.models import Recovery, RecoveryStep
from recovery.pipeline import Done, Pipeline, Step, StepFailed, StepTable, Wait

pytestmark = pytest.mark.django_db

EXITS: list[tuple[str, str]] = []


def prepare(ctx):
    if not ctx.outputs.get("asked"):
        ctx.save(asked=True)
        return Wait(0, "The sandbox is booting.")
    return Done({"sandbox": "sb-1"}, "The sandbox is up.")


def check(ctx):
    assert ctx.previous("preparing")["sandbox"] == "sb-1"
    if ctx.run.instance_type == "silent":
        raise StepFailed(Code.SANDBOX_FAILED, "The server did not answer.")
    return Done({"answered": True}, "The server answered.")


def teardown(run_id, status):
    EXITS.append((str(run_id), status))


# A drill-shaped pipeline over the failover's models (any models with the fields Pipeline lists would do).
DRILL_LIKE = Pipeline(
    name="drill-like",
    model="recovery.Recovery",
    step_model="recovery.RecoveryStep",
    run_field="recovery",
    steps=StepTable(
        Step("preparing", "Preparing the sandbox", f"{__name__}.prepare", timedelta(minutes=5), Code.SANDBOX_FAILED),
        Step("checking", "Checking the server", f"{__name__}.check", timedelta(minutes=5), Code.SANDBOX_FAILED),
    ),
    task="recovery.tasks.failover_step_run",
    succeeded="passed",
    on_exit=f"{__name__}.teardown",
)


@pytest.fixture
def sent(monkeypatch):
    EXITS.clear()
    calls = []
    monkeypatch.setattr(
        engine, "enqueue", lambda rid, step, countdown=None, pipeline=None: calls.append((step, pipeline.name))
    )
    return calls


def started(user, django_capture_on_commit_callbacks, instance_type="t3.small") -> Recovery:
    with django_capture_on_commit_callbacks(execute=True):
        run = Recovery.objects.create(
            user=user, server_name="front-desk", backup_ref=uuid.uuid4(), disk="sda", virtual_size=1,
            instance_type=instance_type, import_method="ebs_direct",
        )  # fmt: skip
        engine.start(run, pipeline=DRILL_LIKE)
    return run


def go(run, step, django_capture_on_commit_callbacks) -> str:
    with django_capture_on_commit_callbacks(execute=True):
        return engine.run_step(run.pk, step, pipeline=DRILL_LIKE)


def test_a_pipeline_runs_its_own_steps_to_its_own_end_and_then_its_exit_hook(
    user, sent, django_capture_on_commit_callbacks
):
    run = started(user, django_capture_on_commit_callbacks)
    assert sent == [("preparing", "drill-like")]
    assert list(RecoveryStep.objects.filter(recovery=run).values_list("name", flat=True)) == ["preparing", "checking"]
    outcomes = [go(run, step, django_capture_on_commit_callbacks) for step in ("preparing", "preparing", "checking")]
    assert outcomes == ["waiting", "done", "done"]
    run.refresh_from_db()
    assert (run.status, run.error_code, run.finished is not None) == ("passed", None, True)
    assert sent == [("preparing", "drill-like"), ("preparing", "drill-like"), ("checking", "drill-like")]
    assert EXITS == [(str(run.pk), "passed")]


def test_the_exit_hook_runs_when_a_step_fails(user, sent, django_capture_on_commit_callbacks):
    run = started(user, django_capture_on_commit_callbacks, instance_type="silent")
    for step in ("preparing", "preparing"):
        go(run, step, django_capture_on_commit_callbacks)
    assert EXITS == []
    assert go(run, "checking", django_capture_on_commit_callbacks) == "failed"
    run.refresh_from_db()
    assert (run.status, run.error_code, run.error) == ("failed", 411, "The server did not answer.")
    assert EXITS == [(str(run.pk), "failed")]


def test_the_exit_hook_runs_when_a_step_misses_its_deadline(user, sent, django_capture_on_commit_callbacks):
    run = started(user, django_capture_on_commit_callbacks)
    RecoveryStep.objects.filter(recovery=run, name="preparing").update(deadline=timezone.now() - timedelta(seconds=1))
    assert go(run, "preparing", django_capture_on_commit_callbacks) == "failed"
    run.refresh_from_db()
    assert (run.status, run.error) == ("failed", "Preparing the sandbox did not finish in time.")
    assert EXITS == [(str(run.pk), "failed")]


def test_the_failover_table_is_where_the_status_choices_and_titles_come_from():
    assert Recovery.Status.values == ["queued", *FAILOVER_STEPS.names, "ready", "failed"]
    assert Recovery.Status("provisioning_vpn").label == "provisioning VPN"
    assert Recovery.ACTIVE == FAILOVER.active and Recovery.STEPS == FAILOVER_STEPS.names
    assert FAILOVER_STEPS.title("importing") == "Creating the cloud image"
    assert FAILOVER_STEPS["launching"].error_code == Code.LAUNCH_FAILED
