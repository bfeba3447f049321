"""The failover's step handlers, each `(StepContext) -> Done | Wait`, named in `recovery.failover.FAILOVER_STEPS`.

A handler may run many times for one recovery (retries, waits, a worker
killed half-way, a task delivered twice), so each begins by looking at what
is already there: ids it saved, then resources tagged with the recovery's
id, and only then creates, with a ClientToken where AWS takes one.
"""

import logging
from array import array
from datetime import datetime

from django.conf import settings
from django.utils import timezone
from reclo_agent.vhd import ChainReader, VHDError, VHDReader, merge_chain, open_seekable
from reclo_agent.vhd.format import FOOTER_SIZE, HEADER_SIZE, SECTOR, bitmap_size

from backups import chains
from reclo_site import cloud
from reclo_site.cloud import compute, imaging, storage, streams
from reclo_site.errors import Code

from . import networks, paths, snapshot_write, staging, vpn_watch
from .engine import StepContext
from .models import Instance, Recovery
from .pipeline import Done, StepFailed, Wait

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# How often waits look at AWS again.
IMAGE_POLL = 10.0
IMPORT_POLL = 30.0
INSTANCE_POLL = 5.0
# Ranged reads of a layer by `open_chain`: a 2 MiB block compresses to well under this.
CHAIN_CHUNK = 4 * MiB


# Consolidated disks live under their own prefix: the vmimport role may read
# these and nothing of the customers' backups.
IMAGES_PREFIX = "images/"


def merged_key(recovery: Recovery) -> str:
    """Where the consolidated disk of a restore point lives: one per restore point, reused."""
    return f"{IMAGES_PREFIX}{recovery.user_id}/{recovery.backup_ref}.vhd"


def recovery_tags(recovery: Recovery, role: str) -> dict:
    return {
        "reclo:managed": "true",
        "reclo:tenant": str(recovery.user_id),
        "reclo:recovery": str(recovery.pk),
        "reclo:role": role,
        "Name": f"reclo {recovery.server_name} ({role})",
    }


# --- consolidating ----------------------------------------------------------------------------


class _ProgressWriter:
    """Passes writes to the upload and renews the step's lease as the merge goes on."""

    def __init__(self, out, ctx: StepContext, total: int):
        self._out = out
        self._ctx = ctx
        self._total = max(1, total)
        self.written = 0

    def write(self, data) -> int:
        n = self._out.write(data)
        self.written += len(data)
        percent = min(99, self.written * 100 // self._total)
        self._ctx.heartbeat(f"Merged {self.written // MiB} MiB of about {self._total // MiB} MiB ({percent}%).")
        return n


def _merged_size_bound(chain: ChainReader) -> int:
    """An upper bound of the merged VHD's size, to size the upload's parts."""
    blocks = sum(1 for _ in chain.allocated_blocks())
    metadata = FOOTER_SIZE + HEADER_SIZE + 4 * chain.block_count + 2 * SECTOR
    return metadata + blocks * (bitmap_size(chain.block_size) + chain.block_size) + FOOTER_SIZE


def _chain_or_fail(recovery: Recovery) -> list:
    """The backups of the restore point's chain, base first; StepFailed when it cannot be restored."""
    if recovery.backup is None:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "The restore point was deleted before its disk could be prepared.")
    try:
        return chains.restorable_chain(recovery.backup)
    except chains.ChainError as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, str(exc)) from exc


