"""Every write and side effect of the backups app; views and tasks call these.

Split by flow: uploads (start, credentials, complete), verification (the
worker's verdict, the scrub), downloads (restore grants), lifecycle
(failing, deleting, clean-up jobs), retention (merging old restore points)
and notifications (late and silent agents).
"""

from .downloads import DownloadGrant, backup_download_grant
from .files import FileDownload, files_browse, files_check, files_download, files_job_run
from .lifecycle import (
    Deletion,
    backup_delete,
    backup_fail,
    backup_in_use,
    backup_undelete,
    backups_purge,
    lock_period,
    objects_purge,
    uploads_clean_up,
    verifications_requeue,
)
from .notifications import overdue_notify
from .retention import MergeFailed, backup_merge, retention_apply
from .servers import (
    EnrollmentGrant,
    enrollment_key_create,
    server_credentials_revoke,
    server_enroll,
    server_get,
    server_remove,
    server_update,
)
from .uploads import UploadGrant, backup_complete, backup_credentials_refresh, backup_start, max_file_size
from .verification import (
    VerificationDeferred,
    backup_scrub,
    backup_verify,
    backups_scrub_pick,
    chain_mark_broken,
    object_check,
    verification_deferred,
)

__all__ = [
    "Deletion",
    "DownloadGrant",
    "EnrollmentGrant",
    "FileDownload",
    "MergeFailed",
    "UploadGrant",
    "VerificationDeferred",
    "backup_complete",
    "backup_credentials_refresh",
    "backup_delete",
    "backup_download_grant",
    "backup_fail",
    "backup_in_use",
    "backup_merge",
    "backup_scrub",
    "backup_start",
    "backup_undelete",
    "backup_verify",
    "files_browse",
    "files_check",
    "files_download",
    "files_job_run",
    "backups_purge",
    "backups_scrub_pick",
    "chain_mark_broken",
    "enrollment_key_create",
    "lock_period",
    "max_file_size",
    "object_check",
    "objects_purge",
    "overdue_notify",
    "retention_apply",
    "server_credentials_revoke",
    "server_enroll",
    "server_get",
    "server_remove",
    "server_update",
    "uploads_clean_up",
    "verification_deferred",
    "verifications_requeue",
]
