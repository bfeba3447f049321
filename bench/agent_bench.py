"""The agent against restic, both backing up to the same local S3 emulator.

    .venv/bin/python bench/agent_bench.py [--size-mib 1024] [--change 0.01] [--keep DIR]

Self-contained: starts moto's ThreadedMotoServer (S3 and STS) and the
portal (Django, in this process, with eager Celery so the verifier runs when
an upload completes) on free loopback ports, with a throw-away database.
The agent runs as its own process, as on a customer's server; restic (the
Debian package, ``apt-get install restic``) backs up the same image to
another bucket of the same emulator.

Measured, on an image of 40% random, 30% zero and 30% text blocks:

1. hashing: the agent's pass without compression (page hashes of the whole
   disk, zero-block detection, the block map written) vs hashlib SHA-256
   over the same file, and the in-memory page hashing vs one SHA-256 over
   the same bytes;
2. full backup: time and stored bytes vs restic's first backup, the wait
   for the portal's verdict, the bytes the agent read from the image (its
   source reader's count, per disk size) and the agent's peak memory
   (its VmHWM, sampled);
3. after rewriting ``--change`` of the 4 KiB pages at random: incremental
   time and uploaded bytes vs restic's second backup and vs the bytes that
   changed;
4. restore of the incremental (the chain) vs ``restic restore`` of the
   second snapshot, both checked byte-identical to the image;
5. disk reads (as root, with the image on a loop device): the agent's scan
   and a plain read of the block device with ``O_DIRECT`` (what the agent
   does now) next to the old buffered reads with the cache warm (fast, but
   stale on a mounted disk) and cold (``BLKFLSBUF``: the fallback for
   devices that refuse ``O_DIRECT``). ``--reads-only`` measures just this.

For each backup and restore it also prints each tool's own CPU time
(wait4), the CPU this process -- the emulator and the portal -- spent
meanwhile, and their sum over the cores: the shortest time this machine
allows for that work, next to the 2x target.

Apart from step 5, the page cache is warm for both tools (nothing drops it). Agent times
are wall-clock times of the whole command, including waiting for the
portal's verdict; the breakdown shows scan, pack-and-upload and verify.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from disk_images import make_raw

MiB = 1024 * 1024
BLOCK = 2 * MiB
PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-password-4821-lantern"


def change_pages(path: Path, fraction: float, seed: int = 2) -> int:
    """Rewrite ``fraction`` of the 4 KiB pages with random bytes; returns bytes changed."""
    rnd = random.Random(seed)
    pages = path.stat().st_size // PAGE
    changed = set()
    with open(path, "r+b") as f:
        for _ in range(int(pages * fraction)):
            page = rnd.randrange(pages)
            changed.add(page)
            f.seek(page * PAGE)
            f.write(rnd.randbytes(PAGE))
    return len(changed) * PAGE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


# --- the stack ------------------------------------------------------------------------


class Stack:
    """moto (S3, STS) and the portal, in this process."""

    def __init__(self, work: Path) -> None:
        from moto.server import ThreadedMotoServer

        self.moto = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
        self.moto.start()
        host, port = self.moto.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        os.environ.update(
            DJANGO_SETTINGS_MODULE="reclo_site.settings",
            RECLO_VAR_DIR=str(work / "var"),
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",  # noqa: S105 - the emulator takes any
            AWS_REGION="us-east-1",
            RECLO_BUCKET="reclo-bench",
            CELERY_TASK_ALWAYS_EAGER="true",
            LOG_LEVEL="WARNING",
        )
        (work / "var" / "staticfiles").mkdir(parents=True)  # whitenoise warns without it
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from accounts.models import User
        from reclo_site.cloud import storage

        storage.ensure_bucket()
        User.objects.create_user(username="bench.user", email="bench@example.com", password=PASSWORD)
        from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
        from django.core.wsgi import get_wsgi_application

        self.web = ThreadedWSGIServer(("127.0.0.1", 0), WSGIRequestHandler)
        self.web.set_app(get_wsgi_application())  # sets up logging again: quiet it after
        for noisy in ("django.server", "kombu", "werkzeug"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        threading.Thread(target=self.web.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.web.server_address[1]}"

    def bucket_bytes(self, bucket: str, prefix: str = "") -> int:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        total = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            total += sum(obj["Size"] for obj in page.get("Contents", []))
        return total

    def stop(self) -> None:
        self.web.shutdown()
        self.moto.stop()


# --- the two tools ----------------------------------------------------------------------


class Agent:
    def __init__(self, stack: Stack, work: Path) -> None:
        self.env = {**os.environ, "RECLO_AGENT_CONFIG": str(work / "agent.json"), "RECLO_PASSWORD": PASSWORD}
        self.run("login", "--portal", stack.url, "--email", "bench@example.com", "--state-dir", str(work / "state"))

    def run(self, *args: str) -> Measured:
        return run_measured([sys.executable, "-m", "reclo_agent", "-q", *args], self.env)

    def backup(self, image: Path) -> tuple[Measured, dict]:
        m = self.run("backup", str(image), "--server", "bench", "--disk", "sda", "--json")
        return m, json.loads(m.out)

    def restore(self, backup_id: str, target: Path) -> tuple[Measured, dict]:
        m = self.run("restore", backup_id, str(target), "--json")
        return m, json.loads(m.out)


@dataclass
class Measured:
    """One command's wall time, its own CPU time, the CPU time this process (the emulator and the portal) spent
    meanwhile, and its peak memory."""

    seconds: float
    out: str
    peak: int
    cpu: float
    host_cpu: float


def run_measured(cmd: list[str], env: dict) -> Measured:
    """Run ``cmd`` and measure it (see :class:`Measured`).

    The peak is the process's own high-water mark (``VmHWM`` in
    /proc/PID/status, sampled until it exits; it only grows). Not wait4's
    ru_maxrss: that counts the RSS the child had between fork and exec,
    i.e. this process's (which hosts the emulator and its objects). The
    child's CPU time is wait4's (user + system, its threads included).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        host0 = _own_cpu()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        peak = 0
        status = Path(f"/proc/{proc.pid}/status")
        while True:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        host = _own_cpu() - host0
        proc.returncode = os.waitstatus_to_exitcode(code)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{err.read().decode()}")
        return Measured(elapsed, out.read().decode(), peak, usage.ru_utime + usage.ru_stime, host)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Restic:
    BUCKET = "restic-bench"

    def __init__(self, stack: Stack, work: Path) -> None:
        self.exe = shutil.which("restic")
        if not self.exe:
            raise SystemExit("restic is not installed: apt-get install -y restic")
        self.env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_CACHE_DIR": str(work / "restic-cache"),
                    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}  # fmt: skip
        self.repo = f"s3:{stack.endpoint}/{self.BUCKET}"
        self.stack = stack
        self.run("init")

    def run(self, *args: str) -> Measured:
        return run_measured([self.exe, "-r", self.repo, "-o", "s3.bucket-lookup=path", *args], self.env)

    def backup(self, image: Path) -> tuple[Measured, dict]:
        m = self.run("backup", "--json", str(image))
        return m, next(json.loads(line) for line in m.out.splitlines() if '"summary"' in line)

    def stored(self) -> int:
        return self.stack.bucket_bytes(self.BUCKET)

    def restore(self, target: Path) -> Measured:
        return self.run("restore", "latest", "--target", str(target))


