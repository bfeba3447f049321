"""Celery queue names, shared by the settings and the test helper that starts workers."""


def recovery_queue_for(default_queue: str) -> str:
    """The failover queue that goes with a default queue.

    `recovery` beside Celery's own `celery`; `<name>-recovery` beside any
    other, so test runs that give their workers a queue of their own get a
    failover queue of their own too.
    """
    return "recovery" if default_queue == "celery" else f"{default_queue}-recovery"
