"""The REST API's webhook routes, in docs/api-dialect.md's dialect (``/api/v3/<object>/<verb>``, camelCase, envelope).

An endpoint's signing secret (``whsec_...``) is in the answer of ``webhook/create`` and
``webhook/rotateSecret`` only: the receiver needs it to check signatures, and it is never shown again.
Every other answer (and every exchange credential answer) holds no secret.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from aiohttp import web

from engine import errors, validation
from engine.api import http, openapi_schemas, routes
from engine.models import Page

T = TypeVar("T")
required = routes.required
# the document's WebhookUrl pattern is the rule (the service then checks scheme policy and addresses)
URL = re.compile(openapi_schemas.URL)
MAX_URL = 2048  # engine/webhooks/guard.py MAX_URL_LENGTH


async def create_webhook(request: web.Request) -> web.Response:
    """POST /api/v3/webhook/create: url, eventTypes (none or empty: every type), description."""
    f = await http.body(request)
    endpoint = await routes.engine_of(request).add_webhook_endpoint(
        http.owner_of(request),
        _url(f) or "",
        event_types=_event_types(f),
        description=f.text("description"),
    )
    return http.ok({**endpoint.public_dict(), "secret": endpoint.secret})


async def list_webhooks(request: web.Request) -> web.Response:
    """GET /api/v3/webhook/list (offset, limit)."""
    f = http.query(request)
    offset, limit = f.integer("offset", 0), f.integer("limit", routes.DEFAULT_LIMIT)
    endpoints = await routes.engine_of(request).list_webhook_endpoints(http.owner_of(request))
    page = _page(endpoints, offset, limit)
    return http.ok([e.public_dict() for e in page.items], page=page)


def _url(f: http.Fields) -> str | None:
    """``url`` as the document's WebhookUrl states it: an http(s) URL of a host name or IPv4 address, an
    optional port, a path and query of RFC 3986 characters, sent as is (no padding), at most 2048 characters."""
    value = f.text("url")
    if value is None or not value.strip():
        return value  # absent (update) or blank: the service answers "is required"
    if len(value) > MAX_URL or not URL.fullmatch(value):
        raise errors.InvalidRequest(
            "url",
            f"must be an http or https URL of at most {MAX_URL} characters: a host name or IPv4 address, an "
            "optional port, a path and query of RFC 3986 characters (no spaces, user info or fragment)",
        )
    return value


def _event_types(f: http.Fields) -> Any:
    """``eventTypes`` as given, when it is a JSON array (the service checks its items); an object is refused
    here, as the document says, rather than read as the collection of its keys."""
    value = f.raw("eventTypes")
    if value is not None and not isinstance(value, list):
        raise errors.InvalidRequest("eventTypes", "must be a list of event types")
    return value


def _page(items: list[T], offset: int, limit: int) -> Page[T]:
    offset, limit = validation.page(offset, limit)  # the same paging rules as every other list
    return Page(items=items[offset : offset + limit], offset=offset, limit=limit, total=len(items))


async def get_webhook(request: web.Request) -> web.Response:
    """GET /api/v3/webhook/get?endpointId=..."""
    f = http.query(request)
    endpoint = await routes.engine_of(request).get_webhook_endpoint(
        http.owner_of(request), required(f, "endpointId")
    )
    return http.ok(endpoint.public_dict())


async def update_webhook(request: web.Request) -> web.Response:
    """POST /api/v3/webhook/update: endpointId and what changes (enabled, eventTypes, url)."""
    f = await http.body(request)
    enabled = f.flag("enabled", False) if f.raw("enabled") is not None else None
    endpoint = await routes.engine_of(request).update_webhook_endpoint(
        http.owner_of(request),
        required(f, "endpointId"),
        enabled=enabled,
        event_types=_event_types(f) if f.present("eventTypes") else None,
        url=_url(f),
    )
    return http.ok(endpoint.public_dict())


async def delete_webhook(request: web.Request) -> web.Response:
    """POST /api/v3/webhook/delete: the endpoint, its secrets and its deliveries are gone."""
    f = await http.body(request)
    endpoint_id = validation.uuid_value(required(f, "endpointId"), "endpointId")
    await routes.engine_of(request).remove_webhook_endpoint(http.owner_of(request), endpoint_id)
    return http.ok({"endpointId": str(endpoint_id), "deleted": True})


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    """POST /api/v3/webhook/rotateSecret: a new secret, shown once; the old one signs for a grace period."""
    f = await http.body(request)
    endpoint_id = validation.uuid_value(required(f, "endpointId"), "endpointId")
    secret = await routes.engine_of(request).rotate_webhook_secret(http.owner_of(request), endpoint_id)
    return http.ok({"endpointId": str(endpoint_id), "secret": secret})


async def list_deliveries(request: web.Request) -> web.Response:
    """GET /api/v3/webhook/delivery/list (endpointId, state, offset, limit), each with its attempts."""
    f = http.query(request)
    page = await routes.engine_of(request).list_webhook_deliveries(
        http.owner_of(request),
        f.identifier("endpointId", required=False),
        state=f.text("state"),
        offset=f.integer("offset", 0),
        limit=f.integer("limit", routes.DEFAULT_LIMIT),
    )
    return http.ok([d.public_dict() for d in page.items], page=page)


async def retry_delivery(request: web.Request) -> web.Response:
    """POST /api/v3/webhook/delivery/retry: send a dead delivery again."""
    f = await http.body(request)
    delivery = await routes.engine_of(request).retry_webhook_delivery(
        http.owner_of(request), required(f, "deliveryId")
    )
    return http.ok(delivery.public_dict())


ROUTES: tuple[tuple[str, str, http.Handler], ...] = (
    ("POST", "/api/v3/webhook/create", create_webhook),
    ("GET", "/api/v3/webhook/list", list_webhooks),
    ("GET", "/api/v3/webhook/get", get_webhook),
    ("POST", "/api/v3/webhook/update", update_webhook),
    ("POST", "/api/v3/webhook/delete", delete_webhook),
    ("POST", "/api/v3/webhook/rotateSecret", rotate_webhook_secret),
    ("GET", "/api/v3/webhook/delivery/list", list_deliveries),
    ("POST", "/api/v3/webhook/delivery/retry", retry_delivery),
)
