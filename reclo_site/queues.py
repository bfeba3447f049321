"""Celery queue names and routing, shared by the settings, `make run` and the test helper that starts workers."""

# Tasks that run on the failover queue: a flood of uploads must never delay them.
RECOVERY_TASK_PREFIXES = ("recovery.tasks.", "drills.tasks.")


def recovery_queue_for(default_queue: str) -> str:
    """The failover queue that goes with a default queue.

    `recovery` beside Celery's own `celery`; `<name>-recovery` beside any
    other, so test runs that give their workers a queue of their own get a
    failover queue of their own too.
    """
    return "recovery" if default_queue == "celery" else f"{default_queue}-recovery"


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery router: failover (and drill) tasks to the failover queue, the rest to the default.

    Decided when a task is sent, from the app's current default queue, so
    a process that switches its default queue (the integration tests do)
    sends failovers to the matching failover queue.
    """
    if not name.startswith(RECOVERY_TASK_PREFIXES):
        return None
    from django.conf import settings

    if settings.CELERY_RECOVERY_QUEUE:
        return {"queue": settings.CELERY_RECOVERY_QUEUE}
    if task is not None:
        default = task.app.conf.task_default_queue
    else:
        from celery import current_app

        default = current_app.conf.task_default_queue
    return {"queue": recovery_queue_for(default)}
