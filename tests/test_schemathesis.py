"""schemathesis against the served OpenAPI schema, as a tenant with data.

No 5xx, every response matches the schema (status, content type, body,
including the error envelope), bad input is refused and auth is enforced.
The number of examples is bounded so CI stays quick.
"""

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance

from backups.tests.factories import BackupFactory, ServerFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def api_schema(db):
    """The schema, fetched through the real WSGI application.

    Django closes "old" connections when a request starts and finishes; inside
    the test's transaction that would close the test's own connection (Django's
    test client switches this off for the same reason, schemathesis's WSGI
    client does not), so it is off for this test.
    """
    from reclo_site.wsgi import application

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/v1/schema", application)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def tenant(aws, user, token):
    server = ServerFactory(user=user, name="front-desk")
    BackupFactory.create_batch(3, server=server)
    return {"Authorization": f"Token {token}"}


def test_the_api_keeps_its_schema(api_schema, tenant):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20  # the schema really describes the whole API
    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=10,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )
        def check(case):
            # A schema-valid body can still break a business rule (a taken
            # email, a weak password): "valid data is accepted" is not ours.
            case.call_and_validate(headers=tenant, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except FailureGroup as group:  # gather every operation's failures, then report them all
            for failure in group.exceptions:
                failures.append(f"{operation.method.upper()} {operation.path}: {str(failure).strip()[:600]}")
    assert not failures, "\n".join(failures)
