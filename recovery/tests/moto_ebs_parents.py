"""A moto extension for the tests: EBS direct's `ParentSnapshotId`, with the semantics AWS documents.

moto's StartSnapshot ignores `ParentSnapshotId` (its docstring says so):
every snapshot starts empty, so an incremental written on its parent reads
back as its own blocks only. AWS documents two things this extension adds,
and nothing else:

- "Use the StartSnapshot action and specify a parent snapshot ID to start a
  snapshot as an incremental snapshot of an existing one" (EBS user guide,
  "Write Amazon EBS snapshots with EBS direct APIs"): the new snapshot reads
  as its parent wherever no block is written into it, and a block written
  into it replaces the parent's there, in it only.
- "When you delete a snapshot, only the data not needed for any other
  snapshot is removed. So regardless of which prior snapshots have been
  deleted, all active snapshots will have access to all the information
  needed to restore the volume" (EC2 API reference, DeleteSnapshot): a
  child stays whole when its parent is deleted.

Both hold when, at StartSnapshot, the child's block table begins as a copy
of its parent's (the Block objects shared, as AWS shares the data): writes
into the child then change its own table only, and deleting the parent
takes nothing from the child. A parent that moto does not know is refused
with ResourceNotFoundException, one not completed yet with
ValidationException (AWS's error names for StartSnapshot). `parents`
records what each snapshot was started on, for the tests to check.

Use: `with ebs_parents() as parents:` around the test (the fixture
`ebs_parents` in test_staging.py), inside moto's mock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from moto.core.exceptions import JsonRESTError
from moto.ebs.responses import EBSResponse


@contextmanager
def ebs_parents() -> Iterator[dict[str, str]]:
    """Patch moto's EBS StartSnapshot to honour `ParentSnapshotId`; yields {child snapshot id: parent id}."""
    parents: dict[str, str] = {}
    original = EBSResponse.start_snapshot

    def start_snapshot(self: EBSResponse):
        parent_id = self._get_param("ParentSnapshotId")
        snapshots = self.ebs_backend.snapshots
        if parent_id:
            parent = snapshots.get(parent_id)
            if parent is None:
                raise JsonRESTError("ResourceNotFoundException", f"The parent snapshot {parent_id} does not exist.")
            if parent.status != "completed":
                raise JsonRESTError("ValidationException", f"The parent snapshot {parent_id} is not completed.")
        before = set(snapshots)
        result = original(self)
        if parent_id:
            (child_id,) = set(snapshots) - before
            snapshots[child_id].blocks = dict(snapshots[parent_id].blocks)
            parents[child_id] = parent_id
        return result

    with mock.patch.object(EBSResponse, "start_snapshot", start_snapshot):
        yield parents
