"""The restore's block assembly: frames decompressed to their exact sizes, views instead of copies, zeros found."""

import ctypes
import os

import pytest
import pyzstd
from reclo_agent import memory
from reclo_agent.restore import _assemble, _decompress
from reclo_agent.vhd import VHDError

BLOCK = 64 * 1024
MiB = 1024 * 1024
BITMAP = 512
FULL = b"\xff" * (BLOCK // 512 // 8) + bytes(BITMAP - BLOCK // 512 // 8)


def zstd(raw: bytes) -> bytes:
    return pyzstd.compress(raw, {pyzstd.CParameter.checksumFlag: 1})  # as the agent writes its frames


def stored(data: bytes, bitmap: bytes = FULL, *, split: bool = False):
    """One layer's piece as Layer.frames_of gives it: (frames, where the block starts, frame sizes)."""
    raw = bitmap + data
    if not split:
        frame = zstd(raw)
        return frame, 0, [(len(frame), len(raw))]
    first, second = zstd(raw[:1000]), zstd(raw[1000:])
    return first + second, 0, [(len(first), 1000), (len(second), len(raw) - 1000)]


def test_a_block_from_one_frame_is_a_view_of_it_and_knows_it_is_not_zero():
    data = os.urandom(BLOCK)
    block, zero = _assemble(3, BLOCK, [stored(data)], BLOCK, BITMAP)
    assert isinstance(block, memoryview)
    assert block == data and zero is False


def test_a_stored_block_of_zeros_is_flagged_so_a_file_keeps_its_hole():
    block, zero = _assemble(0, BLOCK, [stored(bytes(BLOCK))], BLOCK, BITMAP)
    assert zero is True and bytes(block) == bytes(BLOCK)
    nearly = bytearray(BLOCK)
    nearly[-1] = 1
    assert _assemble(0, BLOCK, [stored(bytes(nearly))], BLOCK, BITMAP)[1] is False


def test_a_short_last_block_and_a_block_over_two_frames():
    data = os.urandom(BLOCK)
    block, zero = _assemble(0, BLOCK, [stored(data, split=True)], BLOCK, BITMAP)
    assert bytes(block) == data and not zero
    block, _ = _assemble(0, 4096, [stored(data)], BLOCK, BITMAP)
    assert bytes(block) == data[:4096]


def test_layers_stack_by_their_bitmaps():
    lower, upper = os.urandom(BLOCK), os.urandom(BLOCK)
    first_sector_only = b"\x80" + bytes(BITMAP - 1)
    block, zero = _assemble(0, BLOCK, [stored(upper, first_sector_only), stored(lower)], BLOCK, BITMAP)
    assert bytes(block) == upper[:512] + lower[512:] and not zero


def test_a_frame_that_decompresses_to_another_size_than_the_seek_table_says_is_refused():
    data = os.urandom(BLOCK)
    frames, _, [(c_size, d_size)] = stored(data)
    with pytest.raises(VHDError, match="block 7"):
        _decompress(7, frames, [(c_size, d_size - 1)])
    with pytest.raises(VHDError, match="block 7"):
        _decompress(7, frames, [(c_size, d_size + 512)])
    damaged = bytearray(frames)
    damaged[len(damaged) // 2] ^= 0xFF
    with pytest.raises(VHDError, match="block 7"):
        _decompress(7, bytes(damaged), [(c_size, d_size)])


def test_malloc_thresholds_are_raised_on_glibc_unless_the_user_set_them(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert memory.keep_freed_buffers() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    # glibc takes the thresholds; another libc (musl) is left alone and says so.
    assert memory.keep_freed_buffers() is hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def test_the_writer_starts_writeback_behind_itself_window_by_window(tmp_path, monkeypatch):
    from reclo_agent import restore as restore_module

    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(restore_module, "FLUSH_WINDOW", 4 * BLOCK)
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, start, n, advice: calls.append((start, n, advice)) or real(fd, start, n, advice)
    )
    target = restore_module.Target(str(tmp_path / "out.img"), 20 * BLOCK, force=False)
    writer = restore_module._Writer(target)
    pieces = {n: os.urandom(BLOCK) for n in range(20) if n % 3}  # holes, as zero blocks leave them
    for n, data in pieces.items():
        writer.put(n * BLOCK, memoryview(data))
    writer.close()
    target.close()
    assert {advice for _, _, advice in calls} == {os.POSIX_FADV_DONTNEED}
    # Each call covers the window before and the one just written, moving forward.
    ends = [start + n for start, n, _ in calls]
    assert ends == sorted(ends) and len(calls) == len(pieces) // 4
    assert calls[0][0] == 0 and all(calls[k + 1][0] <= ends[k] for k in range(len(calls) - 1))
    with open(tmp_path / "out.img", "rb") as f:
        written = f.read()
    assert all(written[n * BLOCK : (n + 1) * BLOCK] == pieces.get(n, bytes(BLOCK)) for n in range(20))


@pytest.mark.parametrize(
    "sizes",
    [[474 * MiB, 10 * MiB], [10 * MiB, 474 * MiB, 5 * MiB], [1000 * MiB] * 3, [MiB] * 40, [0], [3 * 1024 * MiB] * 100],
)
def test_read_ahead_shares_stay_in_the_budget_and_go_where_they_are_used(sizes):
    from reclo_agent.restore import MIN_SHARE, READ_AHEAD_BUDGET, read_ahead_shares

    shares = read_ahead_shares(sizes)
    assert sum(shares) <= READ_AHEAD_BUDGET
    fair = READ_AHEAD_BUDGET // len(sizes)
    for size, share in zip(sizes, shares, strict=True):
        assert share >= min(fair, max(size, MIN_SHARE))  # never less than an equal split would give it


def test_small_objects_leave_the_read_ahead_to_the_large_one():
    from reclo_agent.restore import read_ahead_shares

    assert read_ahead_shares([474 * MiB, 10 * MiB]) == [224 * MiB, 32 * MiB]
    assert read_ahead_shares([5 * MiB, 474 * MiB, 40 * MiB]) == [32 * MiB, 184 * MiB, 40 * MiB]
    assert read_ahead_shares([1000 * MiB] * 2) == [128 * MiB] * 2


def test_a_full_under_a_small_incremental_is_fetched_in_eighths():
    from reclo_agent.restore import read_ahead_shares, stream_plan

    full, inc = 474 * MiB, 10 * MiB
    share_full, share_inc = read_ahead_shares([full, inc])
    chunk, ahead = stream_plan(full, share_full)
    assert -(-full // chunk) <= 9 and ahead >= 2 and (ahead + 1) * chunk <= share_full
