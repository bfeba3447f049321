"""Fixtures of the backups tests: disks with real restore points in moto's S3, uploads through the API."""

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from backups.models import Backup, Server
from backups.naming import backup_key
from reclo_site import testing
from reclo_site.cloud import storage

from . import vhds


class Disk:
    """One disk of one of a user's servers, with real restore points stored in S3.

    `raw[backup.pk]` is the disk image each restore point must restore to,
    for bit-for-bit checks.
    """

    def __init__(self, user, server: str = "fileserver", disk: str = "sda"):
        self.user = user
        self.server, _ = Server.objects.get_or_create(user=user, name=server)
        self.disk = disk
        self.raw: dict = {}
        self.info: dict = {}
        self.tip: Backup | None = None
        self.clock = timezone.now() - timedelta(days=30)

    def _store(self, data: bytes, info, *, kind, parent, status, when) -> Backup:
        backup = Backup(user=self.user, server=self.server, disk=self.disk, kind=kind, parent=parent)
        backup.key = backup_key(user_id=self.user.pk, server=self.server.name, disk=self.disk, backup_id=backup.id)
        backup.file_name = f"{self.disk}-{len(self.raw)}.vhd.zst"
        backup.virtual_size = info.virtual_size
        backup.file_size = len(data)
        backup.sha256 = hashlib.sha256(data).hexdigest()
        backup.vhd_unique_id = info.unique_id if status == Backup.Status.VERIFIED else None
        backup.status = status
        self.clock = when or self.clock + timedelta(hours=1)
        backup.date_created = self.clock
        backup.verified_at = self.clock if status == Backup.Status.VERIFIED else None
        stored = storage.put_object(backup.key, data)
        if status == Backup.Status.VERIFIED:
            # What verification records: the version it read, so readers are pinned to it.
            backup.version_id, backup.etag = stored["version_id"], stored["etag"]
        backup.save()
        return backup

    def full(self, seed: int = 1, *, status=Backup.Status.VERIFIED, when=None) -> Backup:
        raw = vhds.raw_disk(seed)
        data, info = vhds.full(raw)
        backup = self._store(data, info, kind=Backup.Kind.FULL, parent=None, status=status, when=when)
        self.raw[backup.pk], self.info[backup.pk], self.tip = bytes(raw), info, backup
        return backup

    def incremental(self, seed: int, *, on: Backup | None = None, status=Backup.Status.VERIFIED, when=None) -> Backup:
        parent = on or self.tip
        new = vhds.changed(self.raw[parent.pk], seed)
        data, info = vhds.incremental(self.raw[parent.pk], new, self.info[parent.pk])
        backup = self._store(data, info, kind=Backup.Kind.INCREMENTAL, parent=parent, status=status, when=when)
        self.raw[backup.pk], self.info[backup.pk], self.tip = bytes(new), info, backup
        return backup


@pytest.fixture
def disk(user, aws):
    """The owner's server `fileserver`, disk `sda`, ready for restore points."""
    return Disk(user)


def stored_chain(backup: Backup) -> list[bytes]:
    """The stored objects of a restore point's chain, base first, as a restore reads them (the verified versions)."""
    from backups.chains import chain_of

    objects = []
    for point in chain_of(backup):
        with storage.ObjectReader(point.key, **point.pinned) as reader:
            objects.append(reader.read())
    return objects


@pytest.fixture
def moto_server(settings):
    """moto's server mode on a free loopback port, as `make run` uses it; the portal points at it."""
    with testing.moto_server(settings) as endpoint:
        yield endpoint


@pytest.fixture
def on_commit(django_capture_on_commit_callbacks):
    """Run what services enqueue after commit (eager Celery: the task runs inline)."""

    def run():
        return django_capture_on_commit_callbacks(execute=True)

    return run


START = {"server": "fileserver", "disk": "sda", "file_name": "sda-1.vhd.zst", "virtual_size": vhds.DISK_SIZE}


@pytest.fixture
def upload(api, aws, on_commit):
    """Upload `data` as a new backup through the API: start, write the object, complete.

    Returns the complete response; the verification has run by then.
    """

    def do(data: bytes, *, kind="full", parent_id=None, file_size=None, sha256=None, client=None, **start):
        client = client or api
        body = {**START, "kind": kind, **start}
        if parent_id:
            body["parent_id"] = str(parent_id)
        started = client.post("/api/v1/backups/uploads", body, format="json")
        assert started.status_code == 201, started.json()
        storage.put_object(started.json()["key"], data)
        complete = {
            "file_size": len(data) if file_size is None else file_size,
            "sha256": hashlib.sha256(data).hexdigest() if sha256 is None else sha256,
        }
        with on_commit():
            return client.post(
                f"/api/v1/backups/uploads/{started.json()['upload_id']}/complete", complete, format="json"
            )

    return do
