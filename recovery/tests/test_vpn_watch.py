"""Watching the VPN gateway: "VPN down" on the pages and the API when its reports stop, one email each way."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core import mail
from django.urls import reverse

from recovery import networks, services, tasks, vpn, vpn_watch
from recovery.models import Instance, Recovery, RecoveryNetwork, RecoveryStep, VpnGateway

from .factories import drive_recovery

pytestmark = pytest.mark.django_db

START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _mail(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def clock(time_machine):
    time_machine.move_to(START, tick=False)
    return time_machine


def _up(user, ip="203.0.113.9") -> VpnGateway:
    net, _ = RecoveryNetwork.objects.get_or_create(user=user, defaults={"ready": True})
    gw = networks._gateway_row(net)
    VpnGateway.objects.filter(pk=gw.pk).update(state=VpnGateway.State.READY, public_ip=ip)
    gw.refresh_from_db()
    return gw


@pytest.fixture
def gateway(user):
    return _up(user)


def report(client, gw, body=""):
    """What the gateway's peer-sync agent does every 30 seconds."""
    response = client.post(
        "/api/v1/vpn/gateway/peers",
        body,
        content_type="text/plain",
        HTTP_AUTHORIZATION=f"Gateway {vpn.decrypt(gw.agent_token_enc)}",
    )
    assert response.status_code == 200, response.content
    return response


def status(api) -> dict:
    return api.get("/api/v1/vpn/devices").json()["gateway"]


def test_the_api_says_whether_the_vpn_is_up_starting_down_or_not_running(api, client, user, clock):
    assert status(api)["status"] == "none"
    gw = _up(user)
    assert status(api) == {
        "status": "starting",
        "message": "The VPN gateway is starting; it has not reported to ReClo yet.",
        "last_report": None,
    }
    report(client, gw)
    clock.shift(timedelta(seconds=40))
    now = status(api)
    assert (now["status"], now["last_report"]) == ("up", "2026-03-02T09:00:00Z")
    assert now["message"] == "The VPN is up: the gateway last reported 0\xa0minutes ago."
    # Six reports missed (3 minutes) is still up; a moment more is down.
    clock.shift(timedelta(seconds=140))
    assert status(api)["status"] == "up"
    clock.shift(timedelta(seconds=1))
    down = status(api)
    assert down["status"] == "down"
    assert down["message"].startswith(
        "VPN down: the VPN gateway has not reported to ReClo since 2 Mar 2026, 09:00 UTC (3\xa0minutes ago)."
    )
    # The next report brings it back at once, without waiting for a beat run.
    report(client, gw)
    assert status(api)["status"] == "up"


def test_the_margin_is_a_setting(api, client, gateway, clock, settings):
    settings.RECLO_VPN_GATEWAY_DOWN_AFTER = timedelta(minutes=10)
    report(client, gateway)
    clock.shift(timedelta(minutes=9))
    assert status(api)["status"] == "up"
    clock.shift(timedelta(minutes=2))
    assert status(api)["status"] == "down"


def test_another_tenants_gateway_says_nothing_of_mine(api, client, user, other_user, clock):
    mine, theirs = _up(user), _up(other_user, ip="203.0.113.10")
    report(client, mine)
    clock.shift(timedelta(minutes=10))
    report(client, theirs)  # theirs is up, mine is down
    assert status(api)["status"] == "down"
    assert vpn_watch.gateway_health(other_user.pk).status == "up"
    assert vpn_watch.gateways_watch() == 1
    assert [m.to for m in mail.outbox] == [[user.email]]


def test_a_silent_gateway_is_emailed_once_per_incident_and_once_when_back(client, gateway, user, clock):
    report(client, gateway)
    clock.shift(timedelta(minutes=2))
    assert vpn_watch.gateways_watch() == 0  # still within the margin
    clock.shift(timedelta(minutes=2))
    assert tasks.gateways_watch.delay().get() == 1  # the beat job, through Celery
    assert [m.subject for m in mail.outbox] == ["ReClo: your office VPN is down"]
    body = mail.outbox[0].body
    assert "has not reported to ReClo since 2 Mar 2026, 09:00 UTC (4\xa0minutes ago)" in body
    assert "/recovery/vpn/" in body
    for _ in range(3):  # every minute the reports stay away: no more email
        clock.shift(timedelta(minutes=1))
        assert vpn_watch.gateways_watch() == 0
    assert len(mail.outbox) == 1
    gateway.refresh_from_db()
    assert gateway.down_since == START  # the silence's start

    report(client, gateway)
    clock.shift(timedelta(seconds=30))
    assert vpn_watch.gateways_watch() == 1
    assert vpn_watch.gateways_watch() == 0
    assert [m.subject for m in mail.outbox][1:] == ["ReClo: your office VPN is back up"]
    assert "after about 7\xa0minutes without" in mail.outbox[1].body

    # A second silence is a second incident.
    clock.shift(timedelta(minutes=5))
    assert vpn_watch.gateways_watch() == 1
    assert [m.subject for m in mail.outbox][2:] == ["ReClo: your office VPN is down"]


def test_a_gateway_that_never_reported_is_starting_not_down(api, gateway, clock):
    # The failover's VPN step watches a first report (and fails with 407 without one).
    clock.shift(timedelta(hours=1))
    assert status(api)["status"] == "starting"
    assert vpn_watch.gateways_watch() == 0 and mail.outbox == []


