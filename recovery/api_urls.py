from django.urls import path

from . import api, vpn_api

urlpatterns = [
    path("recoveries", api.RecoveryListApi.as_view(), name="recoveries"),
    path("recoveries/<str:recovery_id>", api.RecoveryDetailApi.as_view(), name="recovery-detail"),
    path("instances", api.InstanceListApi.as_view(), name="instances"),
    path("instances/<str:instance_id>", api.InstanceDetailApi.as_view(), name="instance-detail"),
    path("instances/<str:instance_id>/start", api.InstanceStartApi.as_view(), name="instance-start"),
    path("instances/<str:instance_id>/stop", api.InstanceStopApi.as_view(), name="instance-stop"),
    path("instances/<str:instance_id>/vpn", api.InstanceVpnApi.as_view(), name="instance-vpn"),
    path("vpn/devices", vpn_api.VpnDeviceListApi.as_view(), name="vpn-devices"),
    path("vpn/devices/<str:device_id>", vpn_api.VpnDeviceDetailApi.as_view(), name="vpn-device"),
    path("vpn/devices/<str:device_id>/config", vpn_api.VpnDeviceConfigApi.as_view(), name="vpn-device-config"),
    path("vpn/gateway/peers", vpn_api.GatewayPeerListApi.as_view(), name="vpn-gateway-peers"),
]

from . import drill_api, failback_api  # noqa: E402 - drills and failbacks after the failover routes

urlpatterns += [
    path("recoveries/<str:recovery_id>/failback", failback_api.FailbackStartApi.as_view(), name="recovery-failback"),
    path("failbacks/<str:failback_id>", failback_api.FailbackDetailApi.as_view(), name="failback-detail"),
    path("drills", drill_api.DrillListApi.as_view(), name="drills"),
    path("drills/<str:drill_id>", drill_api.DrillDetailApi.as_view(), name="drill-detail"),
    path("drills/<str:drill_id>/report", drill_api.DrillReportApi.as_view(), name="drill-report"),
]
