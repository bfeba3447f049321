"""A server's health from its agent's reports, with frozen time: badges, and one email per incident.

The reports go through the real endpoint (`POST /api/v1/servers/{server}/status`
with the server's own credential); time is frozen with time-machine, so
"two hours late" is exactly that.
"""

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core import mail
from rest_framework.test import APIClient

from backups import selectors, services
from backups.health import schedule_health
from backups.models import Server

from .factories import BackupFactory, ServerFactory

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ISO = "%Y-%m-%dT%H:%M:%SZ"


@pytest.fixture
def agent(user):
    """A report from the agent of the user's server "fileserver", with its own credential."""
    from backups.services.servers import enrollment_key_create, server_enroll

    grant = enrollment_key_create(user=user, server="fileserver")
    _, _, token = server_enroll(key=grant.key, hostname="fs")
    mail.outbox.clear()  # the "server enrolled" notice: these tests count the late and silent emails
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")

    def report(**body):
        response = client.post("/api/v1/servers/fileserver/status", body, format="json")
        assert response.status_code == 200, response.content
        return Server.objects.get(user=user, name="fileserver")

    report.client = client
    return report


def hourly_report(now: datetime, **extra) -> dict:
    """What an agent with a working 1-hour timer reports at `now` (its next slot at :17)."""
    next_run = now.replace(minute=17, second=0) + timedelta(hours=1 if now.minute >= 17 else 0)
    return {"schedule": "1h", "next_run": next_run.strftime(ISO), "agent_version": "0.1.0", **extra}


def badge(user, name="fileserver", now=None):
    with time_machine.travel(now, tick=False) if now else _nothing():
        (overview,) = selectors.server_overview(user=user, name=name)
        return overview.health, overview.health_label


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TestBadges:
    def test_no_schedule_a_schedule_on_time_and_two_hours_late(self, agent, user):
        BackupFactory(server=ServerFactory(user=user, name="other"), date_created=T0)
        with time_machine.travel(T0, tick=False):
            agent(schedule=None, next_run=None, agent_version="0.1.0")
        BackupFactory(server=Server.objects.get(name="fileserver"), date_created=T0)
        assert badge(user, now=T0) == ("amber", "no schedule installed")

        with time_machine.travel(T0, tick=False):
            server = agent(**hourly_report(T0))
        assert server.next_run == T0.replace(minute=17)
        assert badge(user, now=T0 + timedelta(minutes=5)) == ("green", "on schedule")
        # 09:17 passed by less than the margin: still on schedule.
        assert badge(user, now=T0 + timedelta(minutes=45)) == ("green", "on schedule")
        # Two hours after the run that never came.
        assert badge(user, now=T0.replace(minute=17) + timedelta(hours=2)) == ("amber", "late")
        # No report for six hours: the agent is silent.
        assert badge(user, now=T0 + timedelta(hours=6, minutes=1)) == ("red", "agent silent")

    def test_backups_made_by_hand_never_make_a_schedule(self, agent, user, mailoutbox):
        """The issue's case: two test backups seconds apart, then 12 minutes (and a day) of nothing."""
        with time_machine.travel(T0, tick=False):
            agent(schedule=None, next_run=None, agent_version="0.1.0")
        server = Server.objects.get(name="fileserver")
        BackupFactory(server=server, date_created=T0)
        BackupFactory(server=server, date_created=T0 + timedelta(seconds=20))
        for later in (timedelta(minutes=12), timedelta(days=1)):
            assert badge(user, now=T0 + later) == ("amber", "no schedule installed")
            assert services.overdue_notify(now=T0 + later) == 0
        assert mailoutbox == []

    def test_a_failed_scheduled_run_is_red_with_the_agents_reason(self, agent, user):
        with time_machine.travel(T0, tick=False):
            agent(**hourly_report(T0, last_result="failed", last_run_at=T0.strftime(ISO),
                                  last_message="web1/sda: Cannot read /dev/sda"))  # fmt: skip
        BackupFactory(server=Server.objects.get(name="fileserver"), date_created=T0 - timedelta(hours=1))
        assert badge(user, now=T0) == ("red", "last scheduled backup failed")
        health = schedule_health(Server.objects.get(name="fileserver"), T0)
        assert "Cannot read /dev/sda" in health.detail

    def test_the_servers_api_gives_the_same_health_and_the_last_run(self, agent, user, api):
        with time_machine.travel(T0, tick=False):
            agent(**hourly_report(T0, last_result="ok", last_run_at=T0.strftime(ISO)))
        BackupFactory(server=Server.objects.get(name="fileserver"), date_created=T0)
        with time_machine.travel(T0 + timedelta(hours=3), tick=False):
            (body,) = api.get("/api/v1/servers").json()["servers"]
        assert (body["health"], body["health_detail"]) == ("amber", "late")
        assert body["disks"][0]["health_detail"] == "late"
        assert body["schedule"]["last_result"] == "ok" and body["schedule"]["last_run"] == T0.strftime(ISO)

    def test_a_report_with_a_bad_last_result_is_refused(self, agent):
        for bad in ({"last_result": "maybe"}, {"last_result": 1}, {"last_message": "x" * 501}, {"last_run_at": "soon"}):
            response = agent.client.post("/api/v1/servers/fileserver/status", hourly_report(T0, **bad), format="json")
            assert response.status_code == 400 and response.json()["error"] == 104, bad