def test_when_the_mail_server_is_down_the_email_waits_for_the_next_run(client, gateway, clock, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 9, 2  # nothing listens
    report(client, gateway)
    clock.shift(timedelta(minutes=5))
    assert vpn_watch.gateways_watch() == 0
    gateway.refresh_from_db()
    assert gateway.down_since is None  # not told yet
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert vpn_watch.gateways_watch() == 1
    assert len(mail.outbox) == 1


def test_a_gateway_released_while_down_ends_the_incident_without_an_email(client, gateway, clock):
    report(client, gateway)
    clock.shift(timedelta(minutes=5))
    assert vpn_watch.gateways_watch() == 1
    VpnGateway.objects.filter(pk=gateway.pk).update(state=VpnGateway.State.RELEASED)
    assert vpn_watch.gateways_watch() == 0
    gateway.refresh_from_db()
    assert gateway.down_since is None and len(mail.outbox) == 1


def test_a_new_gateway_starts_without_the_old_ones_reports(client, gateway, clock):
    report(client, gateway)
    clock.shift(timedelta(minutes=5))
    vpn_watch.gateways_watch()
    networks._renew_generation(gateway)
    gateway.refresh_from_db()
    assert (gateway.generation, gateway.last_report, gateway.down_since) == (2, None, None)


def test_the_vpn_page_says_vpn_down_in_plain_words(owner, client, gateway, clock):
    report(client, gateway)
    page = owner.get(reverse("recovery:vpn-devices")).content.decode()
    assert "VPN up" in page and "VPN down" not in page
    clock.shift(timedelta(minutes=7))
    page = owner.get(reverse("recovery:vpn-devices")).content.decode()
    assert 'role="alert"' in page and "VPN down: the VPN gateway has not reported to ReClo since" in page
    assert "Office devices may not reach the recovered servers." in page


def test_the_vpn_page_gives_the_last_report_in_the_owners_zone(owner, client, gateway, user, clock):
    user.time_zone = "Asia/Kolkata"  # UTC+05:30 all year
    user.save(update_fields=["time_zone"])
    report(client, gateway)
    clock.shift(timedelta(minutes=7))
    page = owner.get(reverse("recovery:vpn-devices")).content.decode()
    assert "has not reported to ReClo since 2 Mar 2026, 14:30 IST" in page


def test_the_recovery_page_says_vpn_down(owner, client, chain, user, clock):
    recovery = drive_recovery(services.recovery_start(user=user, backup_id=chain[0][-1].pk).pk)
    assert recovery.status == "ready"
    gw = VpnGateway.objects.get(network__user=user)
    url = reverse("recovery:detail", args=[recovery.pk])
    report(client, gw)
    page = owner.get(url).content.decode()
    assert 'data-testid="vpn"' in page and 'data-testid="vpn-down"' not in page
    clock.shift(timedelta(minutes=4))
    page = owner.get(url).content.decode()
    assert 'data-testid="vpn-down"' in page and "VPN down: the VPN gateway has not reported" in page


def test_a_failover_reusing_a_silent_gateway_waits_for_it_to_report_again(client, chain, user, clock, settings):
    first = drive_recovery(services.recovery_start(user=user, backup_id=chain[0][-1].pk).pk)
    assert first.status == "ready"
    gw = VpnGateway.objects.get(network__user=user)
    report(client, gw)
    Instance.objects.filter(recovery=first).update(state=Instance.State.TERMINATED)  # frees the server for a 2nd
    settings.RECLO_VPN_GATEWAY_MUST_REPORT = True
    clock.shift(timedelta(minutes=10))  # the gateway went silent meanwhile
    second = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    second = drive_recovery(second.pk, until="provisioning_vpn")
    from recovery import engine

    Recovery.objects.filter(pk=second.pk).update(lease_until=None, lease_token=None)
    engine.run_step(second.pk, "provisioning_vpn")
    step = RecoveryStep.objects.get(recovery=second, name="provisioning_vpn")
    assert step.status == "waiting" and "report" in step.detail
    report(client, gw)
    assert drive_recovery(second.pk).status == "ready"


def test_a_gateway_that_never_reports_fails_the_vpn_step_at_its_deadline_with_407_and_its_console(
    chain, user, clock, settings
):
    from recovery import engine

    settings.RECLO_VPN_GATEWAY_MUST_REPORT = True  # the default; the test settings turn it off for moto
    recovery = drive_recovery(
        services.recovery_start(user=user, backup_id=chain[0][-1].pk).pk, until="provisioning_vpn"
    )

    def go():
        Recovery.objects.filter(pk=recovery.pk).update(lease_until=None, lease_token=None)
        engine.run_step(recovery.pk, "provisioning_vpn")
        return Recovery.objects.get(pk=recovery.pk)

    assert go().status == "provisioning_vpn"
    clock.shift(timedelta(minutes=9, seconds=50))
    assert go().status == "provisioning_vpn"  # within the 10 minutes: still waiting
    assert RecoveryStep.objects.get(recovery=recovery, name="provisioning_vpn").status == "waiting"
    clock.shift(timedelta(seconds=20))
    failed = go()
    assert (failed.status, failed.error_code) == ("failed", 407)
    gw = VpnGateway.objects.get(network__user=user)
    assert failed.error.startswith(f"The VPN gateway {gw.instance_id} did not report to the portal within 10 minutes.")
    # What the gateway's console said (moto's sample boot log stands in for the user-data's lines).
    assert "Enabling fast FPU save and restore... done." in failed.error


def test_the_down_email_gives_the_last_report_in_the_owners_zone(client, gateway, user, clock):
    user.time_zone = "Asia/Kolkata"  # UTC+05:30 all year
    user.save(update_fields=["time_zone"])
    report(client, gateway)
    clock.shift(timedelta(minutes=4))
    assert vpn_watch.gateways_watch() == 1
    assert "since 2 Mar 2026, 14:30 IST" in mail.outbox[0].body
