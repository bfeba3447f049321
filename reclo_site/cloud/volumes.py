"""A recovered server's disk read back: its root volume, a snapshot of it, and its blocks (failback).

- EC2 CreateSnapshot of the instance's root volume. It takes no
  ClientToken: callers tag the snapshot and look the tag up first
  (`find_snapshots`) before making another.
- The EBS direct read APIs: ListSnapshotBlocks (every written block of a
  snapshot), ListChangedBlocks (the blocks that differ between two
  snapshots of one lineage, e.g. the snapshot a volume was created from and
  a later snapshot of that volume) and GetSnapshotBlock (one block's 512 KiB,
  by the block token the lists give).

moto keeps EC2 snapshots of volumes out of its EBS direct backend and
cannot show an instance writing to its disk; the tests stand that in with
`recovery/tests/moto_cloud_disk.py`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from botocore.exceptions import BotoCoreError, ClientError

from .clients import client
from .errors import ObjectNotFound, translate
from .imaging import EBS_BLOCK_SIZE
from .network import tag_specifications

__all__ = [
    "EBS_BLOCK_SIZE",
    "changed_blocks",
    "create_snapshot",
    "image_root_snapshot",
    "read_blocks",
    "root_volume",
    "snapshot_block_list",
]


def _call(service: str, operation: str, what: str, **kwargs) -> dict:
    try:
        return getattr(client(service), operation)(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, what) from exc


def root_volume(instance_id: str) -> str:
    """The id of the EBS volume an instance boots from; ObjectNotFound when it has none (or is gone)."""
    resp = _call("ec2", "describe_instances", f"describe {instance_id}", InstanceIds=[instance_id])
    for reservation in resp.get("Reservations", []):
        for raw in reservation.get("Instances", []):
            root = raw.get("RootDeviceName")
            mappings = raw.get("BlockDeviceMappings", [])
            for mapping in mappings:
                if mapping.get("DeviceName") == root and mapping.get("Ebs", {}).get("VolumeId"):
                    return mapping["Ebs"]["VolumeId"]
    raise ObjectNotFound(f"instance {instance_id} has no root volume", "InvalidVolume.NotFound")


def create_snapshot(volume_id: str, *, description: str, tags: dict) -> str:
    """Start an EC2 snapshot of a volume (crash-consistent, like pulling the plug); returns its id.

    The snapshot is taken at the moment of the call even while the server
    runs; it completes in the background (`imaging.snapshot_state`).
    """
    resp = _call(
        "ec2",
        "create_snapshot",
        f"snapshot {volume_id}",
        VolumeId=volume_id,
        Description=description,
        TagSpecifications=tag_specifications("snapshot", tags),
    )
    return resp["SnapshotId"]


def image_root_snapshot(image_id: str) -> str:
    """The snapshot behind an image's root volume ('' when the image or its mapping is gone)."""
    try:
        resp = _call("ec2", "describe_images", f"describe {image_id}", ImageIds=[image_id])
    except ObjectNotFound:
        return ""
    for image in resp.get("Images", []):
        root = image.get("RootDeviceName")
        for mapping in image.get("BlockDeviceMappings", []):
            if mapping.get("DeviceName") == root and mapping.get("Ebs", {}).get("SnapshotId"):
                return mapping["Ebs"]["SnapshotId"]
    return ""


def _paged(operation: str, what: str, key: str, **kwargs) -> Iterator[dict]:
    token = None
    while True:
        args = dict(kwargs, MaxResults=10000)
        if token:
            args["NextToken"] = token
        page = _call("ebs", operation, what, **args)
        yield from page.get(key, [])
        token = page.get("NextToken")
        if not token:
            return


def snapshot_block_list(snapshot_id: str) -> list[tuple[int, str]]:
    """`(block index, block token)` of every block written in a completed snapshot, in index order.

    Blocks not listed read as zeros.
    """
    blocks = _paged("list_snapshot_blocks", f"list blocks of {snapshot_id}", "Blocks", SnapshotId=snapshot_id)
    return sorted((block["BlockIndex"], block["BlockToken"]) for block in blocks)


def changed_blocks(first_snapshot_id: str, second_snapshot_id: str) -> list[tuple[int, str | None]]:
    """`(block index, block token in the second snapshot)` of the blocks that differ, in index order.

    AWS leaves the second token out when the second snapshot does not hold
    the block (it reads as zeros there): those come back with None.
    """
    blocks = _paged(
        "list_changed_blocks",
        f"list blocks changed from {first_snapshot_id} to {second_snapshot_id}",
        "ChangedBlocks",
        FirstSnapshotId=first_snapshot_id,
        SecondSnapshotId=second_snapshot_id,
    )
    return sorted((block["BlockIndex"], block.get("SecondBlockToken")) for block in blocks)


def _get_block(snapshot_id: str, index: int, token: str | None) -> bytes:
    if token is None:
        return bytes(EBS_BLOCK_SIZE)
    try:
        resp = client("ebs").get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
        data = resp["BlockData"].read()
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"read block {index} of {snapshot_id}") from exc
    return data.ljust(EBS_BLOCK_SIZE, b"\0")


def read_blocks(
    snapshot_id: str, blocks: Iterable[tuple[int, str | None]], *, in_flight: int = 16
) -> Iterator[tuple[int, bytes]]:
    """`(index, 512 KiB)` of the given blocks, in the order given, with `in_flight` GetSnapshotBlock calls at once.

    Each block is its own HTTP request: one at a time would leave most of
    the bandwidth unused. Memory stays at `in_flight` blocks. A None token
    reads as zeros without a call.
    """
    window: deque[tuple[int, Future]] = deque()
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="ebs-get") as pool:
        try:
            for index, token in blocks:
                window.append((index, pool.submit(_get_block, snapshot_id, index, token)))
                if len(window) >= in_flight:
                    done_index, future = window.popleft()
                    yield done_index, future.result()
            while window:
                done_index, future = window.popleft()
                yield done_index, future.result()
        finally:
            for _, future in window:
                future.cancel()
