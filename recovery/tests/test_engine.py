"""The state machine: claims, duplicate delivery, retries, waits, deadlines, the reconciler."""

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from reclo_site.cloud import CloudPermanentError, CloudUnavailable
from recovery import engine, services, steps
from recovery.engine import Done, StepFailed, Wait
from recovery.failover import FAILOVER_STEPS
from recovery.models import Recovery, RecoveryStep

pytestmark = pytest.mark.django_db


@pytest.fixture
def recovery(chain, user):
    return services.recovery_start(user=user, backup_id=chain[0][-1].pk)


@pytest.fixture
def sent(monkeypatch):
    """Tasks the engine enqueues, as (recovery id, step, countdown), instead of sending them."""
    calls = []
    monkeypatch.setattr(
        engine, "enqueue", lambda rid, step, countdown=None, pipeline=None: calls.append((str(rid), step, countdown))
    )
    return calls


def handler(monkeypatch, step, fn):
    """Replace the handler that the failover's step table names for `step`."""
    module, name = FAILOVER_STEPS[step].handler.rsplit(".", 1)
    assert module == steps.__name__
    monkeypatch.setattr(steps, name, fn)


def test_starting_a_failover_enqueues_the_first_step_after_commit(
    chain, user, sent, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
        assert sent == []
    assert sent == [(str(recovery.pk), "consolidating", None)]
    assert recovery.status == "queued"
    assert [s.name for s in recovery.steps.all()] == list(Recovery.STEPS)


def test_a_finished_step_moves_on_and_enqueues_the_next_on_commit(
    recovery, sent, monkeypatch, django_capture_on_commit_callbacks
):
    handler(monkeypatch, "consolidating", lambda ctx: Done({"image_key": "k"}, "merged"))
    with django_capture_on_commit_callbacks(execute=True):
        assert engine.run_step(recovery.pk, "consolidating") == "done"
    recovery.refresh_from_db()
    assert recovery.status == "importing" and recovery.lease_token is None
    step = recovery.steps.get(name="consolidating")
    assert (step.status, step.attempts, step.outputs, step.detail) == ("done", 1, {"image_key": "k"}, "merged")
    assert step.started <= step.finished
    assert sent == [(str(recovery.pk), "importing", None)]


def test_a_duplicate_delivery_of_a_finished_step_does_nothing(recovery, sent, monkeypatch):
    calls = []
    handler(monkeypatch, "consolidating", lambda ctx: calls.append(1) or Done())
    assert engine.run_step(recovery.pk, "consolidating") == "done"
    assert engine.run_step(recovery.pk, "consolidating") == "not claimed"
    assert calls == [1]
    assert recovery.steps.get(name="consolidating").attempts == 1


def test_a_step_held_by_a_live_worker_is_not_run_twice(recovery, sent, monkeypatch):
    token = engine.claim(recovery.pk, "consolidating")
    assert token is not None
    handler(monkeypatch, "consolidating", lambda ctx: pytest.fail("ran while another worker held the lease"))
    assert engine.run_step(recovery.pk, "consolidating") == "not claimed"
    assert engine.claim(recovery.pk, "consolidating") is None


def test_a_step_whose_worker_died_can_be_claimed_again_once_its_lease_expired(recovery, sent, monkeypatch):
    assert engine.claim(recovery.pk, "consolidating")
    Recovery.objects.filter(pk=recovery.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    handler(monkeypatch, "consolidating", lambda ctx: Done())
    assert engine.run_step(recovery.pk, "consolidating") == "done"


def test_a_worker_that_lost_its_lease_stops_without_recording(recovery, sent, monkeypatch):
    def slow(ctx):
        # Meanwhile the lease expired and another worker claimed the step.
        Recovery.objects.filter(pk=recovery.pk).update(lease_token=None, lease_until=timezone.now())
        assert engine.claim(recovery.pk, "consolidating")
        ctx.save(image_key="x")

    handler(monkeypatch, "consolidating", slow)
    assert engine.run_step(recovery.pk, "consolidating") == "lost claim"
    assert recovery.steps.get(name="consolidating").outputs == {}


def test_a_wait_releases_the_lease_and_reschedules_the_same_step(
    recovery, sent, monkeypatch, django_capture_on_commit_callbacks
):
    handler(monkeypatch, "consolidating", lambda ctx: Wait(30, "still working"))
    with django_capture_on_commit_callbacks(execute=True):
        assert engine.run_step(recovery.pk, "consolidating") == "waiting"
    recovery.refresh_from_db()
    assert recovery.status == "consolidating" and recovery.lease_token is None
    assert recovery.due_at > timezone.now() + timedelta(seconds=25)
    step = recovery.steps.get(name="consolidating")
    assert (step.status, step.detail, step.waited) == ("waiting", "still working", 30)
    assert sent == [(str(recovery.pk), "consolidating", 30)]


def test_transient_errors_retry_with_jittered_capped_backoff(
    recovery, sent, monkeypatch, django_capture_on_commit_callbacks
):
    handler(monkeypatch, "consolidating", mock.Mock(side_effect=CloudUnavailable("throttled", "Throttling")))
    for attempt in range(1, engine.MAX_RETRIES + 1):
        Recovery.objects.filter(pk=recovery.pk).update(lease_until=None)
        with django_capture_on_commit_callbacks(execute=True):
            assert engine.run_step(recovery.pk, "consolidating") == "retrying"
        countdown = sent[-1][2]
        assert engine.BACKOFF_BASE <= countdown <= min(engine.BACKOFF_CAP, engine.BACKOFF_BASE * 2 ** (attempt - 1))
        assert recovery.steps.get(name="consolidating").retries == attempt
    assert engine.run_step(recovery.pk, "consolidating") == "failed"
    recovery.refresh_from_db()
    assert (recovery.status, recovery.error_code) == ("failed", 403)
    assert "unavailable" in recovery.error


def test_backoff_is_jittered_and_capped():
    delays = {round(engine.backoff(3), 3) for _ in range(50)}
    assert len(delays) > 10
    assert all(engine.BACKOFF_BASE <= d <= 20 for d in delays)
    assert all(engine.backoff(40) <= engine.BACKOFF_CAP for _ in range(50))


def test_a_progress_made_after_a_transient_error_resets_the_retries(recovery, sent, monkeypatch):
    results = iter([CloudUnavailable("busy"), Wait(1)])

    def flaky(ctx):
        item = next(results)
        if isinstance(item, Exception):
            raise item
        return item

    handler(monkeypatch, "consolidating", flaky)
    engine.run_step(recovery.pk, "consolidating")
    engine.run_step(recovery.pk, "consolidating")
    assert recovery.steps.get(name="consolidating").retries == 0


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (CloudPermanentError("AccessDenied: no", "AccessDenied"), 403, "The cloud refused"),
        (StepFailed(401, "A restore point is missing."), 401, "A restore point is missing."),
        (RuntimeError("boom"), 403, "Internal error in consolidating (RuntimeError)"),
    ],
)
def test_permanent_failures_fail_fast_with_a_code_and_reason(recovery, sent, monkeypatch, error, code, text):
    handler(monkeypatch, "consolidating", mock.Mock(side_effect=error))
    assert engine.run_step(recovery.pk, "consolidating") == "failed"
    recovery.refresh_from_db()
    assert (recovery.status, recovery.error_code) == ("failed", code)
    assert text in recovery.error
    assert recovery.finished is not None
    step = recovery.steps.get(name="consolidating")
    assert step.status == "failed" and text in step.error
    assert sent == []


