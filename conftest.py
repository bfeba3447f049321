"""Fixtures shared by every app's tests: users, tokens, API clients, moto."""

import os

# moto accepts any credentials; set them before any boto3 client exists so
# no test can reach real AWS with a developer's own keys.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ[_name] = _value

# Guests boot under software emulation (TCG) unless the runner forces KVM: on
# nested virtualisation, as on the CI machines, /dev/kvm can run the sandbox's
# tiny probe guest and still hang a Linux guest. The probe itself is tested
# directly (test_sandbox clears this for its choose_accel test).
os.environ.setdefault("RECLO_SANDBOX_ACCEL", "tcg")

import pytest  # noqa: E402
from django.core.cache import cache  # noqa: E402
from moto import mock_aws  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

from reclo_site import testing  # noqa: E402
from reclo_site.celery import app as celery_app  # noqa: E402
from reclo_site.cloud import clients  # noqa: E402


def pytest_sessionstart(session):
    if testing.IN_CI:
        problems = testing.missing_services()
        if problems:
            pytest.exit("CI=true but services are missing: " + "; ".join(problems), returncode=3)


@pytest.fixture(autouse=True)
def _isolated(settings):
    """Each test: its own cache, eager Celery, no emulator endpoint, a test bucket."""
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    settings.AWS_ENDPOINT_URL = None
    settings.RECLO_BUCKET = "reclo-test"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # moto runs no user-data, so no gateway ever reports; the tests of that
    # wait (recovery/tests/test_vpn.py) turn it back on.
    settings.RECLO_VPN_GATEWAY_MUST_REPORT = False
    # No collectstatic in tests: serve from the source folders.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    cache.clear()
    clients.reset()
    yield
    cache.clear()
    clients.reset()


@pytest.fixture
def aws():
    """moto in-process, with the backup bucket created as `setup_cloud` does."""
    from reclo_site.cloud import storage

    with mock_aws():
        clients.reset()
        storage.ensure_bucket()
        yield
    clients.reset()


@pytest.fixture
def password():
    return testing.PASSWORD


@pytest.fixture
def user(db):
    """The owner: the tenant whose data a test works on."""
    return testing.make_user("alice.owner", "alice@example.com")


@pytest.fixture
def other_user(db):
    """An outsider: another tenant, who must see none of the owner's data."""
    return testing.make_user("bob.outsider", "bob@example.com")


@pytest.fixture
def token(user):
    return testing.token_for(user)


@pytest.fixture
def api(token):
    """An API client authenticated as the owner."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


@pytest.fixture
def other_api(other_user):
    """An API client authenticated as the outsider."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {testing.token_for(other_user)}")
    return client


@pytest.fixture
def anon_api():
    return APIClient()


@pytest.fixture
def owner(client, user):
    """A browser (Django's test client) logged in to the portal as `user`."""
    client.force_login(user)
    return client


@pytest.fixture
def outsider(client, other_user):
    """A browser logged in as the other tenant."""
    client.force_login(other_user)
    return client
