from django.urls import path

from . import views

app_name = "backups"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("servers/add/", views.add_server, name="add-server"),
    path("servers/<int:server_id>/", views.server_detail, name="server-detail"),
    path("servers/<int:server_id>/revoke/", views.server_revoke, name="server-revoke"),
    path("servers/<int:server_id>/remove/", views.server_remove, name="server-remove"),
    path("backups/<uuid:backup_id>/delete/", views.backup_delete, name="backup-delete"),
    path("backups/<uuid:backup_id>/undelete/", views.backup_undelete, name="backup-undelete"),
    path("backups/<uuid:backup_id>/files/", views.backup_files, name="backup-files"),
    path("backups/<uuid:backup_id>/files/download/", views.backup_file_download, name="backup-file-download"),
]
