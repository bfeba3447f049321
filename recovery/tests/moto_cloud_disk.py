"""A moto extension: a recovered server's disk that the cloud writes to, snapshots of it, and ListChangedBlocks.

What AWS does, and moto (in-process, `mock_aws`) does not:

1. **An instance's root volume holds its image's snapshot.** RegisterImage
   with a block-device mapping from snapshot S, then RunInstances of that
   image: the root volume is created from S, and reads S's blocks
   ("Amazon EBS volumes created from snapshots", EC2 User Guide). moto
   ignores the mapping of RegisterImage and gives every instance an empty
   8 GiB volume.
2. **A server writes to its disk.** moto runs no guest. `CloudDisk.write`
   plays the office working on the recovered server: it changes bytes of
   the instance's root volume (copy-on-write over the blocks of S, as EBS
   lazy-loads a volume from its snapshot).
3. **A snapshot of a volume is readable through EBS direct.** CreateSnapshot
   of a volume makes a snapshot of its blocks at that moment, readable with
   ListSnapshotBlocks / GetSnapshotBlock ("Use EBS direct APIs to access the
   contents of an EBS snapshot"). moto's EC2 snapshots of volumes hold no
   blocks, and its EBS backend knows only snapshots made by StartSnapshot.
4. **ListChangedBlocks** answers the blocks that differ between two
   snapshots of one lineage (a volume created from snapshot S, and a later
   snapshot of that volume, are one lineage), with `FirstBlockToken` left
   out when the first snapshot does not hold the block and
   `SecondBlockToken` left out when the second does not (EBS direct API
   reference, ListChangedBlocks / ChangedBlock). moto's version lists only
   the blocks the first snapshot holds, so it never reports a block the
   cloud wrote for the first time.

Where it differs from AWS, knowingly: AWS reports a block as changed when
it was written between the snapshots, even with the same bytes; this
compares contents (a superset for our use, never fewer blocks that really
differ). Pagination is not done (moto answers in one page; our adapter
follows NextToken anyway). No lineage check: the tests only ask about one.

Use (inside `mock_aws`): `with CloudDisk() as disk: ...; disk.write(instance_id, offset, data)`.
Another extension, `moto_ebs_parents.py`, adds StartSnapshot's
`ParentSnapshotId`; the two patch different methods.
"""

from __future__ import annotations

from unittest import mock

from moto.core import DEFAULT_ACCOUNT_ID
from moto.ebs.models import Block, EBSBackend, EBSSnapshot, ebs_backends
from moto.ec2.models import ec2_backends
from moto.ec2.models.elastic_block_store import EBSBackend as EC2VolumesBackend
from moto.ec2.responses.amis import AmisResponse

EBS_BLOCK = 512 * 1024
REGION = "us-east-1"


