"""S3: the backup bucket and the objects in it."""

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings

from .clients import client
from .errors import CloudError, CloudPermanentError, CloudUnavailable, translate

MiB = 1024 * 1024
# S3's multipart limits: parts of 5 MiB (but the last) to 5 GiB, 10,000 parts.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
# Incomplete multipart uploads left behind by killed agents are aborted by
# the bucket itself after this many days, as well as by our beat job.
ABORT_INCOMPLETE_UPLOADS_DAYS = 2
# The only storage class a restore point may have: readable at once, for a
# failover. S3 leaves the header out of answers for this class.
STANDARD = "STANDARD"


# Stored restore points are locked in COMPLIANCE mode, not GOVERNANCE: in
# governance mode any identity holding s3:BypassGovernanceRetention (the
# portal's own keys, if someone grants it; the account root) can still
# delete a locked version by sending the bypass header, so stolen portal
# credentials could wipe every backup. In compliance mode nobody can delete
# a locked version or shorten its lock before the date, root included. The
# price: a lock set by mistake cannot be undone, so the period is short
# (30 days by default) and only ever extended by the portal.
LOCK_MODE = "COMPLIANCE"


class ObjectChanged(CloudPermanentError):
    """The object is not the version that was verified, or it was overwritten while being read."""


class ObjectLocked(CloudPermanentError):
    """S3 Object Lock keeps this version until its retain-until date: nobody may delete it sooner."""


def bucket_name() -> str:
    return settings.RECLO_BUCKET


