"""A stored chain written straight into an EBS snapshot: the one-pass disk of an EBS direct failover.

No merged copy anywhere: each layer of the chain is read from S3, merged
block by block in memory and the non-zero 512 KiB pieces go into the
snapshot with PutSnapshotBlock. What makes it fast (measured by
`bench/failover_bench.py`, see docs/architecture.md):

- **Few, long reads.** The disk is cut into `READERS` spans of consecutive
  blocks holding equal numbers of stored blocks, one reader thread each.
  A span's reader fetches each layer with one ranged GET bounded to the
  frames of that layer's blocks in the span (found from the layer's BAT and
  its seek table) and decompresses the frames as the merge reaches them.
  So a failover makes `READERS` GETs per layer whatever the disk's size,
  instead of one per few MiB: on S3 each GET costs a first-byte latency, on
  moto's server a copy of the whole object.
- **Metadata once.** Footers, headers, BATs and seek tables are read once
  per layer (by the main thread) and shared by every span.
- **Nothing read that is not needed.** Blocks no layer stores are neither
  read nor written; frames of a layer whose sectors the layers above hold
  entirely are passed over without being decompressed (read through, or a
  new GET past a long gap); all-zero pieces are not written.
- **Many writes in flight.** All readers feed one pool of `PUTS`
  PutSnapshotBlock calls through a bounded queue, so reading, merging and
  writing overlap and memory stays at `QUEUE` pieces plus a few frames per
  layer and reader.

Resumable: each span's progress (the first block not known to be written,
and how many pieces went in below it) is checkpointed in the step's
outputs, so a worker that dies half-way (SIGKILL included) is taken over by
another that carries on from the checkpoints in the same snapshot, and
rewrites at most what was in flight (rewriting a block is harmless).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

from reclo_agent.vhd import (
    ChainReader,
    SeekTable,
    VHDError,
    VHDReader,
    decompress_frame,
    open_seekable,
    read_seek_table,
)
from reclo_agent.vhd.format import SECTOR, DiskType, bitmap_size

from reclo_site.cloud import imaging, storage, streams

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Spans read at once (each one GET per layer in flight).
READERS = 4
# PutSnapshotBlock calls in flight (each its own HTTP request of 512 KiB).
PUTS = 16
# Pieces read but not yet handed to a writer: what the readers may run ahead.
QUEUE = 2 * PUTS
# Checkpoints: after this many blocks of the disk are known written, or this many seconds.
CHECKPOINT_BLOCKS = 64
CHECKPOINT_SECONDS = 10.0
# Layer metadata (footer, header, BAT, seek table) is read in chunks of this size.
META_CHUNK = MiB


@dataclass
class Layer:
    """One layer of the chain, read once and shared by the spans: where each of its stored blocks is."""

    key: str
    pinned: dict
    vhd: VHDReader
    table: SeekTable
    indices: array  # the blocks it stores, increasing
    offsets: array  # where each one's bitmap (fixed VHD: its data) starts in the decompressed layer

    @property
    def fixed(self) -> bool:
        return self.vhd.disk_type == DiskType.FIXED


def open_layers(layers: list[tuple[str, dict]]) -> tuple[ChainReader, list[Layer]]:
    """The chain from `(key, pinned reader arguments)`, base first: its checked reader and its shared layers.

    The ChainReader (over ranged reads of the metadata) checks the chain's
    links and lists its blocks; no block data is read here.
    """
    readers, tables = [], []
    for key, pinned in layers:
        raw = storage.ObjectReader(key, chunk_size=META_CHUNK, **pinned)
        tables.append(read_seek_table(raw))  # before pyzstd opens it: it keeps its own place in the file
        readers.append(VHDReader(open_seekable(raw)))
    chain = ChainReader(readers)
    shared = []
    for (key, pinned), vhd, table in zip(layers, readers, tables, strict=True):
        indices = array("q", vhd.allocated_indices())
        if vhd.disk_type == DiskType.FIXED:
            offsets = array("q", (index * vhd.block_size for index in indices))
        else:
            offsets = array("q", (vhd.bat_entry(index) * SECTOR for index in indices))
        shared.append(Layer(key, pinned, vhd, table, indices, offsets))
    return chain, shared


class _Frames:
    """A layer's decompressed bytes for one span, fetched by one bounded GET and read forward."""

    def __init__(self, layer: Layer, start: int, end: int):
        self._layer = layer
        self._table = layer.table
        # The span's frames of this layer end with the one holding its last byte.
        self._c_end = self._table.c_offsets[self._table.frame_at(end - 1) + 1]
        self._stream: streams.SequentialObjectReader | None = None
        self._frames: dict[int, bytes] = {}

    def read(self, offset: int, length: int) -> bytes:
        """`length` decompressed bytes at `offset`; offsets should not go back (a step back costs a new GET)."""
        table = self._table
        first = table.frame_at(offset)
        last = table.frame_at(offset + length - 1)
        for stale in [f for f in self._frames if f < first]:
            del self._frames[stale]
        parts = []
        for frame in range(first, last + 1):
            data = self._frames.get(frame)
            if data is None:
                data = self._frames[frame] = self._fetch(frame)
            parts.append(data)
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        within = offset - table.d_offsets[first]
        return joined[within : within + length]

    def _fetch(self, frame: int) -> bytes:
        table = self._table
        start, end = table.c_offsets[frame], table.c_offsets[frame + 1]
        if self._stream is None:
            # The first GET runs from here to the span's last frame: later frames continue it.
            self._stream = streams.SequentialObjectReader(self._layer.key, end=self._c_end, **self._layer.pinned)
        self._stream.seek(start)
        raw = self._stream.read(end - start)
        while len(raw) < end - start:  # a bounded range ends short of a frame only at its end
            more = self._stream.read(end - start - len(raw))
            if not more:
                raise VHDError(f"frame {frame} of {self._layer.key} is cut short")
            raw += more
        return decompress_frame(raw, table.d_offsets[frame + 1] - table.d_offsets[frame], frame)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


