"""The VPN devices page: the VPN's health, add a device, download its config or scan its QR code, revoke it, DNS."""

import io

import qrcode
import qrcode.image.svg
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from reclo_site.errors import ServiceError

from . import devices, vpn_watch


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


def _page(request, *, error="", dns_error="", dns_form=None):
    found = devices.device_list(user=request.user)
    gateway_up = devices.ready_gateway(request.user.pk) is not None
    dns = devices.dns_get(user_id=request.user.pk)
    return render(
        request,
        "recovery/vpn_devices.html",
        {
            "devices": found,
            "gateway_up": gateway_up,
            "health": vpn_watch.gateway_health(request.user.pk),
            "dns": dns,
            "dns_form": dns_form or {"mode": dns.mode, "custom": dns.custom},
            "error": error,
            "dns_error": dns_error,
            "name": request.POST.get("name", "") if error else "",
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def vpn_devices(request):
    """The office's devices and the VPN's health, with a form to add a device."""
    error = ""
    if request.method == "POST":
        try:
            device = devices.device_create(user=request.user, name=request.POST.get("name", "")[:63])
        except ServiceError as exc:
            error = exc.message
        else:
            messages.success(request, f"{device.name} added: download its file or scan its code below.")
            return redirect("recovery:vpn-devices")
    return _page(request, error=error)


@login_required
@require_POST
def vpn_dns(request):
    """Choose what the device configs' DNS line says."""
    mode, custom = request.POST.get("mode", ""), request.POST.get("custom", "")[:1000]
    try:
        dns = devices.dns_set(user=request.user, mode=mode, custom=custom)
    except ServiceError as exc:
        return _page(request, dns_error=exc.message, dns_form={"mode": mode, "custom": custom})
    if dns.mode == devices.DnsMode.SERVER:
        said = "the recovered server as their DNS" + (f" ({dns.entries})" if dns.entries else "")
    else:
        said = f"DNS {dns.entries}" if dns.entries else "no DNS"
    messages.success(request, f"Saved: the VPN files now use {said}. Download each device's file again to apply it.")
    return redirect("recovery:vpn-devices")


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
