"""Time to ready of a cold and a warm failover against the local emulator, next to the two-copy path and qemu-img.

    python bench/failover_bench.py [--sizes 1024,8192] [--no-cold] [--no-warm] [--profile FILE] [--keep DIR]

`--sizes` are the disks to measure, in MiB (1 GiB by default; an 8 GiB run
makes and uploads a 3 GiB chain and holds 8 GiB of snapshot blocks in
moto's memory, so it is asked for, not the default). `--profile FILE`
records the one-pass write of the first size with pyinstrument
(`pip install -r bench/requirements.txt`) and writes its text report there.

Sets up what `make run` has: moto's server mode on a free loopback port as
the cloud, a throwaway SQLite database under a temporary var folder. Makes a
raw disk (a mix of random, all-zero and text blocks), stores a full backup
and three incrementals (1% of the pages changed each, in scattered 4 KiB
writes) as seekable zstd in the emulator's S3, and fails the top restore
point over: the four steps run in this process exactly as a worker runs
them (`recovery.engine.run_step`), each timed. Waits on AWS are not slept
but counted, and subtracted: what is left is the failover's own overhead.

References measured in the same run, on the same disk:
- the two-copy path the one-pass EBS direct write replaced: the chain
  merged into a whole VHD in S3, then read back into a snapshot;
- `qemu-img convert -f raw -O vpc -o subformat=dynamic` of the top disk
  (raw file to dynamic VHD, local disk only): the merge-speed reference;
- our `merge_chain` of the same chain from local files (no S3, no HTTP).
MB/s are of virtual disk bytes.

The warm case (warm standby, `recovery/staging.py`): the same chain staged
as EBS snapshots (the full's non-zero blocks, each incremental on its
parent's with only the blocks its pages touch; staging time and blocks per
restore point printed), then a failover of the staged top restore point
timed to ready the same way; it writes no block. moto's server ignores
ParentSnapshotId and keeps every snapshot's blocks in memory, even
deleted ones: a staged 8 GiB chain of scattered 1% changes is about four
times the disk's non-zero data there. `--no-cold` measures only the warm
case (a run of its own leaves the cold copies out of moto's memory),
`--no-warm` only the cold one. `--change 0.001` (0.1% of the pages per
incremental) keeps an 8 GiB staged chain within a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from disk_images import change_pages, make_raw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
BLOCK = 2 * MIB
PAGE = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_chain(
    work: Path, size: int, incrementals: int, change: float = 0.01
) -> tuple[Path, list[tuple[Path, object]]]:
    """The raw top disk and the chain as seekable zstd files, base first: [(path, VHDInfo)]."""
    from reclo_agent.vhd import SeekableZstdWriter, VHDWriter, make_bitmap, write_dynamic_from_raw

    raw = work / "disk.raw"
    make_raw(raw, size)
    chain = []
    out = work / "restore-0.vhd.zst"
    with open(raw, "rb") as src, open(out, "wb") as dst, SeekableZstdWriter(dst) as zst:
        info = write_dynamic_from_raw(src, zst)
    chain.append((out, info))
    for n in range(1, incrementals + 1):
        runs = change_pages(raw, change, seed=n)
        out = work / f"restore-{n}.vhd.zst"
        with open(raw, "rb") as src, open(out, "wb") as dst, SeekableZstdWriter(dst) as zst:
            writer = VHDWriter(zst, size, runs, parent=chain[-1][1].as_parent(f"restore-{n - 1}.vhd"))
            for index in sorted(runs):
                src.seek(index * BLOCK)
                writer.write_block(index, src.read(BLOCK), make_bitmap(runs[index], 512))
            info = writer.close()
        chain.append((out, info))
    return raw, chain


class CloudClock:
    """Intervals during which some request to the emulator was in flight (any thread).

    Covers the HTTP exchange (botocore's send) and the reading of streamed
    response bodies. The union of the intervals in a window is the time the
    failover was waiting on the cloud; the rest is its own work.
    """

    def __init__(self):
        import threading

        import botocore.endpoint
        import botocore.response

        self.intervals: list[tuple[float, float]] = []
        self.requests = 0
        lock = threading.Lock()
        clock = self

        def record(fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    with lock:
                        clock.intervals.append((start, time.perf_counter()))

            return wrapper

        send = botocore.endpoint.Endpoint._send

        def counted_send(*args, **kwargs):
            clock.requests += 1
            return send(*args, **kwargs)

        botocore.endpoint.Endpoint._send = record(counted_send)
        botocore.response.StreamingBody.read = record(botocore.response.StreamingBody.read)

    _installed: CloudClock | None = None

    @classmethod
    def installed(cls) -> CloudClock:
        """The one clock of this process (it patches botocore: once)."""
        if cls._installed is None:
            cls._installed = cls()
        return cls._installed

    def busy(self, start: float, end: float) -> float:
        """Seconds in [start, end] with at least one request in flight."""
        spans = sorted((max(a, start), min(b, end)) for a, b in self.intervals if b > start and a < end)
        total, cursor = 0.0, start
        for a, b in spans:
            if b > cursor:
                total += b - max(a, cursor)
                cursor = b
        return total


def two_copy_snapshot(key: str, size: int) -> tuple[int, str]:
    """The old second copy: the merged VHD read back from S3 and its non-zero 512 KiB blocks written."""
    from reclo_agent.vhd import ChainReader, VHDReader

    from reclo_site.cloud import imaging, streams

    reader = ChainReader([VHDReader(streams.SequentialObjectReader(key))])
    per = reader.block_size // imaging.EBS_BLOCK_SIZE
    zero = bytes(imaging.EBS_BLOCK_SIZE)

    def blocks():
        for index in reader.allocated_blocks():
            data = reader.read_block(index)
            for part in range(per):
                piece = data[part * imaging.EBS_BLOCK_SIZE : (part + 1) * imaging.EBS_BLOCK_SIZE]
                if piece and piece != zero[: len(piece)]:
                    yield index * per + part, piece.ljust(imaging.EBS_BLOCK_SIZE, b"\0")

    snapshot_id = imaging.start_snapshot(
        volume_size_gib=imaging.volume_gib(size), client_token=uuid.uuid4().hex, tags={}, description="bench baseline"
    )
    written = imaging.put_snapshot_blocks(snapshot_id, blocks())
    imaging.complete_snapshot(snapshot_id, changed_blocks=written)
    return written, snapshot_id


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024", help="disk sizes in MiB, comma-separated (default 1024)")
    parser.add_argument("--incrementals", type=int, default=3)
    parser.add_argument(
        "--change", type=float, default=0.01, help="fraction of 4 KiB pages each incremental rewrites (default 0.01)"
    )
    parser.add_argument("--profile", type=Path, help="write a pyinstrument report of the first one-pass write here")
    parser.add_argument("--keep", type=Path, help="keep the files in this folder")
    parser.add_argument("--no-cold", action="store_true", help="skip the two-copy and cold failover measurements")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm standby measurement")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    work = args.keep or Path(tempfile.mkdtemp(prefix="reclo-failover-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    port = free_port()
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "reclo_site.settings",
            "RECLO_VAR_DIR": str(work / "var"),
            "DATABASE_URL": f"sqlite:///{work / 'bench.sqlite3'}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "RECLO_BUCKET": "reclo-bench",
            "LOG_LEVEL": "WARNING",
            # The owner's "ready" email would be printed among the figures.
            "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend",
            # moto's gateway instance runs nothing that could report in: do not wait for it.
            "RECLO_VPN_GATEWAY_MUST_REPORT": "false",
        }
    )
    os.environ.pop("REDIS_URL", None)
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        import django

        django.setup()
        from django.core.management import call_command

        from reclo_site.cloud import storage

        call_command("migrate", verbosity=0)
        storage.ensure_bucket()
        rows = []
        for n, size_mib in enumerate(sizes):
            folder = work / f"{size_mib}mib"
            folder.mkdir(exist_ok=True)
            row = run(args, size_mib, folder, profile=args.profile if n == 0 else None)
            if row is None:
                return 1
            rows.append(row)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        print("\nsummary, same run, same emulator (seconds to ready; the two-copy figure is to a snapshot):")
        print(f"  {'disk':>8}{'two-copy':>10}{'cold one pass':>15}{'faster':>8}{'cold ready':>12}{'warm ready':>12}")
        for size_mib, two_copy, one_pass, ready, warm in rows:
            disk = f"{size_mib // 1024} GiB" if size_mib % 1024 == 0 else f"{size_mib} MiB"
            cell = lambda value: f"{value:10.1f} s" if value else f"{'-':>12}"  # noqa: E731
            faster = f"{two_copy / one_pass:7.1f}x" if two_copy and one_pass else f"{'':8}"
            two = f"{two_copy:8.1f} s" if two_copy else f"{'-':>10}"
            one = f"{one_pass:13.1f} s" if one_pass else f"{'-':>15}"
            print(f"  {disk:>8}{two}{one}{faster}{cell(ready)}{cell(warm)}")
        return 0
    finally:
        moto.terminate()
        try:
            moto.wait(timeout=30)
        except subprocess.TimeoutExpired:
            moto.kill()
            moto.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def forget_cloud_copies(recovery_ids: list) -> None:
    """Delete the images and snapshots a measured failover made: moto holds snapshot blocks in memory."""
    from reclo_site.cloud import imaging
    from recovery.models import RecoveryStep

    for step in RecoveryStep.objects.filter(recovery_id__in=recovery_ids, name="importing"):
        if step.outputs.get("image_id"):
            imaging.delete_image(step.outputs["image_id"])
        if step.outputs.get("snapshot_id"):
            imaging.delete_snapshot(step.outputs["snapshot_id"])


def run(args, size_mib: int, work: Path, profile: Path | None = None):
    """Measure one disk size; returns (MiB, two-copy seconds, one-pass seconds, seconds to ready) or None."""
    from django.utils import timezone
    from reclo_agent.vhd import merge_chain, open_chain, open_seekable

    from accounts.models import User
    from backups.models import Backup, Server
    from backups.naming import backup_key
    from reclo_site.cloud import imaging, storage
    from recovery import engine, services
    from recovery.models import Instance, Recovery

    size = size_mib * MIB
    print(
        f"\ndisk {size_mib} MiB, chain of a full and {args.incrementals} incrementals ({args.change:.1%} of pages each)"
    )
    seconds, (raw, chain) = timed(lambda: store_chain(work, size, args.incrementals, args.change))
    sizes = ", ".join(f"{path.stat().st_size / MIB:.1f}" for path, _ in chain)
    print(f"  made the chain locally in {seconds:.1f} s; stored sizes MiB: {sizes}")

    user = User.objects.create_user(
        username=f"bench.user.{size_mib}", email=f"bench{size_mib}@example.com", password=uuid.uuid4().hex
    )
    server = Server.objects.create(user=user, name="bench-server")
    backups: list[Backup] = []
    upload_seconds = 0.0
    for n, (path, info) in enumerate(chain):
        backup_id = uuid.uuid4()
        key = backup_key(user_id=user.pk, server=server.name, disk="sda", backup_id=backup_id)

        def upload(path=path, key=key):
            with open(path, "rb") as src, storage.ObjectWriter(key, expected_size=path.stat().st_size) as out:
                shutil.copyfileobj(src, out, 8 * MIB)

        upload_seconds += timed(upload)[0]
        backups.append(
            Backup.objects.create(
                id=backup_id, user=user, server=server, disk="sda", kind="incremental" if n else "full",
                parent=backups[-1] if n else None, file_name=path.name, key=key, virtual_size=size,
                file_size=path.stat().st_size, vhd_unique_id=info.unique_id, status="verified",
                date_created=timezone.now(),
            )
        )  # fmt: skip
    print(f"  uploaded the chain to the emulator in {upload_seconds:.1f} s")

    # This process plays the worker: nothing is sent to a broker.
    engine.enqueue = lambda *args, **kwargs: None

    # The baseline, the two-copy path: the chain merged into a whole VHD in
    # S3 (the real consolidating step, as VM Import still uses it), then that
    # object read back and written into a snapshot (what EBS direct did before).
    if args.no_cold:
        return size_mib, None, None, None, warm_case(args, size, server, backups)
    baseline = services.recovery_start(user=user, backup_id=backups[-1].pk, import_method="vm_import")

    def consolidate() -> str:
        # As a worker would: again after a transient error, but only once
        # (moto's server answers 500 to completing a multipart upload over 2 GiB).
        for _ in range(2):
            outcome = engine.run_step(baseline.pk, "consolidating")
            if outcome != "retrying":
                return outcome
            Recovery.objects.filter(pk=baseline.pk).update(due_at=None)
        return outcome

    merge_seconds, outcome = timed(consolidate)
    merged = baseline.steps.get(name="consolidating").outputs
    two_copy = None
    if "image_key" in merged:
        copy_seconds, (copied, copy_snapshot) = timed(lambda: two_copy_snapshot(merged["image_key"], size))
        imaging.delete_snapshot(copy_snapshot)  # its blocks sit in moto's memory
        storage.delete_object(merged["image_key"])
        two_copy = merge_seconds + copy_seconds
        print(
            f"\ntwo-copy path (baseline): merge into S3 {merge_seconds:.2f} s ({merged['image_size'] / MIB:.0f} MiB), "
            f"read back into a snapshot {copy_seconds:.2f} s ({copied} blocks): {two_copy:.2f} s to a snapshot"
        )
    else:
        detail = baseline.steps.get(name="consolidating").error or outcome
        print(f"\ntwo-copy path (baseline): the emulator could not store the merged disk ({detail}); not measured")
    Recovery.objects.filter(pk=baseline.pk).update(status="failed", finished=timezone.now())

    recovery = services.recovery_start(user=user, backup_id=backups[-1].pk)
    total, timings, in_cloud, requests, goes = drive_timed(recovery, profile)
    if recovery.status != "ready":
        print(f"failover failed: {recovery.error_code} {recovery.error}")
        return None
    waited = sum(s.waited for s in recovery.steps.all())

    print(f"\nfailover to ready against the emulator ({goes} task runs):")
    print(f"  {'step':<18}{'seconds':>9}{'MB/s':>7}{'requests':>10}{'in emulator':>13}{'our own':>9}")
    for step in Recovery.STEPS:
        rate = f"{size / MIB / timings[step]:7.0f}" if step in ("consolidating", "importing") else " " * 7
        own = timings[step] - in_cloud[step]
        print(f"  {step:<18}{timings[step]:9.2f}{rate}{requests[step]:10d}{in_cloud[step]:13.2f}{own:9.2f}")
    own_total = total - sum(in_cloud.values())
    print(
        f"  {'total':<18}{total:9.2f}{'':7}{sum(requests.values()):10d}{sum(in_cloud.values()):13.2f}{own_total:9.2f}"
    )
    print(
        f"  cloud waits (scheduled, not slept): {waited:.1f} s, so time to ready minus waits = {total - waited:.2f} s"
    )
    print("  'in emulator': some request in flight; 'our own': merging, hashing, bookkeeping, with none")
    outputs = {s.name: s.outputs for s in recovery.steps.all()}
    one_pass = timings["consolidating"] + timings["importing"]
    print(f"  {outputs['importing']['changed_blocks']} EBS blocks of 512 KiB written, no merged copy")
    if two_copy:
        print(
            f"  one pass to a registered image {one_pass:.2f} s vs two-copy to a snapshot {two_copy:.2f} s: "
            f"{two_copy / one_pass:.1f}x faster (the two-copy figure leaves out the image registration)"
        )

    print("\nreferences on the same disk, local files only:")
    qemu = shutil.which("qemu-img")
    if qemu:
        out = work / "qemu.vhd"
        seconds, _ = timed(
            lambda: subprocess.run(
                [qemu, "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", str(raw), str(out)], check=True
            )
        )
        print(f"  qemu-img convert raw -> dynamic VHD   {seconds:7.2f} s {size / MIB / seconds:7.0f} MB/s")
    else:
        print("  qemu-img not installed (apt-get install qemu-utils)")

    def local_merge():
        files = [open(path, "rb") for path, _ in chain]  # noqa: SIM115 - closed below
        try:
            with open(work / "merged.vhd", "wb") as out:
                merge_chain(open_chain([open_seekable(f) for f in files]), out)
        finally:
            for f in files:
                f.close()

    seconds, _ = timed(local_merge)
    print(f"  our merge_chain, zstd chain -> VHD    {seconds:7.2f} s {size / MIB / seconds:7.0f} MB/s")
    forget_cloud_copies([recovery.pk])
    # The warm failover is of the same server: only one of its recoveries may run in the cloud.
    Instance.objects.filter(recovery=recovery).update(state=Instance.State.TERMINATED)
    warm = None if args.no_warm else warm_case(args, size, server, backups)
    return size_mib, two_copy, one_pass, total, warm


def drive_timed(recovery, profile: Path | None = None):
    """Run a failover's steps here as a worker would, timed: (total, per step seconds, in cloud, requests; runs)."""
    from recovery import engine
    from recovery.models import Recovery

    clock = CloudClock.installed()
    profiler = None
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
    timings: dict[str, float] = dict.fromkeys(Recovery.STEPS, 0.0)
    in_cloud: dict[str, float] = dict.fromkeys(Recovery.STEPS, 0.0)
    requests: dict[str, int] = dict.fromkeys(Recovery.STEPS, 0)
    start = time.perf_counter()
    goes = 0
    while True:
        recovery.refresh_from_db()
        if recovery.status in Recovery.FINISHED:
            break
        step = engine.step_for_status(recovery.status)
        before, started = clock.requests, time.perf_counter()
        if profiler and step == "importing":
            profiler.start()
        seconds, outcome = timed(lambda step=step: engine.run_step(recovery.pk, step))
        if profiler and step == "importing":
            profiler.stop()
        timings[step] += seconds
        in_cloud[step] += clock.busy(started, started + seconds)
        requests[step] += clock.requests - before
        goes += 1
        if outcome == "retrying":
            # Not slept: the retry's backoff is a cloud wait, like a Wait.
            Recovery.objects.filter(pk=recovery.pk).update(due_at=None)
    total = time.perf_counter() - start
    if profiler and profile:
        profile.write_text(profiler.output_text(unicode=True, show_all=False))
        print(f"  (profile of the one-pass write in {profile})")
    return total, timings, in_cloud, requests, goes


def warm_case(args, size: int, server, backups: list) -> float | None:
    """Stage the chain (warm standby), then time a failover of its staged top restore point to ready."""
    from reclo_site.cloud import imaging
    from recovery import services, staging
    from recovery.models import Recovery, StagedSnapshot

    print("\nwarm standby: staging the chain as EBS snapshots (as the worker does after each verified backup)")
    server.warm_standby = True
    server.save(update_fields=["warm_standby"])
    for backup in backups:
        seconds, row = timed(lambda backup=backup: staging.stage(backup))
        print(
            f"  {backup.kind:<12} staged in {seconds:7.2f} s: {row.changed_blocks:6d} EBS blocks written"
            f"{' on its parent' + chr(39) + 's snapshot' if row.parent_snapshot_id else ''}"
        )
    puts = [0]
    real_put = imaging.put_snapshot_block

    def counted(*a, **kw):
        puts[0] += 1
        return real_put(*a, **kw)

    imaging.put_snapshot_block = counted
    try:
        recovery = services.recovery_start(user=server.user, backup_id=backups[-1].pk)
        total, timings, in_cloud, requests, goes = drive_timed(recovery)
    finally:
        imaging.put_snapshot_block = real_put
    recovery.refresh_from_db()
    if recovery.status != "ready":
        print(f"warm failover failed: {recovery.error_code} {recovery.error}")
        return None
    waited = sum(s.waited for s in recovery.steps.all())
    print(f"\nwarm failover of the staged top restore point to ready ({goes} task runs, {puts[0]} blocks written):")
    print(f"  {'step':<18}{'seconds':>9}{'requests':>10}{'in emulator':>13}")
    for step in Recovery.STEPS:
        print(f"  {step:<18}{timings[step]:9.2f}{requests[step]:10d}{in_cloud[step]:13.2f}")
    print(f"  {'total':<18}{total:9.2f}{sum(requests.values()):10d}{sum(in_cloud.values()):13.2f}")
    print(f"  cloud waits (scheduled, not slept): {waited:.1f} s")
    forget_cloud_copies([recovery.pk])
    for row in StagedSnapshot.objects.filter(backup__in=backups):
        imaging.delete_snapshot(row.snapshot_id)
    return total


if __name__ == "__main__":
    sys.exit(main())
