"""Shared helpers of the agent's tests: small disk images and external tools.

Helpers reach the tests through the ``kit`` fixture rather than imports, so
they work whatever import mode pytest runs in (the repository root has a
conftest of its own).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from reclo_agent.vhd import VHDWriter, make_bitmap, write_dynamic_from_raw
from reclo_agent.vhd.format import DEFAULT_BLOCK_SIZE, SECTOR

IN_CI = os.environ.get("CI", "").lower() == "true"
MIB = 1024 * 1024


def _missing(reason: str) -> None:
    """Skip locally, but fail in CI, where every tool must be installed."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the CI machine must provide it)")
    pytest.skip(reason)


def assert_same(got, expected) -> None:
    """Fail, saying where, unless two (disk-sized) byte strings are equal.

    Used instead of ``assert got == expected``: pytest's own diff of
    megabytes takes minutes, and with CI=true it does not even truncate it,
    so a failing comparison would look like a hang.
    """
    if got == expected:
        return
    common = min(len(got), len(expected))
    lines = [f"{len(got)} bytes differ from the expected {len(expected)} bytes"]
    bad = [s for s in range(0, common, SECTOR) if got[s : s + SECTOR] != expected[s : s + SECTOR]]
    if bad:
        first = next(i for i in range(bad[0], bad[0] + SECTOR) if got[i] != expected[i])
        lines.append(
            f"{len(bad)} of {-(-common // SECTOR)} sectors differ; the first at byte {first} "
            f"(sector {first // SECTOR}, 2 MiB block {first // DEFAULT_BLOCK_SIZE}): "
            f"{bytes(got[first : first + 16]).hex()} != {bytes(expected[first : first + 16]).hex()}"
        )
        lines.append(f"differing sectors (first 20): {[s // SECTOR for s in bad[:20]]}")
    pytest.fail("\n".join(lines), pytrace=False)


@pytest.fixture
def require_tool():
    """``require_tool("qemu-img")`` -> the tool's path, or skip/fail."""

    def require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            _missing(f"{name} is not installed (Debian: apt-get install qemu-utils / zstd)")
        return path

    return require


@pytest.fixture
def pyvhdi():
    """The libvhdi Python bindings (PyPI libvhdi-python), or skip/fail."""
    try:
        import pyvhdi
    except ImportError:
        _missing("pyvhdi is not importable (pip install libvhdi-python)")
    return pyvhdi


def make_disk(size: int, seed: int = 0, block_size: int = DEFAULT_BLOCK_SIZE) -> bytearray:
    """A raw disk with random, all-zero, text and partly-zero blocks."""
    rnd = random.Random(seed)
    disk = bytearray(size)
    for index, start in enumerate(range(0, size, block_size)):
        end = min(start + block_size, size)
        kind = index % 4
        if kind == 0:
            disk[start:end] = rnd.randbytes(end - start)
        elif kind == 2:
            text = b"ReClo keeps the office running. " * (block_size // 32 + 1)
            disk[start:end] = text[: end - start]
        elif kind == 3:  # a few scattered sectors in an otherwise zero block
            for _ in range(5):
                at = start + rnd.randrange(0, (end - start) // SECTOR) * SECTOR
                disk[at : at + SECTOR] = rnd.randbytes(SECTOR)
    return disk


def change_pages(disk: bytearray, seed: int, count: int, page: int = 4096) -> bytearray:
    """A copy of ``disk`` with ``count`` random pages rewritten (agent-like)."""
    rnd = random.Random(seed)
    new = bytearray(disk)
    for _ in range(count):
        at = rnd.randrange(0, len(disk) // page) * page
        new[at : at + page] = rnd.randbytes(page)
    return new


def changed_runs(old: bytes, new: bytes, block_size: int, page: int = 4096) -> dict[int, list[tuple[int, int]]]:
    """Per block, the sector runs of the pages that differ (what the agent's
    page hashes tell it)."""
    runs: dict[int, list[tuple[int, int]]] = {}
    for at in range(0, len(new), page):
        if old[at : at + page] != new[at : at + page]:
            index, within = divmod(at, block_size)
            n = min(page, len(new) - at) // SECTOR
            runs.setdefault(index, []).append((within // SECTOR, n))
    return runs


def dynamic_vhd(disk: bytes, **kwargs) -> bytes:
    out = io.BytesIO()
    write_dynamic_from_raw(io.BytesIO(bytes(disk)), out, **kwargs)
    return out.getvalue()


def differencing_vhd(old: bytes, new: bytes, parent, block_size: int = DEFAULT_BLOCK_SIZE, page: int = 4096) -> bytes:
    """A differencing VHD holding the pages of ``new`` that differ from ``old``."""
    runs = changed_runs(old, new, block_size, page)
    out = io.BytesIO()
    writer = VHDWriter(out, len(new), runs, parent=parent, block_size=block_size)
    bm_bytes = block_size // SECTOR // 8
    for index in sorted(runs):
        data = bytes(new[index * block_size : (index + 1) * block_size])
        writer.write_block(index, data, make_bitmap(runs[index], bm_bytes))
    writer.close()
    return out.getvalue()


@pytest.fixture
def tmp_files(tmp_path):
    """``put(name, data)`` -> path of a file written under a temporary folder."""

    def put(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    return put


@pytest.fixture(scope="session")
def kit():
    """Helpers: make_disk, change_pages, changed_runs, dynamic_vhd, differencing_vhd, same."""
    return SimpleNamespace(
        same=assert_same,
        make_disk=make_disk,
        change_pages=change_pages,
        changed_runs=changed_runs,
        dynamic_vhd=dynamic_vhd,
        differencing_vhd=differencing_vhd,
        MIB=MIB,
    )


# --- a fake root with a running cron daemon (schedule install --root) ----------------------


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def cron_daemon(root, tmp_path):
    """The scheduler of ``root``: a live process called cron (a copy of sleep), named in ROOT/run/crond.pid."""
    binary = tmp_path / "bin" / "cron"
    binary.parent.mkdir()
    shutil.copy("/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "600"])
    (root / "run").mkdir(exist_ok=True)
    (root / "run" / "crond.pid").write_text(f"{proc.pid}\n")

    def stop():
        proc.kill()
        proc.wait()

    proc.stop = stop
    yield proc
    stop()
