"""The Recovery API: the routes and codes of docs/api.md, and other tenants' ids on every endpoint."""

import uuid

import pytest

from recovery import services
from recovery.models import Instance, Recovery

from .factories import recovered_instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def ready(chain, user, drive):
    """A finished failover: (recovery, instance)."""
    recovery = drive(services.recovery_start(user=user, backup_id=chain[0][-1].pk).pk)
    return recovery, Instance.objects.get(recovery=recovery)


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"] == code and body["message"]
    return body


def test_it_starts_a_failover(api, chain):
    response = api.post("/api/v1/recoveries", {"backup_id": str(chain[0][-1].pk)}, format="json")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["status"] == "queued" and body["message"]
    recovery = Recovery.objects.get(pk=body["recovery_id"])
    assert recovery.instance_type == "t3.medium"
    assert body["recovery"]["steps"][0] == {
        "name": "consolidating",
        "title": "Preparing the disk",
        "status": "pending",
        "started": None,
        "finished": None,
        "attempts": 0,
        "detail": "",
    }


def test_a_null_instance_type_means_the_default(api, chain):
    response = api.post("/api/v1/recoveries", {"backup_id": str(chain[0][-1].pk), "instance_type": None}, format="json")
    assert response.status_code == 202 and response.json()["recovery"]["instance_type"] == "t3.medium"


def test_it_takes_an_instance_type(api, chain):
    response = api.post(
        "/api/v1/recoveries", {"backup_id": str(chain[0][-1].pk), "instance_type": "t3.large"}, format="json"
    )
    assert response.status_code == 202
    assert response.json()["recovery"]["instance_type"] == "t3.large"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, 104),
        ({"backup_id": 5}, 104),
        ({"backup_id": "x", "instance_type": 3}, 104),
        ({"backup_id": str(uuid.uuid4())}, 401),
        ({"backup_id": "not-a-uuid"}, 401),
    ],
)
def test_it_refuses_bad_start_requests(api, aws, body, code):
    response = api.post("/api/v1/recoveries", body, format="json")
    assert_error(response, {104: 400, 401: 404}[code], code)


def test_an_unknown_instance_type_is_a_field_error(api, chain):
    response = api.post(
        "/api/v1/recoveries", {"backup_id": str(chain[0][-1].pk), "instance_type": "huge"}, format="json"
    )
    body = assert_error(response, 400, 104)
    assert "instance_type" in body["fields"]


def test_a_second_failover_of_the_server_answers_402(api, chain):
    api.post("/api/v1/recoveries", {"backup_id": str(chain[0][-1].pk)}, format="json")
    response = api.post("/api/v1/recoveries", {"backup_id": str(chain[0][0].pk)}, format="json")
    assert_error(response, 409, 402)


def test_it_lists_and_shows_failovers(api, ready):
    recovery, instance = ready
    listed = api.get("/api/v1/recoveries").json()["recoveries"]
    assert [r["recovery_id"] for r in listed] == [str(recovery.pk)]
    body = api.get(f"/api/v1/recoveries/{recovery.pk}").json()["recovery"]
    assert body["status"] == "ready" and body["error"] is None
    assert body["instance_id"] == instance.instance_id
    assert body["backup_id"] == str(recovery.backup_ref)
    assert [s["name"] for s in body["steps"]] == ["consolidating", "importing", "launching", "provisioning_vpn"]
    assert all(s["status"] == "done" and s["started"].endswith("Z") and s["finished"] for s in body["steps"])


def test_a_failed_failover_shows_its_code_and_reason(api, chain, user):
    recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    Recovery.objects.filter(pk=recovery.pk).update(status="failed", error_code=404, error="No capacity.")
    body = api.get(f"/api/v1/recoveries/{recovery.pk}").json()["recovery"]
    assert body["error"] == {"code": 404, "message": "No capacity."}
    assert body["instance_id"] is None


def test_it_lists_and_shows_instances(api, ready):
    recovery, instance = ready
    (listed,) = api.get("/api/v1/instances").json()["instances"]
    assert listed["instance_id"] == instance.instance_id
    assert listed["recovery_id"] == str(recovery.pk)
    assert listed["state"] == "running" and listed["private_ip"].startswith("10.213.1.")
    assert listed["public_ip"] and listed["launched"].endswith("Z") and listed["stopped_at"] is None
    assert listed["vpn_ready"] is True
    assert api.get(f"/api/v1/instances/{instance.instance_id}").json()["instance"] == listed


