"""Scopes: what a bearer token may do, route by route (403 ``Forbidden``, errno -110005, when it may not).

A token names its scopes in the ``scope`` claim (a space-separated string, RFC 8693 section 4.2 and RFC 9068
section 2.2.3) or the ``scp`` claim (a JSON array of strings, as some identity providers issue it). Scopes this
service does not know (``openid``, ``profile`` ...) are ignored. Six scopes, a read and a write half for each
kind of object an owner holds::

    credentials:read    credential/get, credential/list
    credentials:write   credential/create, verify, rotate, revoke (and tradingAccount/connect with keys)
    accounts:read       tradingAccount/get, tradingAccount/list
    accounts:write      tradingAccount/connect, tradingAccount/disconnect
    webhooks:read       webhook/get, webhook/list, webhook/delivery/list
    webhooks:write      webhook/create, update, delete, rotateSecret, webhook/delivery/retry

A write scope does not imply the read scope (a write answers the object it wrote, nothing else). Every
``/api/...`` route is in :data:`ROUTE_SCOPES`: :func:`check_routes` refuses to build an application with an
``/api/...`` route that declares none, so a new route cannot be left open by omission. The operator routes
(:data:`PUBLIC_ROUTES`) need no token. ``tradingAccount/connect`` with keys stores a credential too, so its
handler also requires ``credentials:write`` (:func:`require`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from aiohttp import web

from engine import errors

CREDENTIALS_READ = "credentials:read"
CREDENTIALS_WRITE = "credentials:write"
ACCOUNTS_READ = "accounts:read"
ACCOUNTS_WRITE = "accounts:write"
WEBHOOKS_READ = "webhooks:read"
WEBHOOKS_WRITE = "webhooks:write"
ALL_SCOPES: tuple[str, ...] = (
    CREDENTIALS_READ,
    CREDENTIALS_WRITE,
    ACCOUNTS_READ,
    ACCOUNTS_WRITE,
    WEBHOOKS_READ,
    WEBHOOKS_WRITE,
)

MAX_SCOPES = 100  # scope tokens read from one claim; the token's own length bound (4096) is the real limit
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")

ROUTE_SCOPES: Mapping[tuple[str, str], str] = {
    ("POST", "/api/v3/credential/create"): CREDENTIALS_WRITE,
    ("POST", "/api/v3/credential/verify"): CREDENTIALS_WRITE,
    ("GET", "/api/v3/credential/get"): CREDENTIALS_READ,
    ("GET", "/api/v3/credential/list"): CREDENTIALS_READ,
    ("POST", "/api/v3/credential/rotate"): CREDENTIALS_WRITE,
    ("POST", "/api/v3/credential/revoke"): CREDENTIALS_WRITE,
    ("POST", "/api/v3/credential/mint"): CREDENTIALS_WRITE,
    ("POST", "/api/v3/tradingAccount/connect"): ACCOUNTS_WRITE,
    ("POST", "/api/v3/tradingAccount/disconnect"): ACCOUNTS_WRITE,
    ("GET", "/api/v3/tradingAccount/get"): ACCOUNTS_READ,
    ("GET", "/api/v3/tradingAccount/list"): ACCOUNTS_READ,
    ("POST", "/api/v3/webhook/create"): WEBHOOKS_WRITE,
    ("GET", "/api/v3/webhook/list"): WEBHOOKS_READ,
    ("GET", "/api/v3/webhook/get"): WEBHOOKS_READ,
    ("POST", "/api/v3/webhook/update"): WEBHOOKS_WRITE,
    ("POST", "/api/v3/webhook/delete"): WEBHOOKS_WRITE,
    ("POST", "/api/v3/webhook/rotateSecret"): WEBHOOKS_WRITE,
    ("GET", "/api/v3/webhook/delivery/list"): WEBHOOKS_READ,
    ("POST", "/api/v3/webhook/delivery/retry"): WEBHOOKS_WRITE,
}
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json")}
)

SCOPES: web.RequestKey[frozenset[str]] = web.RequestKey("scopes", frozenset)


def parse_claims(claims: Mapping[str, Any]) -> frozenset[str]:
    """The scopes a token's payload grants: ``scope`` (space-separated) or ``scp`` (a list).

    Both may be present only when they grant the same set. A malformed claim is
    :class:`errors.Unauthorized` (the issuer signed something this service cannot read); no claim at all
    grants nothing.
    """
    found: list[frozenset[str]] = []
    if "scope" in claims:
        value = claims["scope"]
        if not isinstance(value, str):
            raise errors.Unauthorized("invalid access token: scope must be a space-separated string")
        found.append(_scope_set(value.split(" "), "scope"))
    if "scp" in claims:
        value = claims["scp"]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise errors.Unauthorized("invalid access token: scp must be a list of strings")
        found.append(_scope_set(value, "scp"))
    if len(found) == 2 and found[0] != found[1]:
        raise errors.Unauthorized("invalid access token: scope and scp disagree")
    return found[0] if found else frozenset()


def _scope_set(items: Iterable[str], claim: str) -> frozenset[str]:
    names = [item for item in items if item != ""]  # RFC 6749 separates by one space; be lenient on runs
    if len(names) > MAX_SCOPES:
        raise errors.Unauthorized(f"invalid access token: {claim} lists more than {MAX_SCOPES} scopes")
    if not all(_SCOPE_TOKEN.fullmatch(name) for name in names):
        raise errors.Unauthorized(f"invalid access token: {claim} holds a character RFC 6749 3.3 forbids")
    return frozenset(names)


def check_names(names: Collection[str]) -> tuple[str, ...]:
    """``names`` (sorted, deduplicated) when each is one of :data:`ALL_SCOPES`; ``InvalidRequest`` otherwise."""
    unknown = sorted(set(names) - set(ALL_SCOPES))
    if unknown:
        raise errors.InvalidRequest("scope", f"unknown scope {unknown[0]!r}; known: {' '.join(ALL_SCOPES)}")
    if not names:
        raise errors.InvalidRequest("scope", "name at least one scope")
    return tuple(sorted(set(names)))


def required_scope(method: str, path: str) -> str | None:
    """The scope the route ``method path`` (its canonical pattern) requires; None for public routes."""
    return ROUTE_SCOPES.get((method.upper(), path))


def check_routes(routes: Iterable[tuple[str, str]]) -> None:
    """:class:`errors.ConfigurationError` for an ``/api/...`` route without a scope, or a scope without a
    route (both are mistakes a new route would make)."""
    seen = set()
    for method, path in routes:
        key = (method.upper(), path)
        seen.add(key)
        if path.startswith("/api/") and key not in ROUTE_SCOPES:
            raise errors.ConfigurationError(f"route {method} {path} declares no scope", field="ROUTE_SCOPES")
        if not path.startswith("/api/") and key not in PUBLIC_ROUTES:
            raise errors.ConfigurationError(
                f"route {method} {path} is neither scoped nor public", field="ROUTES"
            )
    stale = sorted(set(ROUTE_SCOPES) - seen)
    if stale:
        raise errors.ConfigurationError(
            f"scope declared for a missing route {stale[0]}", field="ROUTE_SCOPES"
        )


def require(request: web.Request, scope: str) -> None:
    """:class:`errors.Forbidden` unless the request's token grants ``scope``."""
    if scope not in request.get(SCOPES, frozenset()):
        raise errors.Forbidden(f"the token's scopes do not include {scope}, which this request needs")


def authorize(request: web.Request) -> None:
    """The route's scope check for an authenticated ``/api/...`` request (unmatched routes are left to the
    router's 404/405)."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None or route.method == "*":
        return
    scope = required_scope(route.method, resource.canonical)
    if scope is None:  # pragma: no cover - check_routes refuses such an application
        raise errors.Forbidden("this route declares no scope, so no token may call it")
    require(request, scope)
