"""Email settings: the console locally, SMTP from EMAIL_URL in production."""

import importlib
from types import SimpleNamespace

import reclo_site.settings as settings_module


def _loaded(monkeypatch, **env):
    """The email settings as the settings module computes them with `env` (then reloaded as it was)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        module = importlib.reload(settings_module)
        return SimpleNamespace(**{k: v for k, v in vars(module).items() if k.startswith("EMAIL_")})
    finally:
        for name in env:
            monkeypatch.delenv(name)
        importlib.reload(settings_module)


def test_without_email_url_mail_goes_to_the_console(monkeypatch):
    monkeypatch.delenv("EMAIL_URL", raising=False)
    monkeypatch.delenv("EMAIL_BACKEND", raising=False)
    local = _loaded(monkeypatch)
    assert local.EMAIL_BACKEND == "django.core.mail.backends.console.EmailBackend"


def test_email_url_sets_the_smtp_backend_host_port_login_and_tls(monkeypatch):
    prod = _loaded(monkeypatch, EMAIL_URL="smtp+tls://mailer:s3cret@smtp.example.com:587")
    assert prod.EMAIL_BACKEND == "django.core.mail.backends.smtp.EmailBackend"
    assert (prod.EMAIL_HOST, prod.EMAIL_PORT) == ("smtp.example.com", 587)
    assert (prod.EMAIL_HOST_USER, prod.EMAIL_HOST_PASSWORD) == ("mailer", "s3cret")
    assert prod.EMAIL_USE_TLS and prod.EMAIL_TIMEOUT == 20