@pytest.mark.parametrize(("step", "code"), [("importing", 403), ("launching", 404), ("provisioning_vpn", 407)])
def test_each_step_fails_with_its_own_code(recovery, sent, monkeypatch, step, code):
    Recovery.objects.filter(pk=recovery.pk).update(status=step)
    handler(monkeypatch, step, mock.Mock(side_effect=CloudPermanentError("nope")))
    engine.run_step(recovery.pk, step)
    assert Recovery.objects.get(pk=recovery.pk).error_code == code


def test_a_step_past_its_deadline_fails(recovery, sent, monkeypatch):
    RecoveryStep.objects.filter(recovery=recovery, name="consolidating").update(
        started=timezone.now() - timedelta(days=1), deadline=timezone.now() - timedelta(seconds=1)
    )
    handler(monkeypatch, "consolidating", lambda ctx: pytest.fail("ran past its deadline"))
    assert engine.run_step(recovery.pk, "consolidating") == "failed"
    recovery.refresh_from_db()
    assert recovery.error_code == 403 and "did not finish in time" in recovery.error


def test_the_last_step_makes_the_recovery_ready(recovery, sent, monkeypatch):
    Recovery.objects.filter(pk=recovery.pk).update(status="provisioning_vpn")
    handler(monkeypatch, "provisioning_vpn", lambda ctx: Done())
    engine.run_step(recovery.pk, "provisioning_vpn")
    recovery.refresh_from_db()
    assert recovery.status == "ready" and recovery.finished is not None
    assert sent == []


def test_the_reconciler_re_enqueues_stalled_recoveries_once(user, chain, sent, django_capture_on_commit_callbacks):
    now = timezone.now()
    old = now - timedelta(minutes=30)
    dead_worker = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    Recovery.objects.filter(pk=dead_worker.pk).update(
        status="importing", lease_token=dead_worker.pk, lease_until=now - timedelta(seconds=1)
    )
    from .factories import backup_chain

    def another():
        backups, _ = backup_chain(user=user, size=2 * 1024 * 1024, incrementals=0, upload=False)
        return services.recovery_start(user=user, backup_id=backups[-1].pk)

    lost_message = another()
    Recovery.objects.filter(pk=lost_message.pk).update(status="launching", due_at=old, updated=old)
    working = another()
    Recovery.objects.filter(pk=working.pk).update(lease_token=working.pk, lease_until=now + timedelta(minutes=4))
    waiting = another()
    Recovery.objects.filter(pk=waiting.pk).update(status="importing", due_at=now + timedelta(seconds=30))
    finished = another()
    Recovery.objects.filter(pk=finished.pk).update(status="ready", due_at=old, updated=old)

    with django_capture_on_commit_callbacks(execute=True):
        assert engine.reconcile() == 2
    assert sorted(sent) == sorted([(str(dead_worker.pk), "importing", None), (str(lost_message.pk), "launching", None)])
    # A second (or overlapping) run finds them freshly due: nothing more.
    with django_capture_on_commit_callbacks(execute=True):
        assert engine.reconcile() == 0
    assert len(sent) == 2