class CloudDisk:
    """What the section above says moto lacks, patched into moto for the duration of a `with`."""

    def __init__(self, region: str = REGION, account_id: str = DEFAULT_ACCOUNT_ID):
        self.region = region
        self.account_id = account_id
        self.image_snapshots: dict[str, str] = {}  # image id -> the snapshot its root volume comes from
        self.written: dict[str, dict[int, bytes]] = {}  # volume id -> the 512 KiB blocks the cloud wrote
        self.snapshots_of_volumes: list[str] = []
        self._patches: list = []

    @property
    def ebs(self):
        return ebs_backends[self.account_id][self.region]

    @property
    def ec2(self):
        return ec2_backends[self.account_id][self.region]

    # --- the patches --------------------------------------------------------------------

    def __enter__(self) -> CloudDisk:
        disk = self
        real_register = AmisResponse.register_image
        real_create_snapshot = EC2VolumesBackend.create_snapshot

        def register_image(response):  # 1: remember the root snapshot of the mapping moto ignores
            result = real_register(response)
            image_id = result.result["ImageId"] if hasattr(result, "result") else None
            snapshot_id = _mapping_snapshot(response)
            if image_id and snapshot_id:
                disk.image_snapshots[image_id] = snapshot_id
            return result

        def create_snapshot(backend, volume_id, description, owner_id=None, from_ami=None):  # 3
            snapshot = real_create_snapshot(backend, volume_id, description, owner_id=owner_id, from_ami=from_ami)
            source = disk.source_of(volume_id, backend)
            if source is not None:
                copy = EBSSnapshot(account_id=disk.account_id, snapshot=snapshot)
                copy.status = "completed"
                for index, data in sorted(disk.blocks_of(volume_id, backend).items()):
                    copy.put_block(index, data, None, None, len(data))
                disk.ebs.snapshots[snapshot.id] = copy
                disk.snapshots_of_volumes.append(snapshot.id)
            return snapshot

        def list_changed_blocks(backend, first_snapshot_id, second_snapshot_id):  # 4
            first = backend.snapshots[first_snapshot_id]
            second = backend.snapshots[second_snapshot_id]
            changed = {}
            for index in sorted(set(first.blocks) | set(second.blocks)):
                a, b = first.blocks.get(index), second.blocks.get(index)
                if a is None or b is None or a.block_data != b.block_data:
                    changed[index] = (a.block_token if a else None, b.block_token if b else None)
            return changed, second

        self._patches = [
            mock.patch.object(AmisResponse, "register_image", register_image),
            mock.patch.object(EC2VolumesBackend, "create_snapshot", create_snapshot),
            mock.patch.object(EBSBackend, "list_changed_blocks", list_changed_blocks),
        ]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc) -> None:
        for patch in reversed(self._patches):
            patch.stop()

    # --- the disk -----------------------------------------------------------------------

    def source_of(self, volume_id: str, ec2=None) -> str | None:
        """The snapshot a volume was created from: its own, or (2) its instance's image's root snapshot.

        `ec2`: the EC2 backend, when called from inside it (while it is still being built).
        """
        volume = (ec2 or self.ec2).volumes.get(volume_id)
        if volume is None:
            return None
        if volume.snapshot_id and volume.snapshot_id in self.ebs.snapshots:
            return volume.snapshot_id
        attachment = volume.attachment
        if attachment is not None:
            return self.image_snapshots.get(attachment.instance.image_id)
        return None

    def blocks_of(self, volume_id: str, ec2=None) -> dict[int, bytes]:
        """The volume's non-empty 512 KiB blocks now: its source snapshot's, under what the cloud wrote."""
        source = self.source_of(volume_id, ec2)
        blocks = {i: b.block_data for i, b in self.ebs.snapshots[source].blocks.items()} if source else {}
        blocks.update(self.written.get(volume_id, {}))
        return blocks

    def root_volume(self, instance_id: str) -> str:
        instance = self.ec2.get_instance(instance_id)
        return instance.block_device_mapping[instance.root_device_name].volume_id

    def write(self, instance_id: str, offset: int, data: bytes) -> None:
        """The recovered server writes `data` at `offset` of its root volume (2)."""
        volume_id = self.root_volume(instance_id)
        current = self.blocks_of(volume_id)
        written = self.written.setdefault(volume_id, {})
        end = offset + len(data)
        for index in range(offset // EBS_BLOCK, -(-end // EBS_BLOCK)):
            block = bytearray(current.get(index, bytes(EBS_BLOCK)))
            lo, hi = max(offset, index * EBS_BLOCK), min(end, (index + 1) * EBS_BLOCK)
            block[lo - index * EBS_BLOCK : hi - index * EBS_BLOCK] = data[lo - offset : hi - offset]
            written[index] = bytes(block)

    def read(self, instance_id: str, size: int) -> bytes:
        """The first `size` bytes of the instance's root volume as the server sees them."""
        disk = bytearray(size)
        for index, data in self.blocks_of(self.root_volume(instance_id)).items():
            if index * EBS_BLOCK < size:
                disk[index * EBS_BLOCK : (index + 1) * EBS_BLOCK] = data[: size - index * EBS_BLOCK]
        return bytes(disk)


def _mapping_snapshot(response) -> str | None:
    """The root mapping's SnapshotId of a RegisterImage request (EC2 query: BlockDeviceMapping.N.Ebs.SnapshotId)."""
    querystring = getattr(response, "querystring", {}) or {}
    for key, values in querystring.items():
        if key.startswith("BlockDeviceMapping.") and key.endswith(".Ebs.SnapshotId") and values:
            return values[0]
    mappings = response._get_param("BlockDeviceMappings") or response._get_param("BlockDeviceMapping") or []
    for mapping in mappings if isinstance(mappings, list) else []:
        snapshot_id = (mapping.get("Ebs") or {}).get("SnapshotId")
        if snapshot_id:
            return snapshot_id
    return None


__all__ = ["EBS_BLOCK", "Block", "CloudDisk"]