class _SpanLayer:
    """A layer as one span's merge sees it (what ChainReader asks of a VHDReader), read through `_Frames`."""

    def __init__(self, layer: Layer, first: int, end: int):
        vhd = self._vhd = layer.vhd
        self.virtual_size, self.block_size, self.block_count = vhd.virtual_size, vhd.block_size, vhd.block_count
        self._fixed = layer.fixed
        self._bitmap_size = 0 if self._fixed else bitmap_size(vhd.block_size)
        lo, hi = bisect_left(layer.indices, first), bisect_left(layer.indices, end)
        self._where = dict(zip(layer.indices[lo:hi], layer.offsets[lo:hi], strict=True))
        self._frames = None
        if lo < hi:
            last_end = layer.offsets[hi - 1] + self._bitmap_size + vhd.block_length(layer.indices[hi - 1])
            self._frames = _Frames(layer, layer.offsets[lo], last_end)

    def block_length(self, index: int) -> int:
        return self._vhd.block_length(index)

    def read_bitmap(self, index: int) -> bytes | None:
        offset = self._where.get(index)
        if offset is None:
            return None
        if self._fixed:
            return self._vhd.read_bitmap(index)  # all sectors: no read
        return self._reader().read(offset, self._bitmap_size)

    def _reader(self) -> _Frames:
        assert self._frames is not None, "read after close"
        return self._frames

    def read_block_data(self, index: int) -> bytes:
        offset = self._where.get(index)
        if offset is None:
            return bytes(self.block_size)
        if self._fixed:
            return self._reader().read(offset, self.block_length(index)).ljust(self.block_size, b"\0")
        return self._reader().read(offset + self._bitmap_size, self.block_size)

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()