def ensure_bucket() -> None:
    """Create the backup bucket if missing: private, encrypted, versioned, with Object Lock. Idempotent.

    Object Lock needs versioning (S3 turns it on with the lock). No default
    retention is set on the bucket: the portal locks each restore point's
    verified version itself (`lock_version`), for the account's period, so
    scratch objects (a failover's merged disk, markers) stay deletable.
    """
    s3 = client("s3")
    name = bucket_name()
    kwargs = {"Bucket": name, "ObjectLockEnabledForBucket": True}
    if settings.AWS_REGION != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.AWS_REGION}
    try:
        try:
            s3.create_bucket(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        _ensure_object_lock(s3, name)
        s3.put_public_access_block(
            Bucket=name,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
        s3.put_bucket_encryption(
            Bucket=name,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
        # No ACLs at all: the bucket owner owns every object an agent writes.
        s3.put_bucket_ownership_controls(
            Bucket=name, OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
        )
        # Parts of uploads an agent never finished cost money and are
        # invisible in listings; the bucket drops them by itself.
        s3.put_bucket_lifecycle_configuration(
            Bucket=name,
            LifecycleConfiguration={
                "Rules": [
                    {
                        "ID": "abort-incomplete-backup-uploads",
                        "Status": "Enabled",
                        "Filter": {"Prefix": "backups/"},
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_INCOMPLETE_UPLOADS_DAYS},
                    }
                ]
            },
        )
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"prepare bucket {name}") from exc


def _ensure_object_lock(s3, name: str) -> None:
    try:
        current = s3.get_object_lock_configuration(Bucket=name).get("ObjectLockConfiguration", {})
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
            raise
        current = {}
    if current.get("ObjectLockEnabled") == "Enabled":
        return
    # A bucket made before Object Lock was required: S3 enables it on a
    # versioned bucket (moto only on an empty one, and then says so).
    try:
        s3.put_object_lock_configuration(Bucket=name, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"})
    except ClientError as exc:
        raise CloudPermanentError(
            f"bucket {name} has no Object Lock and S3 refused to enable it "
            f"({exc.response.get('Error', {}).get('Code')}); use a new bucket (RECLO_BUCKET)",
            "ObjectLockNotEnabled",
        ) from exc


def pinned_args(version_id: str | None, etag: str | None) -> dict:
    """The request parameters that pin a read to one version (and its ETag, for unversioned buckets)."""
    args = {}
    if version_id:
        args["VersionId"] = version_id
    if etag:
        args["IfMatch"] = f'"{etag}"'
    return args


def read_error(exc: Exception, key: str, what: str) -> CloudError:
    """The adapter's error for a failed read of `key`: ObjectChanged when its pinned ETag no longer matches."""
    error = translate(exc, f"{what} {key}")
    if error.code in ("PreconditionFailed", "412"):
        return ObjectChanged(f"{key} in storage is not the version that was verified", error.code)
    return error


def _call(operation: str, what: str, **kwargs) -> dict:
    """One S3 call on the backup bucket; boto3's errors become the adapter's (`what` names the action)."""
    try:
        return getattr(client("s3"), operation)(Bucket=bucket_name(), **kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, what) from exc


def read_call(operation: str, key: str, what: str, *, s3=None, **kwargs) -> dict:
    """A read of `key` (GetObject, HeadObject): a pinned version that changed raises ObjectChanged.

    `s3`: a client of narrower credentials (`scoped_client`) instead of the portal's own.
    """
    try:
        return getattr(s3 or client("s3"), operation)(Bucket=bucket_name(), Key=key, **kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise read_error(exc, key, what) from exc


def put_object(key: str, body: bytes, *, metadata: dict | None = None, tags: dict | None = None) -> dict:
    """Write a small object (markers, manifests, tests); returns its `version_id` and `etag`."""
    kwargs = {"Key": key, "Body": body, "Metadata": metadata or {}}
    if tags:
        kwargs["Tagging"] = "&".join(f"{k}={v}" for k, v in tags.items())
    resp = _call("put_object", f"put {key}", **kwargs)
    return {"version_id": resp.get("VersionId") or "", "etag": resp.get("ETag", "").strip('"')}


def head_object(key: str, *, version_id: str | None = None, etag: str | None = None, s3=None) -> dict:
    """Size, ETag, version, lock and storage class of an object; ObjectNotFound when it (or that version) is missing.

    With `version_id` it describes that version; with `etag` it raises
    ObjectChanged unless the object still has it. `s3`: a client of
    narrower credentials (`scoped_client`) instead of the portal's own.
    """
    resp = read_call("head_object", key, "head", s3=s3, **pinned_args(version_id, etag))
    return {
        "size": resp["ContentLength"],
        "etag": resp.get("ETag", "").strip('"'),
        # "null" is S3's name for the one version of an unversioned object.
        "version_id": "" if resp.get("VersionId") in (None, "null") else resp["VersionId"],
        "metadata": resp.get("Metadata", {}),
        "locked_until": resp.get("ObjectLockRetainUntilDate"),
        "lock_mode": resp.get("ObjectLockMode", ""),
        "storage_class": resp.get("StorageClass") or STANDARD,
    }


def object_checksum(key: str, *, version_id: str | None = None) -> dict:
    """The SHA-256 checksum S3 keeps for an object (GetObjectAttributes); ObjectNotFound when it is missing.

    `checksum_sha256`: the base64 checksum, "" when the object has none. For
    a multipart upload made with ChecksumAlgorithm SHA256 it is composite:
    the SHA-256 of the parts' SHA-256s, each part checked by S3 on arrival
    (`checksum_type` "COMPOSITE"; AWS leaves out the "-<parts>" that HEAD
    shows, and is dropped here if present). `parts`: the part count S3
    reports, None when it does not say. Also `size`, `etag`, `version_id`.
    """
    args = {"VersionId": version_id} if version_id else {}
    try:
        resp = client("s3").get_object_attributes(
            Bucket=bucket_name(),
            Key=key,
            ObjectAttributes=["ETag", "Checksum", "ObjectParts", "ObjectSize"],
            MaxParts=1,
            **args,
        )
    except (ClientError, BotoCoreError) as exc:
        raise read_error(exc, key, "attributes of") from exc
    checksum = resp.get("Checksum") or {}
    return {
        "checksum_sha256": (checksum.get("ChecksumSHA256") or "").split("-")[0],
        "checksum_type": checksum.get("ChecksumType") or "",
        "parts": (resp.get("ObjectParts") or {}).get("TotalPartsCount"),
        "size": resp.get("ObjectSize"),
        "etag": (resp.get("ETag") or "").strip('"'),
        "version_id": "" if resp.get("VersionId") in (None, "null") else resp["VersionId"],
    }


def lock_version(key: str, version_id: str, until: datetime) -> datetime:
    """Lock one version until `until` (COMPLIANCE mode); returns the date it is locked until.

    Only ever extends: a version already locked for longer keeps its date
    (S3 refuses to shorten a compliance lock anyway; moto would allow it).
    Idempotent.
    """
    if not version_id:
        raise ValueError(f"locking {key} needs its version id (is the bucket versioned?)")
    current = head_object(key, version_id=version_id)["locked_until"]
    if current is not None and current >= until:
        return current
    _call(
        "put_object_retention",
        f"lock {key}",
        Key=key,
        VersionId=version_id,
        Retention={"Mode": LOCK_MODE, "RetainUntilDate": until},
    )
    return until


def _versions(s3, key: str) -> list[str]:
    """Every version id of `key`, delete markers included ("null" for an unversioned object)."""
    found = []
    kwargs = {"Bucket": bucket_name(), "Prefix": key}
    while True:
        resp = s3.list_object_versions(**kwargs)
        for entry in [*resp.get("Versions", []), *resp.get("DeleteMarkers", [])]:
            if entry["Key"] == key:  # the prefix also matches longer keys
                found.append(entry["VersionId"])
        if not resp.get("IsTruncated"):
            return found
        kwargs["KeyMarker"] = resp["NextKeyMarker"]
        kwargs["VersionIdMarker"] = resp["NextVersionIdMarker"]


def _delete_versions(pairs: list[tuple[str, str]]) -> None:
    for start in range(0, len(pairs), 1000):  # DeleteObjects takes up to 1,000 entries
        batch = pairs[start : start + 1000]
        resp = _call(
            "delete_objects",
            f"delete {len(batch)} object versions",
            Delete={"Objects": [{"Key": k, "VersionId": v} for k, v in batch], "Quiet": True},
        )
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            message = f"delete {first.get('Key')}: {first.get('Code')} {first.get('Message', '')}"
            if first.get("Code") == "AccessDenied":
                # What S3 answers for a version under Object Lock.
                raise ObjectLocked(message, "AccessDenied")
            raise CloudUnavailable(message, str(first.get("Code", "")))


def delete_object(key: str) -> None:
    """Delete an object: every version of it, so nothing of it stays billed or readable.

    A plain DeleteObject on a versioned bucket only adds a delete marker;
    this removes the versions themselves. Deleting a missing object is not
    an error; a version under Object Lock raises ObjectLocked (the others
    are deleted).
    """
    delete_objects([key])


def delete_objects(keys: list[str]) -> None:
    """Delete every version of several objects; missing ones are not an error.

    Raises ObjectLocked if a version is locked, CloudUnavailable on other failures.
    """
    s3 = client("s3")
    try:
        pairs = [(key, version) for key in keys for version in _versions(s3, key)]
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"list versions of {len(keys)} objects") from exc
    _delete_versions(pairs)


def multipart_uploads(*, prefix: str, initiated_before: datetime | None = None, key: str | None = None) -> list:
    """Incomplete multipart uploads under `prefix` as (key, upload id) pairs.

    `initiated_before` keeps only older ones; `key` only those of one object.
    """
    s3 = client("s3")
    found = []
    kwargs = {"Bucket": bucket_name(), "Prefix": key or prefix}
    try:
        while True:
            resp = s3.list_multipart_uploads(**kwargs)
            for upload in resp.get("Uploads", []):
                if key is not None and upload["Key"] != key:
                    continue
                if initiated_before is None or upload["Initiated"] < initiated_before:
                    found.append((upload["Key"], upload["UploadId"]))
            if not resp.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = resp["NextKeyMarker"]
            kwargs["UploadIdMarker"] = resp["NextUploadIdMarker"]
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"list multipart uploads under {prefix}") from exc


def abort_multipart_upload(key: str, upload_id: str) -> None:
    """Abort one incomplete upload; one already gone is not an error."""
    try:
        _call("abort_multipart_upload", f"abort upload of {key}", Key=key, UploadId=upload_id)
    except CloudError as error:
        if error.code != "NoSuchUpload":
            raise


class SeekableObject(io.RawIOBase):
    """Position keeping shared by the object readers: `size` and `_pos` are theirs."""

    size: int
    _pos: int

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos


class ObjectReader(SeekableObject):
    """A read-only, seekable file object over one object, read by ranged GETs.

    The VHD validator and the seekable zstd reader jump between the seek
    table at the end and the blocks they need, so nothing is downloaded as a
    whole. Reads go in aligned chunks with a small cache, so the small reads
    of a parser cost one request per chunk.

    Every GET names the version (and ETag, If-Match) seen on opening, so an
    agent that still holds upload credentials cannot swap the object halfway
    through a check. `version_id` / `etag` pin the reader to the version
    verification recorded: a reader of a restore point reads exactly the
    bytes that were verified, whatever was written over the key since, and
    an unversioned object with another ETag raises ObjectChanged.

    With `sha256=True` the chunks fetched in order from the start are hashed
    as they pass, and `sha256_hexdigest()` reads only what was never fetched:
    a check that reads everything front to back (as the zstd frame check
    does) gets the object's SHA-256 without a second download.
    """

    def __init__(
        self,
        key: str,
        *,
        version_id: str | None = None,
        etag: str | None = None,
        chunk_size: int = 8 * MiB,
        cache_chunks: int = 4,
        sha256: bool = False,
        on_fetch: Callable[[], None] | None = None,
        s3=None,
    ):
        super().__init__()
        self._on_fetch = on_fetch  # called after every GET: a long read's heartbeat
        self.key = key
        self._s3 = s3 or client("s3")
        info = head_object(key, version_id=version_id, etag=etag, s3=self._s3)
        self.size = info["size"]
        self.etag = info["etag"]
        self.version_id = info["version_id"]
        self.storage_class = info["storage_class"]
        self._chunk_size = chunk_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_chunks = cache_chunks
        self._pos = 0
        self._hash = hashlib.sha256() if sha256 else None
        self._hashed = 0  # bytes [0, _hashed) are in the hash
        self.requests = 0

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), max(0, self.size - self._pos))
        done = 0
        while done < wanted:
            index, within = divmod(self._pos, self._chunk_size)
            chunk = self._chunk(index)
            take = min(wanted - done, len(chunk) - within)
            view[done : done + take] = chunk[within : within + take]
            done += take
            self._pos += take
        return done

    def _chunk(self, index: int) -> bytes:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        start = index * self._chunk_size
        end = min(start + self._chunk_size, self.size)
        data = self._get(start, end).read()
        if len(data) != end - start:
            raise CloudUnavailable(f"read {self.key}: got {len(data)} of {end - start} bytes", "ShortRead")
        if self._hash is not None and self._hashed == start:
            self._hash.update(data)
            self._hashed = end
        self._cache[index] = data
        if len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        if self._on_fetch is not None:
            self._on_fetch()
        return data

    def _get(self, start: int, end: int):
        """The body stream of bytes [start, end)."""
        self.requests += 1
        resp = read_call(
            "get_object", self.key, "read", s3=self._s3, Range=f"bytes={start}-{end - 1}",
            **pinned_args(self.version_id, self.etag),
        )  # fmt: skip
        return resp["Body"]

    def sha256_hexdigest(self) -> str:
        """The object's SHA-256, fetching only the part not hashed yet."""
        if self._hash is None:
            raise ValueError("open the reader with sha256=True")
        if self._hashed < self.size:
            body = self._get(self._hashed, self.size)
            try:
                for piece in body.iter_chunks(MiB):
                    self._hash.update(piece)
                    self._hashed += len(piece)
            except BotoCoreError as exc:
                raise translate(exc, f"read {self.key}") from exc
            if self._hashed != self.size:
                raise CloudUnavailable(f"read {self.key}: stream ended at {self._hashed} of {self.size}", "ShortRead")
        return self._hash.hexdigest()


