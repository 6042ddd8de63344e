"""The JSON shape of every event, as a JSON Schema (draft 2020-12) per event type.

The same shape reaches in-process listeners (``Event.payload()``) and webhook receivers (the request body)::

    {"type": "credential.verified", "timestamp": 1700000000000,
     "data": {"eventId": "<uuid>", "sequence": 2, "ownerId": "user-1",
              "credential": {...public fields...}, "previousStatus": "PENDING", ...}}

``data.credential`` holds the credential's public fields (masked API key, status, identities, permissions,
...; never key material); the other keys of ``data`` depend on the type (:data:`EXTRAS`). ``sequence`` counts
the events of one credential from 1, without gaps; for ``webhook_endpoint.disabled`` (no credential) it counts
that endpoint's events. :func:`schema` gives the published schema, which lets new fields appear
(``additionalProperties`` left open, as consumers should tolerate additions); ``strict=True`` closes every
object, which the tests use to catch a field that is sent but not documented.
"""

from __future__ import annotations

import copy
from typing import Any

from engine import events

__all__ = ["EXTRAS", "all_schemas", "schema"]

Schema = dict[str, Any]

_UUID: Schema = {"type": "string", "format": "uuid"}
_MS: Schema = {"type": "integer", "description": "milliseconds since the epoch"}
_MS_OR_NULL: Schema = {"type": ["integer", "null"], "description": "milliseconds since the epoch"}
_TEXT_OR_NULL: Schema = {"type": ["string", "null"]}
_STATUS: Schema = {"enum": ["PENDING", "VERIFIED", "FAILED", "REVOKED"]}

PERMISSIONS: Schema = {
    "type": ["object", "null"],
    "properties": {
        "read": {"type": "boolean"},
        "trade": {"type": "boolean"},
        "withdraw": {"type": "boolean"},
        "transfer": {"type": "boolean"},
        "ipRestricted": {"type": "boolean"},
        "ipAllowlist": {"type": "array", "items": {"type": "string"}},
        "expiresAt": _MS_OR_NULL,
        "subAccountKeys": {
            "type": "boolean",
            "description": "present (true) only for a BROKER master key that may manage its sub-accounts' API keys",
        },
    },
    "required": ["read", "trade", "withdraw", "transfer", "ipRestricted", "ipAllowlist", "expiresAt"],
}

_MINTED_FROM: Schema = {
    "type": "object",
    "description": "only for a credential minted through a BROKER credential",
    "properties": {"parentCredentialId": _UUID, "subAccount": {"type": "string"}},
    "required": ["parentCredentialId", "subAccount"],
}

CREDENTIAL: Schema = {
    "type": "object",
    "description": "the credential's public fields after the change; never key material",
    "properties": {
        "credentialId": _UUID,
        "userId": {"type": "string"},
        "venue": {"enum": ["BINANCE", "OKX", "BYBIT", "COINBASE", "KRAKEN"]},
        "credentialType": {"enum": ["EXCHANGE", "BROKER"]},
        "type": {"enum": ["EXCHANGE", "BROKER"]},
        "nickname": _TEXT_OR_NULL,
        "name": _TEXT_OR_NULL,
        "apiKey": {"type": "string", "description": "masked, e.g. 'AKIAEXAM***'"},
        "status": _STATUS,
        "identities": {"type": "array", "items": {"type": "string"}},
        "permissions": PERMISSIONS,
        "venueAccountId": _TEXT_OR_NULL,
        "failureReason": _TEXT_OR_NULL,
        "warnings": {"type": "array", "items": {"type": "string"}},
        "secretVersion": {"type": "integer"},
        "pendingRotation": {
            "type": ["object", "null"],
            "properties": {
                "secretVersion": {"type": "integer"},
                "apiKey": {"type": "string"},
                "startedAt": _MS,
            },
            "required": ["secretVersion", "apiKey", "startedAt"],
        },
        "createdAt": _MS,
        "updatedAt": _MS,
        "verifiedAt": _MS_OR_NULL,
        "revokedAt": _MS_OR_NULL,
        "mintedFrom": {**_MINTED_FROM, "type": ["object", "null"], "description": "null unless minted"},
    },
}
CREDENTIAL["required"] = sorted(CREDENTIAL["properties"])

TRADING_ACCOUNT: Schema = {
    "type": "object",
    "properties": {
        "tradingAccountId": _UUID,
        "userId": {"type": "string"},
        "credentialId": _UUID,
        "venue": {"type": "string"},
        "name": _TEXT_OR_NULL,
        "accountType": {"type": "string"},
        "status": {"enum": ["ACTIVE", "DISABLED"]},
        "createdAt": _MS,
        "updatedAt": _MS,
    },
}
TRADING_ACCOUNT["required"] = sorted(TRADING_ACCOUNT["properties"])

ENDPOINT: Schema = {
    "type": "object",
    "description": "the endpoint after the change; its URL without query or user info",
    "properties": {
        "endpointId": _UUID,
        "userId": {"type": "string"},
        "url": {"type": "string"},
        "description": _TEXT_OR_NULL,
        "eventTypes": {"type": ["array", "null"], "items": {"type": "string"}},
        "enabled": {"type": "boolean"},
        "disabledReason": _TEXT_OR_NULL,
        "failingSince": _MS_OR_NULL,
        "createdAt": _MS,
        "updatedAt": _MS,
    },
}
ENDPOINT["required"] = sorted(ENDPOINT["properties"])

