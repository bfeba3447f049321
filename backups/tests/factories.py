"""factory_boy factories of servers and backups (rows only; objects are up to the test)."""

import hashlib
import uuid

import factory
from django.utils import timezone
from factory.django import DjangoModelFactory

from backups.models import Backup, Server
from backups.naming import backup_key

from .vhds import DISK_SIZE


class ServerFactory(DjangoModelFactory):
    class Meta:
        model = Server

    name = factory.Sequence(lambda n: f"server{n}")


class BackupFactory(DjangoModelFactory):
    """A verified full backup of disk sda unless told otherwise."""

    class Meta:
        model = Backup

    id = factory.LazyFunction(uuid.uuid4)
    server = factory.SubFactory(ServerFactory)
    user = factory.SelfAttribute("server.user")
    disk = "sda"
    kind = Backup.Kind.FULL
    file_name = "sda.vhd.zst"
    key = factory.LazyAttribute(
        lambda o: backup_key(user_id=o.user.pk, server=o.server.name, disk=o.disk, backup_id=o.id)
    )
    virtual_size = DISK_SIZE
    file_size = 1000
    sha256 = factory.LazyAttribute(lambda o: hashlib.sha256(str(o.id).encode()).hexdigest())
    status = Backup.Status.VERIFIED
    vhd_unique_id = factory.LazyFunction(uuid.uuid4)
    date_created = factory.LazyFunction(timezone.now)
    verified_at = factory.LazyAttribute(lambda o: o.date_created if o.status == Backup.Status.VERIFIED else None)
