from django.urls import path

from . import api

urlpatterns = [
    path("backups", api.BackupListApi.as_view(), name="backup-list"),
    path("backups/uploads", api.UploadStartApi.as_view(), name="upload-start"),
    path("backups/uploads/<uuid:upload_id>/credentials", api.UploadCredentialsApi.as_view(), name="upload-credentials"),
    path("backups/uploads/<uuid:upload_id>/complete", api.UploadCompleteApi.as_view(), name="upload-complete"),
    path("backups/<uuid:backup_id>", api.BackupApi.as_view(), name="backup-detail"),
    path("backups/<uuid:backup_id>/download", api.BackupDownloadApi.as_view(), name="backup-download"),
    path("backups/<uuid:backup_id>/undelete", api.BackupUndeleteApi.as_view(), name="backup-undelete"),
]
