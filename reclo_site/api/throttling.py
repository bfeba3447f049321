"""A general per-token request rate limit (code 103)."""

from rest_framework.throttling import SimpleRateThrottle


class TokenRateThrottle(SimpleRateThrottle):
    """Limits each token (or, without one, each address) to API_RATE requests.

    The counters live in the shared cache, so every web process sees them.
    """

    scope = "token"

    def get_cache_key(self, request, view):
        token = getattr(request, "auth", None)
        ident = f"t{token.pk}" if token is not None and hasattr(token, "pk") else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}