def consolidate(ctx: StepContext) -> Done:
    """Merge the chain up to the restore point into one uncompressed dynamic VHD in S3.

    Streams: each layer is read by ranged GETs through the seekable zstd
    reader, and the merged VHD goes up as a multipart upload, so memory stays
    at a few blocks and one part whatever the disk's size. Skipped when the
    merged disk of this restore point is already stored (an upload completes
    atomically, so an existing object is a whole one).
    """
    recovery = ctx.recovery
    if recovery.import_method == Recovery.ImportMethod.EBS_DIRECT:
        # EBS direct merges the chain straight into the snapshot's blocks
        # (`_write_snapshot_blocks`): no merged copy. Only check the chain here.
        chain = _chain_or_fail(recovery)
        if staging.staged_snapshot(recovery.backup):
            return Done(
                {"direct": True, "layers": len(chain), "staged": True},
                "The restore point is staged as a cloud snapshot already (warm standby): nothing to prepare.",
                True,
            )
        return Done(
            {"direct": True, "layers": len(chain)},
            f"The {len(chain)} restore point(s) will be merged straight into the cloud disk: no copy needed.",
        )
    key = merged_key(recovery)
    try:
        existing = storage.head_object(key)
    except cloud.ObjectNotFound:
        existing = None
    if existing:
        return Done(
            {"image_key": key, "image_size": existing["size"], "image_version_id": existing["version_id"]},
            "The merged disk was already there.",
            True,
        )

    chain = _chain_or_fail(recovery)
    # Parts of an earlier try that died half-way would only cost storage.
    for stale_key, upload_id in storage.multipart_uploads(prefix=key, key=key):
        storage.abort_multipart_upload(stale_key, upload_id)
    try:
        # Each layer is read nearly front to back: one streaming GET each,
        # of exactly the version that was verified.
        layers = [VHDReader(open_seekable(streams.SequentialObjectReader(b.key, **b.pinned))) for b in chain]
        reader = ChainReader(layers)
    except cloud.ObjectNotFound as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "A restore point of the chain is missing from storage.") from exc
    except storage.ObjectChanged as exc:
        raise StepFailed(Code.IMPORT_FAILED, _changed_message(exc)) from exc
    except VHDError as exc:
        raise StepFailed(Code.IMPORT_FAILED, f"A restore point of the chain is damaged: {exc}") from exc
    if reader.virtual_size != recovery.virtual_size:
        raise StepFailed(Code.IMPORT_FAILED, "The chain's disk size does not match the restore point.")

    ctx.heartbeat(f"Merging {len(chain)} restore point(s).", force=True)
    bound = _merged_size_bound(reader)
    with storage.ObjectWriter(key, expected_size=bound, in_flight=3) as out:
        progress = _ProgressWriter(out, ctx, bound)
        try:
            merge_chain(reader, progress)
        except storage.ObjectChanged as exc:
            raise StepFailed(Code.IMPORT_FAILED, _changed_message(exc)) from exc
        except VHDError as exc:
            raise StepFailed(Code.IMPORT_FAILED, f"A restore point of the chain is damaged: {exc}") from exc
    return Done(
        {"image_key": key, "image_size": progress.written, "layers": len(chain), "image_version_id": out.version_id},
        f"Merged {len(chain)} restore point(s) into one {progress.written // MiB} MiB disk.",
    )


def _changed_message(exc: Exception) -> str:
    return (
        "A restore point of the chain in storage is not the one that was verified (it was replaced since): "
        f"refusing to build a server from it ({exc})."
    )


# --- importing --------------------------------------------------------------------------------


def import_image(ctx: StepContext) -> Done | Wait:
    """Turn the merged disk into an EC2 image, by the recovery's method."""
    if ctx.recovery.import_method == Recovery.ImportMethod.VM_IMPORT:
        return _vm_import(ctx)
    return _ebs_direct(ctx)


def _image_ready(ctx: StepContext, image_id: str) -> Done | Wait:
    state, reason = imaging.image_state(image_id)
    if state == "available":
        return Done({"image_id": image_id}, f"Image {image_id} is ready.")
    if state == "pending":
        return Wait(IMAGE_POLL, "The cloud is registering the image.")
    raise StepFailed(Code.IMPORT_FAILED, f"The image could not be created ({state}): {reason or 'no reason given'}.")


def open_chain(layers: list[tuple[str, dict]]) -> ChainReader:
    """The chain's disk from `(key, pinned reader arguments)`, base first, read by ranged GETs of its zstd frames."""
    files = [storage.ObjectReader(key, chunk_size=CHAIN_CHUNK, **pinned) for key, pinned in layers]
    return ChainReader([VHDReader(open_seekable(f)) for f in files])


def _ebs_direct(ctx: StepContext) -> Done | Wait:
    """EBS direct: the chain merged straight into snapshot blocks, then RegisterImage.

    Resumable: the snapshot is found by its tag or ClientToken; block writes
    are checkpointed (rewriting a block is harmless); the image is found by
    its unique name.
    """
    recovery = ctx.recovery
    name = f"reclo-{recovery.pk}"
    if ctx.outputs.get("image_id"):
        return _image_ready(ctx, ctx.outputs["image_id"])
    existing = imaging.find_image(name)
    if existing:
        ctx.save(image_id=existing["image_id"])
        return _image_ready(ctx, existing["image_id"])

    gib = imaging.volume_gib(recovery.virtual_size)
    snapshot_id = ctx.outputs.get("snapshot_id")
    if not snapshot_id:
        # Warm standby: the restore point's snapshot is written and sealed already; no block to write.
        snapshot_id = staging.staged_snapshot(recovery.backup)
        if snapshot_id:
            ctx.save(snapshot_id=snapshot_id, staged=True, blocks_written=True, snapshot_completed=True)
    if not snapshot_id:
        found = imaging.find_snapshots({"reclo:recovery": str(recovery.pk)})
        snapshot_id = (
            found[0]["snapshot_id"]
            if found
            else imaging.start_snapshot(
                volume_size_gib=gib,
                client_token=f"reclo-{recovery.pk}",
                tags=recovery_tags(recovery, "server-disk"),
                description=f"ReClo failover of {recovery.server_name}",
            )
        )
        ctx.save(snapshot_id=snapshot_id)

    if not ctx.outputs.get("blocks_written"):
        _write_snapshot_blocks(ctx, snapshot_id)
    if not ctx.outputs.get("snapshot_completed"):
        imaging.complete_snapshot(snapshot_id, changed_blocks=ctx.outputs.get("changed_blocks", 0))
        ctx.save(snapshot_completed=True)
    state, message = imaging.snapshot_state(snapshot_id)
    if state == "pending":
        return Wait(IMAGE_POLL, "The cloud is sealing the disk snapshot.")
    if state != "completed":
        raise StepFailed(Code.IMPORT_FAILED, f"The disk snapshot failed ({state}): {message or 'no reason given'}.")
    path = paths.image_path(recovery.server)
    image_id = imaging.register_image(
        name=name,
        snapshot_id=snapshot_id,
        volume_size_gib=gib,
        boot_mode=path.boot_mode,
        description=f"ReClo failover of {recovery.server_name}, restore point {recovery.backup_ref}",
        tags=recovery_tags(recovery, "server-image"),
    )
    ctx.save(image_id=image_id)
    return _image_ready(ctx, image_id)


