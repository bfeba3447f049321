"""Failovers have a queue of their own: the router, and the queues `make run` and the tests' workers consume."""

import pytest

from reclo_site import testing
from reclo_site.celery import app as celery_app
from reclo_site.queues import recovery_queue_for


def queue_of(task_name: str) -> str:
    return celery_app.amqp.router.route({}, task_name)["queue"].name


@pytest.fixture
def default_queue():
    previous = celery_app.conf.task_default_queue
    yield lambda name: setattr(celery_app.conf, "task_default_queue", name)
    celery_app.conf.task_default_queue = previous


def test_failover_and_drill_tasks_go_to_the_failover_queue_the_rest_to_the_default(default_queue):
    default_queue("celery")
    assert queue_of("recovery.tasks.failover_step_run") == "recovery"
    assert queue_of("recovery.tasks.failovers_reconcile") == "recovery"
    assert queue_of("drills.tasks.drill_run") == "recovery"
    assert queue_of("backups.tasks.backup_verify") == "celery"
    assert queue_of("accounts.tasks.tokens_expire") == "celery"


def test_a_process_with_a_queue_of_its_own_sends_failovers_to_a_failover_queue_of_its_own(default_queue):
    default_queue("test-run-42")
    assert queue_of("recovery.tasks.failover_step_run") == "test-run-42-recovery"
    assert queue_of("backups.tasks.backup_verify") == "test-run-42"


def test_an_explicit_failover_queue_wins(default_queue, settings):
    settings.CELERY_RECOVERY_QUEUE = "failovers"
    default_queue("celery")
    assert queue_of("recovery.tasks.failover_step_run") == "failovers"


def test_the_test_worker_consumes_both_queues_by_default(monkeypatch):
    seen = {}

    class Popen:
        def __init__(self, args, **kwargs):
            seen["queues"] = args[args.index("-Q") + 1]
            self.pid = 0

        def poll(self):
            return 0

    monkeypatch.setattr(testing.subprocess, "Popen", Popen)
    with testing.celery_worker({"CELERY_TASK_DEFAULT_QUEUE": "mine"}):
        pass
    assert seen["queues"] == "mine,mine-recovery" == f"mine,{recovery_queue_for('mine')}"