def test_it_stops_starts_and_terminates_an_instance(api, aws, user):
    instance = recovered_instance(user=user)
    url = f"/api/v1/instances/{instance.instance_id}"
    response = api.post(f"{url}/stop")
    assert response.status_code == 202
    assert response.json()["instance"]["stopped_at"] and response.json()["instance"]["cleanup_at"]
    assert_error(api.post(f"{url}/stop"), 409, 406)
    Instance.objects.filter(pk=instance.pk).update(state="stopped")
    assert api.post(f"{url}/start").status_code == 202
    assert_error(api.post(f"{url}/start"), 409, 406)
    assert api.delete(url).status_code == 202
    assert api.get(url).json()["instance"]["state"] == "terminated"
    assert_error(api.delete(url), 409, 406)
    assert_error(api.get(f"{url}/vpn"), 409, 406)


def test_the_vpn_config_is_a_plain_text_wireguard_file(api, ready):
    _recovery, instance = ready
    response = api.get(f"/api/v1/instances/{instance.instance_id}/vpn")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="reclo-front-des.conf"'
    assert response["Cache-Control"] == "no-store"
    text = response.content.decode()
    # The account's first device (made now): the whole recovery subnet, every server at once.
    assert text.count("PrivateKey = ") == 1 and "AllowedIPs = 10.213.1.0/24\n" in text
    assert instance.private_ip.startswith("10.213.1.")
    listed = api.get("/api/v1/vpn/devices").json()["devices"]
    assert [d["name"] for d in listed] == ["Office"]
    assert api.get(f"/api/v1/instances/{instance.instance_id}/vpn").content == response.content


def test_the_vpn_config_waits_for_the_failover(api, chain, user):
    recovery = services.recovery_start(user=user, backup_id=chain[0][-1].pk)
    instance = recovered_instance(user=user)
    Instance.objects.filter(pk=instance.pk).update(recovery=recovery)  # its failover is still running
    assert_error(api.get(f"/api/v1/instances/{instance.instance_id}/vpn"), 409, 406)


def test_a_cloud_failure_to_stop_answers_408(api, aws, user, monkeypatch):
    from reclo_site.cloud import CloudUnavailable, compute

    instance = recovered_instance(user=user)
    monkeypatch.setattr(compute, "stop_instance", lambda iid: (_ for _ in ()).throw(CloudUnavailable("down")))
    assert_error(api.post(f"/api/v1/instances/{instance.instance_id}/stop"), 502, 408)


# --- every endpoint, another tenant ------------------------------------------------------------------


def endpoints(recovery, instance):
    i = f"/api/v1/instances/{instance.instance_id}"
    return [
        ("get", f"/api/v1/recoveries/{recovery.pk}", 105),
        ("get", i, 405),
        ("delete", i, 405),
        ("post", f"{i}/start", 405),
        ("post", f"{i}/stop", 405),
        ("get", f"{i}/vpn", 405),
    ]


def test_another_tenants_ids_answer_404_on_every_endpoint(other_api, api, ready):
    recovery, instance = ready
    for method, url, code in endpoints(recovery, instance):
        assert_error(getattr(other_api, method)(url), 404, code)
    assert other_api.get("/api/v1/recoveries").json()["recoveries"] == []
    assert other_api.get("/api/v1/instances").json()["instances"] == []
    response = other_api.post("/api/v1/recoveries", {"backup_id": str(recovery.backup_ref)}, format="json")
    assert_error(response, 404, 401)
    # Nothing was touched: the owner still sees a running instance.
    assert api.get(f"/api/v1/instances/{instance.instance_id}").json()["instance"]["state"] == "running"


def test_unknown_ids_answer_like_another_tenants(api, aws):
    fake = Recovery(pk=uuid.uuid4())
    fake_instance = Instance(instance_id="i-0123456789abcdef0")
    for method, url, code in endpoints(fake, fake_instance):
        assert_error(getattr(api, method)(url), 404, code)
    assert_error(api.get("/api/v1/recoveries/not-a-uuid"), 404, 105)


def test_every_endpoint_needs_a_token(anon_api):
    fake, fake_instance = Recovery(pk=uuid.uuid4()), Instance(instance_id="i-0123456789abcdef0")
    calls = [("get", "/api/v1/recoveries", 0), ("post", "/api/v1/recoveries", 0), ("get", "/api/v1/instances", 0)]
    for method, url, _ in calls + endpoints(fake, fake_instance):
        response = getattr(anon_api, method)(url)
        assert_error(response, 401, 102)


def test_the_schema_describes_the_recovery_routes(api):
    schema = api.get("/api/v1/schema").json()
    paths = schema["paths"]
    for route in ["/api/v1/recoveries", "/api/v1/recoveries/{recovery_id}", "/api/v1/instances",
                  "/api/v1/instances/{instance_id}", "/api/v1/instances/{instance_id}/start",
                  "/api/v1/instances/{instance_id}/stop", "/api/v1/instances/{instance_id}/vpn"]:  # fmt: skip
        assert route in paths, route
    assert "text/plain" in paths["/api/v1/instances/{instance_id}/vpn"]["get"]["responses"]["200"]["content"]
    assert "402" in paths["/api/v1/recoveries"]["post"]["responses"]["409"]["description"]
