"""Turning a disk into an EC2 image: EBS direct snapshots and VM Import.

Two ways, one purpose:

- EBS direct: StartSnapshot, PutSnapshotBlock for every non-zero 512 KiB
  block, CompleteSnapshot, then RegisterImage. Minutes for a disk that
  already boots on EC2. moto implements it (without checking checksums and
  without honouring ClientToken).
- VM Import: ImportImage of a VHD in S3 through the `vmimport` service role.
  Slow (tens of minutes to hours) but it installs EC2's drivers, so it suits
  Windows and physical servers. moto does not implement it; the tests
  script it with botocore's Stubber.

Also the vmimport role itself, which VM Import requires by that name.
"""

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings

from .clients import client
from .errors import CloudError, ObjectNotFound, translate
from .network import tag_filters, tag_specifications

# The EBS direct APIs' fixed block size.
EBS_BLOCK_SIZE = 512 * 1024
GiB = 1024**3
ROOT_DEVICE = "/dev/sda1"


def _call(service: str, operation: str, what: str, **kwargs) -> dict:
    try:
        return getattr(client(service), operation)(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, what) from exc


def encryption_args(key_param: str) -> dict:
    """`Encrypted=True`, plus RECLO_KMS_KEY_ID under the name this call gives it (else AWS's default EBS key).

    A failover's disk is the customer's whole server: its snapshot, image
    and volumes are encrypted at rest like the backups they come from.
    Volumes made from an encrypted snapshot are always encrypted.
    """
    args = {"Encrypted": True}
    if settings.RECLO_KMS_KEY_ID:
        args[key_param] = settings.RECLO_KMS_KEY_ID
    return args


def volume_gib(virtual_size: int) -> int:
    """The EBS volume size (whole GiB) that holds a disk of `virtual_size` bytes."""
    return max(1, -(-virtual_size // GiB))


# --- EBS direct ---------------------------------------------------------------------


def start_snapshot(
    *, volume_size_gib: int, client_token: str, tags: dict, description: str, parent_snapshot_id: str = ""
) -> str:
    """Start a snapshot to write blocks into; returns its id.

    Empty, or with `parent_snapshot_id` an incremental of that completed
    snapshot: it reads as the parent wherever no block is written into it
    (AWS's EBS direct guide, "Write snapshots"), and it stays whole when the
    parent is deleted later (DeleteSnapshot: "all active snapshots will have
    access to all the information needed to restore the volume").
    Idempotent on AWS through `client_token`; callers also look for the tag
    first (`find_snapshots`), which covers moto. A started snapshot must be
    completed within the timeout (24 h here) or AWS marks it as failed.
    """
    parent = {"ParentSnapshotId": parent_snapshot_id} if parent_snapshot_id else {}
    resp = _call(
        "ebs",
        "start_snapshot",
        "start EBS snapshot",
        VolumeSize=volume_size_gib,
        ClientToken=client_token,
        Description=description,
        Tags=[{"Key": k, "Value": str(v)} for k, v in tags.items()],
        Timeout=24 * 60,
        **parent,
        # moto ignores these and the parent (tests check the request instead).
        **encryption_args("KmsKeyArn"),
    )
    return resp["SnapshotId"]


def find_snapshots(tags: dict) -> list[dict]:
    """Snapshots of ours carrying `tags`: [{snapshot_id, state}]."""
    resp = _call("ec2", "describe_snapshots", "find snapshots", OwnerIds=["self"], Filters=tag_filters(tags))
    return [{"snapshot_id": s["SnapshotId"], "state": s.get("State", "")} for s in resp.get("Snapshots", [])]


def tagged_snapshots(key: str) -> list[tuple[str, dict]]:
    """`(snapshot id, tags)` of our snapshots carrying tag `key` (any value)."""
    resp = _call(
        "ec2", "describe_snapshots", "find snapshots", OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [key]}]
    )
    return [(s["SnapshotId"], {t["Key"]: t["Value"] for t in s.get("Tags", [])}) for s in resp.get("Snapshots", [])]


