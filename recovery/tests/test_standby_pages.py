"""The warm standby page: its monthly cost shown before it is turned on, the switch, and other tenants' servers."""

from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse

from backups.models import Backup, Server
from recovery import staging
from recovery import standby_tasks as tasks

from .factories import MiB, backup_chain

pytestmark = pytest.mark.django_db


@pytest.fixture
def enqueued(monkeypatch):
    sent = []
    monkeypatch.setattr(tasks.standby_stage, "delay", lambda server_id: sent.append(server_id))
    return sent


def test_the_cost_is_shown_before_it_is_turned_on(owner, user, server, aws):
    backup_chain(user=user, server=server, size=8 * MiB, incrementals=1)
    Backup.objects.filter(server=server).update(virtual_size=100 * 1024**3)  # priced as a 100 GiB disk
    cost = staging.monthly_cost(server)
    assert cost.monthly_usd == Decimal("5.37")  # 107.4 GB (and the incrementals' changes) at $0.05
    page = owner.get(reverse("backups:server-detail", args=[server.pk])).content.decode()
    assert f"about ${cost.monthly_usd} a month" in page
    assert reverse("recovery:standby", args=[server.pk]) in page
    page = owner.get(reverse("recovery:standby", args=[server.pk])).content.decode()
    assert f"Turn warm standby on (about ${cost.monthly_usd} a month)" in page
    assert f"{cost.gb} GB in EBS snapshots" in page


def test_turning_it_on_and_off_from_the_page(owner, server, enqueued, django_capture_on_commit_callbacks):
    url = reverse("recovery:standby", args=[server.pk])
    with django_capture_on_commit_callbacks(execute=True):
        response = owner.post(url, {"warm_standby": "on"})
    assert response.status_code == 302
    assert Server.objects.get(pk=server.pk).warm_standby is True
    assert enqueued == [server.pk]
    assert "Turn warm standby off" in owner.get(url).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        owner.post(url, {"warm_standby": "off"})
    assert Server.objects.get(pk=server.pk).warm_standby is False
    assert enqueued == [server.pk, server.pk]


@pytest.mark.parametrize("body", [{}, {"warm_standby": "yes"}, {"warm_standby": "ON "}])
def test_bad_input_changes_nothing(owner, server, enqueued, body):
    response = owner.post(reverse("recovery:standby", args=[server.pk]), body)
    assert response.status_code == 400
    assert Server.objects.get(pk=server.pk).warm_standby is False
    assert enqueued == []


def test_another_tenants_server_is_not_found(other_user, server, enqueued):
    outsider = Client()
    outsider.force_login(other_user)
    url = reverse("recovery:standby", args=[server.pk])
    assert outsider.get(url).status_code == 404
    assert outsider.post(url, {"warm_standby": "on"}).status_code == 404
    assert Server.objects.get(pk=server.pk).warm_standby is False
    assert enqueued == []


def test_a_windows_server_is_told_that_staging_does_not_apply(owner, server):
    Server.objects.filter(pk=server.pk).update(preflight={"os": "windows", "boot_mode": "uefi"})
    page = owner.get(reverse("recovery:standby", args=[server.pk])).content.decode()
    assert "fails over by VM Import" in page


def test_the_failover_form_expects_minutes_for_a_staged_point(owner, user, server, aws, monkeypatch):
    backups, _top = backup_chain(user=user, server=server, size=8 * MiB, incrementals=0)
    url = reverse("recovery:failover-start", args=[server.pk])
    assert "staged by warm standby" not in owner.get(url).content.decode()
    monkeypatch.setattr(staging, "staged_snapshot", lambda backup: "snap-1" if backup == backups[0] else "")
    page = owner.get(url).content.decode()
    assert "staged by warm standby" in page
    assert "about 3 minutes" in page
