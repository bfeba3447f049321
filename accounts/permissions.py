"""Who may call an API view: the owner's tokens anything, a server credential only what a view allows.

`CredentialScope` is the API's default permission class (settings
`REST_FRAMEWORK["DEFAULT_PERMISSION_CLASSES"]`), so the rule holds on every
view, including views added later: a server credential (an `ApiToken` with
`server` set, minted by enrollment) is refused with 403, code 106, unless
the view declares it for that method, with a *resolver* that says which
server the request touches::

    from accounts.permissions import server_credential_may, server_in_url

    class ServerStatusApi(APIView):
        server_access = server_credential_may(POST=server_in_url("server"))

A resolver gets the request and the view and returns the name of the
server the request acts on; a name other than the credential's own is
refused (106). It returns `None` when there is nothing to compare (the
object does not exist -- the view then answers its own 404 -- or the body
lacks the name -- the view answers 400), and `OWN_SERVER` for views that
scope themselves to the caller's own server or credential
(`credential_server`).

Another server's objects of the same tenant answer 106 rather than 404:
the contract lists "other servers" among the 106 refusals, existence is no
secret from the tenant's own credential (the ids are random UUIDs it cannot
guess), and 106 tells the person debugging an agent that the credential's
scope, not a missing object, is the reason. Another tenant's objects stay
404 as for every token: resolvers look objects up within the token's user.
"""

from collections.abc import Callable

from rest_framework.permissions import IsAuthenticated

from reclo_site.errors import Code, ServiceError

OWN_SERVER = object()
"""A resolver's answer for views that scope themselves to the credential's server."""

Resolver = Callable[..., object]


def credential_server(request):
    """The `Server` a server credential belongs to, or None for an owner's token."""
    token = getattr(request, "auth", None)
    if token is None or getattr(token, "server_id", None) is None:
        return None
    return token.server


def server_credential_may(**methods: Resolver) -> dict[str, Resolver]:
    """What a server credential may call on a view: HTTP method -> resolver."""
    return {method.upper(): resolver for method, resolver in methods.items()}


def own_server(request, view):
    """Resolver of views that act on the caller's own server or credential only."""
    return OWN_SERVER


def server_in_url(kwarg: str = "server") -> Resolver:
    """Resolver: the server's name is the URL parameter `kwarg`."""

    def resolve(request, view):
        return view.kwargs.get(kwarg)

    return resolve


def server_in_query(param: str = "server") -> Resolver:
    """Resolver: the server's name is an optional query parameter; without it the view scopes itself."""

    def resolve(request, view):
        value = request.query_params.get(param)
        return OWN_SERVER if value is None else value

    return resolve


def server_in_body(field: str = "server") -> Resolver:
    """Resolver: the server's name is the JSON body's `field` (a missing one is the view's 400)."""

    def resolve(request, view):
        data = request.data  # parsed once and cached; malformed JSON is the handler's 104
        value = data.get(field) if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    return resolve


class CredentialScope(IsAuthenticated):
    """Authenticated, and a server credential only where the view allows it, on its own server."""

    def has_permission(self, request, view) -> bool:
        if not super().has_permission(request, view):
            return False
        server = credential_server(request)
        if server is None:
            return True
        resolver = (getattr(view, "server_access", None) or {}).get(request.method)
        if resolver is None:
            raise ServiceError(
                Code.FORBIDDEN,
                f"This is the agent credential of server {server.name}; it may not do that. "
                "Use the owner's account (the portal, or a token of your own).",
            )
        target = resolver(request, view)
        if target is not OWN_SERVER and target is not None and target != server.name:
            raise ServiceError(
                Code.FORBIDDEN,
                f"This is the agent credential of server {server.name}; it may not act on another server.",
            )
        return True
