"""Security headers, cookies and request ids on pages and the API."""

import pytest

pytestmark = pytest.mark.django_db


def test_pages_carry_a_strict_csp_with_a_nonce(client):
    response = client.get("/accounts/login/")
    csp = response["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    script_src = csp.split("script-src")[1].split(";")[0]
    # django-csp adds the nonce only to pages whose templates use it.
    assert script_src.strip().startswith("'self'") and "unsafe" not in script_src
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Content-Type-Options"] == "nosniff"


def test_the_docs_page_allows_only_what_redoc_needs(client):
    csp = client.get("/api/v1/docs")["Content-Security-Policy"]
    script_src = csp.split("script-src")[1].split(";")[0]
    assert "unsafe-inline" not in script_src and "unsafe-eval" not in script_src
    assert "worker-src 'self' blob:" in csp


def test_every_response_has_a_request_id(client):
    first = client.get("/accounts/login/")["X-Request-ID"]
    second = client.get("/api/v1/nope")["X-Request-ID"]
    assert len(first) == 32 and first != second


def test_a_harmful_request_id_is_replaced(client):
    response = client.get("/accounts/login/", HTTP_X_REQUEST_ID="<script>alert(1)</script>")
    assert "<" not in response["X-Request-ID"]


def test_a_clients_request_id_is_not_taken_as_ours(client):
    response = client.get("/accounts/login/", HTTP_X_REQUEST_ID="chosen-by-the-client")
    assert response["X-Request-ID"] != "chosen-by-the-client" and len(response["X-Request-ID"]) == 32


def test_a_trusted_proxys_request_id_is_used(client, settings):
    settings.RECLO_TRUST_REQUEST_ID = True
    response = client.get("/accounts/login/", HTTP_X_REQUEST_ID="set-by-nginx-0001")
    assert response["X-Request-ID"] == "set-by-nginx-0001"
    harmful = client.get("/accounts/login/", HTTP_X_REQUEST_ID="<script>alert(1)</script>")
    assert len(harmful["X-Request-ID"]) == 32  # even a trusted header must be well-formed


def test_production_settings_make_cookies_secure_and_send_hsts(monkeypatch):
    """The settings module itself, loaded as production loads it."""
    import importlib

    import reclo_site.settings as settings_module

    monkeypatch.setenv("RECLO_HTTPS", "true")
    try:
        prod = importlib.reload(settings_module)
        assert prod.SESSION_COOKIE_SECURE and prod.CSRF_COOKIE_SECURE
        assert prod.SECURE_HSTS_SECONDS >= 31536000 and prod.SECURE_SSL_REDIRECT
        assert prod.SESSION_COOKIE_HTTPONLY and prod.SESSION_COOKIE_SAMESITE == "Lax"
    finally:
        monkeypatch.delenv("RECLO_HTTPS")
        importlib.reload(settings_module)


def test_hsts_is_sent_behind_https(client, settings):
    settings.SECURE_HSTS_SECONDS = 31536000
    response = client.get("/accounts/login/", secure=True)
    assert response["Strict-Transport-Security"].startswith("max-age=31536000")
