"""The REST API's HTTP layer: the envelope (docs/api-dialect.md §1), errors, body and query parsing, middlewares.

Every answer of ``/api/...``, ``/healthz`` and ``/readyz`` is the envelope of docs/api-dialect.md §1::

    {"data": ..., "success": true, "errno": 0, "error": null}            (+ "pagination" on lists)
    {"data": null, "success": false, "errno": -100001, "error": "apiKey: is required"}

Errors map here and only here. An engine error answers its class's ``http_status`` and ``errno`` with its
message (messages name fields and rules, never values). The HTTP layer adds its own kinds::

    RouteNotFound      404  -110002  no such route
    MethodNotAllowed   405  -110003  the route exists, the method does not
    PayloadTooLarge    413  -110004  the body is over ApiConfig.max_body_bytes

Anything else, and every 5xx, answers a fixed message with the request's correlation id (also in the
``X-Request-Id`` header); the details go to the server log, through the redacting log pipeline. A 503 because
no database connection came free in time (``db.PoolExhausted``) also says ``Retry-After``.
"""

from __future__ import annotations

import json
import math
import re
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

from engine import db as dbmod
from engine import errors
from engine.api import auth, scopes
from engine.models import Page

log = structlog.get_logger("engine.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-Id"
INTERNAL_ERRNO = errors.CredentialEngineError.errno  # -100000: an unexpected failure
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
UUID_PATTERN = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_JSON = "application/json"
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class RouteNotFound(errors.NotFound):
    http_status = 404
    errno = -110002


class MethodNotAllowed(errors.CredentialEngineError):
    http_status = 405
    errno = -110003


class PayloadTooLarge(errors.CredentialEngineError):
    http_status = 413
    errno = -110004


HTTP_ERRORS: tuple[type[errors.CredentialEngineError], ...] = (
    RouteNotFound,
    MethodNotAllowed,
    PayloadTooLarge,
)


# ---- the envelope ------------------------------------------------------------------------------------------


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def ok(data: Any, *, status: int = 200, page: Page[Any] | None = None) -> web.Response:
    """A success envelope; ``page`` adds the ``pagination`` object of docs/api-dialect.md §6."""
    body: dict[str, Any] = {"data": data, "success": True, "errno": 0, "error": None}
    if page is not None:
        body["pagination"] = {"offset": page.offset, "limit": page.limit, "total": page.total}
    return web.Response(text=dumps(body), status=status, content_type=_JSON)


def fail(status: int, errno: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    body = {"data": None, "success": False, "errno": errno, "error": message}
    return web.Response(text=dumps(body), status=status, content_type=_JSON, headers=headers)


def _from_http_exception(exc: web.HTTPException) -> tuple[errors.CredentialEngineError, dict[str, str]]:
    """aiohttp's own refusals (router, body size) as error kinds of ours."""
    if exc.status == 404:
        return RouteNotFound("no such route; see /openapi.json"), {}
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return MethodNotAllowed(f"method not allowed; use {allow}"), {"Allow": allow}
    if exc.status == 413:
        return PayloadTooLarge("body: too large"), {}
    if 400 <= exc.status < 500:
        return errors.InvalidRequest("request", exc.reason.lower()), {}
    return errors.CredentialEngineError("internal error"), {}


def error_response(exc: errors.CredentialEngineError, request_id: str, **headers: str) -> web.Response:
    status = exc.http_status
    if isinstance(exc, dbmod.UniqueViolation):  # a race the engine did not name: still a conflict
        return fail(
            409, errors.Conflict.errno, "the request conflicts with a concurrent change", headers=headers
        )
    if status >= 500:
        what = "service unavailable" if status == 503 else "internal error"
        return fail(status, exc.errno, f"{what}; correlation id {request_id}", headers=headers)
    return fail(status, exc.errno, exc.message, headers=headers)


# ---- request parsing ----------------------------------------------------------------------------------------


class Fields:
    """Typed access to request fields (JSON body or query string), every error naming the field.

    A field that is absent is absent: the route's default applies. A field that is present must hold a
    value of its type: a JSON ``null`` or an empty query value (``?status=``, ``?offset=``) is refused like
    any other wrong value (400 naming the field), never read as "no filter" or "the default". No request
    field is nullable in the OpenAPI document (``engine/api/openapi_schemas.py``); a field that ever is must be
    read with ``nullable=True``.
    """

    def __init__(self, values: Mapping[str, list[Any]], *, source: str) -> None:
        self._values = values
        self._source = source  # "query" or "body": what an empty value means differs

    def raw(self, *names: str, nullable: bool = False) -> Any:
        """The value of the spelling given (``credentialType`` or ``type``); None when absent.

        A request gives one spelling of a field: both are refused (even with the same value), a rule the
        OpenAPI document can state exactly (``not: {required: [credentialType, type]}``).
        """
        found: list[tuple[str, Any]] = []
        for name in names:
            given = self._values.get(name, [])
            if len(given) > 1:
                raise errors.InvalidRequest(name, "must be given once")
            if given:
                self._check_given(name, given[0], nullable)
                found.append((name, given[0]))
        if len(found) > 1:
            raise errors.InvalidRequest(names[0], f"give {' or '.join(n for n, _ in found)}, not both")
        return found[0][1] if found else None

    def _check_given(self, name: str, value: Any, nullable: bool) -> None:
        if value is None and not nullable:
            raise errors.InvalidRequest(name, "must not be null (leave the field out for its default)")
        if self._source == "query" and isinstance(value, str) and not value.strip():
            raise errors.InvalidRequest(name, "must not be empty (leave the parameter out for its default)")

    def text(self, *names: str) -> str | None:
        value = self.raw(*names)
        if value is not None and not isinstance(value, str):
            raise errors.InvalidRequest(names[0], "must be a string")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if self._source == "query" and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise errors.InvalidRequest(name, "must be a boolean")  # a JSON body says true or false

    def integer(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,12}", value.strip()):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise errors.InvalidRequest(name, "must be an integer")

    def identifier(self, name: str, *, required: bool = True) -> str | None:
        """A UUID field in its 36-character form (either case), as the OpenAPI document states it; a missing
        required one is 400 "is required", any other form (braces, no hyphens, padding) 400 "must be a UUID"."""
        value = self.text(name)
        if value is None and not required:
            return None
        if value is None or (required and not value.strip()):
            raise errors.InvalidRequest(name, "is required")
        if not UUID_PATTERN.fullmatch(value):
            raise errors.InvalidRequest(name, "must be a UUID (8-4-4-4-12 hexadecimal digits)")
        return value

    def present(self, name: str) -> bool:
        """Whether ``name`` was sent at all (with any value)."""
        return name in self._values


def query(request: web.Request) -> Fields:
    values: dict[str, list[Any]] = {}
    for key, value in request.query.items():
        values.setdefault(key, []).append(value)
    return Fields(values, source="query")


async def body(request: web.Request) -> Fields:
    """The JSON object in the body (any content type is read as JSON: curl's default form type included)."""
    raw = await request.read()  # aiohttp refuses bodies over client_max_size with 413
    if not raw.strip():
        raise errors.InvalidRequest("body", "must be a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise errors.InvalidRequest("body", "is not valid JSON") from None
    if not isinstance(data, dict):
        raise errors.InvalidRequest("body", "must be a JSON object")
    return Fields({key: [value] for key, value in data.items()}, source="body")


# ---- middlewares --------------------------------------------------------------------------------------------

OWNER: web.RequestKey[str] = web.RequestKey("owner", str)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
TOKEN_VERIFIER: web.AppKey[auth.Authenticator] = web.AppKey("token_verifier", auth.Authenticator)
HTTP_COUNTS: web.AppKey[Counter[tuple[str, str, int]]] = web.AppKey("http_counts", Counter)


def owner_of(request: web.Request) -> str:
    return request[OWNER]


def route_name(request: web.Request) -> str:
    """The route pattern (``/api/v3/credential/get``), or ``unmatched``: bounded label values for metrics."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, access log, request counts, and every error as an envelope (never a stack trace)."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if REQUEST_ID_PATTERN.match(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.monotonic()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except errors.CredentialEngineError as exc:
        response = error_response(exc, request_id, **_auth_challenge(exc), **_retry_after(exc))
        if exc.http_status >= 500:
            log.warning(
                "http_unavailable", request_id=request_id, error=type(exc).__name__, detail=exc.message
            )
    except web.HTTPException as exc:
        mapped, headers = _from_http_exception(exc)
        response = error_response(mapped, request_id, **headers)
    except Exception as exc:  # the one catch-all: a bug must not show its traceback to the client
        # the traceback as text, never frame locals (they hold request bodies: keys and secrets), whatever
        # renderer the embedding application configured; configure_logging's redaction scrubs the text
        log.error(
            "http_unhandled",
            request_id=request_id,
            method=request.method,
            route=route_name(request),
            error=type(exc).__name__,
            traceback="".join(traceback.format_exception(exc)),
        )
        response = fail(500, INTERNAL_ERRNO, f"internal error; correlation id {request_id}")
    response.headers[REQUEST_ID_HEADER] = request_id
    method = request.method if request.method in _METHODS else "OTHER"  # bounded label values
    request.app[HTTP_COUNTS][(route_name(request), method, response.status)] += 1
    log.debug(
        "http_request",
        request_id=request_id,
        method=request.method,
        route=route_name(request),
        status=response.status,
        ms=round((time.monotonic() - started) * 1000, 2),
    )
    return response


def _auth_challenge(exc: errors.CredentialEngineError) -> dict[str, str]:
    return (
        {"WWW-Authenticate": 'Bearer realm="credential-engine"'}
        if isinstance(exc, errors.Unauthorized)
        else {}
    )


def _retry_after(exc: errors.CredentialEngineError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, RFC 9110 10.2.3) for errors that say when to come back (429s)."""
    seconds = getattr(exc, "retry_after", None)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def authenticate(request: web.Request) -> str:
    """The owner of the request's bearer token (also kept on the request, with the token's scopes);
    :class:`errors.Unauthorized`."""
    token = auth.bearer_token(request.headers.get("Authorization"))
    claims = await request.app[TOKEN_VERIFIER].verify(token)
    request[scopes.SCOPES] = claims.scopes
    owner = request[OWNER] = claims.owner_id
    return owner


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/api/...`` needs a valid bearer token (401) whose scopes cover the route (403,
    :mod:`engine.api.scopes`); its owner claim names the owner every handler acts for (already known when
    the rate limit middleware, engine/api/limits.py, authenticated the request)."""
    if request.path.startswith("/api/"):
        if OWNER not in request:
            await authenticate(request)
        scopes.authorize(request)
    return await handler(request)
