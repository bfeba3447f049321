"""``reclo-agent backup``: one restore point of one disk, full or incremental.

The steps of a run:

1. Finish first what a killed run left: an upload already completed waits
   for its verdict; one half uploaded is resumed (below).
2. Decide the kind. Incremental when the block map in the state folder
   describes the newest verified restore point the portal lists for this
   server and disk, with the same disk size and page size; full otherwise
   (or with ``--full``), and the log says why.
3. Ask the portal for an upload (credentials for one object key).
4. Scan: hash every page into a pending block map (:mod:`.scan`).
5. Pack and upload: the VHD writer writes into the seekable zstd writer,
   which writes into the part uploader; blocks are read ahead by a thread,
   parts go up several at once (:mod:`.uploader`). Memory stays bounded.
6. Complete the multipart upload, then the portal's upload with the
   object's size and SHA-256 (learnt at the end of the stream), and wait
   for the verdict. Only a verified backup commits the new block map, so a
   failed run never poisons the next incremental.

Resuming: the stored object must be the same bytes on a rerun, so the run
records everything random or time-dependent in the stream (the VHD unique
id and timestamp, the file name, the part size) and regenerates the stream
from the source; the compressor (single-threaded zstd, fixed level, frame
per block) is deterministic. Parts whose regenerated size and SHA-256
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

import errno
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .api import PortalClient
from .blockmap import DEFAULT_PAGE_SIZE, MapMeta, MapStore
from .codes import Code
from .errors import AgentError, NoSpace, PortalError, VerificationFailed
from .progress import Reporter, human_bytes
from .s3 import S3Access, StorageError
from .scan import Plan, scan
from .source import Source
from .state import StateLock, UploadState
from .throttle import TokenBucket
from .uploader import PartUploader, choose_part_size, in_flight_for
from .vhd import ParentInfo, SeekableZstdWriter, VHDWriter
from .vhd.format import bitmap_size, vhd_timestamp
from .vhd.seekzstd import DEFAULT_LEVEL

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
    poll_interval: float = 2.0
    max_in_flight: int = 4
    part_size: int | None = None  # tuning and tests; S3's 5 MiB minimum applies


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
    resumed: bool = False
    full_reason: str = ""
    timings: dict = field(default_factory=dict)


@dataclass
class Decision:
    kind: str
    parent: MapMeta | None = None
    reason: str = ""


class BackupRun:
    def __init__(self, api: PortalClient, state_dir: Path, options: BackupOptions, reporter: Reporter) -> None:
        self.api = api
        self.state_dir = Path(state_dir)
        self.opt = options
        self.reporter = reporter
        self.maps = MapStore(self.state_dir)

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
        if state is not None and state.get("phase") in ("uploaded", "completed"):
            log.info("a killed run had uploaded backup %s; finishing it first", state.get("upload_id"))
            return self._finish(state, resumed=True)

        with Source(opt.source) as src:
            decision = self._decide(src.size)
            if state is not None and not self._same_backup(state, decision, src.size):
                log.info("the unfinished upload %s no longer fits (%s backup now); starting over",
                         state.get("upload_id"), decision.kind)  # fmt: skip
                self._abandon(state)
                state = None
            resumed = state is not None
            if resumed:
                log.info("resuming the %s backup of %s/%s (upload %s)", state["kind"], opt.server, opt.disk,
                         state["upload_id"])  # fmt: skip
                grant = self._regrant(state)
                if grant is None:
                    state, resumed = None, False
            if state is None:
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
            state.get("kind") == decision.kind
            and state.get("parent_id") == parent_id
            and state.get("virtual_size") == size
            and state.get("page_size") == self.opt.page_size
            and state.get("phase") == "uploading"
        )

    def _start(self, decision: Decision, size: int) -> tuple[UploadState, dict, Decision]:
        opt = self.opt
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        file_name = f"{opt.server}-{opt.disk}-{stamp}.vhd"
        fields = {"server": opt.server, "disk": opt.disk, "file_name": file_name, "virtual_size": size,
                  "kind": decision.kind}  # fmt: skip
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
        state = UploadState(self.state_dir, opt.server, opt.disk)
        state.reset_parts()
        state.save(
            phase="uploading",
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
            multipart_id=None,
            part_size=None,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        log.info(
            "%s backup of %s as %s/%s (upload %s)%s",
            decision.kind,
            opt.source,
            opt.server,
            opt.disk,
            grant["upload_id"],
            f": {decision.reason}" if decision.reason else f" on top of {decision.parent.backup_id}",
        )
        return state, grant, decision

    def _regrant(self, state: UploadState) -> dict | None:
        """Fresh credentials for an unfinished upload, or None if the portal dropped it."""
        try:
            credentials = self.api.upload_credentials(state["upload_id"])
        except PortalError as exc:
            if exc.code == Code.NO_UPLOAD:
                log.info("the portal no longer has upload %s (expired); starting over", state["upload_id"])
                state.discard()
                return None
            raise
        return {"bucket": state["bucket"], "region": state.get("region"), "endpoint_url": state.get("endpoint_url"),
                "credentials": credentials}  # fmt: skip

    def _abandon(self, state: UploadState) -> None:
        """Best effort: abort the old multipart upload (the portal's clean-up does it anyway)."""
        try:
            grant = self._regrant(state)
            if grant is not None and state.get("multipart_id"):
                S3Access(grant).call("abort_multipart_upload", Key=state["key"], UploadId=state["multipart_id"])
        except AgentError as exc:
            log.debug("could not abort the old upload: %s", exc)
        state.discard()

    # --- scan, pack, upload --------------------------------------------------------

    def _upload(self, src: Source, state: UploadState, grant: dict, decision: Decision, resumed: bool) -> BackupResult:
        opt = self.opt
        timings = {}
        s3 = S3Access(grant, refresh=lambda: self.api.upload_credentials(state["upload_id"]),
                      max_connections=opt.max_in_flight + 2)  # fmt: skip

        pending = self.maps.pending_path(opt.server, opt.disk, "next")
        old_map = self.maps.digests_path(decision.parent) if decision.parent else None
        t0 = time.monotonic()
        log.debug("scanning %s (%d bytes)", src.path, src.size)
        with self.reporter.task("scanning", src.size) as task:
            plan = scan(src, pending, page_size=opt.page_size, old_map=old_map, progress=task.advance)
        timings["scan"] = time.monotonic() - t0

        part_size = state.get("part_size") or opt.part_size or choose_part_size(_max_object_size(plan))
        # A multipart upload left by a killed run may be gone from storage
        # since (aborted by a lifecycle rule or the portal's clean-up): S3
        # then answers NoSuchUpload to UploadPart or CompleteMultipartUpload.
        continuing = bool(state.get("multipart_id"))
        try:
            try:
                stored, uploader = self._send(src, plan, state, s3, part_size, timings)
            except StorageError as exc:
                if not (continuing and exc.code == "NoSuchUpload"):
                    raise
                log.info("the multipart upload %s is gone from storage; uploading from the start",
                         state["multipart_id"])  # fmt: skip
                state.save(multipart_id=None)
                state.reset_parts()
                plan.close()  # the second pass reads the block maps from the start again
                stored, uploader = self._send(src, plan, state, s3, part_size, timings)
        finally:
            plan.close()
        state.save(phase="uploaded", file_size=stored[0], sha256=stored[1], pending_map=str(plan.pending_map),
                   changed_bytes=plan.changed_bytes)  # fmt: skip
        log.info(
            "uploaded %s (%d parts sent, %d already there) for %s of %s",
            human_bytes(stored[0]),
            uploader.sent_parts,
            uploader.skipped_parts,
            "changes" if plan.kind == "incremental" else "data",
            human_bytes(plan.changed_bytes),
        )
        t0 = time.monotonic()
        result = self._finish(state, resumed=resumed)
        timings["verify"] = time.monotonic() - t0
        result.sent_bytes, result.sent_parts, result.skipped_parts = (
            uploader.sent_bytes,
            uploader.sent_parts,
            uploader.skipped_parts,
        )
        result.full_reason = decision.reason if decision.kind == "full" else ""
        result.timings.update(timings)
        return result

    def _send(self, src: Source, plan: Plan, state: UploadState, s3: S3Access, part_size: int,
              timings: dict) -> tuple[tuple[int, str], PartUploader]:  # fmt: skip
        """Pack the restore point into the multipart upload (made first if there is none) and complete it.

        Returns the stored object's (size, SHA-256) and the uploader, which
        counts the parts sent and those the journal says are already there.
        """
        opt = self.opt
        if not state.get("multipart_id"):
            created = s3.call("create_multipart_upload", Key=state["key"], ChecksumAlgorithm="SHA256")
            state.reset_parts()
            state.save(multipart_id=created["UploadId"], part_size=part_size)
        elif not state.get("part_size"):
            state.save(part_size=part_size)
        if state.parts:
            log.info("the journal lists %d parts already in storage; those still the same are not sent again",
                     len(state.parts))  # fmt: skip

        limiter = TokenBucket(opt.bandwidth) if opt.bandwidth else None
        t0 = time.monotonic()
        with self.reporter.task("uploading", plan.stored_bytes) as task:
            uploader = PartUploader(
                s3,
                state["key"],
                state["multipart_id"],
                state["part_size"],
                state,
                max_in_flight=in_flight_for(state["part_size"], opt.max_in_flight),
                limiter=limiter,
                on_bytes=lambda n: task.set_note(f"sent {human_bytes(uploader.sent_bytes)}"),
            )
            try:
                stored = self._pack(src, plan, state, uploader, task.advance)
                parts = uploader.finish()
            except BaseException:
                uploader.abort()
                raise
            task.set_note(f"sent {human_bytes(uploader.sent_bytes)}")
        timings["upload"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            # If-None-Match: the upload credentials may only create the
            # object, never replace one (their policy denies writes without
            # it), so nothing can be swapped in after the portal checked it.
            s3.call("complete_multipart_upload", Key=state["key"], UploadId=state["multipart_id"],
                    MultipartUpload={"Parts": parts}, IfNoneMatch="*")  # fmt: skip
        except StorageError as exc:
            if exc.code != "PreconditionFailed":
                raise
            # Already stored: an earlier completion whose answer was lost.
            # The portal's verification tells whether it is this one.
            log.info("the object of upload %s is already stored; the portal will check it", state["upload_id"])
        timings["complete"] = time.monotonic() - t0
        return stored, uploader

    def _pack(self, src: Source, plan: Plan, state: UploadState, out: PartUploader, advance) -> tuple[int, str]:
        """Write the restore point into ``out``: VHD -> seekable zstd -> parts."""
        parent = None
        if plan.kind == "incremental":
            meta, _ = self.maps.load(self.opt.server, self.opt.disk)
            parent = ParentInfo(uuid.UUID(meta.vhd_unique_id), meta.vhd_timestamp, meta.file_name)
        zstd = SeekableZstdWriter(out, level=DEFAULT_LEVEL)
        writer = VHDWriter(
            zstd,
            plan.virtual_size,
            plan.allocated,
            parent=parent,
            block_size=plan.block_size,
            unique_id=uuid.UUID(state["vhd_unique_id"]),
            timestamp=state["vhd_timestamp"],
        )
        for index, data in src.blocks(plan.block_size, plan.allocated):
            writer.write_block(index, data, plan.sector_bitmap(index))
            advance(len(data))
        writer.close()
        zstd.close()
        return zstd.compressed_size, zstd.sha256()

    # --- complete and wait -----------------------------------------------------------

    def _finish(self, state: UploadState, *, resumed: bool) -> BackupResult:
        opt = self.opt
        if state.get("phase") == "uploaded":
            try:
                backup = self.api.complete_upload(state["upload_id"], file_size=state["file_size"],
                                                  sha256=state["sha256"])  # fmt: skip
            except PortalError as exc:
                if exc.code == Code.TOO_LARGE:
                    self._drop(state)
                    raise VerificationFailed(
                        f"The portal refused backup upload {state['upload_id']}: {exc}. The compressed disk is "
                        f"larger than this account may store; ask the provider to raise the limit."
                    ) from exc
                if exc.code in (Code.NO_UPLOAD, Code.OBJECT_MISSING, Code.VERIFICATION_FAILED):
                    self._drop(state)
                    raise VerificationFailed(
                        f"The portal refused backup upload {state['upload_id']}: {exc}. Nothing was lost: "
                        "run the backup again (it starts from the last verified restore point)."
                    ) from exc
                raise
            state.save(phase="completed", backup_id=backup["backup_id"])
        else:
            backup = self.api.get_backup(state["backup_id"])
        backup = self._await_verdict(backup)
        result = BackupResult(
            backup_id=backup["backup_id"],
            kind=backup.get("kind") or state["kind"],
            status=backup["status"],
            file_size=backup.get("file_size"),
            virtual_size=state["virtual_size"],
            changed_bytes=state.get("changed_bytes") or 0,
            resumed=resumed,
        )
        if backup["status"] != "verified":
            self._drop(state)
            raise VerificationFailed(
                f"The portal could not verify backup {backup['backup_id']}: "
                f"{backup.get('failure') or 'no reason given'}. The block map is unchanged, so the next "
                "backup builds on the last verified restore point; run it again."
            )
        self.maps.commit(
            Path(state["pending_map"]),
            MapMeta(
                server=opt.server,
                disk=opt.disk,
                virtual_size=state["virtual_size"],
                page_size=state["page_size"],
                backup_id=backup["backup_id"],
                vhd_unique_id=state["vhd_unique_id"],
                vhd_timestamp=state["vhd_timestamp"],
                file_name=state["file_name"],
                kind=result.kind,
                source=state.get("source") or opt.source,
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
        pending = state.get("pending_map")
        if pending:
            Path(pending).unlink(missing_ok=True)
        state.discard()


def _max_object_size(plan: Plan) -> int:
    """An upper bound of the stored object's size (incompressible data plus zstd overhead)."""
    metadata = 64 * 1024 + 4 * plan.block_count
    vhd = metadata + len(plan.allocated) * (plan.block_size + bitmap_size(plan.block_size)) + 512
    return int(vhd * 1.01) + (1 << 20)