_PREVIOUS_STATUS: Schema = {**_STATUS, "description": "the status before this change"}
_REASON: Schema = {"type": "string", "description": "a stable identifier, e.g. INVALID_KEY, ACCOUNT_MISMATCH"}
_MESSAGE: Schema = {"type": "string", "description": "a human-readable explanation"}

_AUTOMATIC: Schema = {
    "type": "boolean",
    "description": "true: the engine minted the new key itself (a credential minted through a BROKER credential)",
}

# type -> (extra properties of data, which of them are always present)
EXTRAS: dict[str, tuple[Schema, tuple[str, ...]]] = {
    "credential.created": ({"mintedFrom": _MINTED_FROM}, ()),
    "credential.minted": (
        {"parentCredentialId": _UUID, "subAccount": {"type": "string"}},
        ("parentCredentialId", "subAccount"),
    ),
    "credential.mint_failed": (
        {"previousStatus": _PREVIOUS_STATUS, "reason": _REASON, "message": _MESSAGE},
        ("previousStatus", "reason", "message"),
    ),
    "credential.verified": (
        {"previousStatus": _PREVIOUS_STATUS, "previousPermissions": PERMISSIONS},
        ("previousStatus", "previousPermissions"),
    ),
    "credential.permissions_changed": (
        {"previousStatus": _PREVIOUS_STATUS, "previousPermissions": PERMISSIONS},
        ("previousStatus", "previousPermissions"),
    ),
    "credential.verification_failed": (
        {"previousStatus": _PREVIOUS_STATUS, "reason": _REASON, "message": _MESSAGE},
        ("previousStatus", "reason", "message"),
    ),
    "credential.rotation_started": (
        {
            "immediate": {"type": "boolean", "description": "true: old keys destroyed at once (compromise)"},
            "previousStatus": {**_PREVIOUS_STATUS, "description": "only when immediate"},
            "automatic": {**_AUTOMATIC, "description": "present and true when the engine minted the new key"},
        },
        ("immediate",),
    ),
    "credential.rotated": (
        {
            "previousStatus": _PREVIOUS_STATUS,
            "previousApiKey": {"type": "string", "description": "masked"},
            "automatic": _AUTOMATIC,
        },
        ("previousStatus", "previousApiKey", "automatic"),
    ),
    "credential.rotation_failed": (
        {
            "reason": _REASON,
            "message": _MESSAGE,
            "rejectedVersion": {
                "type": "integer",
                "description": "the staged version rejected; absent when the venue refused to mint the new key",
            },
            "automatic": _AUTOMATIC,
        },
        ("reason", "message", "automatic"),
    ),
    "credential.revoked": ({"previousStatus": _PREVIOUS_STATUS}, ("previousStatus",)),
    "credential.expiring": (
        {"expiresAt": _MS, "daysLeft": {"type": "integer", "minimum": 0}},
        ("expiresAt", "daysLeft"),
    ),
    "trading_account.connected": ({"tradingAccount": TRADING_ACCOUNT}, ("tradingAccount",)),
    "trading_account.disconnected": (
        {"tradingAccount": TRADING_ACCOUNT, "reason": {"enum": ["DISCONNECTED", "CREDENTIAL_REVOKED"]}},
        ("tradingAccount", "reason"),
    ),
    "webhook_endpoint.disabled": (
        {
            "endpoint": ENDPOINT,
            "reason": {
                "enum": ["GONE", "FAILING"],
                "description": "GONE: it answered 410; FAILING: for days",
            },
        },
        ("endpoint", "reason"),
    ),
}


def schema(event_type: str, *, strict: bool = False) -> Schema:
    """The JSON Schema of a ``event_type`` body. ``strict``: no property beyond the documented ones."""
    if event_type not in EXTRAS:
        raise KeyError(event_type)
    extra, required = EXTRAS[event_type]
    has_credential = not event_type.startswith("webhook_endpoint.")
    data_props: Schema = {
        "eventId": {**_UUID, "description": "the event id; also the webhook-id header"},
        "sequence": {"type": "integer", "minimum": 1, "description": "per credential, from 1, no gaps"},
        "ownerId": {"type": "string"},
    }
    if has_credential:
        data_props["credential"] = CREDENTIAL
    data_props.update(extra)
    body: Schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": event_type,
        "type": "object",
        "properties": {
            "type": {"const": event_type},
            "timestamp": {**_MS, "description": "when the change committed, ms"},
            "data": {
                "type": "object",
                "properties": data_props,
                "required": [
                    "eventId",
                    "sequence",
                    "ownerId",
                    *(["credential"] if has_credential else []),
                    *required,
                ],
            },
        },
        "required": ["type", "timestamp", "data"],
    }
    body = copy.deepcopy(body)
    if strict:
        _close(body)
    return body


def all_schemas(*, strict: bool = False) -> dict[str, Schema]:
    """Every event type's schema."""
    return {event_type: schema(event_type, strict=strict) for event_type in events.EVENT_TYPES}


def _close(node: Any) -> None:
    if isinstance(node, dict):
        if "properties" in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)
