from django.urls import path

from . import views

app_name = "backups"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("servers/add/", views.add_server, name="add-server"),
]