def snapshot_state(snapshot_id: str) -> tuple[str, str]:
    """(state, message) of a snapshot: pending, completed, error."""
    resp = _call("ec2", "describe_snapshots", f"describe {snapshot_id}", SnapshotIds=[snapshot_id])
    snapshots = resp.get("Snapshots", [])
    if not snapshots:
        raise ObjectNotFound(f"snapshot {snapshot_id} not found", "InvalidSnapshot.NotFound")
    return snapshots[0].get("State", ""), snapshots[0].get("StateMessage", "")


def _checksum(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def put_snapshot_block(snapshot_id: str, index: int, data: bytes) -> None:
    """Write one 512 KiB block into a pending snapshot. Thread-safe; rewriting a block is harmless."""
    if len(data) != EBS_BLOCK_SIZE:
        raise ValueError(f"EBS block {index} is {len(data)} bytes, not {EBS_BLOCK_SIZE}")
    try:
        client("ebs").put_snapshot_block(
            SnapshotId=snapshot_id,
            BlockIndex=index,
            BlockData=data,
            DataLength=len(data),
            Checksum=_checksum(data),
            ChecksumAlgorithm="SHA256",
        )
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"write block {index} of {snapshot_id}") from exc


def snapshot_blocks(snapshot_id: str) -> Iterator[tuple[int, bytes]]:
    """`(block index, 512 KiB)` of every block written into a completed snapshot, in index order.

    ListSnapshotBlocks pages through the indices and their block tokens;
    GetSnapshotBlock reads each one. Blocks not listed read as zeros.
    """
    ebs = client("ebs")
    token = None
    while True:
        kwargs = {"SnapshotId": snapshot_id, "MaxResults": 10000}
        if token:
            kwargs["NextToken"] = token
        try:
            page = ebs.list_snapshot_blocks(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, f"list blocks of {snapshot_id}") from exc
        for block in page.get("Blocks", []):
            try:
                resp = ebs.get_snapshot_block(
                    SnapshotId=snapshot_id, BlockIndex=block["BlockIndex"], BlockToken=block["BlockToken"]
                )
                data = resp["BlockData"].read()
            except (ClientError, BotoCoreError) as exc:
                raise translate(exc, f"read block {block['BlockIndex']} of {snapshot_id}") from exc
            yield block["BlockIndex"], data
        token = page.get("NextToken")
        if not token:
            return


def put_snapshot_blocks(
    snapshot_id: str,
    blocks: Iterable[tuple[int, bytes]],
    *,
    in_flight: int = 8,
    on_done: Callable[[int], None] | None = None,
    on_wait: Callable[[], None] | None = None,
    wait_every: float = 1.0,
) -> int:
    """Write `(block index, 512 KiB of data)` pairs into a pending snapshot.

    Several PutSnapshotBlock calls run at once (each block is its own HTTP
    request; one at a time leaves most of the bandwidth unused), but no more
    than `in_flight`, so memory stays at a few blocks. Rewriting a block is
    harmless, which makes a resumed write idempotent. `on_done(index)` is
    called, in the caller's thread, for every block written, in completion
    order; `on_wait()` every `wait_every` seconds that the caller's thread
    waits for writes to finish (a lease to renew). Returns the number of
    blocks written.
    """

    def put(index: int, data: bytes) -> int:
        put_snapshot_block(snapshot_id, index, data)  # botocore clients are thread-safe
        return index

    written = 0
    pending: set[Future] = set()

    def settle(below: int) -> None:
        """Wait until fewer than `below` writes are in flight."""
        nonlocal pending, written
        while pending and len(pending) >= below:
            done, pending = wait(pending, timeout=wait_every, return_when=FIRST_COMPLETED)
            for future in done:
                finished = future.result()
                written += 1
                if on_done:
                    on_done(finished)
            if not done and on_wait:
                on_wait()

    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="ebs-put") as pool:
        try:
            for index, data in blocks:
                settle(in_flight)
                pending.add(pool.submit(put, index, data))
            settle(1)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return written


def complete_snapshot(snapshot_id: str, *, changed_blocks: int) -> str:
    """Seal a snapshot after its blocks are written; returns its status.

    Completing an already completed snapshot (a worker died after the call
    but before recording it) is not an error.
    """
    try:
        resp = _call(
            "ebs",
            "complete_snapshot",
            f"complete {snapshot_id}",
            SnapshotId=snapshot_id,
            ChangedBlocksCount=changed_blocks,
        )
    except CloudError as exc:
        state, _ = snapshot_state(snapshot_id)
        if state == "completed" or "completed" in str(exc).lower():
            return "completed"
        raise
    return resp.get("Status", "pending")


