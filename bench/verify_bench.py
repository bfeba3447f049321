"""Verifying crafted restore points: time and peak memory next to plain decompression.

A few kilobytes of seekable zstd can declare a 2 TiB disk of 4 KiB blocks;
its BAT (2 GiB decompressed) used to be read as one list. This prints, for
crafted empty VHDs of growing declared size, the time and the peak Python
memory (tracemalloc) of `validate_stored` (what the portal's verifier runs)
and of a chain merge, next to the baseline measured in the same run:
streaming the same object through a zstd decompressor into nothing.

    .venv/bin/python bench/verify_bench.py
"""

import io
import time
import tracemalloc
import uuid

import pyzstd
from reclo_agent import vhd
from reclo_agent.vhd.format import FOOTER_SIZE, HEADER_SIZE, DiskType, DynamicHeader, Footer

KIB, MIB, GIB = 1024, 1024**2, 1024**3


def crafted(virtual_size: int, block_size: int) -> bytes:
    """An empty dynamic VHD as seekable zstd (everything but the headers is BAT)."""
    blocks = -(-virtual_size // block_size)
    footer = Footer(
        disk_type=DiskType.DYNAMIC, current_size=virtual_size, unique_id=uuid.uuid4(), timestamp=0,
        data_offset=FOOTER_SIZE,
    ).pack()  # fmt: skip
    header = DynamicHeader(table_offset=FOOTER_SIZE + HEADER_SIZE, max_table_entries=blocks, block_size=block_size)
    out = io.BytesIO()
    with vhd.SeekableZstdWriter(out, max_frame_size=MIB) as writer:
        writer.write(footer + header.pack())
        left = -(-4 * blocks // 512) * 512
        while left:
            writer.write(b"\xff" * min(left, MIB))
            left -= min(left, MIB)
        writer.write(footer)
    return out.getvalue()


class Sink:
    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def measure(fn) -> tuple[float, float]:
    """(seconds, peak MiB of Python allocations) of fn()."""
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / MIB
    tracemalloc.stop()
    return seconds, peak


def decompress_all(data: bytes) -> None:
    with pyzstd.SeekableZstdFile(io.BytesIO(data)) as stream:
        while stream.read(MIB):
            pass


def merge(data: bytes) -> None:
    chain = vhd.open_chain([vhd.open_seekable(io.BytesIO(data))])
    with vhd.SeekableZstdWriter(Sink()) as out:
        vhd.merge_chain(chain, out)


def main() -> None:
    print(f"{'declared disk':>22} {'stored':>9} {'BAT':>9} | {'what':<28} {'seconds':>8} {'peak MiB':>9}")
    for virtual_size, block_size in ((128 * GIB, 4 * KIB), (512 * GIB, 4 * KIB), (2040 * GIB, 4 * KIB)):
        data = crafted(virtual_size, block_size)
        label = f"{virtual_size // GIB} GiB @ {block_size // KIB} KiB"
        bat = 4 * (virtual_size // block_size) / MIB
        rows = [
            ("baseline: zstd -d to nothing", lambda data=data: decompress_all(data)),
            ("validate_stored", lambda data=data: vhd.validate_stored(io.BytesIO(data))),
            ("merge_chain", lambda data=data: merge(data)),
        ]
        for what, fn in rows:
            seconds, peak = measure(fn)
            print(f"{label:>22} {len(data) / KIB:>7.1f}KB {bat:>7.0f}MiB | {what:<28} {seconds:>8.2f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
