from django.urls import path

from . import failback_views, standby_views, views, vpn_views

app_name = "recovery"

urlpatterns = [
    path("instances/", views.instances, name="instances"),
    path("vpn/", vpn_views.vpn_devices, name="vpn-devices"),
    path("vpn/dns/", vpn_views.vpn_dns, name="vpn-dns"),
    path("vpn/<uuid:device_id>.conf", vpn_views.vpn_device_config, name="vpn-device-config"),
    path("vpn/<uuid:device_id>/qr.svg", vpn_views.vpn_device_qr, name="vpn-device-qr"),
    path("vpn/<uuid:device_id>/revoke/", vpn_views.vpn_device_revoke, name="vpn-device-revoke"),
    path("servers/<int:server_id>/failover/", views.failover_start, name="failover-start"),
    path("servers/<int:server_id>/drill/", views.drill_start, name="drill-start"),
    path("servers/<int:server_id>/standby/", standby_views.standby_settings, name="standby"),
    path("drills/report/", views.contingency_report, name="contingency-report"),
    path("drills/<uuid:drill_id>/", views.drill_detail, name="drill"),
    path("drills/<uuid:drill_id>/status.json", views.drill_status, name="drill-status"),
    path("drills/<uuid:drill_id>/screenshot.png", views.drill_screenshot, name="drill-screenshot"),
    path("drills/<uuid:drill_id>/report.pdf", views.drill_report_pdf, name="drill-report"),
    path("<uuid:recovery_id>/", views.recovery_detail, name="detail"),
    path("<uuid:recovery_id>/status.json", views.recovery_status, name="status"),
    path("<uuid:recovery_id>/bring-home/", failback_views.failback_start, name="failback-start"),
    path("failbacks/<uuid:failback_id>/", failback_views.failback_detail, name="failback"),
    path("instances/<str:instance_id>/vpn.conf", views.vpn_config, name="vpn-config"),
    path("instances/<str:instance_id>/vpn-qr.svg", views.vpn_qr, name="vpn-qr"),
    path("instances/<str:instance_id>/<str:action>/", views.instance_action, name="instance-action"),
]
