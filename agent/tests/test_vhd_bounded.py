"""Crafted headers cannot blow up the reader: memory stays bounded whatever the declared size.

A few kilobytes of seekable zstd can declare a 2 TiB disk of 4 KiB blocks:
its BAT (4 bytes per declared block, all "unallocated") is 2 GiB once
decompressed, yet compresses to almost nothing. The reader, the validator
and the chain merger must read such a BAT in windows, never as one list. Each
check runs in a subprocess whose address space is capped
(``resource.setrlimit(RLIMIT_AS)``) at what it uses after its imports plus a
constant, far below the size of the BAT.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid

import pytest
from reclo_agent.vhd import SeekableZstdWriter, VHDError, validate
from reclo_agent.vhd.format import FOOTER_SIZE, HEADER_SIZE, DiskType, DynamicHeader, Footer

KIB, MIB, GIB = 1024, 1024**2, 1024**3
# What the checks may use on top of an idle interpreter with the package
# imported: a few BAT windows, zstd buffers and one block, not the BAT.
HEADROOM = 64 * MIB


def crafted_vhd(virtual_size: int, block_size: int, *, frame: int = MIB) -> bytes:
    """A valid, empty dynamic VHD as seekable zstd: everything is BAT."""
    blocks = -(-virtual_size // block_size)
    footer = Footer(
        disk_type=DiskType.DYNAMIC, current_size=virtual_size, unique_id=uuid.uuid4(), timestamp=0,
        data_offset=FOOTER_SIZE,
    ).pack()  # fmt: skip
    header = DynamicHeader(
        table_offset=FOOTER_SIZE + HEADER_SIZE, max_table_entries=blocks, block_size=block_size
    ).pack()
    out = io.BytesIO()
    with SeekableZstdWriter(out, max_frame_size=frame) as writer:
        writer.write(footer + header)
        left = -(-4 * blocks // 512) * 512
        chunk = b"\xff" * MIB
        while left:
            writer.write(chunk[: min(left, MIB)])
            left -= min(left, MIB)
        writer.write(footer)
    return out.getvalue()


# Runs in the capped subprocess: validate the stored object, walk the chain's
# allocated blocks, and merge it (into a sink that only counts).
_CHECK = """
import json, resource, sys
from reclo_agent import vhd

class Sink:
    size = 0
    def write(self, b):
        self.size += len(b)
        return len(b)
    def flush(self):
        pass

path, headroom, merge = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "merge"
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))
with open(path, "rb") as f:
    info = vhd.validate_stored(f, expected_kind="full")
    chain = vhd.open_chain([vhd.open_seekable(f)])
    allocated = sum(1 for _ in chain.allocated_blocks())
    merged = None
    if merge:
        sink = Sink()
        with vhd.SeekableZstdWriter(sink) as out:
            merged = vhd.merge_chain(chain, out).file_size
print(json.dumps({"virtual_size": info.virtual_size, "file_size": info.file_size,
                  "allocated": allocated, "merged": merged}))
"""


def run_capped(path, *, merge: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, str(path), str(HEADROOM), "merge" if merge else "validate"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"the capped check failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    ("virtual_size", "block_size", "merge"),
    [
        pytest.param(128 * GIB, 4 * KIB, True, id="128GiB-4KiB-blocks"),  # the 11.5 KB upload of the report
        pytest.param(512 * GIB, 4 * KIB, False, id="512GiB-4KiB-blocks"),  # about the 45 KB one
        pytest.param(2040 * GIB, 4 * KIB, False, id="2TiB-4KiB-blocks"),  # the format's maximum
    ],
)
def test_a_crafted_header_is_read_within_a_constant_memory(tmp_path, virtual_size, block_size, merge):
    path = tmp_path / "crafted.vhd.zst"
    path.write_bytes(crafted_vhd(virtual_size, block_size))
    bat = 4 * (virtual_size // block_size)
    assert bat > HEADROOM  # a BAT read as one list could never fit
    result = run_capped(path, merge=merge)
    assert (result["virtual_size"], result["allocated"]) == (virtual_size, 0)
    assert result["file_size"] > bat
    if merge:
        assert result["merged"] == result["file_size"]  # the same empty disk, written again


def test_blocks_out_of_block_order_are_refused(kit):
    """The streaming check needs blocks in block order (how ReClo and qemu-img write them)."""
    disk = kit.make_disk(3 * 2 * MIB, seed=3)
    data = bytearray(kit.dynamic_vhd(disk))
    at = FOOTER_SIZE + HEADER_SIZE
    bat = [int.from_bytes(data[at + 4 * i : at + 4 * i + 4], "big") for i in range(3)]
    allocated = [i for i, entry in enumerate(bat) if entry != 0xFFFFFFFF]
    assert len(allocated) >= 2
    a, b = allocated[:2]
    data[at + 4 * a : at + 4 * a + 4], data[at + 4 * b : at + 4 * b + 4] = (
        bat[b].to_bytes(4, "big"), bat[a].to_bytes(4, "big"),
    )  # fmt: skip
    with pytest.raises(VHDError, match=f"block {b} is stored before block {a}"):
        validate(io.BytesIO(bytes(data)))


def test_a_bat_over_the_callers_limit_is_refused_before_it_is_read():
    data = crafted_vhd(128 * GIB, 4 * KIB)
    from reclo_agent.vhd import open_seekable

    with pytest.raises(VHDError, match="33554432 blocks of 4096 bytes: more than the 4194304 allowed"):
        validate(open_seekable(io.BytesIO(data)), max_blocks=4 * MIB)
