"""Clients reused across calls, for the adapters that make many small calls (failover).

Building a client costs ~30 ms (botocore builds a class with a method per
operation, and EC2 has hundreds); a failover makes a hundred calls. botocore
clients are thread-safe, so one per service and configuration is kept. The
key holds the settings read at call time, so a changed endpoint or region
(the tests, the local emulator) gets a new client.
"""

import functools

from django.conf import settings

from . import clients


@functools.lru_cache(maxsize=32)
def _client(service: str, region: str, endpoint_url: str | None):
    return clients.client(service, region_name=region, endpoint_url=endpoint_url)


def client(service: str):
    """A shared client for `service` under the current settings."""
    return _client(service, settings.AWS_REGION, settings.AWS_ENDPOINT_URL)