def ebs_pieces(index: int, data: bytes, per: int) -> Iterator[tuple[int, bytes]]:
    """(EBS block index, 512 KiB) of the non-zero parts of VHD block `index` (unwritten EBS blocks read as zeros)."""
    size = imaging.EBS_BLOCK_SIZE
    zero = bytes(size)
    for part in range(per):
        piece = data[part * size : (part + 1) * size]
        if piece and piece != zero[: len(piece)]:
            yield index * per + part, piece.ljust(size, b"\0")


def changed_pieces(index: int, data: bytes, bitmap: bytes, per: int) -> Iterator[tuple[int, bytes]]:
    """(EBS block index, 512 KiB) of the parts of VHD block `index` whose sectors `bitmap` marks, zeros included.

    For an incremental written on its parent's snapshot: a marked piece is
    written even when it is all zeros (it may hide data of the parent's), an
    unmarked one never (the parent's reads through).
    """
    size = imaging.EBS_BLOCK_SIZE
    marks = size // SECTOR // 8  # bitmap bytes per EBS block
    for part in range(per):
        piece = data[part * size : (part + 1) * size]
        if piece and any(bitmap[part * marks : (part + 1) * marks]):
            yield index * per + part, piece.ljust(size, b"\0")


def blocks_to_write(chain: ChainReader, layers: list[Layer], *, changed_only: bool = False) -> array:
    """The VHD blocks `write_chain` goes through: the chain's stored ones, or with `changed_only` the top layer's."""
    return array("q", layers[-1].indices) if changed_only else array("q", chain.allocated_blocks())


