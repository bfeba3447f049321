"""Small request helpers shared by pages and the API."""

from django.conf import settings


def client_address(request) -> str:
    """The caller's IP address, trusting X-Forwarded-For only behind our own proxies."""
    proxies = getattr(settings, "NUM_PROXIES", 0)
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if proxies and forwarded:
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if hops:
            return hops[-min(proxies, len(hops))]
    return request.META.get("REMOTE_ADDR", "") or "unknown"
