from django.urls import path

from . import views

app_name = "recovery"

urlpatterns = [
    path("instances/", views.instances, name="instances"),
]
