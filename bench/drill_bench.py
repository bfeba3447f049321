"""Time to a drill's verdict for the bootable test disk, next to a plain QEMU boot of the same disk.

    python bench/drill_bench.py [--runs 1] [--time-limit 600]

The disk is the test suite's (``reclo_site.testing_disks``: Debian's kernel,
busybox, GRUB; built once and cached). It is stored as the agent stores a
full backup (a dynamic VHD in seekable zstd) in a temporary folder; that
setup is not timed. Each run then measures, in this process:

- **drill**: ``prepare disk`` (the stored restore point read through the
  chain reader into a sparse raw file, ``materialise_chain``), then
  ``LocalSandbox().run`` with ``probe_port=80``: its own ``prepare`` (lease,
  command line, firmware copy, until QEMU is started), ``boot`` (power-on to
  the ready line), ``checks`` (port 80 answering, the screenshot) and the
  teardown; ``time to verdict`` is all of them together;
- **baseline**: a plain ``qemu-system-x86_64`` of the same raw file with the
  same machine, accelerator, memory and NVMe disk, serial console on a pipe,
  timed from start to the same ready line the sandbox stops at
  (``reclo-test: ready``, printed just before ``login:``), then killed.

Runs alternate drill and baseline so a busy machine slows both alike. The
accelerator is whatever the sandbox chooses (TCG where KVM does not really
work). Figures are seconds: the minimum and median over ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "agent"))
READY = b"reclo-test: ready"


def store_full_backup(raw: Path, work: Path) -> Path:
    """The raw disk as the agent stores a full backup: a dynamic VHD, seekable zstd."""
    from reclo_agent.vhd import SeekableZstdWriter, write_dynamic_from_raw

    out = work / "restore-0.vhd.zst"
    with open(raw, "rb") as src, open(out, "wb") as dst, SeekableZstdWriter(dst) as zst:
        write_dynamic_from_raw(src, zst)
    return out


def drill_once(stored: Path, work: Path, time_limit: float) -> dict:
    from reclo_agent.vhd import open_chain, open_seekable

    from recovery.sandbox import BootRequest, LocalSandbox, materialise_chain

    raw = work / "drill.raw"
    started = time.monotonic()
    with open(stored, "rb") as f:
        materialise_chain(open_chain([open_seekable(f)]), raw)
    prepared = time.monotonic()
    request = BootRequest(evidence_dir=work / "evidence", probe_port=80, time_limit=time_limit, label="drill-bench")
    verdict = LocalSandbox(work / "state").run(raw, request)
    done = time.monotonic()
    raw.unlink()
    if not verdict.passed:
        raise SystemExit(f"the drill failed: {verdict.reason}\n{verdict.console_excerpt}")
    return {
        "prepare disk": prepared - started,
        "sandbox prepare": verdict.timings["prepare"],
        "boot": verdict.timings["boot"],
        "checks": verdict.timings["checks"],
        "teardown": (done - prepared) - verdict.timings["total"],
        "time to verdict": done - started,
        "accel": verdict.details["accel"],
    }


def baseline_once(raw: Path, accel: str, time_limit: float) -> float:
    """Seconds from starting a plain QEMU of ``raw`` to the test disk's ready line on its serial console."""
    cmd = ["qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-cpu", "max", "-smp", "1", "-m", "1024",
           "-display", "none", "-drive", f"file={raw},format=raw,if=none,id=disk0,snapshot=on",
           "-device", "nvme,drive=disk0,serial=bench", "-nic", "user,model=e1000e", "-serial", "stdio",
           "-monitor", "none"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    out = b""
    try:
        while READY not in out:
            if time.monotonic() - started > time_limit or proc.poll() is not None:
                raise SystemExit(f"the plain QEMU boot did not get ready ({out[-500:]!r})")
            ready, _, _ = select.select([proc.stdout], [], [], 0.25)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)
        return time.monotonic() - started
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=600)
    args = parser.parse_args()

    from reclo_site.testing_disks import test_disks
    from recovery.sandbox import choose_accel

    disks = test_disks()
    accel = choose_accel()
    with tempfile.TemporaryDirectory(prefix="reclo-drill-bench-") as tmp:
        work = Path(tmp)
        stored = store_full_backup(disks.good, work)
        drills, baselines = [], []
        for n in range(args.runs):
            drills.append(drill_once(stored, work, args.time_limit))
            baselines.append(baseline_once(disks.good, accel, args.time_limit))
            print(f"run {n + 1}/{args.runs}: verdict {drills[-1]['time to verdict']:.1f} s, "
                  f"plain boot {baselines[-1]:.1f} s", flush=True)  # fmt: skip

    print(f"\ndrill of the test disk ({disks.good.stat().st_size // 2**20} MiB, {accel}, "
          f"{args.runs} run{'s' if args.runs > 1 else ''}; seconds, min / median)")  # fmt: skip
    rows = ["prepare disk", "sandbox prepare", "boot", "checks", "teardown", "time to verdict"]
    for row in rows:
        values = [d[row] for d in drills]
        print(f"  {row:<28} {min(values):7.2f} / {statistics.median(values):7.2f}")
    print(f"  {'baseline: plain QEMU boot':<28} {min(baselines):7.2f} / {statistics.median(baselines):7.2f}")
    boot, plain = statistics.median(d["boot"] for d in drills), statistics.median(baselines)
    verdict = statistics.median(d["time to verdict"] for d in drills)
    print(f"\n  sandbox boot - plain boot: {boot - plain:+.2f} s; time to verdict / plain boot: {verdict / plain:.2f}x")


if __name__ == "__main__":
    main()