def scoped_client(creds):
    """An S3 client acting with temporary credentials (a `credentials.TemporaryCredentials`), not the portal's own.

    Pass it as `s3=` to `ObjectReader`: a reader for one chain then can read
    that chain's objects and nothing else, whatever asks it to.
    """
    return client(
        "s3",
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
        aws_session_token=creds.session_token,
    )


class ObjectWriter(io.RawIOBase):
    """A write-only stream into a new object, sent as a multipart upload.

    For objects the worker makes itself (retention's merged fulls, the
    merged disk VM Import reads): parts go up as they fill, up to
    `in_flight` of them on threads while the caller fills the next, so
    producing the data and sending it overlap; memory holds `in_flight + 1`
    parts whatever the object's size. `expected_size` picks the first part
    size; since the final size is only a guess, the part size also doubles
    every 1,000 parts, which keeps any object up to S3's 5 TiB within its
    10,000 parts. Used as a context manager, an exception (in the block or
    in the final part and completion) aborts the upload, so a failed write
    leaves neither an object nor parts.
    """

    def __init__(self, key: str, *, expected_size: int = 0, part_size: int = 16 * MiB, in_flight: int = 1):
        super().__init__()
        self.key = key
        needed = -(-int(expected_size * 1.05) // (MAX_PARTS - 100)) if expected_size else 0
        self.part_size = max(part_size, MIN_PART_SIZE, -(-needed // MiB) * MiB)
        self._in_flight = max(1, in_flight)
        self._buffer = bytearray()
        self._pending: list[Future] = []
        self._parts: list[dict] = []
        self._sent = 0  # parts handed to the pool (done or pending)
        self.size = 0
        self.version_id = ""  # of the object written, once finished
        self._done = False
        self._upload_id = _call("create_multipart_upload", f"start upload of {key}", Key=key)["UploadId"]
        self._pool = ThreadPoolExecutor(max_workers=self._in_flight, thread_name_prefix="s3-part")

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self._done:
            raise ValueError("write to a finished ObjectWriter")
        view = memoryview(data).cast("B")
        self._buffer += view
        self.size += len(view)
        while len(self._buffer) >= self._next_part_size():
            size = self._next_part_size()
            self._submit(bytes(self._buffer[:size]))
            del self._buffer[:size]
        return len(view)

    def _next_part_size(self) -> int:
        return self.part_size << (self._sent // 1000)

    def _send(self, number: int, body: bytes) -> dict:
        resp = _call(
            "upload_part",
            f"upload part {number} of {self.key}",
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _submit(self, body: bytes) -> None:
        while len(self._pending) >= self._in_flight:
            self._parts.append(self._pending.pop(0).result())
        self._sent += 1
        self._pending.append(self._pool.submit(self._send, self._sent, body))

    def finish(self) -> int:
        """Send the last part, wait for all, complete the upload; returns the object's size."""
        if self._done:
            return self.size
        if self._buffer or not self._sent:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._parts.append(self._pending.pop(0).result())
        self._pool.shutdown()
        resp = _call(
            "complete_multipart_upload",
            f"complete upload of {self.key}",
            Key=self.key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": sorted(self._parts, key=lambda part: part["PartNumber"])},
        )
        self.version_id = resp.get("VersionId") or ""
        self._done = True
        return self.size

    def abort(self) -> None:
        """Give up: cancel parts not sent yet and abort the upload (its sent parts go too)."""
        if self._done:
            return
        self._done = True
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        try:
            abort_multipart_upload(self.key, self._upload_id)
        except CloudError:
            pass  # the bucket's lifecycle rule and the beat job clean it up

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.finish()
        finally:
            # Also when the last part or the completion itself fails: its
            # parts would otherwise stay behind. Does nothing once finished.
            self.abort()
        return super().__exit__(exc_type, exc, tb)


def tenant_marker_key(user_id: int) -> str:
    return f"backups/{user_id}/.reclo-tenant.json"


def provision_tenant(user_id: int, username: str) -> None:
    """Create the user's storage area: a tagged marker object at its prefix. Idempotent."""
    body = json.dumps({"user_id": user_id, "username": username}).encode()
    put_object(tenant_marker_key(user_id), body, tags={"reclo-tenant": str(user_id)})
