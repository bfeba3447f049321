"""Lazily built boto3 clients, configured from settings at call time."""

import boto3
from botocore.config import Config
from django.conf import settings

# Standard retry mode backs off on throttling with jitter inside botocore,
# before our own task-level retries see anything.
_CONFIG = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=10, read_timeout=60)


def client(service: str, **kwargs):
    """A boto3 client for `service`, pointed at the local emulator when configured."""
    kwargs.setdefault("region_name", settings.AWS_REGION)
    kwargs.setdefault("endpoint_url", settings.AWS_ENDPOINT_URL)
    kwargs.setdefault("config", _CONFIG)
    return boto3.session.Session().client(service, **kwargs)
