"""STS: temporary credentials an agent uses to reach exactly its own objects.

Two ways to mint them, chosen by settings:

- ``RECLO_UPLOAD_ROLE_ARN`` set: ``AssumeRole`` on that role with a session
  policy. The role's trust policy must let the portal's identity assume it,
  its permissions must allow s3:PutObject, s3:AbortMultipartUpload and
  s3:GetObject on ``<bucket>/backups/*``, and its MaxSessionDuration must be raised to 12 hours (the default is 1 hour).
  If the portal itself runs on role credentials (an instance profile), AWS
  treats this as role chaining and caps every session at 1 hour whatever is
  asked: set ``RECLO_CREDENTIALS_TTL_HOURS=1``; agents refresh through
  ``.../credentials``.
- unset (the default): ``GetFederationToken`` with the same session policy.
  It needs long-term IAM *user* credentials (not a role's), whose policy
  allows the actions above on that prefix, and lasts up to 36 hours, so the
  contract's 12 hours hold without any role set-up. moto's server mode
  answers it too, so the local stack needs no IAM at all.

Either way the session policy is what narrows the credentials to one object
key (uploads) or one chain's keys (downloads): effective permissions are the
intersection of the caller's and the session policy. moto does not enforce
session policies, so tests check the documents themselves.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings

from .clients import client
from .errors import CloudPermanentError, translate

# STS refuses session policies over 2,048 characters (plain text, both
# AssumeRole and GetFederationToken), so they are serialized compactly.
MAX_POLICY_LENGTH = 2048
MIN_DURATION = 15 * 60
MAX_DURATION = 12 * 60 * 60

# What an agent may do with the one key of its upload (the contract's
# "Upload rules"). s3:PutObject also authorizes CreateMultipartUpload,
# UploadPart and CompleteMultipartUpload; aborting its own multipart upload
# is a separate action, still limited to that key. Nothing reads, lists
# (not even the parts of its own upload: a resumed agent goes by its own
# journal) or deletes.
UPLOAD_ACTIONS = ("s3:PutObject", "s3:AbortMultipartUpload")
# A restore reads whole objects and ranges of them (GetObject covers HEAD);
# reading a named version (the verified one, which the chain pins) is
# s3:GetObjectVersion.
DOWNLOAD_ACTIONS = ("s3:GetObject", "s3:GetObjectVersion")

# Characters IAM gives a meaning inside a resource ARN: wildcards and policy
# variables. Keys come from backups.naming, which never produces them; this
# is the adapter's own last line of defence.
_POLICY_SPECIAL = frozenset("*?$")


class PolicyTooLarge(CloudPermanentError):
    """The session policy would not fit STS's limit."""


