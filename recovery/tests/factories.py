"""Test data: servers and real backup chains (VHDs written by the agent's code, stored as seekable zstd)."""

import hashlib
import io
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import factory
from django.utils import timezone
from reclo_agent.vhd import SeekableZstdWriter, VHDWriter, make_bitmap, write_dynamic_from_raw
from reclo_agent.vhd.format import DEFAULT_BLOCK_SIZE, SECTOR

from backups.models import Backup, Server
from backups.naming import backup_key
from reclo_site.cloud import storage

MiB = 1024 * 1024
PAGE = 4096
GATEWAY_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"


class ServerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Server

    name = factory.Sequence(lambda n: f"front-desk-{n}")


def make_disk(size: int, seed: int) -> bytearray:
    """A raw disk: random, text, sparse and empty blocks, like a real one."""
    rnd = random.Random(seed)
    disk = bytearray(size)
    for index, start in enumerate(range(0, size, DEFAULT_BLOCK_SIZE)):
        end = min(start + DEFAULT_BLOCK_SIZE, size)
        kind = index % 4
        if kind == 0:
            disk[start:end] = rnd.randbytes(end - start)
        elif kind == 1:
            text = b"ReClo keeps the office running. " * (DEFAULT_BLOCK_SIZE // 32 + 1)
            disk[start:end] = text[: end - start]
        elif kind == 2:
            for _ in range(5):
                at = start + rnd.randrange(0, (end - start) // SECTOR) * SECTOR
                disk[at : at + SECTOR] = rnd.randbytes(SECTOR)
    return disk


def change_pages(disk: bytearray, seed: int, count: int) -> tuple[bytearray, dict[int, list[tuple[int, int]]]]:
    """A copy with `count` pages rewritten, and per block the sector runs that changed."""
    rnd = random.Random(seed)
    new = bytearray(disk)
    changed = set()
    for _ in range(count):
        at = rnd.randrange(0, len(disk) // PAGE) * PAGE
        new[at : at + PAGE] = rnd.randbytes(PAGE)
        changed.add(at)
    runs: dict[int, list[tuple[int, int]]] = {}
    for at in sorted(changed):
        index, within = divmod(at, DEFAULT_BLOCK_SIZE)
        runs.setdefault(index, []).append((within // SECTOR, PAGE // SECTOR))
    return new, runs


@dataclass
class Stored:
    data: bytes
    info: object  # VHDInfo


def store_full(disk: bytes) -> Stored:
    out = io.BytesIO()
    with SeekableZstdWriter(out) as zst:
        info = write_dynamic_from_raw(io.BytesIO(bytes(disk)), zst)
    return Stored(out.getvalue(), info)


def store_incremental(new: bytes, runs: dict, parent_info, parent_name: str) -> Stored:
    out = io.BytesIO()
    with SeekableZstdWriter(out) as zst:
        writer = VHDWriter(zst, len(new), runs, parent=parent_info.as_parent(parent_name))
        bitmap_bytes = DEFAULT_BLOCK_SIZE // SECTOR // 8
        for index in sorted(runs):
            block = bytes(new[index * DEFAULT_BLOCK_SIZE : (index + 1) * DEFAULT_BLOCK_SIZE])
            writer.write_block(index, block, make_bitmap(runs[index], bitmap_bytes))
        info = writer.close()
    return Stored(out.getvalue(), info)


def backup_chain(
    *,
    user,
    server=None,
    size: int = 8 * MiB,
    incrementals: int = 2,
    seed: int = 1,
    disk_name: str = "sda",
    upload: bool = True,
) -> tuple[list[Backup], bytes]:
    """A verified chain (full + `incrementals`) in the database and in S3; returns it and the top disk."""
    server = server or ServerFactory(user=user)
    disk = make_disk(size, seed)
    stored = [store_full(disk)]
    for n in range(incrementals):
        disk, runs = change_pages(disk, seed * 100 + n, count=40)
        stored.append(store_incremental(disk, runs, stored[-1].info, f"restore-{n}.vhd"))
    backups: list[Backup] = []
    now = timezone.now()
    for n, item in enumerate(stored):
        backup_id = uuid.uuid4()
        key = backup_key(user_id=user.pk, server=server.name, disk=disk_name, backup_id=backup_id)
        # The version verification would have recorded: readers are pinned to it.
        stored_as = storage.put_object(key, item.data) if upload else {"version_id": "", "etag": ""}
        backups.append(
            Backup.objects.create(
                id=backup_id,
                user=user,
                server=server,
                disk=disk_name,
                kind=Backup.Kind.FULL if n == 0 else Backup.Kind.INCREMENTAL,
                parent=backups[-1] if n else None,
                file_name=f"restore-{n}.vhd",
                key=key,
                virtual_size=size,
                file_size=len(item.data),
                sha256=hashlib.sha256(item.data).hexdigest(),
                vhd_unique_id=item.info.unique_id,
                status=Backup.Status.VERIFIED,
                date_created=now - timedelta(hours=len(stored) - n),
                completed_at=now,
                verified_at=now,
                version_id=stored_as["version_id"],
                etag=stored_as["etag"],
            )
        )
    return backups, bytes(disk)


def recovered_instance(*, user, state: str = "running", tagged: bool = True, server=None):
    """A ready recovery with a real (moto) instance behind it, without running the pipeline."""
    from reclo_site.cloud import compute
    from reclo_site.cloud.clients import client
    from recovery.models import Instance, Recovery

    server = server or ServerFactory(user=user)
    recovery = Recovery.objects.create(
        user=user,
        server=server,
        server_name=server.name,
        backup_ref=uuid.uuid4(),
        disk="sda",
        virtual_size=8 * MiB,
        instance_type="t3.medium",
        import_method="ebs_direct",
        status=Recovery.Status.READY,
        finished=timezone.now(),
    )
    image_id = compute.latest_image_from_parameter(GATEWAY_AMI_PARAMETER)
    tags = {"reclo:managed": "true", "reclo:tenant": str(user.pk), "reclo:recovery": str(recovery.pk),
            "reclo:role": "server"} if tagged else {"Name": "someone else's"}  # fmt: skip
    info = compute.run_instance(
        image_id=image_id,
        instance_type="t3.medium",
        subnet_id=client("ec2").describe_subnets()["Subnets"][0]["SubnetId"],
        security_group_ids=[],
        client_token=str(uuid.uuid4()),
        tags=tags,
    )
    address = compute.allocate_address(tags=tags)
    compute.associate_address(allocation_id=address.allocation_id, instance_id=info.instance_id)
    instance = Instance.objects.create(
        instance_id=info.instance_id,
        user=user,
        recovery=recovery,
        state=state,
        instance_type="t3.medium",
        private_ip=info.private_ip,
        public_ip=address.public_ip,
        allocation_id=address.allocation_id,
        running_since=timezone.now() if state == "running" else None,
    )
    if state == "stopped":
        compute.stop_instance(info.instance_id)
        Instance.objects.filter(pk=instance.pk).update(stopped_at=timezone.now())
        instance.refresh_from_db()
    return instance


def drive_recovery(recovery_id, *, max_goes: int = 50, until: str | None = None):
    """Run a recovery's steps in this process, one go at a time, until it is ready or failed."""
    from recovery import engine
    from recovery.models import Recovery

    for _ in range(max_goes):
        recovery = Recovery.objects.get(pk=recovery_id)
        if recovery.status in Recovery.FINISHED or (until and recovery.status == until):
            return recovery
        Recovery.objects.filter(pk=recovery_id).update(lease_until=None, lease_token=None)
        engine.run_step(recovery_id, engine.step_for_status(recovery.status))
    raise AssertionError(f"recovery did not finish in {max_goes} goes: {Recovery.objects.get(pk=recovery_id)}")


class SnapshotWrites:
    """The EBS block writes moto (in this process) receives, in order; `hold_after(n)` stops those after the nth."""

    def __init__(self):
        self.indices: list[int] = []
        self._lock = threading.Lock()
        self._admitted = 0
        self._limit: int | None = None
        self._released = threading.Event()

    def hold_after(self, count: int) -> None:
        """Writes after the first `count` wait (in moto) until `release()`: no race with a fast writer."""
        with self._lock:
            self._limit = count

    def release(self) -> None:
        with self._lock:
            self._limit = None
        self._released.set()

    def passed(self) -> int:
        return len(self.indices)

    def admit(self) -> None:
        with self._lock:
            self._admitted += 1
            held = self._limit is not None and self._admitted > self._limit
        if held:
            self._released.wait(timeout=300)


def slow_snapshot_writes(monkeypatch, delay: float = 0.03) -> SnapshotWrites:
    """Make each EBS block write take a little while, so a worker can be caught (or killed) mid-step.

    Returns what moto was sent: each written block index (a write that is
    held waits before it is recorded or stored).
    """
    from moto.ebs.models import EBSBackend

    real_put = EBSBackend.put_snapshot_block
    writes = SnapshotWrites()

    def slow_put(self, *args, **kwargs):
        time.sleep(delay)
        writes.admit()
        writes.indices.append(kwargs["block_index"] if "block_index" in kwargs else args[1])
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(EBSBackend, "put_snapshot_block", slow_put)
    return writes


def saved(instance, *, at, status="ready"):
    """A failback of the instance that made its restore point at `at` (as the pipeline leaves it)."""
    from recovery.models import Failback

    return Failback.objects.create(
        user=instance.user, recovery=instance.recovery, server=instance.recovery.server,
        server_name=instance.recovery.server_name, instance_id=instance.instance_id,
        status=status, kind="full", snapshot_at=at, finished=at, created=at, updated=at,
    )  # fmt: skip
