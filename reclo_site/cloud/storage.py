"""S3: the backup bucket and the objects in it."""

import json

from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings

from .clients import client
from .errors import translate


def bucket_name() -> str:
    return settings.RECLO_BUCKET


def ensure_bucket() -> None:
    """Create the backup bucket if missing: private, encrypted at rest. Idempotent."""
    s3 = client("s3")
    name = bucket_name()
    kwargs = {"Bucket": name}
    if settings.AWS_REGION != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.AWS_REGION}
    try:
        try:
            s3.create_bucket(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
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
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"prepare bucket {name}") from exc


def put_object(key: str, body: bytes, *, metadata: dict | None = None, tags: dict | None = None) -> None:
    """Write a small object (markers, manifests)."""
    kwargs = {"Bucket": bucket_name(), "Key": key, "Body": body, "Metadata": metadata or {}}
    if tags:
        kwargs["Tagging"] = "&".join(f"{k}={v}" for k, v in tags.items())
    try:
        client("s3").put_object(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"put {key}") from exc


def head_object(key: str) -> dict:
    """Size and metadata of an object; ObjectNotFound when it is missing."""
    try:
        resp = client("s3").head_object(Bucket=bucket_name(), Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"head {key}") from exc
    return {
        "size": resp["ContentLength"],
        "etag": resp.get("ETag", "").strip('"'),
        "metadata": resp.get("Metadata", {}),
    }


def delete_object(key: str) -> None:
    """Delete an object; deleting a missing one is not an error."""
    try:
        client("s3").delete_object(Bucket=bucket_name(), Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise translate(exc, f"delete {key}") from exc


def tenant_marker_key(user_id: int) -> str:
    return f"backups/{user_id}/.reclo-tenant.json"


def provision_tenant(user_id: int, username: str) -> None:
    """Create the user's storage area: a tagged marker object at its prefix. Idempotent."""
    body = json.dumps({"user_id": user_id, "username": username}).encode()
    put_object(tenant_marker_key(user_id), body, tags={"reclo-tenant": str(user_id)})
