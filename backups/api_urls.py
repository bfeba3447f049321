from django.urls import path

from . import api, api_files, api_servers, api_status

urlpatterns = [
    path("backups", api.BackupListApi.as_view(), name="backup-list"),
    path("backups/uploads", api.UploadStartApi.as_view(), name="upload-start"),
    path("backups/uploads/<uuid:upload_id>/credentials", api.UploadCredentialsApi.as_view(), name="upload-credentials"),
    path("backups/uploads/<uuid:upload_id>/complete", api.UploadCompleteApi.as_view(), name="upload-complete"),
    path("backups/<uuid:backup_id>", api.BackupDetailApi.as_view(), name="backup-detail"),
    path("backups/<uuid:backup_id>/download", api.BackupDownloadApi.as_view(), name="backup-download"),
    path("backups/<uuid:backup_id>/files", api_files.FilesApi.as_view(), name="backup-files"),
    path("backups/<uuid:backup_id>/files/content", api_files.FileContentApi.as_view(), name="backup-file-content"),
    path("backups/<uuid:backup_id>/undelete", api.BackupUndeleteApi.as_view(), name="backup-undelete"),
    path("servers", api_servers.ServerListApi.as_view(), name="server-list"),
    path("servers/<str:server>", api_servers.ServerDetailApi.as_view(), name="server-detail"),
    path("servers/<str:server>/enrollment", api_servers.EnrollmentKeyApi.as_view(), name="server-enrollment"),
    path("servers/<str:server>/credentials", api_servers.ServerCredentialsApi.as_view(), name="server-credentials"),
    path("enroll", api_servers.EnrollApi.as_view(), name="enroll"),
    path("servers/<str:server>/status", api_status.ServerStatusApi.as_view(), name="server-status"),
]
