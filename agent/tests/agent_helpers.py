"""Helpers of the agent's own tests (not the VHD tests): a fake portal, disk images.

:class:`FakePortal` implements the calls of the API (docs/api.md) that the
agent makes, in process, over moto's S3 (``mock_aws``): it grants uploads,
verifies completed ones the way the portal's verifier does (size, SHA-256,
``validate_stored`` with the kind, parent id and disk size) and hands out
download grants. The agent's backup and restore code runs against it
unchanged, with no Django in sight; the end-to-end test at the repository
root runs the same flows against the real portal.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import uuid
from datetime import UTC, datetime, timedelta

import boto3
from reclo_agent.errors import PortalError, TokenRejected
from reclo_agent.vhd import open_seekable, validate_stored
from reclo_agent.vhd.errors import VHDError

MiB = 1024 * 1024
BUCKET = "reclo-agent-test"


class FakePortal:
    """The backups API of docs/api.md, in process (see the module doc)."""

    def __init__(self, *, credentials_ttl: timedelta = timedelta(hours=12), user_id: int = 7) -> None:
        self.s3 = boto3.client("s3", region_name="us-east-1")
        self.s3.create_bucket(Bucket=BUCKET)
        self.backups: dict[str, dict] = {}
        self.uploads: dict[str, str] = {}
        self.vhd_ids: dict[str, uuid.UUID] = {}
        self.ttl = credentials_ttl
        self.user_id = user_id
        self.calls: list[str] = []
        self.credential_calls = 0
        self.reject_token = False
        self.verify_hook = None  # callable(backup) -> failure message or None
        self.statuses: list[tuple[str, dict]] = []  # (server, body) of each status report

    # helpers

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self.reject_token:
            raise TokenRejected("The portal refused the agent's token (expired). Log in again.")

    def _credentials(self) -> dict:
        expires = datetime.now(UTC) + self.ttl
        return {
            "AccessKeyId": "testing",
            "SecretAccessKey": "testing",
            "SessionToken": "testing",
            "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def _grant(self) -> dict:
        return {"bucket": BUCKET, "region": "us-east-1", "endpoint_url": None, "credentials": self._credentials()}

    # the API's calls (docs/api.md)

    def iter_backups(self, server=None):
        self._check("list")
        items = sorted(self.backups.values(), key=lambda b: b["_order"], reverse=True)
        for b in items:
            if server is None or b["server"] == server:
                yield self._public(b)

    def _public(self, b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    def get_backup(self, backup_id: str) -> dict:
        self._check("get")
        if backup_id not in self.backups:
            raise PortalError("No such backup.", code=105, status=404)  # as the portal answers
        return self._public(self.backups[backup_id])

    def create_upload(self, **fields) -> dict:
        self._check("create_upload")
        parent_id = fields.get("parent_id")
        if fields["kind"] == "incremental":
            parent = self.backups.get(parent_id or "")
            if not parent or parent["status"] != "verified" or parent["server"] != fields["server"]:
                raise PortalError("Invalid backup chain (error 312)", code=312, status=409)
        backup_id = str(uuid.uuid4())
        upload_id = str(uuid.uuid4())
        key = f"backups/{self.user_id}/{fields['server']}/{fields['disk']}/{backup_id}.vhd.zst"
        self.backups[backup_id] = {
            "backup_id": backup_id,
            "server": fields["server"],
            "disk": fields["disk"],
            "kind": fields["kind"],
            "parent_id": parent_id,
            "file_name": fields["file_name"],
            "file_size": None,
            "virtual_size": fields["virtual_size"],
            "consistency": fields.get("consistency", "crash"),
            "sha256": "",
            "status": "pending",
            "failure": "",
            "date_created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "_key": key,
            "_order": len(self.backups),
        }
        self.uploads[upload_id] = backup_id
        return {"upload_id": upload_id, "key": key, **self._grant()}

    def upload_credentials(self, upload_id: str) -> dict:
        self._check("credentials")
        self.credential_calls += 1
        backup_id = self.uploads.get(upload_id)
        if backup_id is None or self.backups[backup_id]["status"] != "pending":
            raise PortalError("No upload found.", code=305, status=404)
        return self._credentials()

    def complete_upload(self, upload_id: str, *, file_size: int, sha256: str, part_sha256=None) -> dict:
        self._check("complete")
        backup_id = self.uploads.get(upload_id)
        if backup_id is None:
            raise PortalError("No upload found.", code=305, status=404)
        b = self.backups[backup_id]
        if b["status"] != "pending":
            return self._public(b)
        data = self.s3.get_object(Bucket=BUCKET, Key=b["_key"])["Body"].read()
        if len(data) != file_size:
            raise PortalError("Could not verify backup: size differs.", code=307, status=422)
        b.update(file_size=file_size, sha256=sha256, status="verifying", part_sha256=part_sha256)
        b["status"], b["failure"] = self._verify(b, data, sha256)
        if b["status"] == "verified" and part_sha256 is not None:
            # The portal compares these with the object's composite checksum (moto computes it).
            attrs = self.s3.get_object_attributes(Bucket=BUCKET, Key=b["_key"], ObjectAttributes=["Checksum"])
            joined = b"".join(bytes.fromhex(h) for h in part_sha256)
            if (
                attrs["Checksum"]["ChecksumSHA256"].split("-")[0]
                != base64.b64encode(hashlib.sha256(joined).digest()).decode()
            ):
                b["status"], b["failure"] = "failed", "part checksums do not match the object"
        return self._public(b)

    def _verify(self, b: dict, data: bytes, sha256: str) -> tuple[str, str]:
        if hashlib.sha256(data).hexdigest() != sha256:
            return "failed", "SHA-256 does not match"
        parent_vhd = self.vhd_ids.get(b["parent_id"]) if b["parent_id"] else None
        try:
            info = validate_stored(
                io.BytesIO(data), expected_kind=b["kind"], parent_unique_id=parent_vhd, virtual_size=b["virtual_size"]
            )
        except VHDError as exc:
            return "failed", str(exc)
        if self.verify_hook and (failure := self.verify_hook(b)):
            return "failed", failure
        self.vhd_ids[b["backup_id"]] = info.unique_id
        return "verified", ""

    def download(self, backup_id: str) -> dict:
        self._check("download")
        b = self.backups.get(backup_id)
        if b is None or b["status"] != "verified":
            raise PortalError("No restorable backup with that id.", code=401, status=404)
        chain = []
        while b is not None:
            chain.append({"backup_id": b["backup_id"], "kind": b["kind"], "key": b["_key"],
                          "file_size": b["file_size"], "sha256": b["sha256"]})  # fmt: skip
            b = self.backups.get(b["parent_id"]) if b["parent_id"] else None
        return {"chain": chain[::-1], **self._grant()}

    def report_status(self, server: str, **fields) -> dict:
        self._check("status")
        self.statuses.append((server, fields))
        return {"message": "Status recorded."}

    def renew_token(self) -> dict:
        self._check("renew")
        return {"token_expires": (datetime.now(UTC) + timedelta(days=60)).strftime("%Y-%m-%dT%H:%M:%SZ")}

    # test conveniences

    def object_bytes(self, backup_id: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=self.backups[backup_id]["_key"])["Body"].read()

    def stored_vhd(self, backup_id: str) -> bytes:
        return open_seekable(io.BytesIO(self.object_bytes(backup_id))).read()


def make_image(size: int, seed: int = 1) -> bytearray:
    """A raw disk: random, all-zero and text regions, like a used disk."""
    rnd = random.Random(seed)
    disk = bytearray(size)
    text = b"ReClo keeps the office running when its server does not. " * 64
    at = 0
    while at < size:
        n = min(rnd.choice((64, 256, 1024)) * 1024, size - at)
        kind = rnd.random()
        if kind < 0.4:
            disk[at : at + n] = rnd.randbytes(n)
        elif kind < 0.7:
            pass  # zeros
        else:
            disk[at : at + n] = (text * (n // len(text) + 1))[:n]
        at += n
    return disk


def scatter_writes(disk: bytearray, count: int, seed: int = 2, page: int = 4096) -> tuple[bytearray, int]:
    """A copy with ``count`` random 4 KiB pages rewritten; returns (new disk, changed bytes)."""
    rnd = random.Random(seed)
    new = bytearray(disk)
    pages = set()
    for _ in range(count):
        p = rnd.randrange(len(disk) // page)
        pages.add(p)
        new[p * page : (p + 1) * page] = rnd.randbytes(page)
    return new, len(pages) * page
