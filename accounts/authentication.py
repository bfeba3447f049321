"""`Authorization: Token <token>` for the agent API."""

from datetime import timedelta

from django.db.models import Q
from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, get_authorization_header

from reclo_site.api.errors import ApiError
from reclo_site.errors import Code

from .models import ApiToken
from .tokens import TOKEN_RE, hash_token

# Query parameters that would carry a credential in a URL, where it leaks
# into access logs and browser history. We refuse them outright.
URL_TOKEN_PARAMS = frozenset({"token", "auth_token", "access_token", "api_key", "apikey", "key"})
LAST_USED_RESOLUTION = timedelta(minutes=1)


class TokenAuthentication(BaseAuthentication):
    keyword = "Token"

    def authenticate(self, request):
        if URL_TOKEN_PARAMS.intersection(k.lower() for k in request.query_params):
            raise ApiError(Code.BAD_TOKEN, "Tokens in URLs are refused; send 'Authorization: Token <token>' instead.")
        header = get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise ApiError(Code.BAD_TOKEN, "Invalid Authorization header; expected 'Token <token>'.")
        try:
            key = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise ApiError(Code.BAD_TOKEN, "Invalid token.") from None
        if not TOKEN_RE.match(key):
            raise ApiError(Code.BAD_TOKEN, "Invalid token.")
        try:
            token = ApiToken.objects.select_related("user", "server").get(key_hash=hash_token(key))
        except ApiToken.DoesNotExist:
            token = None
        if token is None or token.revoked_at is not None:
            raise ApiError(Code.BAD_TOKEN, "Invalid or revoked token.")
        now = timezone.now()
        if token.expires <= now:
            raise ApiError(Code.BAD_TOKEN, "This token has expired; log in again to get a new one.")
        if not token.user.is_active:
            raise ApiError(Code.ACCOUNT_DEACTIVATED, "This account is deactivated.")
        self._touch(token, now)
        return token.user, token

    def authenticate_header(self, request):
        return self.keyword

    @staticmethod
    def _touch(token, now):
        """Record use at most once a minute: a conditional UPDATE, no read-modify-write."""
        if token.last_used is None or now - token.last_used >= LAST_USED_RESOLUTION:
            stale = Q(last_used__isnull=True) | Q(last_used__lt=now - LAST_USED_RESOLUTION)
            ApiToken.objects.filter(stale, pk=token.pk).update(last_used=now)