# --- measurements -------------------------------------------------------------------------


def restore_locally(stack: Stack, backup_ids: list[str], work: Path) -> float:
    """The restore's decompress-and-write work alone: the chain's objects copied to local
    files, restored by a fresh process (not this one, which hosts the emulator and the portal)."""
    import boto3

    from backups.models import Backup

    s3 = boto3.client("s3", endpoint_url=stack.endpoint, region_name="us-east-1")
    files = []
    for backup_id in backup_ids:
        path = work / f"{backup_id}.vhd.zst"
        s3.download_file("reclo-bench", Backup.objects.get(pk=backup_id).key, str(path))
        files.append(str(path))
    out = subprocess.run([sys.executable, __file__, "--local-restore", str(work / "local-restored.img"), *files],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout)


def local_restore_main(target: str, files: list[str]) -> None:
    """``--local-restore TARGET FILE...``: print the seconds a chain restore takes, fsync excluded."""
    from reclo_agent.memory import keep_freed_buffers
    from reclo_agent.progress import Reporter
    from reclo_agent.restore import Layer, Target, write_disk
    from reclo_agent.vhd import ChainReader, VHDReader, open_seekable

    keep_freed_buffers()  # as the agent's command line does
    t0 = time.perf_counter()
    handles = [open(f, "rb") for f in files]  # noqa: SIM115 - closed below
    layers = [Layer(h, VHDReader(open_seekable(h))) for h in handles]
    reader = ChainReader([layer.reader for layer in layers])
    out = Target(target, reader.virtual_size, force=True)
    try:
        with Reporter(quiet=True).task("restoring", reader.virtual_size) as task:
            write_disk(layers, reader, list(reader.allocated_blocks()), out, task)
    finally:
        out.close()
        for h in handles:
            h.close()
    print(time.perf_counter() - t0 - out.fsync_seconds)


