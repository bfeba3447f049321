"""Throughput of the agent's VHD code, next to qemu-img measured in the same run.

    python bench/vhd_bench.py [--size-mib 256] [--keep DIR]

Makes a raw disk image (a mix of random, all-zero and text blocks), then
times: writing it as a dynamic VHD (ours vs ``qemu-img convert -O vpc``),
writing it straight into seekable zstd (the agent's upload path), and
merging a base plus two incrementals (1% of the pages changed in scattered
4 KiB writes each) into one dynamic VHD. MB/s are of virtual disk bytes.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from disk_images import change_pages, make_raw
from reclo_agent.vhd import (
    SeekableZstdWriter,
    VHDReader,
    VHDWriter,
    compress_seekable,
    make_bitmap,
    merge_chain,
    open_chain,
    write_dynamic_from_raw,
)

MIB = 1024 * 1024
BLOCK = 2 * MIB
PAGE = 4096


def write_incremental(raw: Path, out: Path, runs, parent_vhd: Path, name: str) -> None:
    with open(parent_vhd, "rb") as f:
        parent = VHDReader(f).info.as_parent(name)
    size = raw.stat().st_size
    with open(raw, "rb") as src, open(out, "wb") as dst:
        writer = VHDWriter(dst, size, runs, parent=parent)
        for index in sorted(runs):
            src.seek(index * BLOCK)
            writer.write_block(index, src.read(BLOCK), make_bitmap(runs[index], 512))
        writer.close()


def timed(label: str, size: int, fn) -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"{label:<52} {seconds:7.2f} s {size / MIB / seconds:8.1f} MB/s", flush=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--keep", help="folder to keep the files in (default: a temporary one)")
    args = parser.parse_args()
    size = args.size_mib * MIB
    qemu_img = shutil.which("qemu-img")
    work = Path(args.keep or tempfile.mkdtemp(prefix="vhd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = work / "disk.raw"
        make_raw(raw, size)
        print(f"{args.size_mib} MiB raw image in {work}\n")

        def ours():
            with open(raw, "rb") as src, open(work / "ours.vhd", "wb") as out:
                write_dynamic_from_raw(src, out)

        timed("reclo_agent: raw -> dynamic VHD", size, ours)
        if qemu_img:
            timed(
                "qemu-img convert -O vpc (dynamic)",
                size,
                lambda: subprocess.run(
                    [
                        qemu_img,
                        "convert",
                        "-f",
                        "raw",
                        "-O",
                        "vpc",
                        "-o",
                        "subformat=dynamic,force_size=on",
                        str(raw),
                        str(work / "qemu.vhd"),
                    ],
                    check=True,
                ),
            )
        else:
            print("qemu-img not installed: no comparison")

        stored = io.BytesIO()

        def ours_zstd():
            with open(raw, "rb") as src, SeekableZstdWriter(stored) as dst:
                write_dynamic_from_raw(src, dst)

        timed("reclo_agent: raw -> dynamic VHD -> seekable zstd", size, ours_zstd)
        print(f"{'':<52} stored object {stored.tell() / MIB:.1f} MiB")

        # A chain: base, then two incrementals of 1% scattered 4 KiB pages.
        base = work / "ours.vhd"
        inc1, inc2 = work / "inc1.vhd", work / "inc2.vhd"
        write_incremental(raw, inc1, change_pages(raw, 0.01, seed=2), base, base.name)
        write_incremental(raw, inc2, change_pages(raw, 0.01, seed=3), inc1, inc1.name)
        for inc in (inc1, inc2):
            with open(inc, "rb") as f:
                packed = compress_seekable(f, io.BytesIO()).size
            print(f"{'':<52} {inc.name}: {inc.stat().st_size / MIB:.0f} MiB, stored {packed / MIB:.1f} MiB")

        def merge():
            with ExitStack() as stack:
                files = [stack.enter_context(open(p, "rb")) for p in (base, inc1, inc2)]
                with open(work / "merged.vhd", "wb") as out:
                    merge_chain(open_chain(files), out)

        timed("reclo_agent: merge base + 2 incrementals", size, merge)
        if qemu_img:
            same = subprocess.run(
                [qemu_img, "compare", "-f", "vpc", str(work / "merged.vhd"), "-F", "raw", str(raw)],
                check=False,
                capture_output=True,
                text=True,
            )
            print(f"\nqemu-img compare merged.vhd disk.raw: {same.stdout.strip() or same.stderr.strip()}")
            if same.returncode:
                return 1
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
