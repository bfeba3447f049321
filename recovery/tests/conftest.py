"""Fixtures of the recovery tests: real backup chains in moto's S3, a driver for the pipeline."""

import pytest

from .factories import MiB, ServerFactory, backup_chain, drive_recovery


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
    return drive_recovery
