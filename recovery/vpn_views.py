"""The VPN devices page: add a device, download its config or scan its QR code, revoke it."""

import io

import qrcode
import qrcode.image.svg
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from reclo_site.errors import ServiceError

from . import devices


def _device_or_404(request, device_id):
    try:
        return devices.device_get(user=request.user, device_id=device_id)
    except ServiceError:
        raise Http404("No such device.") from None


def _config_or_404(device) -> str:
    try:
        return devices.device_config(device=device)
    except ServiceError:
        raise Http404("The VPN gateway is not up yet.") from None


@login_required
@require_http_methods(["GET", "POST"])
def vpn_devices(request):
    """The office's devices, with a form to add one."""
    error = ""
    if request.method == "POST":
        try:
            device = devices.device_create(user=request.user, name=request.POST.get("name", "")[:63])
        except ServiceError as exc:
            error = exc.message
        else:
            messages.success(request, f"{device.name} added: download its file or scan its code below.")
            return redirect("recovery:vpn-devices")
    found = devices.device_list(user=request.user)
    gateway_up = devices.ready_gateway(request.user.pk) is not None
    return render(
        request,
        "recovery/vpn_devices.html",
        {"devices": found, "gateway_up": gateway_up, "error": error, "name": request.POST.get("name", "")},
    )


@login_required
@require_GET
def vpn_device_config(request, device_id):
    device = _device_or_404(request, device_id)
    response = HttpResponse(_config_or_404(device), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{devices.config_file_name(device)}"'
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def vpn_device_qr(request, device_id):
    """The device's config as a QR code (SVG) for the WireGuard app on a phone."""
    config = _config_or_404(_device_or_404(request, device_id))
    image = qrcode.make(config, image_factory=qrcode.image.svg.SvgPathFillImage, box_size=8, border=2)
    out = io.BytesIO()
    image.save(out)
    response = HttpResponse(out.getvalue(), content_type="image/svg+xml")
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_http_methods(["GET", "POST"])
def vpn_device_revoke(request, device_id):
    """Confirm (GET), then revoke (POST)."""
    device = _device_or_404(request, device_id)
    if request.method == "POST":
        devices.device_revoke(device=device)
        messages.success(request, f"{device.name} revoked: it loses the VPN within a minute.")
        return redirect("recovery:vpn-devices")
    return render(request, "recovery/vpn_revoke.html", {"device": device})
