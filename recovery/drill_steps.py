"""The drill's step handlers, each `(StepContext) -> Done | Wait`, and its teardown (`DRILL.on_exit`).

- preparing: the chain up to the restore point, read through the chain
  reader from the stored objects (ranged GETs, never a write), into a
  sparse raw file in the drill's work folder.
- booting: the sandbox boots that file (`recovery.sandbox`), one blocking
  call bounded by RECLO_DRILL_TIME_LIMIT, run in a thread while this one
  renews the lease; if the drill was cancelled meanwhile (a failover of the
  server started), the guest is stopped at once.
- checking: the verdict is recorded (checks, RTO, console excerpt) and the
  screenshot and console log are stored with the account's backups; a
  failed check fails the drill with the console as the reason.
- teardown: stops a guest still running under the drill's label, removes
  the work folder, records what was removed, and tells the owner of a
  failed drill. Idempotent: it runs after every end, and again if a crash
  interrupted it.
"""

import json
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from reclo_agent.vhd import VHDError, open_chain, open_seekable

from accounts import notify
from backups import chains
from reclo_site import cloud
from reclo_site.cloud import imaging, storage
from reclo_site.errors import Code

from . import drill_report, paths
from .engine import LostClaim, StepContext
from .models import Drill
from .pipeline import Done, StepFailed
from .sandbox import BootRequest, LocalSandbox, SandboxError, materialise_chain
from .sandbox.aws import DRILL_TAG, AwsSandbox, image_name
from .snapshot_write import ebs_pieces

log = logging.getLogger(__name__)

DRILLS_PREFIX = "drills/"


def work_dir(drill_id) -> Path:
    """The drill's disk and evidence while it runs (removed by the teardown)."""
    return Path(settings.RECLO_DRILL_DIR) / str(drill_id)


def evidence_key(drill: Drill, name: str) -> str:
    """Where a drill's evidence is stored: beside the account's backups, one folder per drill."""
    return f"{DRILLS_PREFIX}{drill.user_id}/{drill.pk}/{name}"


def sandbox_label(drill_id) -> str:
    return f"drill-{drill_id}"


def make_sandbox(name: str, drill: Drill | None = None):
    """The sandbox called `name` (for `drill`: its tenant tags the aws one); SandboxError (code 411) if unknown."""
    if name == Drill.Sandbox.LOCAL:
        return LocalSandbox(Path(settings.RECLO_DRILL_DIR) / "sandbox")
    if name == Drill.Sandbox.AWS:
        return AwsSandbox(
            tags={"reclo:tenant": str(drill.user_id)} if drill else {},
            instance_type=settings.RECLO_DRILL_INSTANCE_TYPE,
            poll=settings.RECLO_DRILL_AWS_POLL,
        )
    raise SandboxError(f"The {name} sandbox is not available on this portal.")


# --- preparing --------------------------------------------------------------------------------


def prepare(ctx: StepContext) -> Done:
    """Make what the sandbox boots from the restore point's chain (the stored objects are only read).

    `local`: the chain materialised into a sparse raw file. `aws`: the chain
    written into an EBS snapshot and registered as an image, as a failover
    does (`AwsSandbox.prepare`).
    """
    drill = ctx.run
    if drill.backup is None:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "The restore point was deleted before the drill could start.")
    try:
        chain = chains.restorable_chain(drill.backup)
    except chains.ChainError as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, str(exc)) from exc
    if drill.sandbox == Drill.Sandbox.AWS:
        return _prepare_image(ctx, chain)
    folder = work_dir(drill.pk)
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "disk.raw"
    # A half-written file of a killed try is simply written again.
    raw.unlink(missing_ok=True)
    ctx.save(disk=str(raw))
    _note(drill, f"work folder {folder}", created=True)
    started = timezone.now()
    try:
        with _chain_reader(drill, chain) as reader:
            written = materialise_chain(_Beating(reader, ctx), raw)
    except LostClaim:
        # Cancelled or taken over: the partial disk must not outlive the teardown.
        raw.unlink(missing_ok=True)
        raise
    seconds = (timezone.now() - started).total_seconds()
    return Done(
        {"disk": str(raw), "bytes_written": written, "layers": len(chain), "seconds": seconds},
        f"Read {len(chain)} restore point(s); {written // (1024 * 1024)} MiB of data.",
    )