def plan_spans(allocated: array, total: int, count: int | None = None) -> list[list[int]]:
    """`[first block, end block, next block, pieces written]`: `count` (READERS) spans, equal in stored blocks."""
    if not allocated:
        return []
    count = max(1, min(count or READERS, len(allocated)))
    bounds = [0] + [allocated[n * len(allocated) // count] for n in range(1, count)] + [total]
    return [[bounds[n], bounds[n + 1], bounds[n], 0] for n in range(count) if bounds[n] < bounds[n + 1]]


class _Progress:
    """Which blocks of each span are known written: the checkpoints (touched by readers and the main thread)."""

    def __init__(self, spans: list[list[int]], per: int):
        self.spans = spans
        self._starts = [span[0] for span in spans]
        self._per = per
        self._lock = threading.Lock()
        self._open: list[dict] = [{} for _ in spans]  # per span: block -> [pieces in flight, pieces written]
        self._read = [span[2] for span in spans]  # every block before this was handed on

    def queued(self, span: int, index: int, pieces: int) -> None:
        with self._lock:
            if pieces:
                self._open[span][index] = [pieces, 0]
            self._read[span] = index + 1

    def written(self, ebs_index: int) -> None:
        index = ebs_index // self._per
        span = bisect_left(self._starts, index + 1) - 1
        with self._lock:
            entry = self._open[span][index]
            entry[0] -= 1
            entry[1] += 1

    def finished(self, span: int) -> None:
        with self._lock:
            self._read[span] = self.spans[span][1]

    def checkpoint(self) -> list[list[int]]:
        """Move each span's next block past every block whose pieces are all written; the spans as saved."""
        with self._lock:
            for n, span in enumerate(self.spans):
                entries = self._open[n]
                waiting = [index for index, (in_flight, _) in entries.items() if in_flight]
                next_block = min(waiting) if waiting else self._read[n]
                for index in [index for index in entries if index < next_block]:
                    span[3] += entries.pop(index)[1]
                span[2] = max(span[2], next_block)
            return [list(span) for span in self.spans]


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def write_chain(
    snapshot_id: str,
    chain: ChainReader,
    layers: list[Layer],
    spans: list[list[int]],
    *,
    save: Callable[[list[list[int]]], None],
    heartbeat: Callable[[str], None],
    changed_only: bool = False,
) -> int:
    """Write every non-zero piece of the chain's disk into `snapshot_id`, from each span's next block on.

    With `changed_only` (an incremental staged on its parent's snapshot,
    `recovery.staging`) only the pieces the top layer's sector bitmaps
    mark are written, each as the merged chain reads there (`changed_pieces`);
    `spans` then come from `plan_spans` of `blocks_to_write(..., changed_only=True)`.

    `spans` as from `plan_spans` (or as saved by an earlier try). `save` is
    called with the spans at each checkpoint and at the end, `heartbeat`
    with a progress line, both in the caller's thread (the step's database
    connection). Returns the pieces written in all (earlier tries included).
    Exceptions of the readers (VHDError, storage.ObjectChanged, CloudError)
    and of the writes come out here, after every thread stopped.
    """
    per = chain.block_size // imaging.EBS_BLOCK_SIZE
    allocated = blocks_to_write(chain, layers, changed_only=changed_only)
    progress = _Progress(spans, per)
    pieces: queue.Queue = queue.Queue(maxsize=QUEUE)
    stop = threading.Event()

    def hand_on(item) -> None:
        while not stop.is_set():
            try:
                pieces.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def read_span(n: int) -> None:
        first, end, next_block, _ = spans[n]
        views = [_SpanLayer(layer, next_block, end) for layer in layers]
        try:
            # The links were checked when the chain was opened; a span view reads like a VHDReader.
            merged = ChainReader(cast(list[VHDReader], views), _check=False)
            for index in allocated[bisect_left(allocated, next_block) : bisect_left(allocated, end)]:
                if stop.is_set():
                    return
                if changed_only:
                    bitmap = views[-1].read_bitmap(index) or b""  # before the merge reads on past it
                    found = list(changed_pieces(index, merged.read_block(index), bitmap, per))
                else:
                    found = list(ebs_pieces(index, merged.read_block(index), per))
                progress.queued(n, index, len(found))
                for piece in found:
                    hand_on(piece)
            progress.finished(n)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            hand_on(_Failed(exc))
        finally:
            for view in views:
                view.close()
            hand_on(_END)

    todo = [n for n, span in enumerate(spans) if span[2] < span[1]]

    def done() -> int:
        """Stored blocks below the checkpoints."""
        return sum(bisect_left(allocated, span[2]) - bisect_left(allocated, span[0]) for span in spans)

    last_save = [time.monotonic(), done()]

    def maybe_checkpoint(force: bool = False) -> None:
        saved = progress.checkpoint()
        now, blocks = time.monotonic(), done()
        if force or blocks - last_save[1] >= CHECKPOINT_BLOCKS or now - last_save[0] > CHECKPOINT_SECONDS:
            save(saved)
            last_save[:] = [now, blocks]

    def from_readers() -> Iterator[tuple[int, bytes]]:
        running = len(todo)
        while running:
            try:
                item = pieces.get(timeout=1.0)
            except queue.Empty:
                item = None
            if item is _END:
                running -= 1
            elif isinstance(item, _Failed):
                raise item.exc
            elif item is not None:
                yield item
            if item is None:
                waiting()  # the readers are slow: still renew the lease, save what is done
            else:
                heartbeat(f"Writing the disk: {min(99, done() * 100 // max(1, len(allocated)))}% done.")

    def written(ebs_index: int) -> None:
        progress.written(ebs_index)
        maybe_checkpoint()

    threads = [threading.Thread(target=read_span, args=(n,), name=f"ebs-read-{n}", daemon=True) for n in todo]
    for thread in threads:
        thread.start()

    def waiting() -> None:
        maybe_checkpoint()
        heartbeat(f"Writing the disk: {min(99, done() * 100 // max(1, len(allocated)))}% done.")

    try:
        imaging.put_snapshot_blocks(snapshot_id, from_readers(), in_flight=PUTS, on_done=written, on_wait=waiting)
    finally:
        stop.set()
        while any(thread.is_alive() for thread in threads):
            try:  # unblock readers waiting for room
                pieces.get(timeout=0.1)
            except queue.Empty:
                pass
        for thread in threads:
            thread.join()
    for n in todo:
        progress.finished(n)
    maybe_checkpoint(force=True)
    return sum(span[3] for span in spans)
