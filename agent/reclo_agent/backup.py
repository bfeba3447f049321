"""``reclo-agent backup``: one restore point of one disk, full or incremental.

The steps of a run:

1. Finish first what a killed run left: an upload already completed waits
   for its verdict; one half uploaded is resumed (below).
2. Decide the kind. Incremental when the block map in the state folder
   describes the newest verified restore point the portal lists for this
   server and disk, with the same disk size and page size; full otherwise
   (or with ``--full``), and the log says why.
3. Decide how the disk is read (:mod:`.consistency`): ``offline``,
   ``snapshot``, ``frozen`` or ``crash``; the portal records it with the
   upload, which it grants next (credentials for one object key).
4. The pre-hook, then the snapshot or the freeze (:func:`.consistency.reading`),
   and while that holds, step 5.
5. One pass over the disk (:mod:`.scan`): each block is read once, its
   pages hashed into a pending block map, decided (stored or not, which
   sectors) and compressed, on every core; the frames go in block order
   into the seekable zstd writer, which writes into the part uploader:
   parts go up several at once, each with its SHA-256, which S3 checks on
   arrival (:mod:`.uploader`). The VHD's BAT is written after the data.
   Memory stays bounded. Then the thaw or the snapshot's removal, and the
   post-hook.
6. Complete the multipart upload, then the portal's upload with the
   object's size, SHA-256 and part checksums (learnt at the end of the
   stream), and wait for the verdict. Only a verified backup commits the
   new block map, so a failed run never poisons the next incremental.

Resuming: the stored object must be the same bytes on a rerun, so the run
records everything random or time-dependent in the stream (the VHD unique
id and timestamp, the file name, the part size) and regenerates the stream
from the source; the compressor (single-threaded zstd per frame, fixed level,
frame per block, frames kept in block order) is deterministic. Parts whose regenerated size and SHA-256
match the journal are not sent again; every other part is (one in flight
when the run was killed was never journaled). The journal is all the agent
knows of what storage holds: its credentials may not list the parts. If
the disk changed in between, the differing parts are sent again, so the
object is always exactly the last run's stream -- correct either way, only
cheaper when the disk is still. (The alternative, spooling the compressed
object to the state folder, would need as much free space as the
compressed disk.) A multipart upload that is gone from storage (S3 answers
NoSuchUpload) is made anew, once, and the whole stream sent again.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import consistency, lvm
from .api import PortalClient
from .blockmap import DEFAULT_PAGE_SIZE, MapMeta, MapStore
from .codes import Code
from .errors import AgentError, NoSpace, PortalError, VerificationFailed
from .freeze import DEFAULT_LIMIT
from .hooks import Hooks
from .progress import Reporter, human_bytes
from .s3 import S3Access, StorageError
from .scan import Scan, pack
from .source import Source
from .state import StateLock, UploadRecord, UploadState
from .throttle import TokenBucket
from .uploader import PartUploader, choose_part_size, in_flight_for
from .vhd import ParentInfo
from .vhd.format import DEFAULT_BLOCK_SIZE, bitmap_size, vhd_timestamp

log = logging.getLogger(__name__)

FINAL = ("verified", "failed")


@dataclass
class BackupOptions:
    source: str
    server: str
    disk: str
    full: bool = False
    page_size: int = DEFAULT_PAGE_SIZE
    bandwidth: int | None = None  # bytes per second
    verify_timeout: float = 6 * 3600
    poll_interval: float = 0.25  # the first wait for the verdict; it grows to 15 s
    max_in_flight: int = 4
    part_size: int | None = None  # tuning and tests; S3's 5 MiB minimum applies
    freeze: bool = False  # freeze the disk's mounted file systems for the read
    freeze_limit: float = DEFAULT_LIMIT  # seconds
    pre_hook: str | None = None
    post_hook: str | None = None


@dataclass
class BackupResult:
    backup_id: str
    kind: str
    status: str
    file_size: int | None = None
    virtual_size: int = 0
    changed_bytes: int = 0  # bytes of changed pages (incremental) or non-zero blocks (full)
    sent_bytes: int = 0  # uploaded by this run
    sent_parts: int = 0
    skipped_parts: int = 0  # already uploaded by an earlier, killed run
    read_bytes: int = 0  # read from the source by this run (the disk's size for one pass)
    resumed: bool = False
    full_reason: str = ""
    consistency: str = ""
    hook_error: str = ""  # the post-hook's failure; the restore point stands
    timings: dict = field(default_factory=dict)


@dataclass
class Decision:
    kind: str
    parent: MapMeta | None = None
    reason: str = ""


class BackupRun:
    def __init__(self, api: PortalClient, state_dir: Path, options: BackupOptions, reporter: Reporter,
                 *, lvm_run: lvm.Runner = lvm.run_command) -> None:  # fmt: skip
        self.api = api
        self.state_dir = Path(state_dir)
        self.opt = options
        self.reporter = reporter
        self.maps = MapStore(self.state_dir)
        self.lvm_run = lvm_run
        self.hooks = Hooks(options.pre_hook, options.post_hook,
                           env={"RECLO_SOURCE": options.source, "RECLO_SERVER": options.server,
                                "RECLO_DISK": options.disk})  # fmt: skip

    # --- the run --------------------------------------------------------------

    def run(self) -> BackupResult:
        with StateLock(self.state_dir):
            try:
                return self._run()
            except OSError as exc:
                if exc.errno == errno.ENOSPC:  # in the state folder (block map, journal)
                    raise NoSpace(
                        f"Out of space in the state folder {self.state_dir} (the block map needs 4 MiB "
                        "per GiB of disk). Free some space there and run the backup again; it resumes."
                    ) from exc
                raise

    def _run(self) -> BackupResult:
        opt = self.opt
        state = UploadState.load(self.state_dir, opt.server, opt.disk)
        if state is not None and state.record.phase in ("uploaded", "completed"):
            log.info("a killed run had uploaded backup %s; finishing it first", state.record.upload_id)
            return self._finish(state, resumed=True)

        with Source(opt.source) as src:
            self.plan = consistency.assess(opt.source, freeze=opt.freeze, state_dir=str(self.state_dir),
                                           lvm_run=self.lvm_run)  # fmt: skip
            decision = self._decide(src.size)
            if state is not None and not self._same_backup(state, decision, src.size):
                log.info("the unfinished upload %s no longer fits (%s backup now); starting over",
                         state.record.upload_id, decision.kind)  # fmt: skip
                self._abandon(state)
                state = None
            grant = None
            if state is not None:
                log.info("resuming the %s backup of %s/%s (upload %s)", state.record.kind, opt.server, opt.disk,
                         state.record.upload_id)  # fmt: skip
                grant = self._regrant(state)
            resumed = state is not None and grant is not None
            if state is None or grant is None:
                state, grant, decision = self._start(decision, src.size)
            return self._upload(src, state, grant, decision, resumed)

    def _decide(self, size: int) -> Decision:
        opt = self.opt
        if opt.full:
            return Decision("full", reason="--full was given")
        meta, why = self.maps.load(opt.server, opt.disk)
        if meta is None:
            return Decision("full", reason=why)
        if meta.virtual_size != size:
            return Decision("full", reason=f"the disk size changed from {meta.virtual_size} to {size} bytes")
        if meta.page_size != opt.page_size:
            return Decision("full", reason=f"the page size changed from {meta.page_size} to {opt.page_size}")
        latest = self._latest_verified()
        if latest is None:
            return Decision("full", reason=f"the portal lists no verified restore point of {opt.server}/{opt.disk}")
        if latest.get("backup_id") != meta.backup_id:
            return Decision(
                "full",
                reason=f"the block map describes backup {meta.backup_id}, but the portal's newest verified "
                f"restore point of this disk is {latest.get('backup_id')}",
            )
        if latest.get("virtual_size") not in (None, size):
            return Decision("full", reason="the portal's restore point has another disk size")
        return Decision("incremental", parent=meta)

    def _latest_verified(self) -> dict | None:
        for backup in self.api.iter_backups(server=self.opt.server):
            if backup.get("server") == self.opt.server and backup.get("disk") == self.opt.disk:
                if backup.get("status") == "verified":
                    return backup
        return None

    def _same_backup(self, state: UploadState, decision: Decision, size: int) -> bool:
        parent_id = decision.parent.backup_id if decision.parent else None
        return (
            state.record.kind == decision.kind
            and state.record.parent_id == parent_id
            and state.record.virtual_size == size
            and state.record.page_size == self.opt.page_size
            and state.record.consistency == self.plan.consistency
            and state.record.phase == "uploading"
        )

    def _start(self, decision: Decision, size: int) -> tuple[UploadState, dict, Decision]:
        opt = self.opt
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        file_name = f"{opt.server}-{opt.disk}-{stamp}.vhd"
        fields = {"server": opt.server, "disk": opt.disk, "file_name": file_name, "virtual_size": size,
                  "kind": decision.kind, "consistency": self.plan.consistency}  # fmt: skip
        if decision.parent:
            fields["parent_id"] = decision.parent.backup_id
        try:
            grant = self.api.create_upload(**fields)
        except PortalError as exc:
            if exc.code != Code.BAD_CHAIN or decision.kind != "incremental":
                raise
            # The chain no longer fits (parent deleted or merged away since
            # the list call): the map is useless, so make a full one now.
            log.warning("the portal refused the incremental (%s); making a full backup instead", exc)
            self.maps.forget(opt.server, opt.disk)
            decision = Decision("full", reason=f"the portal refused the chain: {exc}")
            fields.update(kind="full")
            fields.pop("parent_id")
            grant = self.api.create_upload(**fields)
        record = UploadRecord(
            upload_id=grant["upload_id"],
            key=grant["key"],
            bucket=grant["bucket"],
            region=grant.get("region"),
            endpoint_url=grant.get("endpoint_url"),
            kind=decision.kind,
            parent_id=decision.parent.backup_id if decision.parent else None,
            file_name=file_name,
            virtual_size=size,
            page_size=opt.page_size,
            vhd_unique_id=str(uuid.uuid4()),
            vhd_timestamp=vhd_timestamp(),
            source=opt.source,
            consistency=self.plan.consistency,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        state = UploadState(self.state_dir, opt.server, opt.disk, record)
        state.reset_parts()
        state.save()
        log.info(
            "%s %s backup of %s as %s/%s (upload %s)%s",
            decision.kind,
            self.plan.consistency,
            opt.source,
            opt.server,
            opt.disk,
            grant["upload_id"],
            f" on top of {decision.parent.backup_id}"
            if decision.parent and not decision.reason
            else f": {decision.reason}",
        )
        return state, grant, decision

    def _regrant(self, state: UploadState) -> dict | None:
        """Fresh credentials for an unfinished upload, or None if the portal dropped it."""
        try:
            credentials = self.api.upload_credentials(state.record.upload_id)
        except PortalError as exc:
            if exc.code == Code.NO_UPLOAD:
                log.info("the portal no longer has upload %s (expired); starting over", state.record.upload_id)
                state.discard()
                return None
            raise
        return {"bucket": state.record.bucket, "region": state.record.region, "endpoint_url": state.record.endpoint_url,
                "credentials": credentials}  # fmt: skip

    def _abandon(self, state: UploadState) -> None:
        """Best effort: abort the old multipart upload (the portal's clean-up does it anyway)."""
        try:
            grant = self._regrant(state)
            if grant is not None and state.record.multipart_id:
                S3Access(grant).call("abort_multipart_upload", Key=state.record.key, UploadId=state.record.multipart_id)
        except AgentError as exc:
            log.debug("could not abort the old upload: %s", exc)
        state.discard()

    # --- the pass: read, pack, upload --------------------------------------------------------

    def _upload(self, src: Source, state: UploadState, grant: dict, decision: Decision, resumed: bool) -> BackupResult:
        timings: dict[str, float] = {}
        with consistency.reading(self.plan, src, self.hooks, freeze_limit=self.opt.freeze_limit,
                                 lvm_run=self.lvm_run) as reader:  # fmt: skip
            uploader = self._read_and_send(reader, state, grant, decision, timings)
            read_bytes = reader.bytes_read
        t0 = time.monotonic()
        result = self._finish(state, resumed=resumed)
        timings["verify"] = time.monotonic() - t0
        result.sent_bytes, result.sent_parts, result.skipped_parts = (
            uploader.sent_bytes,
            uploader.sent_parts,
            uploader.skipped_parts,
        )
        result.read_bytes = read_bytes
        result.full_reason = decision.reason if decision.kind == "full" else ""
        if self.hooks.post_error is not None:
            result.hook_error = str(self.hooks.post_error)
        result.timings.update(timings)
        return result

    def _read_and_send(self, src: Source, state: UploadState, grant: dict, decision: Decision, timings: dict):
        """Read, pack and upload ``src`` into the stored object in one pass; the part uploader (its counts)."""
        opt = self.opt
        s3 = S3Access(grant, refresh=lambda: self.api.upload_credentials(state.record.upload_id),
                      max_connections=opt.max_in_flight + 2)  # fmt: skip
        rec = state.record
        part_size = rec.part_size or opt.part_size or choose_part_size(_max_object_size(src.size))
        # A multipart upload left by a killed run may be gone from storage
        # since (aborted by a lifecycle rule or the portal's clean-up): S3
        # then answers NoSuchUpload to UploadPart or CompleteMultipartUpload.
        continuing = bool(rec.multipart_id)
        try:
            scan, stored, uploader = self._send(src, decision, state, s3, part_size, timings)
        except StorageError as exc:
            if not (continuing and exc.code == "NoSuchUpload"):
                raise
            log.info("the multipart upload %s is gone from storage; uploading from the start", rec.multipart_id)
            state.save(multipart_id=None)
            state.reset_parts()
            scan, stored, uploader = self._send(src, decision, state, s3, part_size, timings)
        state.save(phase="uploaded", file_size=stored[0], sha256=stored[1], part_count=uploader.part_count,
                   pending_map=str(scan.pending_map), changed_bytes=scan.changed_bytes)  # fmt: skip
        log.info(
            "uploaded %s (%d parts sent, %d already there) for %s of %s",
            human_bytes(stored[0]),
            uploader.sent_parts,
            uploader.skipped_parts,
            "changes" if decision.kind == "incremental" else "data",
            human_bytes(scan.changed_bytes),
        )
        return uploader

    def _send(self, src: Source, decision: Decision, state: UploadState, s3: S3Access, part_size: int,
              timings: dict) -> tuple[Scan, tuple[int, str], PartUploader]:  # fmt: skip
        """The one pass into the multipart upload (made first if there is none), then its completion.

        Returns the pass (its counts), the stored object's (size, SHA-256)
        and the uploader, which counts the parts sent and those the journal
        says are already there.
        """
        opt = self.opt
        rec = state.record
        if not rec.multipart_id:
            created = s3.call("create_multipart_upload", Key=rec.key, ChecksumAlgorithm="SHA256")
            state.reset_parts()
            state.save(multipart_id=created["UploadId"], part_size=part_size)
        elif not rec.part_size:
            state.save(part_size=part_size)
        if state.parts:
            log.info("the journal lists %d parts already in storage; those still the same are not sent again",
                     len(state.parts))  # fmt: skip

        limiter = TokenBucket(opt.bandwidth) if opt.bandwidth else None
        t0 = time.monotonic()
        # The bar counts the disk as far as storage has acknowledged its
        # compressed bytes (contiguous parts), not as far as it was read.
        marks: collections.deque[tuple[int, int]] = collections.deque()  # (stream offset, disk offset)
        with self.reporter.task("backing up", src.size) as task:

            def acknowledged(stream_bytes: int) -> None:
                disk = None
                while marks and marks[0][0] <= stream_bytes:
                    disk = marks.popleft()[1]
                if disk is not None:
                    task.set_done(disk)
                task.set_note(f"sent {human_bytes(uploader.sent_bytes)}")

            assert rec.multipart_id and rec.part_size, "a started upload has both"
            uploader = PartUploader(
                s3,
                rec.key,
                rec.multipart_id,
                rec.part_size,
                state,
                max_in_flight=in_flight_for(rec.part_size, opt.max_in_flight),
                limiter=limiter,
                on_acknowledged=acknowledged,
            )
            try:
                scan, stored = self._pack(src, decision, state, uploader, marks)
                parts = uploader.finish()
            except BaseException as exc:
                uploader.abort(wait=not isinstance(exc, KeyboardInterrupt))
                raise
            task.set_done(src.size)
            task.set_note(f"sent {human_bytes(uploader.sent_bytes)}")
        timings["upload"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            # If-None-Match: the upload credentials may only create the
            # object, never replace one (their policy denies writes without
            # it), so nothing can be swapped in after the portal checked it.
            s3.call("complete_multipart_upload", Key=rec.key, UploadId=rec.multipart_id,
                    MultipartUpload={"Parts": parts}, IfNoneMatch="*")  # fmt: skip
        except StorageError as exc:
            if exc.code != "PreconditionFailed":
                raise
            # Already stored: an earlier completion whose answer was lost.
            # The portal's verification tells whether it is this one.
            log.info("the object of upload %s is already stored; the portal will check it", rec.upload_id)
        timings["complete"] = time.monotonic() - t0
        return scan, stored, uploader

    def _pack(self, src: Source, decision: Decision, state: UploadState, out: PartUploader,
              marks: collections.deque) -> tuple[Scan, tuple[int, str]]:  # fmt: skip
        """Write the restore point into ``out`` in one pass: VHD -> seekable zstd -> parts."""
        opt, rec = self.opt, state.record
        parent = None
        if decision.kind == "incremental":
            meta = decision.parent
            assert meta is not None, "an incremental has a parent"
            parent = ParentInfo(uuid.UUID(meta.vhd_unique_id), meta.vhd_timestamp, meta.file_name)
        log.debug("reading %s (%d bytes)", src.path, src.size)
        return pack(
            src,
            out,
            self.maps.pending_path(opt.server, opt.disk, "next"),
            page_size=rec.page_size,
            unique_id=uuid.UUID(rec.vhd_unique_id),
            timestamp=rec.vhd_timestamp,
            parent=parent,
            old_map=self.maps.digests_path(decision.parent) if decision.parent else None,
            on_block=lambda stream, disk: marks.append((stream, disk)),
        )

    # --- complete and wait -----------------------------------------------------------

    def _finish(self, state: UploadState, *, resumed: bool) -> BackupResult:
        opt = self.opt
        if state.record.phase == "uploaded":
            assert state.record.file_size is not None and state.record.sha256, "an uploaded record has both"
            try:
                backup = self.api.complete_upload(state.record.upload_id, file_size=state.record.file_size,
                                                  sha256=state.record.sha256,
                                                  part_sha256=state.part_checksums() or None)  # fmt: skip
            except PortalError as exc:
                if exc.code == Code.TOO_LARGE:
                    self._drop(state)
                    raise VerificationFailed(
                        f"The portal refused backup upload {state.record.upload_id}: {exc}. The compressed disk is "
                        f"larger than this account may store; ask the provider to raise the limit."
                    ) from exc
                if exc.code in (Code.NO_UPLOAD, Code.OBJECT_MISSING, Code.VERIFICATION_FAILED):
                    self._drop(state)
                    raise VerificationFailed(
                        f"The portal refused backup upload {state.record.upload_id}: {exc}. Nothing was lost: "
                        "run the backup again (it starts from the last verified restore point)."
                    ) from exc
                raise
            state.save(phase="completed", backup_id=backup["backup_id"])
        else:
            assert state.record.backup_id, "a completed record names its backup"
            backup = self.api.get_backup(state.record.backup_id)
        backup = self._await_verdict(backup)
        result = BackupResult(
            backup_id=backup["backup_id"],
            kind=backup.get("kind") or state.record.kind,
            status=backup["status"],
            file_size=backup.get("file_size"),
            virtual_size=state.record.virtual_size,
            changed_bytes=state.record.changed_bytes or 0,
            resumed=resumed,
            consistency=backup.get("consistency") or state.record.consistency or "",
        )
        if backup["status"] != "verified":
            self._drop(state)
            raise VerificationFailed(
                f"The portal could not verify backup {backup['backup_id']}: "
                f"{backup.get('failure') or 'no reason given'}. The block map is unchanged, so the next "
                "backup builds on the last verified restore point; run it again."
            )
        assert state.record.pending_map, "a verified upload has its new block map"
        self.maps.commit(
            Path(state.record.pending_map),
            MapMeta(
                server=opt.server,
                disk=opt.disk,
                virtual_size=state.record.virtual_size,
                page_size=state.record.page_size,
                backup_id=backup["backup_id"],
                vhd_unique_id=state.record.vhd_unique_id,
                vhd_timestamp=state.record.vhd_timestamp,
                file_name=state.record.file_name,
                kind=result.kind,
                source=state.record.source or opt.source,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            ),
        )
        state.discard()
        return result

    def _await_verdict(self, backup: dict) -> dict:
        deadline = time.monotonic() + self.opt.verify_timeout
        interval = self.opt.poll_interval
        if backup.get("status") not in FINAL:
            log.info("waiting for the portal to verify backup %s", backup["backup_id"])
        while backup.get("status") not in FINAL:
            if time.monotonic() > deadline:
                raise VerificationFailed(
                    f"Backup {backup['backup_id']} is still {backup.get('status')} after "
                    f"{self.opt.verify_timeout / 60:.0f} minutes. Run the backup again later to keep waiting "
                    "for the verdict."
                )
            time.sleep(interval)
            interval = min(interval * 1.5, 15.0)
            backup = self.api.get_backup(backup["backup_id"])
        return backup

    def _drop(self, state: UploadState) -> None:
        pending = state.record.pending_map
        if pending:
            Path(pending).unlink(missing_ok=True)
        state.discard()


def _max_object_size(virtual_size: int) -> int:
    """An upper bound of the stored object's size (every block stored, incompressible, plus zstd overhead)."""
    blocks = -(-virtual_size // DEFAULT_BLOCK_SIZE)
    metadata = 64 * 1024 + 4 * blocks + 8 * blocks  # headers, BAT, seek table
    vhd = metadata + blocks * (DEFAULT_BLOCK_SIZE + bitmap_size(DEFAULT_BLOCK_SIZE)) + 512
    return int(vhd * 1.01) + (1 << 20)
