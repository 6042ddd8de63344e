"""The OpenAPI 3.1 document of the REST API, served at ``GET /openapi.json``.

Written by hand to say what the server does; ``tests/api/test_api_openapi.py`` holds it to that: the document
validates (openapi-spec-validator), its operations are exactly the server's routes, and the responses the
tests receive validate against the schemas documented here for their status.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from engine import validation
from engine.api import scopes
from engine.api.openapi_schemas import SCHEMAS, UUID, UUID_FIELD, Schema, envelope, json_content, ref
from engine.webhooks.models import DeliveryState

VERSION = "0.1.0"
MAX_OFFSET = 10_000_000  # engine/validation.py page(): a larger offset is refused (400)


_ERROR = {"description": "error envelope", "content": json_content(ref("Error"))}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before the next request can be accepted",
        "schema": {"type": "integer", "minimum": 1},
    }
}
_TOO_MANY = {
    "description": "rate limited (errno -100014: this owner's, or without a valid token this address's, "
    "requests per second; engine/api/limits.py) or an hourly request quota spent (errno -100017)",
    "headers": _RETRY_AFTER,
    "content": json_content(ref("Error")),
}
_COMMON_ERRORS = {
    "400": {
        "description": "invalid request: a field is missing or invalid (named in error); a JSON null or an "
        "empty query value is invalid too (leave an optional field out for its default)",
        "content": json_content(ref("Error")),
    },
    "401": {
        "description": "missing, malformed or expired bearer token; a wrong issuer, audience, algorithm or key "
        "(errno -110001)",
        "headers": {
            "WWW-Authenticate": {"description": "the Bearer challenge", "schema": {"type": "string"}}
        },
        "content": json_content(ref("Error")),
    },
    "403": {
        "description": "the token's scopes do not cover this operation (errno -110005; the operation's "
        "security requirement names the scope it needs)",
        "content": json_content(ref("Error")),
    },
    "413": {
        "description": "the body is over the server's limit (ENGINE_API_MAX_BODY, 64 KiB by default; errno -110004)",
        "content": json_content(ref("Error")),
    },
    "429": _TOO_MANY,
    "503": {
        "description": "no database connection came free in time, or the engine is stopping (retry later)",
        "headers": _RETRY_AFTER,
        "content": json_content(ref("Error")),
    },
    "default": _ERROR,
}


def _operation(
    op_id: str,
    summary: str,
    data: Schema,
    *,
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: dict[str, str] | None = None,
    paginated: bool = False,
    tag: str,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "success", "content": json_content(envelope(data, paginated=paginated))}
    }
    responses.update(_COMMON_ERRORS)
    for status, text in (errors or {}).items():  # an operation's own text wins over the common one
        responses[status] = {
            **responses.get(status, {}),
            "description": text,
            "content": json_content(ref("Error")),
        }
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag], "responses": responses}
    if body is None:
        responses.pop("413")  # a GET's body is not read
    else:
        op["requestBody"] = {"required": True, "content": json_content(ref(body))}
    if params:
        op["parameters"] = params
    return op


def _query(name: str, schema: Schema, description: str, *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


_PAGE = [
    _query("offset", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}, "items to skip"),
    _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": validation.MAX_PAGE, "default": 50},
        "items per page",
    ),
]
_NOT_FOUND = {"404": "no such credential for this owner (another owner's id answers the same)"}


def _paths() -> dict[str, Any]:
    cred = ref("Credential")
    account = ref("TradingAccount")
    return {
        "/api/v3/credential/create": {
            "post": _operation(
                "createCredential",
                "Store exchange API keys (status PENDING; verification is enqueued)",
                cred,
                body="CreateCredentialRequest",
                tag="credential",
                errors={
                    "409": "a credential with this API key already exists, or the owner's credential quota is "
                    "full (errno -100015)",
                    "422": "invalid API key format",
                },
            )
        },
        "/api/v3/credential/verify": {
            "post": _operation(
                "verifyCredential",
                "Enqueue a (re-)verification of the current keys",
                cred,
                body="CredentialIdRequest",
                tag="credential",
                errors={**_NOT_FOUND, "409": "the credential is REVOKED"},
            )
        },
        "/api/v3/credential/get": {
            "get": _operation(
                "getCredential",
                "One credential",
                cred,
                tag="credential",
                errors=_NOT_FOUND,
                params=[_query("credentialId", UUID_FIELD, "the credential", required=True)],
            )
        },
        "/api/v3/credential/list": {
            "get": _operation(
                "listCredentials",
                "The owner's credentials, newest first",
                {"type": "array", "items": cred},
                tag="credential",
                paginated=True,
                params=[
                    _query("credentialStatus", ref("CredentialStatus"), "only this status (alias: status)"),
                    _query("credentialType", ref("CredentialType"), "only this type (alias: type)"),
                    _query("venue", ref("Venue"), "only this venue"),
                    *_PAGE,
                ],
            )
        },
        "/api/v3/credential/rotate": {
            "post": _operation(
                "rotateCredential",
                "Replace the keys: staged until the new keys verify on the same account",
                cred,
                body="RotateCredentialRequest",
                tag="credential",
                errors={
                    "400": "invalid request (a field missing or invalid, named in error: errno -100001); also "
                    "for a request the schema allows: new keys of an OKX credential without apiPassphrase",
                    **_NOT_FOUND,
                    "409": "REVOKED, or a rotation already pending",
                    "422": "invalid API key format",
                },
            )
        },
        "/api/v3/credential/revoke": {
            "post": _operation(
                "revokeCredential",
                "Revoke for good: keys destroyed, trading accounts disconnected",
                cred,
                body="RevokeCredentialRequest",
                tag="credential",
                errors={**_NOT_FOUND, "409": "already REVOKED, or ACTIVE accounts with cascade=false"},
            )
        },
        "/api/v3/tradingAccount/connect": {
            "post": _operation(
                "connectTradingAccount",
                "Connect a trading account (docs/api-dialect.md §8)",
                account,
                body="ConnectTradingAccountRequest",
                tag="tradingAccount",
                errors={
                    "400": "invalid request (a field missing or invalid, named in error: errno -100001); also for "
                    "a request the schema allows: the exchange refused the keys (errno -120001, docs/api-dialect.md "
                    "§8), or accountType is not one of the credential's identities (errno -100001)",
                    **_NOT_FOUND,
                    "408": "the keys were not verified in time (they stay stored; retry the call)",
                    "409": "the credential is not VERIFIED, this account type is already connected, or (with "
                    "keys) the owner's credential quota is full (errno -100015)",
                    "422": "invalid API key format",
                },
            )
        },
        "/api/v3/tradingAccount/disconnect": {
            "post": _operation(
                "disconnectTradingAccount",
                "Disconnect a trading account (idempotent)",
                account,
                body="TradingAccountIdRequest",
                tag="tradingAccount",
                errors={"404": "no such trading account for this owner"},
            )
        },
        "/api/v3/tradingAccount/get": {
            "get": _operation(
                "getTradingAccount",
                "One trading account",
                account,
                tag="tradingAccount",
                errors={"404": "no such trading account for this owner"},
                params=[_query("tradingAccountId", UUID_FIELD, "the trading account", required=True)],
            )
        },
        "/api/v3/tradingAccount/list": {
            "get": _operation(
                "listTradingAccounts",
                "The owner's trading accounts",
                {"type": "array", "items": account},
                tag="tradingAccount",
                paginated=True,
                params=[
                    _query("credentialId", UUID_FIELD, "only accounts of this credential"),
                    _query("status", ref("TradingAccountStatus"), "only this status"),
                    _query("venue", ref("Venue"), "only this venue"),
                    *_PAGE,
                ],
            )
        },
        **_webhook_paths(),
        **_ops_paths(),
    }


def _webhook_paths() -> dict[str, Any]:
    endpoint = ref("WebhookEndpoint")
    with_secret = {"allOf": [endpoint, ref("WebhookSecret")]}
    missing = {"404": "no such webhook endpoint for this owner"}
    return {
        "/api/v3/webhook/create": {
            "post": _operation(
                "createWebhook",
                "Add a webhook endpoint; the answer holds its signing secret, shown this once",
                with_secret,
                body="CreateWebhookRequest",
                tag="webhook",
                errors={"409": "the owner's webhook endpoint quota is full (errno -100015)"},
            )
        },
        "/api/v3/webhook/list": {
            "get": _operation(
                "listWebhooks",
                "The owner's webhook endpoints",
                {"type": "array", "items": endpoint},
                tag="webhook",
                paginated=True,
                params=_PAGE,
            )
        },
        "/api/v3/webhook/get": {
            "get": _operation(
                "getWebhook",
                "One webhook endpoint",
                endpoint,
                tag="webhook",
                errors=missing,
                params=[_query("endpointId", UUID_FIELD, "the endpoint", required=True)],
            )
        },
        "/api/v3/webhook/update": {
            "post": _operation(
                "updateWebhook",
                "Enable or disable an endpoint, change its event types or URL",
                endpoint,
                body="UpdateWebhookRequest",
                tag="webhook",
                errors=missing,
            )
        },
        "/api/v3/webhook/delete": {
            "post": _operation(
                "deleteWebhook",
                "Delete an endpoint with its secrets and deliveries",
                {
                    "type": "object",
                    "required": ["endpointId", "deleted"],
                    "properties": {"endpointId": UUID, "deleted": {"const": True}},
                },
                body="EndpointIdRequest",
                tag="webhook",
                errors=missing,
            )
        },
        "/api/v3/webhook/rotateSecret": {
            "post": _operation(
                "rotateWebhookSecret",
                "A new signing secret (shown once); the old one keeps signing for a grace period",
                {
                    "allOf": [
                        {"type": "object", "required": ["endpointId"], "properties": {"endpointId": UUID}},
                        ref("WebhookSecret"),
                    ]
                },
                body="EndpointIdRequest",
                tag="webhook",
                errors=missing,
            )
        },
        "/api/v3/webhook/delivery/list": {
            "get": _operation(
                "listWebhookDeliveries",
                "Deliveries, newest first, each with every attempt",
                {"type": "array", "items": ref("WebhookDelivery")},
                tag="webhook",
                paginated=True,
                errors=missing,
                params=[
                    _query("endpointId", UUID_FIELD, "only deliveries to this endpoint"),
                    _query(
                        "state",
                        {"type": "string", "enum": [d.value for d in DeliveryState]},
                        "only this state",
                    ),
                    *_PAGE,
                ],
            )
        },
        "/api/v3/webhook/delivery/retry": {
            "post": _operation(
                "retryWebhookDelivery",
                "Send a dead delivery again",
                ref("WebhookDelivery"),
                body="DeliveryIdRequest",
                tag="webhook",
                errors={
                    "404": "no such delivery for this owner",
                    "409": "not dead, or its endpoint is disabled",
                },
            )
        },
    }


def _ops_paths() -> dict[str, Any]:
    unauthenticated: list[dict[str, Any]] = []
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness",
                "tags": ["operations"],
                "security": unauthenticated,
                "responses": {
                    "200": {
                        "description": "the process answers",
                        "content": json_content(envelope(ref("Health"))),
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "Readiness: database reachable, workers alive",
                "tags": ["operations"],
                "security": unauthenticated,
                "responses": {
                    "200": {"description": "ready", "content": json_content(envelope(ref("Readiness")))},
                    "503": {
                        "description": "not ready; data names the failing checks",
                        "content": json_content(ref("ReadinessFailure")),
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text format 0.0.4; OpenMetrics 1.0 when Accept asks for it)",
                "tags": ["operations"],
                "security": unauthenticated,
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {
                            "text/plain": {"schema": {"type": "string"}},
                            "application/openmetrics-text": {"schema": {"type": "string"}},
                        },
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["operations"],
                "security": unauthenticated,
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": json_content({"type": "object"})},
                    "429": {
                        "description": "too many requests from this client address (errno -100014)",
                        "headers": _RETRY_AFTER,
                        "content": json_content(ref("Error")),
                    },
                },
            }
        },
    }


_SCOPE_TEXT = {
    scopes.CREDENTIALS_READ: "read credentials",
    scopes.CREDENTIALS_WRITE: "create, verify, rotate and revoke credentials (and connect a trading account "
    "with keys, which stores a credential)",
    scopes.ACCOUNTS_READ: "read trading accounts",
    scopes.ACCOUNTS_WRITE: "connect and disconnect trading accounts",
    scopes.WEBHOOKS_READ: "read webhook endpoints and their deliveries",
    scopes.WEBHOOKS_WRITE: "create, update, delete webhook endpoints, rotate their secrets, retry deliveries",
}


def _with_scopes(paths: dict[str, Any]) -> dict[str, Any]:
    """Each /api operation's security requirement names its scope (engine/api/scopes.py); OpenAPI 3.1 lets
    a non-OAuth scheme list role names there (https://spec.openapis.org/oas/v3.1.0#security-requirement-object)."""
    for path, item in paths.items():
        for method, operation in item.items():
            scope = scopes.required_scope(method, path)
            if scope is not None:
                operation["security"] = [{"bearerAuth": [scope]}]
                if (method, path) == ("post", "/api/v3/tradingAccount/connect"):
                    operation["description"] = (
                        "Connecting with keys stores a credential too, so it also needs credentials:write "
                        "(403 without it)."
                    )
    return paths


def document() -> dict[str, Any]:
    """The whole OpenAPI document (a new dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "credential-engine",
            "version": VERSION,
            "description": "Stores exchange API keys encrypted, verifies, rotates and revokes them. Every answer "
            'is the envelope {"data", "success", "errno", "error"} (+ "pagination" on lists); timestamps are '
            "milliseconds; secrets are never returned.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "credential", "description": "exchange API keys"},
            {"name": "tradingAccount", "description": "accounts reached through a credential"},
            {"name": "webhook", "description": "signed event delivery (Standard Webhooks)"},
            {"name": "operations", "description": "health, readiness, metrics; no token needed"},
        ],
        "paths": _with_scopes(_paths()),
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT: from the identity provider (RS256, ES256 or EdDSA, keys from "
                    "ENGINE_API_JWKS_URL, iss and aud checked) or a development HS256 token "
                    "(`credential-engine token --owner ID`). The owner claim (sub unless "
                    "ENGINE_API_OWNER_CLAIM says otherwise) names the owner; exp is required; the scope "
                    "(space-separated) or scp (list) claim grants the scopes each operation's security "
                    "requirement names: "
                    + "; ".join(f"{name}: {text}" for name, text in _SCOPE_TEXT.items()),
                }
            },
            "schemas": json.loads(json.dumps(SCHEMAS)),
        },
    }


@functools.cache
def document_json() -> str:
    return json.dumps(document(), separators=(",", ":"))