class TestEmails:
    def test_late_then_silent_is_one_incident_and_one_email(self, agent, user, mailoutbox):
        with time_machine.travel(T0, tick=False):
            agent(**hourly_report(T0))
        assert services.overdue_notify(now=T0 + timedelta(minutes=30)) == 0
        assert services.overdue_notify(now=T0 + timedelta(hours=2)) == 1
        (mail,) = mailoutbox
        assert mail.to == [user.email] and mail.subject == "ReClo: the backup of fileserver is late"
        assert (
            "due at 2026-12-01 09:17 UTC has not started" in mail.body and "1\xa0hour, 43\xa0minutes late" in mail.body
        )
        assert services.overdue_notify(now=T0 + timedelta(hours=3)) == 0
        # Silent later in the same incident: no second email.
        assert services.overdue_notify(now=T0 + timedelta(hours=7)) == 0
        assert len(mailoutbox) == 1

    def test_a_new_report_ends_the_incident_and_the_next_one_is_told(self, agent, user, mailoutbox):
        with time_machine.travel(T0, tick=False):
            agent(**hourly_report(T0))
        assert services.overdue_notify(now=T0 + timedelta(hours=2)) == 1
        later = T0 + timedelta(hours=5)
        with time_machine.travel(later, tick=False):
            agent(**hourly_report(later))
        assert services.overdue_notify(now=later + timedelta(minutes=10)) == 0
        assert services.overdue_notify(now=later + timedelta(hours=8)) == 1
        assert mailoutbox[1].subject == "ReClo: the agent on fileserver has gone silent"
        assert "has not reported for 8\xa0hours" in mailoutbox[1].body

    def test_deactivated_accounts_get_no_email(self, agent, user, mailoutbox):
        with time_machine.travel(T0, tick=False):
            agent(**hourly_report(T0))
        user.is_active = False
        user.save()
        assert services.overdue_notify(now=T0 + timedelta(hours=3)) == 0 and mailoutbox == []

    def test_a_failed_send_is_tried_again(self, agent, mailoutbox, monkeypatch):
        from accounts import notify

        with time_machine.travel(T0, tick=False):
            agent(**hourly_report(T0))

        def broken(*args, **kwargs):
            raise OSError("smtp down")

        monkeypatch.setattr(notify, "send_mail", broken)
        assert services.overdue_notify(now=T0 + timedelta(hours=3)) == 0
        assert Server.objects.get(name="fileserver").alerted_report_at is None
        monkeypatch.undo()
        assert services.overdue_notify(now=T0 + timedelta(hours=3)) == 1
