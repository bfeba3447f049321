"""Our own cloud exceptions, and the translation from botocore's."""

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, ReadTimeoutError
from botocore.parsers import ResponseParserError

# Error codes AWS returns for conditions that go away if we wait.
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "Unavailable",
        "InsufficientInstanceCapacity",
    }
)
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload", "NoSuchBucket", "NoSuchVersion"})


class CloudError(Exception):
    """Any failure of a cloud call. `code` is AWS's error code when there was one."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class CloudUnavailable(CloudError):
    """A transient failure (throttling, 5xx, timeout): worth retrying later."""


class CloudPermanentError(CloudError):
    """A failure that will not go away by retrying (access denied, bad input)."""


class ObjectNotFound(CloudPermanentError):
    """The object, upload or resource does not exist."""


class ObjectArchived(CloudPermanentError):
    """The object is in a storage class we refuse (GLACIER, DEEP_ARCHIVE, ...); `storage_class` says which."""

    def __init__(self, message: str, code: str = "", storage_class: str = ""):
        super().__init__(message, code)
        self.storage_class = storage_class


def translate(exc: Exception, what: str) -> CloudError:
    """Turn a botocore exception into one of ours, keeping AWS's code."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = f"{what}: {code} {err.get('Message', '')}".strip()
        if code in NOT_FOUND_CODES or code.endswith(".NotFound"):
            return ObjectNotFound(message, code)
        if code == "InvalidObjectState":
            return ObjectArchived(message, code, str(err.get("StorageClass", "")))
        if code in TRANSIENT_CODES or status >= 500:
            return CloudUnavailable(message, code)
        return CloudPermanentError(message, code)
    if isinstance(exc, (ConnectionError, ReadTimeoutError, BotoCoreError, ResponseParserError)):
        return CloudUnavailable(f"{what}: {exc.__class__.__name__}", exc.__class__.__name__)
    return CloudError(f"{what}: {exc}")
