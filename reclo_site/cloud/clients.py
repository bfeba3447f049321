"""Lazily built boto3 clients, configured from settings at call time."""

import os

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from django.conf import settings

# Standard retry mode backs off on throttling with jitter inside botocore,
# before our own task-level retries see anything.
_CONFIG = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=10, read_timeout=60)


class _PathList(list):
    """Search paths where boto3's per-session `append` of its data folder adds it once only."""

    def append(self, path):
        if path not in self:
            super().append(path)


# Every client gets a fresh session (thread safety; moto intercepts only
# clients made after it starts), but they all share one loader: it caches
# the parsed service models, megabytes of JSON that would otherwise be
# parsed again for every client (EC2's alone takes ~40 ms).
_LOADER = botocore.loaders.Loader(
    extra_search_paths=_PathList(p for p in os.environ.get("AWS_DATA_PATH", "").split(os.pathsep) if p)
)


def client(service: str, **kwargs):
    """A boto3 client for `service`, pointed at the local emulator when configured."""
    kwargs.setdefault("region_name", settings.AWS_REGION)
    kwargs.setdefault("endpoint_url", settings.AWS_ENDPOINT_URL)
    kwargs.setdefault("config", _CONFIG)
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core).client(service, **kwargs)