def _prepare_image(ctx: StepContext, chain: list) -> Done:
    drill = ctx.run
    sandbox = make_sandbox(drill.sandbox, drill)
    request = boot_request(drill)
    # Noted before AWS names them, so a worker killed half-way still leaves them on the record.
    placeholder = f"EBS snapshot and image {image_name(request.label)}"
    _note(drill, placeholder, created=True)
    started = timezone.now()
    # Each piece handed over is one PutSnapshotBlock call, billed (drill_cost): counted over every try.
    written = _Counted(ctx.outputs.get("blocks_written", 0))
    try:
        with _chain_reader(drill, chain) as reader:
            ctx.save(volume_gib=imaging.volume_gib(reader.virtual_size))
            per = reader.block_size // imaging.EBS_BLOCK_SIZE
            # The failover's cut of VHD blocks into EBS's 512 KiB ones (zero pieces are never written).
            pieces = (p for index, data in _Beating(reader, ctx).iter_blocks() for p in ebs_pieces(index, data, per))
            image_id = sandbox.prepare(
                written.counting(pieces),
                virtual_size=reader.virtual_size,
                request=request,
                description=f"ReClo drill of {drill.server_name}, restore point {drill.backup_ref}",
                heartbeat=lambda: ctx.heartbeat("The cloud is making the drill's image."),
            )
    except SandboxError as exc:
        raise StepFailed(Code.SANDBOX_FAILED, str(exc)) from exc
    finally:
        if written.added:
            with suppress(LostClaim):  # taken over: the count of this try is lost, the estimate errs low
                ctx.save(blocks_written=written.total)
    when = next((r["created"] for r in Drill.objects.get(pk=drill.pk).resources if r["what"] == placeholder), None)
    for snapshot in imaging.find_snapshots({DRILL_TAG: request.label}):
        _note(drill, f"snapshot {snapshot['snapshot_id']}", created=True, when=when, replaces=placeholder)
    _note(drill, f"image {image_id}", created=True, when=when, replaces=placeholder)
    seconds = (timezone.now() - started).total_seconds()
    return Done(
        {"image_id": image_id, "layers": len(chain), "seconds": seconds},
        f"Read {len(chain)} restore point(s) into image {image_id}.",
    )


@contextmanager
def _chain_reader(drill: Drill, chain: list):
    """The restore point's disk through the chain reader, each layer at exactly its verified version.

    What goes wrong reading it (a missing, changed or damaged layer) ends
    the step as StepFailed with words for the owner.
    """
    try:
        reader = open_chain([open_seekable(storage.ObjectReader(b.key, **b.pinned)) for b in chain])
        if reader.virtual_size != chain[-1].virtual_size:  # the chain's top is the restore point
            raise StepFailed(Code.SANDBOX_FAILED, "The chain's disk size does not match the restore point.")
        yield reader
    except cloud.ObjectNotFound as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "A restore point of the chain is missing from storage.") from exc
    except storage.ObjectChanged as exc:
        raise StepFailed(
            Code.SANDBOX_FAILED, f"A restore point of the chain is not the version that was verified: {exc}"
        ) from exc
    except VHDError as exc:
        raise StepFailed(Code.SANDBOX_FAILED, f"A restore point of the chain is damaged: {exc}") from exc


class _Counted:
    """How many items went through `counting`, on top of `total` (what earlier tries counted)."""

    def __init__(self, total: int):
        self.total = total
        self.added = 0

    def counting(self, items):
        for item in items:
            self.total += 1
            self.added += 1
            yield item


class _Beating:
    """A chain reader whose block iteration renews the step's lease as it goes."""

    def __init__(self, reader, ctx: StepContext):
        self._reader = reader
        self._ctx = ctx

    def __getattr__(self, name):
        return getattr(self._reader, name)

    def iter_blocks(self):
        for n, item in enumerate(self._reader.iter_blocks()):
            self._ctx.heartbeat(f"Read {n + 1} blocks of the disk.")
            yield item


# --- booting ----------------------------------------------------------------------------------