def _write_snapshot_blocks(ctx: StepContext, snapshot_id: str) -> None:
    """Merge the chain straight into the snapshot: one pass, no merged copy anywhere (`recovery.snapshot_write`).

    The spans and their checkpoints are saved in the step's outputs, so a
    worker killed mid-write (even by SIGKILL) is followed by one that writes
    into the same snapshot from the checkpoints on.
    """
    # Each layer read at exactly the version that was verified.
    layers = [(backup.key, backup.pinned) for backup in _chain_or_fail(ctx.recovery)]
    try:
        chain, shared = snapshot_write.open_layers(layers)
    except cloud.ObjectNotFound as exc:
        raise StepFailed(Code.NO_RESTORABLE_BACKUP, "A restore point of the chain is missing from storage.") from exc
    except storage.ObjectChanged as exc:
        raise StepFailed(Code.IMPORT_FAILED, _changed_message(exc)) from exc
    except VHDError as exc:
        raise StepFailed(Code.IMPORT_FAILED, f"A restore point of the chain is damaged: {exc}") from exc
    if chain.virtual_size != ctx.recovery.virtual_size:
        raise StepFailed(Code.IMPORT_FAILED, "The chain's disk size does not match the restore point.")
    spans = ctx.outputs.get("spans")
    if spans is None:
        allocated = array("q", chain.allocated_blocks())
        spans = snapshot_write.plan_spans(allocated, chain.block_count)
        ctx.save(spans=spans)
        ctx.heartbeat(f"Writing {len(allocated)} stored block(s) of the disk.", force=True)
    try:
        written = snapshot_write.write_chain(
            snapshot_id,
            chain,
            shared,
            spans,
            save=lambda saved: ctx.save(spans=saved, changed_blocks=sum(span[3] for span in saved)),
            heartbeat=ctx.heartbeat,
        )
    except storage.ObjectChanged as exc:
        raise StepFailed(Code.IMPORT_FAILED, _changed_message(exc)) from exc
    except VHDError as exc:
        raise StepFailed(Code.IMPORT_FAILED, f"A restore point of the chain is damaged: {exc}") from exc
    ctx.save(blocks_written=True, changed_blocks=written)


def _vm_import(ctx: StepContext) -> Done | Wait:
    """VM Import: ImportImage of the merged VHD, then polled through its states until it has an image."""
    recovery = ctx.recovery
    task_id = ctx.outputs.get("import_task_id")
    if not task_id:
        path = paths.image_path(recovery.server)
        key = ctx.previous("consolidating")["image_key"]
        task_id = imaging.import_image(
            bucket=storage.bucket_name(),
            key=key,
            role_name=settings.RECLO_VMIMPORT_ROLE,
            client_token=f"reclo-{recovery.pk}",
            description=f"ReClo failover of {recovery.server_name}",
            tags=recovery_tags(recovery, "server-import"),
            boot_mode=path.boot_mode,
            license_type=settings.RECLO_WINDOWS_LICENSE_TYPE,
            platform=path.platform.capitalize(),
        )
        ctx.save(import_task_id=task_id)
    status = imaging.import_status(task_id)
    if status.status == "completed" and status.image_id:
        ctx.save(image_id=status.image_id)
        return Done({"image_id": status.image_id}, f"Image {status.image_id} is ready.")
    if status.failed:
        raise StepFailed(Code.IMPORT_FAILED, f"VM Import failed: {status.message or status.status}.")
    progress = f" ({status.progress}%)" if status.progress is not None else ""
    return Wait(IMPORT_POLL, f"VM Import: {status.message or status.status}{progress}.")