def bench_hashing(image: Path, work: Path) -> dict:
    from reclo_agent.blockmap import page_digests
    from reclo_agent.scan import Scan
    from reclo_agent.source import Source

    size = image.stat().st_size
    sha256_file(image)  # warm the page cache for both
    t0 = time.perf_counter()
    sha256_file(image)
    file_sha = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Source(str(image)) as src:
        for _ in Scan(src, work / "bench.map", page_size=PAGE):
            pass
    file_scan = time.perf_counter() - t0
    result = {"file_scan": size / file_scan / MiB, "file_sha256": size / file_sha / MiB}
    mixed = image.read_bytes()[: 256 * MiB]
    noise = os.urandom(256 * MiB)  # no zero pages to skip: the pure hashing cost
    for name, data in (("mixed", mixed), ("random", noise)):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        result[f"{name}_sha256"] = len(data) / (time.perf_counter() - t0) / MiB
        t0 = time.perf_counter()
        for at in range(0, len(data), BLOCK):
            page_digests(data[at : at + BLOCK], PAGE)
        result[f"{name}_pages"] = len(data) / (time.perf_counter() - t0) / MiB
    return result


def bench_reads(image: Path, work: Path) -> dict | None:
    """Scan and read MiB/s of the image on a loop device, per read mode; None unless root with losetup."""
    from reclo_agent import source as source_module
    from reclo_agent.scan import Scan

    if os.geteuid() != 0 or not shutil.which("losetup"):
        return None
    device = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)], capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    size = image.stat().st_size
    result = {}
    try:
        modes = {
            # The old agent: buffered reads, nothing dropped; warm after the first pass.
            "buffered, cache warm (old)": dict(direct=False, mode=source_module.FILE),
            "buffered, cache dropped (fallback)": dict(direct=False, mode=source_module.INVALIDATED),
            "O_DIRECT (now)": dict(direct=True, mode=source_module.DIRECT),
        }
        # Best of three, the modes interleaved: a shared machine's noise then hits each alike.
        for _ in range(3):
            for name, how in modes.items():
                times = result.setdefault(name, {"read": 0.0, "scan": 0.0})
                for what in ("read", "scan"):
                    with source_module.Source(device, direct=how["direct"]) as src:
                        src.read_mode = how["mode"]
                        if how["mode"] == source_module.FILE:
                            for _ in src.blocks(BLOCK):  # warm the device's cache
                                pass
                        t0 = time.perf_counter()
                        if what == "read":
                            for _ in src.blocks(BLOCK):
                                pass
                        else:
                            for _ in Scan(src, work / "reads.map", page_size=PAGE):
                                pass
                        times[what] = max(times[what], size / (time.perf_counter() - t0) / MiB)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
    return result