@dataclass(frozen=True)
class TemporaryCredentials:
    """A set of STS credentials and the session policy that limits them."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime
    policy: str

    def as_api(self) -> dict:
        """The `credentials` object of the API contract (boto3's own names)."""
        return {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": self.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def partition() -> str:
    region = settings.AWS_REGION
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def object_arn(key: str) -> str:
    """The ARN of one object of the backup bucket, with no wildcard in it."""
    if not key or _POLICY_SPECIAL.intersection(key) or key.startswith("/") or "//" in key:
        raise ValueError(f"refusing to put {key!r} into a policy")
    return f"arn:{partition()}:s3:::{settings.RECLO_BUCKET}/{key}"


def object_arn_pattern(prefix: str, suffix: str) -> str:
    """`<prefix>*<suffix>` as an ARN: one wildcard between two literal parts.

    For callers that can show the pattern matches one object only (see
    `backups.services.downloads`). The wildcard stands for whole path
    segments: `prefix` ends and `suffix` starts with a slash.
    """
    if not prefix.endswith("/") or not suffix.startswith("/") or len(suffix) < 2:
        raise ValueError("a pattern's wildcard must stand for whole path segments")
    object_arn(prefix + "x" + suffix)  # both parts are checked as a literal key would be
    return f"{object_arn(prefix.rstrip('/'))}/*{suffix}"


def _dump(policy: dict) -> str:
    text = json.dumps(policy, separators=(",", ":"))
    if len(text) > MAX_POLICY_LENGTH:
        raise PolicyTooLarge(f"session policy of {len(text)} characters is over STS's {MAX_POLICY_LENGTH}")
    return text


def upload_policy(key: str) -> str:
    """The session policy of an upload: write that one key, once, nothing else.

    The second statement makes the key write-once: S3 denies a PutObject or
    CompleteMultipartUpload that does not carry `If-None-Match: *`, and with
    the header S3 refuses (412) to write over an object that exists. So once
    the agent's object is stored, these credentials cannot replace it, even
    in the hour they stay valid. `s3:ObjectCreationOperation` is true only
    for the requests that create the object: CreateMultipartUpload and
    UploadPart cannot carry the header and stay allowed (AWS, "Enforce
    conditional writes on Amazon S3 buckets").

    Real S3 enforces all of this; moto enforces no session policy at all (it
    does honour If-None-Match when the client sends it), so the tests check
    this document and the agent's headers separately. The versioned bucket
    keeps the verified version whatever is written later anyway.
    """
    arn = object_arn(key)
    return _dump(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "WriteOneBackup", "Effect": "Allow", "Action": list(UPLOAD_ACTIONS), "Resource": arn},
                {
                    "Sid": "WriteItOnce",
                    "Effect": "Deny",
                    "Action": "s3:PutObject",
                    "Resource": arn,
                    "Condition": {
                        "Null": {"s3:if-none-match": "true"},
                        "Bool": {"s3:ObjectCreationOperation": "true"},
                    },
                },
                {
                    "Sid": "OnlyIfAbsent",
                    "Effect": "Deny",
                    "Action": "s3:PutObject",
                    "Resource": arn,
                    "Condition": {
                        "StringNotEquals": {"s3:if-none-match": "*"},
                        "Bool": {"s3:ObjectCreationOperation": "true"},
                    },
                },
            ],
        }
    )


def download_policy(resources: list[str]) -> str:
    """The session policy of a restore: read these resources, nothing else.

    `resources` are object ARNs from `object_arn`, or `object_arn_pattern`
    ones for chains too long for a policy of whole ARNs.
    """
    if not resources:
        raise ValueError("a download policy needs at least one object")
    return _dump(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "ReadOneChain", "Effect": "Allow", "Action": list(DOWNLOAD_ACTIONS), "Resource": resources},
            ],
        }
    )


def _duration(seconds: int | None) -> int:
    if seconds is None:
        seconds = int(settings.RECLO_CREDENTIALS_TTL.total_seconds())
    return max(MIN_DURATION, min(MAX_DURATION, int(seconds)))


def issue(*, policy: str, session_name: str, duration: int | None = None) -> TemporaryCredentials:
    """Temporary credentials limited by `policy` (see the module docstring).

    `session_name` shows up in CloudTrail; only [A-Za-z0-9_=,.@+-] is kept,
    cut to what each call allows.
    """
    name = "".join(c for c in session_name if c.isascii() and (c.isalnum() or c in "_=,.@+-")) or "reclo"
    seconds = _duration(duration)
    sts = client("sts")
    try:
        if settings.RECLO_UPLOAD_ROLE_ARN:
            resp = sts.assume_role(
                RoleArn=settings.RECLO_UPLOAD_ROLE_ARN,
                RoleSessionName=name[:64].ljust(2, "-"),
                Policy=policy,
                DurationSeconds=seconds,
            )
        else:
            resp = sts.get_federation_token(Name=name[:32].ljust(2, "-"), Policy=policy, DurationSeconds=seconds)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, "get temporary credentials") from exc
    creds = resp["Credentials"]
    expiration = creds["Expiration"]
    if expiration.tzinfo is None:
        expiration = expiration.replace(tzinfo=UTC)
    return TemporaryCredentials(
        access_key_id=creds["AccessKeyId"],
        secret_access_key=creds["SecretAccessKey"],
        session_token=creds["SessionToken"],
        expiration=expiration,
        policy=policy,
    )
