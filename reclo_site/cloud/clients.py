"""Lazily built boto3 clients, configured from settings at call time."""

import os
import threading

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from django.conf import settings
from django.core.signals import setting_changed

# Standard retry mode backs off on throttling with jitter inside botocore,
# before our own task-level retries see anything.
# The pool holds the failover's parallel EBS writes and reads (recovery.snapshot_write: PUTS and READERS)
# with room to spare.
_CONFIG = Config(
    retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=10, read_timeout=60, max_pool_connections=32
)


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


# Building a client costs ~20 ms of CPU (a session, its event handlers, the
# endpoint resolver): more than the request that needs it. Clients are
# thread-safe and are reused per configuration; tests and setting changes
# call reset() so no client outlives the emulator it was made for.
_CLIENTS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def new_client(service: str, **kwargs):
    """A client of its own, never shared (for tests that stub one)."""
    kwargs.setdefault("region_name", settings.AWS_REGION)
    kwargs.setdefault("endpoint_url", settings.AWS_ENDPOINT_URL)
    kwargs.setdefault("config", _CONFIG)
    return _new_client(service, kwargs)


def _new_client(service: str, kwargs: dict):
    core = botocore.session.get_session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core).client(service, **kwargs)


def client(service: str, **kwargs):
    """A boto3 client for `service`, pointed at the local emulator when configured.

    Clients with the default credentials are cached per service, region and
    endpoint; one given explicit credentials is always new.
    """
    kwargs.setdefault("region_name", settings.AWS_REGION)
    kwargs.setdefault("endpoint_url", settings.AWS_ENDPOINT_URL)
    kwargs.setdefault("config", _CONFIG)
    if any(k.startswith("aws_") for k in kwargs):
        return _new_client(service, kwargs)
    key = (service, kwargs["region_name"], kwargs["endpoint_url"], id(kwargs["config"]),
           os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))  # fmt: skip
    cached = _CLIENTS.get(key)
    if cached is None:
        with _LOCK:
            cached = _CLIENTS.get(key)
            if cached is None:
                cached = _CLIENTS[key] = _new_client(service, kwargs)
    return cached


def reset() -> None:
    """Forget every cached client (tests; after the cloud settings change)."""
    with _LOCK:
        _CLIENTS.clear()


def _on_setting_changed(setting, **kwargs):
    if setting.startswith("AWS_"):
        reset()


setting_changed.connect(_on_setting_changed)