def print_reads(reads: dict | None, size: int) -> None:
    print()
    if reads is None and "--no-reads" in sys.argv:
        print("disk reads: skipped (--no-reads)")
        return
    if reads is None:
        print("disk reads: skipped (needs root and losetup to put the image on a loop device)")
        return
    print(f"disk reads ({mb(size)} image on a loop device; MiB/s, best of 3)")
    print(f"  {'':<36} {'read':>10} {'agent scan':>12}")
    for name, t in reads.items():
        print(f"  {name:<36} {t['read']:>10,.0f} {t['scan']:>12,.0f}")
    print("  (a loop device's O_DIRECT reads go through the image file's page cache: on a real disk")
    print("   O_DIRECT reads at the disk's speed, which the old warm-cache figure never shows)")


def breakdown(total: float, t: dict) -> str:
    other = total - sum(t.values())
    return (
        f"agent: one pass (read, hash, compress, upload) {t['upload']:.1f} s, "
        f"S3 complete {t.get('complete', 0):.1f} s, "
        f"portal complete+verdict {t['verify']:.1f} s, start-up etc. {other:.1f} s"
    )


def mb(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


def main() -> int:
    if sys.argv[1:2] == ["--local-restore"]:
        local_restore_main(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--change", type=float, default=0.01, help="fraction of 4 KiB pages rewritten")
    parser.add_argument("--keep", help="work in this folder and keep it")
    parser.add_argument("--reads-only", action="store_true", help="only the disk reads (step 5)")
    parser.add_argument("--no-reads", action="store_true", help="skip the disk reads (step 5)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="reclo-agent-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB
    try:
        image = work / "disk.img"
        print(f"image: {mb(size)} (40% random, 30% zero, 30% text) in {work}", flush=True)
        make_raw(image, size)
        reads = None if args.no_reads else bench_reads(image, work)
        if args.reads_only:
            print_reads(reads, size)
            return 0
        h = bench_hashing(image, work)
        stack = Stack(work)
        agent, restic = Agent(stack, work), Restic(stack, work)

        a_full_m, a_full = agent.backup(image)
        r_full_m, r_full = restic.backup(image)
        r_full_stored = restic.stored()
        changed = change_pages(image, args.change)
        a_inc_m, a_inc = agent.backup(image)
        r_inc_m, r_inc = restic.backup(image)
        r_inc_stored = restic.stored() - r_full_stored
        expected = sha256_file(image)

        a_restore_m, a_restore = agent.restore(a_inc["backup_id"], work / "agent-restored.img")
        local_t = restore_locally(stack, [a_full["backup_id"], a_inc["backup_id"]], work)
        assert sha256_file(work / "local-restored.img") == expected, "local restore differs"
        assert sha256_file(work / "agent-restored.img") == expected, "agent restore differs"
        r_restore_m = restic.restore(work / "restic-restored")
        restic_file = next(p for p in (work / "restic-restored").rglob("disk.img"))
        assert sha256_file(restic_file) == expected, "restic restore differs"
        stack.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def row(name, ours, theirs, note=""):
        print(f"  {name:<34} {ours:>16} {theirs:>16}  {note}")

    cores = os.cpu_count() or 1

    def cpu_rows(what: str, ours: Measured, theirs: Measured, target: float) -> None:
        row(f"{what}: CPU, own", f"{ours.cpu:.1f} s", f"{theirs.cpu:.1f} s", "user + system, every thread")
        row(f"{what}: CPU, emulator + portal", f"{ours.host_cpu:.1f} s", f"{theirs.host_cpu:.1f} s",
            "this process, meanwhile")  # fmt: skip
        floor = (ours.cpu + ours.host_cpu) / cores
        row(f"{what}: floor on {cores} cores", f"{floor:.1f} s", f"{(theirs.cpu + theirs.host_cpu) / cores:.1f} s",
            f"(own + emulator CPU) / cores; the 2x target is {target:.1f} s")  # fmt: skip

    print()
    print(f"hashing ({mb(size)} image; page cache warm)")
    print(f"  agent scan (4 KiB page hashes, zero blocks, map): {h['file_scan']:,.0f} MiB/s"
          f"   hashlib SHA-256 of the file: {h['file_sha256']:,.0f} MiB/s"
          f"   ({h['file_scan'] / h['file_sha256']:.0%})")  # fmt: skip
    for name, what in (("mixed", "the image's first 256 MiB"), ("random", "256 MiB of random bytes")):
        print(
            f"  in memory, {what}: 4 KiB page hashes {h[name + '_pages']:,.0f} MiB/s"
            f" vs one SHA-256 {h[name + '_sha256']:,.0f} MiB/s ({h[name + '_pages'] / h[name + '_sha256']:.0%})"
        )
    print()
    print(f"  {'':<34} {'reclo-agent':>16} {'restic':>16}")
    a_full_t, r_full_t = a_full_m.seconds, r_full_m.seconds
    row("full backup: time", f"{a_full_t:.1f} s", f"{r_full_t:.1f} s", breakdown(a_full_t, a_full["timings"]))
    row("full backup: stored", mb(a_full["file_size"]), mb(r_full_stored))
    row("full backup: speed vs restic", f"{r_full_t / a_full_t:.2f}x", "1.00x", "target: at least 2x, verdict included")
    cpu_rows("full backup", a_full_m, r_full_m, r_full_t / 2)
    row("full backup: wait for the verdict", f"{a_full['timings']['verify']:.2f} s", "-", "target: at most 2 s")
    row("full backup: source bytes read", f"{a_full['read_bytes'] / size:.2f}x", "-", "of the disk; target 1.00x")
    row("full backup: peak memory", mb(a_full_m.peak), mb(r_full_m.peak), "peak RSS (VmHWM)")
    print(f"  changed: {args.change:.0%} of the pages in scattered 4 KiB writes = {mb(changed)}")
    a_inc_t, r_inc_t = a_inc_m.seconds, r_inc_m.seconds
    row("incremental: time", f"{a_inc_t:.1f} s", f"{r_inc_t:.1f} s", breakdown(a_inc_t, a_inc["timings"]))
    row("incremental: uploaded", mb(a_inc["sent_bytes"]), mb(r_inc_stored),
        f"restic's own count, before compression: {mb(r_inc.get('data_added', 0))}")  # fmt: skip
    row("incremental: source bytes read", f"{a_inc['read_bytes'] / size:.2f}x", "-", "of the disk; target 1.00x")
    row("incremental: peak memory", mb(a_inc_m.peak), mb(r_inc_m.peak), "peak RSS (VmHWM)")
    row("incremental / changed bytes", f"{a_inc['sent_bytes'] / changed:.2f}x", f"{r_inc_stored / changed:.1f}x",
        "target: agent within 1.1x")  # fmt: skip
    a_restore_t, r_restore_t = a_restore_m.seconds, r_restore_m.seconds
    row("restore of the incremental: time", f"{a_restore_t:.1f} s", f"{r_restore_t:.1f} s",
        f"{mb(size)} disk; both byte-identical to the image; agent: {a_restore['requests']} GETs")  # fmt: skip
    row("restore: speed vs restic", f"{r_restore_t / a_restore_t:.2f}x", "1.00x", "target: at least 2x")
    cpu_rows("restore", a_restore_m, r_restore_m, r_restore_t / 2)
    row("restore: peak memory", mb(a_restore_m.peak), mb(r_restore_m.peak), "peak RSS (VmHWM)")
    print(
        f"  (the agent's restore includes {a_restore['timings']['fsync']:.2f} s of fsync of the restored disk;"
        f" without network or fsync, from local copies of the objects, it takes {local_t:.1f} s)"
    )
    print_reads(reads, size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
