"""Fixtures of the recovery tests: real backup chains in moto's S3, a driver for the pipeline."""

import pytest

from recovery import engine
from recovery.models import Recovery

from .factories import MiB, ServerFactory, backup_chain


@pytest.fixture
def server(user):
    return ServerFactory(user=user, name="front-desk")


@pytest.fixture
def chain(aws, user, server):
    """A verified chain of a full and two incrementals of an 8 MiB disk; (backups, top disk bytes)."""
    return backup_chain(user=user, server=server, size=8 * MiB, incrementals=2)


@pytest.fixture
def drive():
    """Run a recovery's steps in this process, one go at a time, until it is ready or failed.

    Tests that use the plain `db` fixture run inside one transaction, where
    on_commit never fires; this plays the part of the worker instead.
    """

    def run(recovery_id, *, max_goes: int = 50, until: str | None = None) -> Recovery:
        for _ in range(max_goes):
            recovery = Recovery.objects.get(pk=recovery_id)
            if recovery.status in Recovery.FINISHED or (until and recovery.status == until):
                return recovery
            Recovery.objects.filter(pk=recovery_id).update(lease_until=None, lease_token=None)
            engine.run_step(recovery_id, engine.step_for_status(recovery.status))
        raise AssertionError(f"recovery did not finish in {max_goes} goes: {Recovery.objects.get(pk=recovery_id)}")

    return run