def boot(ctx: StepContext) -> Done:
    """Boot the prepared disk in the sandbox and keep the verdict for the checking step."""
    drill = ctx.run
    prepared = ctx.previous("preparing")
    if drill.sandbox == Drill.Sandbox.AWS:
        source = prepared["image_id"]
    else:
        source = Path(prepared["disk"])
        if not source.is_file():
            # The worker that prepared it is gone with its folder (another machine, or a teardown).
            raise StepFailed(Code.SANDBOX_FAILED, "The prepared disk is gone; start the drill again.")
    request = boot_request(drill)
    try:
        sandbox = make_sandbox(drill.sandbox, drill)
    except SandboxError as exc:
        raise StepFailed(Code.SANDBOX_FAILED, str(exc)) from exc
    _note(drill, f"{drill.sandbox} sandbox guest {request.label}", created=True)
    outcome: dict = {}

    def go():
        try:
            outcome["verdict"] = sandbox.run(source, request)
        except SandboxError as exc:
            outcome["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported as the step's failure below
            log.exception("drill %s: the sandbox crashed", drill.pk)
            outcome["error"] = f"The sandbox crashed ({exc.__class__.__name__})."

    thread = threading.Thread(target=go, name=request.label, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(1.0)
            ctx.heartbeat("The restore point is booting in the sandbox.")
    except LostClaim:
        # Cancelled (a failover of this server) or taken over: the guest must not live on.
        stop_guest(drill.pk)
        thread.join(30)
        raise
    if "error" in outcome:
        raise StepFailed(Code.SANDBOX_FAILED, outcome["error"])
    verdict = outcome["verdict"]
    for made in verdict.details.get("resources", []):
        _note(drill, made["what"], created=True, when=made["created"])
    facts = verdict.as_dict()
    return Done({"verdict": facts}, "The sandbox gave its verdict." if verdict.passed else verdict.reason[:200])


def boot_mode(server) -> str:
    """``"uefi"`` or ``"bios"``: the firmware the server's last preflight says its disk boots with.

    The same reading as the failover's (`paths.image_path`): a server that
    never reported a boot mode is taken for a legacy BIOS one.
    """
    if server is None:
        return "bios"
    return "uefi" if paths.image_path(server).boot_mode == "uefi" else "bios"


def boot_request(drill: Drill) -> BootRequest:
    """What the sandbox is asked to boot: firmware from the preflight, the probed port, the time limit."""
    return BootRequest(
        evidence_dir=work_dir(drill.pk) / "evidence",
        boot_mode=boot_mode(drill.server),
        probe_port=drill.probe_port,
        time_limit=settings.RECLO_DRILL_TIME_LIMIT,
        label=sandbox_label(drill.pk),
    )


def stop_guest(drill_id) -> list[str]:
    """Stop a sandbox guest still running for this drill on this machine; what was stopped, in words.

    The local sandbox writes each run's QEMU process into its run folder's
    `lease.json` under the request's label; the process group is killed (the
    sandbox's own `finally` then removes the folder, and `reap` does for a
    dead worker).
    """
    stopped = []
    root = Path(settings.RECLO_DRILL_DIR) / "sandbox"
    for lease_file in root.glob("run-*/lease.json"):
        try:
            lease = json.loads(lease_file.read_text())
        except (OSError, ValueError):
            continue
        if lease.get("label") != sandbox_label(drill_id) or not lease.get("qemu_pid"):
            continue
        try:
            os.killpg(lease["qemu_pid"], signal.SIGKILL)
            stopped.append(f"QEMU process {lease['qemu_pid']}")
        except ProcessLookupError:
            pass
    return stopped


# --- checking ---------------------------------------------------------------------------------


def check(ctx: StepContext) -> Done:
    """Record the verdict and store the evidence; fail the drill on a failed check."""
    drill = ctx.run
    facts = ctx.previous("booting")["verdict"]
    evidence = work_dir(drill.pk) / "evidence"
    screenshot_key = ""
    shot = facts.get("screenshot_path")
    # Stored and locked like restore points (drill_report.put_evidence); a
    # retried step writes them again, and the newest locked version counts.
    if shot and Path(shot).is_file():
        screenshot_key = drill_report.put_evidence(drill, "screenshot.png", Path(shot).read_bytes())["key"]
    console = Path(facts["console_path"]) if facts.get("console_path") else evidence / "console.log"
    if console.is_file():
        drill_report.put_evidence(drill, "console.log", console.read_bytes())
    rto = None
    if facts["passed"] and facts.get("answered_after") is not None:
        boot_row = ctx.pipeline.step_rows_of(drill.pk).get(name="booting")
        # The click to "server answers": queueing and preparing, then power-on to the answer.
        powered_on = boot_row.started.timestamp() + facts["timings"].get("prepare", 0.0)
        rto = powered_on + facts["answered_after"] - drill.created.timestamp()
    Drill.objects.filter(pk=drill.pk).update(
        checks=facts["checks"],
        console_excerpt=facts["console_excerpt"][:8000],
        screenshot_key=screenshot_key,
        rto_seconds=rto,
    )
    if not facts["passed"]:
        raise StepFailed(Code.SANDBOX_FAILED, facts["reason"] or "A check failed.")
    return Done({"rto_seconds": rto}, "Every check passed.")


# --- teardown (on every exit) -----------------------------------------------------------------


def teardown(drill_id, status: str, *, wait_for_cloud: bool = True) -> None:
    """Remove whatever the drill left (guest, disk, work folder, AWS resources) and tell the owner of a failure.

    Idempotent. If AWS would not delete everything now (an instance slow to
    terminate, AWS unreachable), the drill's resources stay marked as not
    removed and `sweep_aws` (every reconcile) runs the teardown again.
    `wait_for_cloud=False` (a web request cancelling the drill) terminates
    the instance without waiting for it and leaves the rest to that sweep.
    """
    removed = stop_guest(drill_id)
    folder = work_dir(drill_id)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(f"work folder {folder}")
    cloud_left = False
    if Drill.objects.filter(pk=drill_id, sandbox=Drill.Sandbox.AWS).exists():
        try:
            sandbox = make_sandbox(Drill.Sandbox.AWS)
            if not wait_for_cloud:
                sandbox.terminate_wait = 0
            removed += sandbox.destroy(sandbox_label(drill_id))
        except cloud.CloudError as exc:
            log.warning("drill %s: its AWS resources are not all deleted yet (%s)", drill_id, exc)
            cloud_left = True
    now = timezone.now()
    with transaction.atomic():
        drill = Drill.objects.select_for_update().select_related("user").get(pk=drill_id)
        first_time = drill.torn_down is None
        resources = list(drill.resources)
        for item in resources:
            if not cloud_left:
                item["removed"] = item.get("removed") or now.isoformat()
        for text in removed:
            if not any(r["what"] == text for r in resources):
                resources.append({"what": text, "created": None, "removed": now.isoformat()})
        drill.resources = resources
        drill.torn_down = drill.torn_down or now
        drill.save(update_fields=["resources", "torn_down"])
    log.info("drill %s (%s) torn down: %s", drill_id, status, ", ".join(removed) or "nothing left")
    try:
        drill_report.store_evidence(Drill.objects.select_related("user").get(pk=drill_id))
    except (cloud.CloudUnavailable, cloud.CloudPermanentError) as exc:
        # The report is made from the database again when it is asked for.
        log.warning("drill %s: could not store its report (%s)", drill_id, exc)
    if first_time and status == Drill.Status.FAILED:
        notify_failure(drill)


def sweep_aws() -> list[str]:
    """Finish the aws teardowns that AWS refused earlier, and delete what killed runs left past their deadline.

    Called by every `drills_reconcile`; cheap when no drill used AWS.
    Returns what was done, in words.
    """
    if not Drill.objects.filter(sandbox=Drill.Sandbox.AWS).exists():
        return []
    done = []
    unfinished = Drill.objects.filter(sandbox=Drill.Sandbox.AWS, status__in=Drill.FINISHED, torn_down__isnull=False)
    for drill in unfinished.filter(finished__gte=timezone.now() - timedelta(days=2)).only("pk", "resources"):
        if any(not item.get("removed") for item in drill.resources):
            teardown(drill.pk, drill.status)
            done.append(f"teardown of drill {drill.pk} again")
    try:
        done += make_sandbox(Drill.Sandbox.AWS).reap()
    except cloud.CloudError as exc:
        log.warning("aws sandbox reap failed (%s); the next reconcile tries again", exc)
    return done


def notify_failure(drill: Drill) -> None:
    """Email the owner that a drill failed and why (templates/recovery/email/drill_failed*.txt)."""
    # A mail server that is down is logged; the page and the dashboard still show the failure.
    notify.owner_email(
        drill.user, "recovery/email/drill_failed", {"drill": drill, "portal_url": settings.SITE_URL.rstrip("/")}
    )


def _note(drill: Drill, what: str, *, created: bool, when: str | None = None, replaces: str = "") -> None:
    """Add a resource the drill made to its record (once), so the teardown and the report list it.

    `when` is when it was made (ISO 8601; now if not given); `replaces`
    names a placeholder entry (noted before the ids were known) it takes the
    place of.
    """
    with transaction.atomic():
        row = Drill.objects.select_for_update().get(pk=drill.pk)
        kept = [r for r in row.resources if not (replaces and r["what"] == replaces)]
        if not any(r["what"] == what for r in kept):
            kept.append({"what": what, "created": when or timezone.now().isoformat(), "removed": None})
        row.resources = kept
        row.save(update_fields=["resources"])