# --- launching --------------------------------------------------------------------------------


def launch(ctx: StepContext) -> Done | Wait:
    """Start the server from the image in the tenant's recovery network, with an Elastic IP."""
    recovery = ctx.recovery
    network = networks.network_ensure(recovery.user)
    if network is None:
        return Wait(3, "Another failover is preparing the recovery network.")

    instance = Instance.objects.filter(recovery=recovery).first()
    if instance is None:
        info = compute.instance_find_or_run(
            {"reclo:recovery": str(recovery.pk), "reclo:role": "server"},
            image_id=ctx.previous("importing")["image_id"],
            instance_type=recovery.instance_type,
            subnet_id=network.subnet_id,
            security_group_ids=[network.server_group_id],
            client_token=f"reclo-{recovery.pk}-server",
            tags=recovery_tags(recovery, "server"),
        )
        instance, _ = Instance.objects.get_or_create(
            recovery=recovery,
            defaults={
                "instance_id": info.instance_id,
                "user_id": recovery.user_id,
                "instance_type": info.instance_type or recovery.instance_type,
                "image_id": info.image_id,
                "state": info.state or Instance.State.PENDING,
                "private_ip": info.private_ip,
                "launched": info.launched or timezone.now(),
            },
        )
        ctx.save(instance_id=instance.instance_id)

    info = compute.describe_instance(instance.instance_id)
    Instance.objects.filter(pk=instance.pk).update(state=info.state, private_ip=info.private_ip, synced=timezone.now())
    if info.state == "pending":
        return Wait(INSTANCE_POLL, "The server is booting.")
    if info.state != "running":
        raise StepFailed(
            Code.LAUNCH_FAILED,
            f"The server did not start: it is {info.state} ({info.state_reason or 'no reason given'}).",
        )

    allocation_id, public_ip = compute.address_attach(
        allocation_id=instance.allocation_id,
        lookup={"reclo:recovery": str(recovery.pk), "reclo:role": "server"},
        tags=recovery_tags(recovery, "server"),
        instance_id=instance.instance_id,
    )
    if allocation_id != instance.allocation_id:
        Instance.objects.filter(pk=instance.pk).update(allocation_id=allocation_id)
        ctx.save(allocation_id=allocation_id)
    now = timezone.now()
    Instance.objects.filter(pk=instance.pk).update(
        state=Instance.State.RUNNING, public_ip=public_ip, running_since=now, synced=now
    )
    return Done(
        {"instance_id": instance.instance_id, "private_ip": info.private_ip, "public_ip": public_ip},
        f"Server {instance.instance_id} is running at {info.private_ip}.",
    )


# --- provisioning_vpn -------------------------------------------------------------------------


def provision_vpn(ctx: StepContext) -> Done | Wait:
    """Bring up (or reuse) the tenant's WireGuard gateway."""
    recovery = ctx.recovery
    network = networks.network_ensure(recovery.user)
    if network is None:
        return Wait(3, "Another failover is preparing the recovery network.")
    result = networks.gateway_ensure(network)
    if isinstance(result, Wait):
        return result
    gateway = result
    # A gateway reused from an earlier failover must be reporting now, too.
    if settings.RECLO_VPN_GATEWAY_MUST_REPORT and vpn_watch.health_of(gateway).status != "up":
        return _await_gateway_report(ctx, gateway)
    ctx.save(gateway_instance_id=gateway.instance_id, gateway_public_ip=gateway.public_ip)
    return Done(
        {"gateway_instance_id": gateway.instance_id, "gateway_public_ip": gateway.public_ip},
        f"The VPN gateway answers at {gateway.public_ip}:51820.",
    )


def _await_gateway_report(ctx: StepContext, gateway) -> Wait:
    """Wait for the gateway's agent to call the portal once: the proof that WireGuard came up on it."""
    since = ctx.outputs.get("gateway_up_since")
    if since is None or ctx.outputs.get("gateway_instance_id") != gateway.instance_id:
        since = timezone.now().isoformat()
        ctx.save(gateway_up_since=since, gateway_instance_id=gateway.instance_id)
    if timezone.now() - datetime.fromisoformat(since) < settings.RECLO_VPN_GATEWAY_REPORT_DEADLINE:
        return Wait(10, "Waiting for the VPN gateway to report in.")
    try:
        console = compute.console_output(gateway.instance_id) or "(empty)"
    except cloud.CloudError as exc:
        console = f"(unreadable: {exc})"
    minutes = int(settings.RECLO_VPN_GATEWAY_REPORT_DEADLINE.total_seconds() // 60)
    raise StepFailed(
        Code.VPN_FAILED,
        f"The VPN gateway {gateway.instance_id} did not report to the portal within {minutes} minutes. "
        f"The end of its console:\n{console}",
    )
