"""Agent API: the office's VPN devices, and the gateway's peer-sync endpoint.

The device routes are the owner's (a user token); the peer-sync route takes
only a gateway credential (`Authorization: Gateway <token>`), which no other
route accepts.
"""

import hmac

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.authentication import get_authorization_header
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from reclo_site.api.fields import StrictCharField
from reclo_site.api.schema import error_responses
from reclo_site.api.validation import valid_body
from reclo_site.errors import Code, ServiceError

from . import devices, vpn_watch

MAX_REPORT_BYTES = 256 * 1024


class DeviceOutput(serializers.Serializer):
    device_id = serializers.UUIDField(source="pk")
    name = serializers.CharField()
    address = serializers.CharField(help_text="The device's address inside the tunnel.")
    created = serializers.DateTimeField()
    last_handshake = serializers.DateTimeField(
        allow_null=True, help_text="The gateway's last handshake with this device, as its agent last reported."
    )


class GatewayOutput(serializers.Serializer):
    status = serializers.ChoiceField(
        ["none", "starting", "up", "down"],
        help_text="`down`: the gateway has not reported for RECLO_VPN_GATEWAY_DOWN_MINUTES (3 by default).",
    )
    message = serializers.CharField(help_text="The same in plain words, as the VPN page says it.")
    last_report = serializers.DateTimeField(allow_null=True, help_text="The gateway agent's last call.")


class DnsOutput(serializers.Serializer):
    mode = serializers.ChoiceField(["server", "custom", "none"])
    entries = serializers.CharField(help_text="The configs' `DNS =` line (empty: none).")


class DeviceInput(serializers.Serializer):
    name = StrictCharField(max_length=63, help_text="What the device is, e.g. “Reception PC”.")


def _config_response(device) -> HttpResponse:
    response = HttpResponse(devices.device_config(device=device), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{devices.config_file_name(device)}"'
    response["Cache-Control"] = "no-store"
    return response


class VpnDeviceListApi(APIView):
    @extend_schema(
        operation_id="vpn_devices_list",
        tags=["vpn"],
        responses={
            200: inline_serializer(
                "VpnDeviceListOutput",
                {
                    "message": serializers.CharField(),
                    "devices": DeviceOutput(many=True),
                    "gateway": GatewayOutput(),
                    "dns": DnsOutput(),
                },
            ),
            **error_responses(Code.BAD_TOKEN),
        },
    )
    def get(self, request):
        found = devices.device_list(user=request.user)
        health = vpn_watch.gateway_health(request.user.pk)
        dns = devices.dns_get(user_id=request.user.pk)
        return Response(
            {
                "message": "Your VPN devices.",
                "devices": DeviceOutput(found, many=True).data,
                "gateway": GatewayOutput(health).data,
                "dns": {"mode": dns.mode, "entries": dns.entries},
            }
        )

    @extend_schema(
        operation_id="vpn_devices_add",
        tags=["vpn"],
        request=DeviceInput,
        responses={
            201: inline_serializer(
                "VpnDeviceAddOutput", {"message": serializers.CharField(), "device": DeviceOutput()}
            ),
            **error_responses(Code.BAD_TOKEN, Code.MALFORMED),
        },
    )
    def post(self, request):
        device = devices.device_create(user=request.user, name=valid_body(DeviceInput, request)["name"])
        return Response(
            {"message": f"Device {device.name} added.", "device": DeviceOutput(device).data},
            status=status.HTTP_201_CREATED,
        )


class VpnDeviceDetailApi(APIView):
    @extend_schema(
        operation_id="vpn_devices_revoke",
        tags=["vpn"],
        responses={
            200: inline_serializer("VpnDeviceRevokeOutput", {"message": serializers.CharField()}),
            **error_responses(Code.BAD_TOKEN, Code.NO_VPN_DEVICE),
        },
    )
    def delete(self, request, device_id):
        device = devices.device_get(user=request.user, device_id=device_id)
        devices.device_revoke(device=device)
        return Response({"message": f"Device {device.name} revoked; the gateway drops it within a minute."})


class VpnDeviceConfigApi(APIView):
    @extend_schema(
        operation_id="vpn_devices_config",
        tags=["vpn"],
        description="The device's WireGuard config (text/plain): every recovered server of the account "
        "through one tunnel. It holds the device's private key: keep it like a password.",
        responses={
            (200, "text/plain"): OpenApiResponse(OpenApiTypes.STR, description="A wg-quick config file."),
            **error_responses(Code.BAD_TOKEN, Code.NO_VPN_DEVICE, Code.INSTANCE_STATE_CONFLICT),
        },
    )
    def get(self, request, device_id):
        return _config_response(devices.device_get(user=request.user, device_id=device_id))


class GatewayPeerListApi(APIView):
    """The gateway agent's one call: it posts `wg show wg0 latest-handshakes`, gets its [Peer] sections."""

    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="vpn_gateway_peers",
        tags=["vpn"],
        auth=[],
        description="For the VPN gateway's peer-sync agent only (`Authorization: Gateway <token>`). "
        "The body is `wg show wg0 latest-handshakes` (text/plain); the answer, the [Peer] sections the "
        "gateway must have, for `wg syncconf`.",
        request={"text/plain": OpenApiTypes.STR},
        responses={
            (200, "text/plain"): OpenApiResponse(OpenApiTypes.STR, description="WireGuard [Peer] sections."),
            **error_responses(Code.BAD_TOKEN, Code.MALFORMED),
        },
    )
    def post(self, request):
        header = get_authorization_header(request).split()
        if len(header) != 2 or not hmac.compare_digest(header[0].lower(), b"gateway"):
            raise ServiceError(Code.BAD_TOKEN, "Send 'Authorization: Gateway <token>'.")
        try:
            gateway = devices.gateway_for_token(header[1].decode("ascii"))
        except UnicodeDecodeError:
            gateway = None
        if gateway is None:
            raise ServiceError(Code.BAD_TOKEN, "Invalid or released gateway credential.")
        body = request.body
        if len(body) > MAX_REPORT_BYTES:
            raise ServiceError(Code.MALFORMED, "The handshake report is too large.")
        try:
            report = body.decode("ascii")
        except UnicodeDecodeError:
            raise ServiceError(Code.MALFORMED, "The report must be `wg show` text.") from None
        response = HttpResponse(devices.gateway_sync(gateway=gateway, report=report), content_type="text/plain")
        response["Cache-Control"] = "no-store"
        return response
