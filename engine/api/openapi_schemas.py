"""The OpenAPI document's component schemas: the JSON the REST API reads and writes (see engine/api/openapi.py)."""

from __future__ import annotations

from typing import Any

from engine.events import EVENT_TYPES
from engine.models import CredentialStatus, CredentialType, TradingAccountStatus
from engine.webhooks.models import DeliveryState
from venues.base import Venue

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


def envelope(data: Schema, *, paginated: bool = False) -> Schema:
    properties: dict[str, Any] = {
        "data": data,
        "success": {"const": True},
        "errno": {"const": 0},
        "error": {"type": "null"},
    }
    required = ["data", "success", "errno", "error"]
    if paginated:
        properties["pagination"] = ref("Pagination")
        required.append("pagination")
    return {"type": "object", "required": required, "properties": properties}


def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


MS = {"type": "integer", "description": "milliseconds since the Unix epoch"}
UUID = {"type": "string", "format": "uuid"}

SCHEMAS: dict[str, Schema] = {
    "Venue": {"type": "string", "enum": [v.value for v in Venue]},
    "CredentialType": {"type": "string", "enum": [t.value for t in CredentialType]},
    "CredentialStatus": {"type": "string", "enum": [s.value for s in CredentialStatus]},
    "TradingAccountStatus": {"type": "string", "enum": [s.value for s in TradingAccountStatus]},
    "Permissions": {
        "type": "object",
        "required": ["read", "trade", "withdraw", "transfer", "ipRestricted", "ipAllowlist", "expiresAt"],
        "properties": {
            "read": {"type": "boolean"},
            "trade": {"type": "boolean"},
            "withdraw": {"type": "boolean"},
            "transfer": {"type": "boolean"},
            "ipRestricted": {"type": "boolean"},
            "ipAllowlist": {"type": "array", "items": {"type": "string"}},
            "expiresAt": nullable("integer"),
        },
    },
    "PendingRotation": {
        "type": "object",
        "required": ["secretVersion", "apiKey", "startedAt"],
        "properties": {"secretVersion": {"type": "integer"}, "apiKey": {"type": "string"}, "startedAt": MS},
    },
    "Credential": {
        "type": "object",
        "description": "The credential object. Both spellings (credentialType/type, nickname/name) "
        "are present. apiKey is masked; secrets are never returned.",
        "required": [
            "credentialId",
            "userId",
            "venue",
            "credentialType",
            "type",
            "nickname",
            "name",
            "apiKey",
            "status",
            "identities",
            "permissions",
            "venueAccountId",
            "failureReason",
            "warnings",
            "secretVersion",
            "pendingRotation",
            "createdAt",
            "updatedAt",
            "verifiedAt",
            "revokedAt",
        ],
        "properties": {
            "credentialId": UUID,
            "userId": {"type": "string", "description": "the owner (the token's sub)"},
            "venue": ref("Venue"),
            "credentialType": ref("CredentialType"),
            "type": ref("CredentialType"),
            "nickname": nullable("string"),
            "name": nullable("string"),
            "apiKey": {"type": "string", "description": "masked, e.g. your-api-***"},
            "status": ref("CredentialStatus"),
            "identities": {"type": "array", "items": {"type": "string"}},
            "permissions": {"oneOf": [ref("Permissions"), {"type": "null"}]},
            "venueAccountId": nullable("string"),
            "failureReason": nullable("string"),
            "warnings": {"type": "array", "items": {"type": "string"}},
            "secretVersion": {"type": "integer"},
            "pendingRotation": {"oneOf": [ref("PendingRotation"), {"type": "null"}]},
            "createdAt": MS,
            "updatedAt": MS,
            "verifiedAt": nullable("integer"),
            "revokedAt": nullable("integer"),
        },
    },
    "TradingAccount": {
        "type": "object",
        "description": "docs/api-dialect.md §8's trading account.",
        "required": [
            "tradingAccountId",
            "userId",
            "credentialId",
            "venue",
            "name",
            "accountType",
            "status",
            "createdAt",
            "updatedAt",
        ],
        "properties": {
            "tradingAccountId": UUID,
            "userId": {"type": "string"},
            "credentialId": UUID,
            "venue": ref("Venue"),
            "name": nullable("string"),
            "accountType": {"type": "string", "description": "e.g. SPOT, MARGIN, FUTURES"},
            "status": ref("TradingAccountStatus"),
            "createdAt": MS,
            "updatedAt": MS,
        },
    },
    "Pagination": {
        "type": "object",
        "required": ["offset", "limit", "total"],
        "properties": {
            "offset": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
            "total": {"type": "integer", "minimum": 0},
        },
    },
    "Error": {
        "type": "object",
        "description": "Every failure. errno is stable per error kind (see the errno table in the README).",
        "required": ["data", "success", "errno", "error"],
        "properties": {
            "data": {"oneOf": [{"type": "null"}, {"type": "object"}]},
            "success": {"const": False},
            "errno": {"type": "integer", "maximum": -1},
            "error": {"type": "string"},
        },
    },
    "CreateCredentialRequest": {
        "type": "object",
        "required": ["venue", "apiKey", "apiSecret"],
        "properties": {
            "venue": ref("Venue"),
            "credentialType": ref("CredentialType"),
            "type": {
                **ref("CredentialType"),
                "description": "docs/api-dialect.md §4's spelling of credentialType",
            },
            "apiKey": {"type": "string", "maxLength": 512},
            "apiSecret": {"type": "string", "maxLength": 8192},
            "apiPassphrase": {"type": "string", "maxLength": 128, "description": "required for OKX"},
            "nickname": {"type": "string", "maxLength": 100},
            "name": {"type": "string", "maxLength": 100, "description": "another spelling of nickname"},
        },
    },
    "CredentialIdRequest": {
        "type": "object",
        "required": ["credentialId"],
        "properties": {"credentialId": UUID},
    },
    "RotateCredentialRequest": {
        "type": "object",
        "required": ["credentialId", "apiKey", "apiSecret"],
        "properties": {
            "credentialId": UUID,
            "apiKey": {"type": "string"},
            "apiSecret": {"type": "string"},
            "apiPassphrase": {"type": "string"},
            "immediate": {
                "type": "boolean",
                "default": False,
                "description": "compromised key: destroy the old keys now (status PENDING until the new verify)",
            },
        },
    },
    "RevokeCredentialRequest": {
        "type": "object",
        "required": ["credentialId"],
        "properties": {
            "credentialId": UUID,
            "cascade": {
                "type": "boolean",
                "default": True,
                "description": "disconnect ACTIVE trading accounts; false answers 409 while any exist",
            },
        },
    },
    "ConnectTradingAccountRequest": {
        "type": "object",
        "description": "Either keys (venue, apiKey, apiSecret[, apiPassphrase]: the keys are stored, "
        "verified and connected in one call), or credentialId of a VERIFIED credential.",
        "oneOf": [
            {"required": ["venue", "apiKey", "apiSecret"]},
            {"required": ["credentialId"]},
        ],
        "properties": {
            "venue": ref("Venue"),
            "apiKey": {"type": "string"},
            "apiSecret": {"type": "string"},
            "apiPassphrase": {"type": "string"},
            "credentialId": UUID,
            "name": {"type": "string", "maxLength": 100},
            "accountType": {
                "type": "string",
                "description": "SPOT, MARGIN, FUTURES, ... (one of the identities)",
            },
        },
    },
    "TradingAccountIdRequest": {
        "type": "object",
        "required": ["tradingAccountId"],
        "properties": {"tradingAccountId": UUID},
    },
    "EventType": {"type": "string", "enum": list(EVENT_TYPES)},
    "WebhookEndpoint": {
        "type": "object",
        "required": [
            "endpointId",
            "userId",
            "url",
            "description",
            "eventTypes",
            "enabled",
            "disabledReason",
            "failingSince",
            "createdAt",
            "updatedAt",
        ],
        "properties": {
            "endpointId": UUID,
            "userId": {"type": "string"},
            "url": {"type": "string"},
            "description": nullable("string"),
            "eventTypes": {
                "oneOf": [{"type": "array", "items": ref("EventType")}, {"type": "null"}],
                "description": "null: every event type",
            },
            "enabled": {"type": "boolean"},
            "disabledReason": {
                **nullable("string"),
                "description": "MANUAL, GONE (the receiver answered 410) or FAILING (failed for days)",
            },
            "failingSince": nullable("integer"),
            "createdAt": MS,
            "updatedAt": MS,
        },
    },
    "WebhookSecret": {
        "type": "object",
        "required": ["secret"],
        "properties": {
            "secret": {
                "type": "string",
                "pattern": "^whsec_",
                "description": "the Standard Webhooks signing secret; shown in this answer only",
            }
        },
    },
    "WebhookAttempt": {
        "type": "object",
        "required": ["attempt", "outcome", "statusCode", "latencyMs", "error", "at"],
        "properties": {
            "attempt": {"type": "integer"},
            "outcome": {"type": "string", "description": "delivered, failed, gone or refused"},
            "statusCode": nullable("integer"),
            "latencyMs": {"type": "number"},
            "error": nullable("string"),
            "at": MS,
        },
    },
    "WebhookDelivery": {
        "type": "object",
        "required": [
            "deliveryId",
            "endpointId",
            "userId",
            "eventId",
            "eventType",
            "credentialId",
            "sequence",
            "state",
            "attempts",
            "nextAttemptAt",
            "lastStatusCode",
            "lastError",
            "createdAt",
            "deliveredAt",
        ],
        "properties": {
            "deliveryId": UUID,
            "endpointId": UUID,
            "userId": {"type": "string"},
            "eventId": UUID,
            "eventType": ref("EventType"),
            "credentialId": {"oneOf": [UUID, {"type": "null"}]},
            "sequence": {"type": "integer"},
            "state": {"type": "string", "enum": [d.value for d in DeliveryState]},
            "attempts": {"type": "array", "items": ref("WebhookAttempt")},
            "nextAttemptAt": nullable("integer"),
            "lastStatusCode": nullable("integer"),
            "lastError": nullable("string"),
            "createdAt": MS,
            "deliveredAt": nullable("integer"),
        },
    },
    "CreateWebhookRequest": {
        "type": "object",
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "description": "https (http and private addresses only when allowed)"},
            "eventTypes": {
                "type": "array",
                "items": ref("EventType"),
                "description": "absent or empty ([]): every type (null is refused like any wrong value)",
            },
            "description": {"type": "string"},
        },
    },
    "UpdateWebhookRequest": {
        "type": "object",
        "required": ["endpointId"],
        "properties": {
            "endpointId": UUID,
            "enabled": {"type": "boolean", "description": "false: pending deliveries are given up"},
            "eventTypes": {"type": "array", "items": ref("EventType"), "description": "empty: every type"},
            "url": {"type": "string"},
        },
    },
    "EndpointIdRequest": {
        "type": "object",
        "required": ["endpointId"],
        "properties": {"endpointId": UUID},
    },
    "DeliveryIdRequest": {
        "type": "object",
        "required": ["deliveryId"],
        "properties": {"deliveryId": UUID},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "checks": {
                "type": "object",
                "required": ["database", "workers"],
                "properties": {
                    "database": {"type": "string", "enum": ["up", "down"]},
                    "workers": {"type": "string", "enum": ["up", "down", "disabled"]},
                },
            },
        },
    },
}
