"""The audit log: each account event recorded, with address and request id, never a secret."""

import json
import logging

import pytest

from accounts.models import AuditEvent

pytestmark = pytest.mark.django_db


def post(client, url, body, **extra):
    return client.post(url, data=json.dumps(body), content_type="application/json", **extra)


def test_login_ok_and_failed_are_recorded_with_address_and_request_id(anon_api, user, password, settings):
    settings.RECLO_TRUST_REQUEST_ID = True  # behind a proxy that sets X-Request-ID
    post(anon_api, "/api/v1/login", {"email": user.email, "password": "wrong-wrong-wrong"}, REMOTE_ADDR="192.0.2.44",
         HTTP_X_REQUEST_ID="req-abcdef123")  # fmt: skip
    post(anon_api, "/api/v1/login", {"email": user.email, "password": password}, REMOTE_ADDR="192.0.2.45")
    failed, ok = AuditEvent.objects.filter(kind__startswith="login").order_by("id")
    assert (failed.kind, failed.user, failed.address, failed.request_id) == ("login.failed", user, "192.0.2.44",
                                                                            "req-abcdef123")  # fmt: skip
    assert (ok.kind, ok.user, ok.address) == ("login.ok", user, "192.0.2.45")
    assert len(ok.request_id) == 32


def test_a_clients_request_id_is_kept_beside_ours_never_as_ours(anon_api, user):
    response = post(anon_api, "/api/v1/login", {"email": user.email, "password": "wrong-wrong-wrong"},
                    HTTP_X_REQUEST_ID="req-chosen-by-client")  # fmt: skip
    event = AuditEvent.objects.get(kind="login.failed")
    assert event.request_id == response["X-Request-ID"] != "req-chosen-by-client"
    assert len(event.request_id) == 32
    assert event.details["client_request_id"] == "req-chosen-by-client"


def test_a_malformed_client_request_id_is_not_recorded(anon_api, user):
    post(anon_api, "/api/v1/login", {"email": user.email, "password": "wrong-wrong-wrong"},
         HTTP_X_REQUEST_ID="x" * 65)  # fmt: skip
    event = AuditEvent.objects.get(kind="login.failed")
    assert "client_request_id" not in event.details and len(event.request_id) == 32


def test_a_failed_login_for_an_unknown_email_belongs_to_nobody(anon_api, db):
    post(anon_api, "/api/v1/login", {"email": "ghost@example.com", "password": "x"})
    event = AuditEvent.objects.get()
    assert event.user is None and event.details == {"email": "ghost@example.com"}


def test_token_created_and_revoked_are_recorded(client, user):
    client.force_login(user)
    client.post("/accounts/tokens/", {"name": "nas"})
    token = user.api_tokens.get()
    client.post(f"/accounts/tokens/{token.pk}/revoke/")
    client.post(f"/accounts/tokens/{token.pk}/revoke/")  # twice: logged once
    kinds = list(AuditEvent.objects.filter(user=user).order_by("id").values_list("kind", flat=True))
    assert kinds == ["token.created", "token.revoked"]
    assert AuditEvent.objects.filter(kind="token.revoked").get().details == {"token_name": "nas",
                                                                            "token_prefix": token.prefix}  # fmt: skip


def test_no_secret_reaches_the_audit_log_or_the_logs(anon_api, aws, caplog):
    password = "granite-meadow-4821-lantern"
    with caplog.at_level(logging.DEBUG):
        response = post(anon_api, "/api/v1/register", {"username": "secretive", "email": "s@example.com",
                                                       "password": password})  # fmt: skip
        key = response.json()["token"]
        anon_api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        anon_api.post("/api/v1/logout")
        post(anon_api, "/api/v1/login", {"email": "s@example.com", "password": password + "x"})
    stored = json.dumps(list(AuditEvent.objects.values()), default=str)
    for secret in (password, key):
        assert secret not in stored
        assert secret not in caplog.text
    kinds = sorted(AuditEvent.objects.values_list("kind", flat=True))
    assert kinds == ["login.failed", "token.created", "token.revoked"]


def test_secret_looking_details_are_dropped():
    from accounts.audit import audit_record

    event = audit_record("login.ok", password="p", api_key="k", session_token="t", token_name="ok", server="srv")
    assert event.details == {"token_name": "ok", "server": "srv"}


def test_the_owner_sees_only_their_own_activity(client, user, other_user):
    from accounts.audit import audit_record

    audit_record("backup.deleted", user=user, server="frontdesk")
    audit_record("backup.deleted", user=other_user, server="bobs-box")
    client.force_login(user)
    html = client.get("/accounts/activity/").content.decode()
    assert "frontdesk" in html and "bobs-box" not in html
