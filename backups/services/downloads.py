"""Download grants: read-only credentials for exactly one chain's objects."""

from dataclasses import dataclass

from reclo_site import cloud
from reclo_site.cloud import credentials
from reclo_site.errors import Code, ServiceError

from ..chains import chain_of
from ..models import Backup
from ..naming import tenant_prefix


@dataclass(frozen=True)
class DownloadGrant:
    """The chain to restore (base first) and credentials that can read it."""

    chain: list[Backup]
    credentials: credentials.TemporaryCredentials


def read_policy(user_id: int, keys: list[str]) -> str:
    """A read-only session policy naming exactly `keys`.

    Whole ARNs when they fit STS's 2,048 characters. Long server and disk
    names times a long chain may not (about 8 keys at the longest names),
    so then each key becomes `backups/<user>/*/<backup id>.<suffix>`: the
    backup id is a UUID the portal made and every object under the tenant's
    prefix was written through credentials for one exact portal-made key, so
    each pattern still matches that one object and nothing else. Raises
    PolicyTooLarge if even that does not fit (a chain of some 20 points).
    """
    try:
        return credentials.download_policy([credentials.object_arn(key) for key in keys])
    except credentials.PolicyTooLarge:
        prefix = tenant_prefix(user_id)
        patterns = []
        for key in keys:
            if not key.startswith(prefix):
                raise ValueError(f"{key} is not under {prefix}") from None
            patterns.append(credentials.object_arn_pattern(prefix, "/" + key.rsplit("/", 1)[1]))
        return credentials.download_policy(patterns)


def backup_download_grant(*, user, backup_id) -> DownloadGrant:
    """Read-only credentials for every object of a restore point's chain.

    Each chain entry names the version (and ETag) verification read; the
    agent reads exactly that version, so bytes written over a key after
    verification never reach a restored disk.

    NO_RESTORABLE_BACKUP for an unknown id, another tenant's, a deleted one, or a chain not verified yet;
    VERIFICATION_FAILED when a restore point of the chain failed verification (with its
    reason); UPLOAD_CREDENTIALS_FAILED when STS fails. Idempotent: each call is a fresh grant.
    """
    backup = Backup.objects.filter(user=user, pk=backup_id, deleted_at__isnull=True).first()
    if backup is None:
        raise ServiceError(Code.NO_RESTORABLE_BACKUP, "No restorable backup with that id.")
    chain = chain_of(backup)
    for point in chain:
        if point.status == Backup.Status.FAILED:
            raise ServiceError(
                Code.VERIFICATION_FAILED, f"Restore point {point.pk} of this chain failed verification: {point.failure}"
            )
        if point.status != Backup.Status.VERIFIED:
            raise ServiceError(
                Code.NO_RESTORABLE_BACKUP,
                f"Restore point {point.pk} of this chain is {point.status}, not verified yet.",
            )
    try:
        policy = read_policy(user.pk, [point.key for point in chain])
        grant = credentials.issue(policy=policy, session_name=f"reclo-rd-{user.pk}-{backup.pk.hex}")
    except cloud.CloudError as exc:
        raise ServiceError(
            Code.UPLOAD_CREDENTIALS_FAILED, "Could not get temporary storage credentials; try again shortly."
        ) from exc
    return DownloadGrant(chain=chain, credentials=grant)