def register_image(
    *,
    name: str,
    snapshot_id: str,
    volume_size_gib: int,
    description: str,
    tags: dict,
    boot_mode: str = "legacy-bios",
) -> str:
    """Register a bootable image whose root volume comes from `snapshot_id`.

    RegisterImage takes no ClientToken, but an image name is unique in an
    account and region: callers look the name up first (`find_image`), and a
    duplicate name is answered with the existing image. `boot_mode`
    (legacy-bios or uefi) must be the one the disk was installed for, or
    it does not boot. (moto ignores the tags, the boot mode and the
    block-device mapping of this call.)
    """
    try:
        resp = _call(
            "ec2",
            "register_image",
            f"register image {name}",
            Name=name,
            Description=description,
            Architecture="x86_64",
            VirtualizationType="hvm",
            RootDeviceName=ROOT_DEVICE,
            EnaSupport=True,
            BootMode=boot_mode,
            BlockDeviceMappings=[
                {
                    "DeviceName": ROOT_DEVICE,
                    # No Encrypted here: a mapping from a snapshot takes the
                    # snapshot's encryption, and start_snapshot made it encrypted.
                    "Ebs": {
                        "SnapshotId": snapshot_id,
                        "VolumeSize": volume_size_gib,
                        "VolumeType": "gp3",
                        "DeleteOnTermination": True,
                    },
                }
            ],
            TagSpecifications=tag_specifications("image", tags),
        )
    except CloudError as exc:
        if exc.code == "InvalidAMIName.Duplicate":
            existing = find_image(name)
            if existing:
                return existing["image_id"]
        raise
    return resp["ImageId"]


def find_image(name: str) -> dict | None:
    """Our image of that name: {image_id, state, reason}, or None."""
    resp = _call(
        "ec2", "describe_images", f"find image {name}", Owners=["self"], Filters=[{"Name": "name", "Values": [name]}]
    )
    images = resp.get("Images", [])
    if not images:
        return None
    image = images[0]
    return {
        "image_id": image["ImageId"],
        "state": image.get("State", ""),
        "reason": image.get("StateReason", {}).get("Message", ""),
    }


def image_state(image_id: str) -> tuple[str, str]:
    """(state, reason) of an image: pending, available, failed, ..."""
    resp = _call("ec2", "describe_images", f"describe {image_id}", ImageIds=[image_id])
    images = resp.get("Images", [])
    if not images:
        raise ObjectNotFound(f"image {image_id} not found", "InvalidAMIID.NotFound")
    return images[0].get("State", ""), images[0].get("StateReason", {}).get("Message", "")


def delete_image(image_id: str, *, keep: Iterable[str] = ()) -> None:
    """Deregister an image and delete its snapshots, except those in `keep` (staged ones). Idempotent."""
    try:
        resp = _call("ec2", "describe_images", f"describe {image_id}", ImageIds=[image_id])
    except ObjectNotFound:
        return
    except CloudError as exc:
        if exc.code.startswith("InvalidAMIID"):
            return
        raise
    snapshots = [
        m["Ebs"]["SnapshotId"]
        for image in resp.get("Images", [])
        for m in image.get("BlockDeviceMappings", [])
        if m.get("Ebs", {}).get("SnapshotId")
    ]
    if resp.get("Images"):
        _call("ec2", "deregister_image", f"deregister {image_id}", ImageId=image_id)
    kept = set(keep)
    for snapshot_id in snapshots:
        if snapshot_id not in kept:
            delete_snapshot(snapshot_id)


def delete_snapshot_unless_in_use(snapshot_id: str) -> bool:
    """Delete a snapshot; False (and kept) while a registered image uses it. Idempotent.

    AWS refuses to delete the root snapshot of a registered image
    (InvalidSnapshot.InUse) until that image is deregistered.
    """
    try:
        _call("ec2", "delete_snapshot", f"delete {snapshot_id}", SnapshotId=snapshot_id)
    except CloudError as exc:
        if exc.code == "InvalidSnapshot.InUse":
            return False
        if not (isinstance(exc, ObjectNotFound) or exc.code.startswith("InvalidSnapshot")):
            raise
    return True


