"""The cloud adapter: the only package that imports boto3.

Views, services and tasks call these functions with plain values and get
plain values or our own exceptions back, so tests swap in moto and
production swaps in real AWS with nothing else changed. Clients are built
lazily, at call time, from settings: moto only intercepts clients made
after its mock starts, and tests change settings on the fly.
"""

from .errors import (
    CloudError,
    CloudPermanentError,
    CloudUnavailable,
    ObjectArchived,
    ObjectNotFound,
)

__all__ = ["CloudError", "CloudPermanentError", "CloudUnavailable", "ObjectArchived", "ObjectNotFound"]
