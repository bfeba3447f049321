"""Making and hashing API tokens."""

import hashlib
import re
import secrets
import string

TOKEN_LENGTH = 32
_ALPHABET = string.ascii_letters + string.digits
TOKEN_RE = re.compile(r"^[A-Za-z0-9]{32}$")


def new_token() -> str:
    """32 alphanumeric characters from the OS's CSPRNG."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(TOKEN_LENGTH))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