def delete_snapshot(snapshot_id: str) -> None:
    try:
        _call("ec2", "delete_snapshot", f"delete {snapshot_id}", SnapshotId=snapshot_id)
    except CloudError as exc:
        if not (isinstance(exc, ObjectNotFound) or exc.code.startswith("InvalidSnapshot")):
            raise


# --- VM Import ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportStatus:
    """Where an import task is. `status`: active, completed, deleting or deleted."""

    status: str
    message: str = ""
    progress: int | None = None
    image_id: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("deleting", "deleted")


def import_image(
    *,
    bucket: str,
    key: str,
    role_name: str,
    client_token: str,
    description: str,
    tags: dict,
    boot_mode: str = "legacy-bios",
    license_type: str = "AWS",
    platform: str = "Windows",
) -> str:
    """Start importing a VHD in S3 as an image; returns the import task id.

    Idempotent through `client_token`: a repeated call returns the same task.
    `license_type` AWS: EC2 provides (and bills) the Windows licence;
    BYOL: the customer's own. `boot_mode`: legacy-bios or uefi.
    """
    resp = _call(
        "ec2",
        "import_image",
        f"import s3://{bucket}/{key}",
        Description=description,
        DiskContainers=[
            {"Description": description, "Format": "VHD", "UserBucket": {"S3Bucket": bucket, "S3Key": key}}
        ],
        RoleName=role_name,
        ClientToken=client_token,
        BootMode=boot_mode,
        LicenseType=license_type,
        Platform=platform,
        TagSpecifications=tag_specifications("import-image-task", tags),
        **encryption_args("KmsKeyId"),
    )
    return resp["ImportTaskId"]


def import_status(task_id: str) -> ImportStatus:
    """The state of an import task (VM Import reports progress as a string percentage)."""
    resp = _call("ec2", "describe_import_image_tasks", f"describe import {task_id}", ImportTaskIds=[task_id])
    tasks = resp.get("ImportImageTasks", [])
    if not tasks:
        raise ObjectNotFound(f"import task {task_id} not found", "InvalidConversionTaskId")
    task = tasks[0]
    progress = task.get("Progress")
    return ImportStatus(
        status=task.get("Status", ""),
        message=task.get("StatusMessage", ""),
        progress=int(progress) if progress and str(progress).isdigit() else None,
        image_id=task.get("ImageId", "") or "",
    )


def vmimport_trust_policy() -> dict:
    """Who may assume the vmimport role: the VM Import service, with AWS's documented external id."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "vmie.amazonaws.com"},
                "Action": "sts:AssumeRole",
                "Condition": {"StringEquals": {"sts:Externalid": "vmimport"}},
            }
        ],
    }


def vmimport_role_policy(bucket: str, prefix: str) -> dict:
    """What VM Import may do with the role: read the disks under `prefix`, make snapshots and images."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
            },
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"]},
            {
                "Effect": "Allow",
                "Action": [
                    "ec2:ModifySnapshotAttribute",
                    "ec2:CopySnapshot",
                    "ec2:RegisterImage",
                    "ec2:Describe*",
                ],
                "Resource": "*",
            },
        ],
    }


def ensure_vmimport_role(*, role_name: str, bucket: str, prefix: str) -> str:
    """Create the vmimport role (or update its policies). Idempotent; returns the role's ARN."""
    iam = client("iam")
    trust = json.dumps(vmimport_trust_policy())
    try:
        try:
            arn = iam.create_role(
                RoleName=role_name,
                AssumeRolePolicyDocument=trust,
                Description="Lets EC2 VM Import read ReClo's consolidated disks and register images.",
                Tags=[{"Key": "reclo:managed", "Value": "true"}],
            )["Role"]["Arn"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "EntityAlreadyExists":
                raise
            arn = iam.get_role(RoleName=role_name)["Role"]["Arn"]
            iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=trust)
        iam.put_role_policy(
            RoleName=role_name,
            PolicyName="reclo-vmimport",
            PolicyDocument=json.dumps(vmimport_role_policy(bucket, prefix)),
        )
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"prepare role {role_name}") from exc
    return arn
