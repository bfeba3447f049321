"""Watching the VPN gateway: is it up, and telling the owner when its reports stop.

The gateway's peer-sync agent calls the portal every 30 seconds
(`devices.gateway_sync` records `last_report`). Whether the VPN is up is
worked out on read from that time (`gateway_health`), so the pages and the
API say "VPN down" as soon as the margin has passed, whether or not a beat
run has happened yet, and never disagree with each other. Email needs a job,
since nobody may be looking: `gateways_watch` (a beat job, every minute)
uses the same reading, and claims each change with a conditional UPDATE of
`down_since`, so overlapping runs send one "down" email per incident and one
"back up" email when it ends.
"""

import logging
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from django.utils.timesince import timesince

from accounts import notify
from reclo_site.localtime import when

from .models import VpnGateway

log = logging.getLogger(__name__)

BATCH = 200


@dataclass(frozen=True)
class Health:
    """The account's VPN as the owner should read it."""

    status: str  # "none", "starting", "up" or "down"
    message: str
    last_report: datetime | None = None

    @property
    def down(self) -> bool:
        return self.status == "down"


def health_of(gateway: VpnGateway | None, *, now: datetime | None = None) -> Health:
    """Read a gateway's state and its last report (None: the account has none).

    Times are written in the active zone: the owner's on pages, UTC in the API.
    """
    now = now or timezone.now()
    if gateway is None or gateway.state not in (VpnGateway.State.PROVISIONING, VpnGateway.State.READY):
        return Health("none", "No VPN gateway is running: it starts with your next failover.")
    last = gateway.last_report
    if last is None:
        # The failover's VPN step waits for this first report (or fails with 407).
        return Health("starting", "The VPN gateway is starting; it has not reported to ReClo yet.")
    if now - last <= settings.RECLO_VPN_GATEWAY_DOWN_AFTER:
        return Health("up", f"The VPN is up: the gateway last reported {timesince(last, now)} ago.", last)
    return Health(
        "down",
        f"VPN down: the VPN gateway has not reported to ReClo since {when(last)} ({timesince(last, now)} ago). "
        "Office devices may not reach the recovered servers. ReClo keeps watching it and emails you when it is "
        "back; if it is not back within a few minutes, reply to the email for help.",
        last,
    )


def gateway_health(user_id, *, now: datetime | None = None) -> Health:
    """The account's VPN health (for the pages and the API)."""
    return health_of(VpnGateway.objects.filter(network__user_id=user_id).first(), now=now)


def gateways_watch(*, now: datetime | None = None) -> int:
    """Beat job: email owners whose gateway stopped reporting, and again when it is back. Emails sent."""
    now = now or timezone.now()
    sent = 0
    stale = now - settings.RECLO_VPN_GATEWAY_DOWN_AFTER
    newly_down = VpnGateway.objects.filter(
        state__in=[VpnGateway.State.PROVISIONING, VpnGateway.State.READY],
        last_report__lt=stale,
        down_since__isnull=True,
    )
    for gateway in newly_down.select_related("network__user").order_by("pk")[:BATCH]:
        # The claim: only the run whose UPDATE matched sends the email.
        # `down_since` is the silence's start: the last report before it.
        claim = VpnGateway.objects.filter(pk=gateway.pk, down_since__isnull=True, last_report=gateway.last_report)
        if not claim.update(down_since=gateway.last_report):
            continue
        if _send(gateway, "down", now):
            sent += 1
        else:  # tell them on the next run instead
            VpnGateway.objects.filter(pk=gateway.pk, down_since=gateway.last_report).update(down_since=None)
    for gateway in VpnGateway.objects.filter(down_since__isnull=False).select_related("network__user")[:BATCH]:
        health = health_of(gateway, now=now)
        if health.down:
            continue
        if not VpnGateway.objects.filter(pk=gateway.pk, down_since=gateway.down_since).update(down_since=None):
            continue
        if health.status != "up":
            continue  # released while down (no server left to reach): nothing to tell
        if _send(gateway, "back", now, since=gateway.down_since):
            sent += 1
        else:
            VpnGateway.objects.filter(pk=gateway.pk, down_since__isnull=True).update(down_since=gateway.down_since)
    return sent


def _send(gateway: VpnGateway, kind: str, now: datetime, *, since: datetime | None = None) -> bool:
    user = gateway.network.user
    if not user.is_active or not user.email:
        return True  # nobody to tell; the pages still say it
    last = gateway.last_report or now  # both callers passed a gateway that has reported
    context = {
        "last_report": last,  # shown in the owner's zone
        "ago": timesince(last, now),
        "down_for": timesince(since, now) if since else "",
        "vpn_url": settings.SITE_URL.rstrip("/") + reverse("recovery:vpn-devices"),
    }
    # False when the mail server refused: the next run tries again.
    return notify.owner_email(user, f"recovery/email/vpn_{kind}", context)
