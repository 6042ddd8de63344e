"""The OpenAPI document's component schemas: the JSON the REST API reads and writes (see engine/api/openapi.py)."""

from __future__ import annotations

from typing import Any

from engine.broker.minting import SUB_ACCOUNT_PATTERN
from engine.broker.settings import MAX_ALLOWLIST
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
UUID_FIELD = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$",
    "description": "a UUID in its 36-character form (either case)",
}

# The engine trims text fields before its checks (engine/validation.py): what it trims is Python's whitespace
# (str.isspace), written out here so that every regular-expression dialect reads the same set; what it refuses
# inside a field are control characters (engine/validation.py _CONTROL). JSON Schema patterns are ECMA-262
# (https://json-schema.org/draft/2020-12/json-schema-core#section-6.4); only \uXXXX escapes are used.
_WS = "\\u0009-\\u000d\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
_CTRL = "\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f"
_TOKEN = f"[^{_WS}{_CTRL}]"  # a character of a key part: neither whitespace nor control


def _trimmed(inner: str) -> str:
    """A pattern: ``inner`` with any whitespace around it (the engine trims it off)."""
    return f"^[{_WS}]*{inner}[{_WS}]*$"


# Bounds count the trimmed text (what the engine keeps), so they are in the patterns, not in maxLength.
KEY_PART = _trimmed(f"{_TOKEN}{{1,512}}")  # apiKey: one token (whitespace inside is a copy-paste slip: 422)
SECRET = _trimmed(f"{_TOKEN}(?:[^{_CTRL}]{{0,8190}}{_TOKEN})?")  # apiSecret: PEM secrets span lines
OPTIONAL_PART = _trimmed(f"(?:{_TOKEN}{{1,128}})?")  # apiPassphrase: blank is "not given"
NAME = _trimmed(f"(?:{_TOKEN}(?:[^{_CTRL}\\u000a\\u000d]{{0,98}}{_TOKEN})?)?")  # one line; blank: none
TEXT = _trimmed(f"(?:{_TOKEN}(?:[^\\u0000-\\u0008\\u000b-\\u001f\\u007f]{{0,254}}{_TOKEN})?)?")  # description
ACCOUNT_TYPE = _trimmed("[A-Za-z][A-Za-z0-9_]{0,31}")
_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_URI_CHAR = "(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})"  # RFC 3986 pchar, "/" and "?"
URL = f"^https?://(?:{_LABEL}\\.)*{_LABEL}(?::{_PORT})?(?:[/?]{_URI_CHAR}*)?$"


def api_key() -> Schema:
    return {"type": "string", "pattern": KEY_PART, "description": "at most 512 characters once trimmed"}


def api_secret() -> Schema:
    return {"type": "string", "pattern": SECRET, "description": "at most 8192 characters once trimmed"}


def passphrase(description: str) -> Schema:
    return {"type": "string", "pattern": OPTIONAL_PART, "description": description}


def name(description: str = "at most 100 characters once trimmed, one line; blank: none") -> Schema:
    return {"type": "string", "pattern": NAME, "description": description}


_PHRASE_NOTE = (
    "at most 128 characters once trimmed; required (not blank) for OKX; blank or absent otherwise means none "
    "(Coinbase Exchange keys need one too: 422)"
)
# OKX keys need their passphrase (docs/api-dialect.md §5): 400 "apiPassphrase: is required for OKX" otherwise
OKX_PASSPHRASE: Schema = {
    "if": {"required": ["venue"], "properties": {"venue": {"const": "OKX"}}},
    "then": {
        "required": ["apiPassphrase"],
        "properties": {"apiPassphrase": {"pattern": _trimmed(f"{_TOKEN}{{1,128}}")}},
    },
}


def one_spelling(*pairs: tuple[str, str]) -> Schema:
    """A field has two spellings (docs/api-dialect.md §4): a request gives one of them, never both (400)."""
    return {"not": {"anyOf": [{"required": [a, b]} for a, b in pairs]}}


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
            "subAccountKeys": {
                "type": "boolean",
                "description": "present (true) only for a BROKER master key that may manage its sub-accounts' "
                "API keys (mint)",
            },
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
            "mintedFrom",
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
            "mintedFrom": {
                "oneOf": [
                    {
                        "type": "object",
                        "description": "a credential minted through a BROKER credential: its parent and sub-account",
                        "required": ["parentCredentialId", "subAccount"],
                        "properties": {"parentCredentialId": UUID, "subAccount": {"type": "string"}},
                    },
                    {"type": "null"},
                ]
            },
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
        "description": "Text fields are trimmed; apiKey, apiSecret and apiPassphrase must also fit the venue's "
        "key format (422 otherwise: e.g. Binance and Bybit 8-128 letters and digits, a Coinbase CDP secret a PEM "
        "EC P-256 or Ed25519 key), which depends on the venue and is checked by its probe (venues/*.py). "
        "credentialType and type are one field in two spellings, and so are nickname and name: give one of "
        "each, not both (400).",
        "required": ["venue", "apiKey", "apiSecret"],
        "properties": {
            "venue": ref("Venue"),
            "credentialType": ref("CredentialType"),
            "type": {
                **ref("CredentialType"),
                "description": "docs/api-dialect.md §4's spelling of credentialType",
            },
            "apiKey": api_key(),
            "apiSecret": api_secret(),
            "apiPassphrase": passphrase(_PHRASE_NOTE),
            "nickname": name(),
            "name": name("another spelling of nickname"),
        },
        "allOf": [OKX_PASSPHRASE, one_spelling(("credentialType", "type"), ("nickname", "name"))],
    },
    "CredentialIdRequest": {
        "type": "object",
        "required": ["credentialId"],
        "properties": {"credentialId": UUID_FIELD},
    },
    "RotateCredentialBody": {
        "description": "Either new keys (RotateCredentialRequest), or automatic: true for a credential minted "
        "through a BROKER credential (RotateAutomatically: the engine mints the new key itself), never both (400).",
        "oneOf": [ref("RotateCredentialRequest"), ref("RotateAutomatically")],
    },
    "RotateCredentialRequest": {
        "type": "object",
        "description": "The new keys follow the rules of CreateCredentialRequest for the credential's venue "
        "(an OKX credential's new keys need apiPassphrase: 400 without it).",
        "required": ["credentialId", "apiKey", "apiSecret"],
        "properties": {
            "credentialId": UUID_FIELD,
            "apiKey": api_key(),
            "apiSecret": api_secret(),
            "apiPassphrase": passphrase(_PHRASE_NOTE),
            "immediate": {
                "type": "boolean",
                "default": False,
                "description": "compromised key: destroy the old keys now (status PENDING until the new verify)",
            },
            "automatic": {"type": "boolean", "const": False, "default": False},
        },
    },
    "RotateAutomatically": {
        "type": "object",
        "description": "The engine mints a new key for the same sub-account, stages and verifies it, promotes "
        "it, and deletes the old key at the venue after the rotation grace. No keys (400 with any of apiKey, "
        "apiSecret, apiPassphrase); 409 (errno -100021) for a credential the engine did not mint.",
        "required": ["credentialId", "automatic"],
        "properties": {
            "credentialId": UUID_FIELD,
            "automatic": {"type": "boolean", "const": True},
            "immediate": {"type": "boolean", "const": False, "default": False},
        },
        "not": {"anyOf": [{"required": [key]} for key in ("apiKey", "apiSecret", "apiPassphrase")]},
    },
    "MintCredentialRequest": {
        "type": "object",
        "description": "A key for subAccount, created through the master key of BROKER credential "
        "brokerCredentialId and stored as a new EXCHANGE credential. Least privilege: read and trade unless "
        "narrowed, never withdraw. nickname and name are one field in two spellings: give one, not both (400).",
        "required": ["brokerCredentialId", "subAccount"],
        "properties": {
            "brokerCredentialId": UUID_FIELD,
            "subAccount": {
                "type": "string",
                "pattern": "^" + SUB_ACCOUNT_PATTERN + "$",
                "description": "the venue's sub-account id (a uid, sub-account name or email), one of the BROKER "
                "credential's identities as sub:<id>",
            },
            "permissions": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "read": {"type": "boolean", "default": True},
                    "trade": {"type": "boolean", "default": True},
                    "withdraw": {
                        "type": "boolean",
                        "const": False,
                        "description": "a minted key never withdraws (true: 400, errno -100023)",
                    },
                },
            },
            "ipAllowlist": {
                "type": "array",
                "maxItems": MAX_ALLOWLIST,
                "items": {
                    "anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"}]
                },
                "description": "IP addresses the key is restricted to (absent: the engine's ENGINE_MINT_IP_ALLOWLIST)",
            },
            "nickname": name(),
            "name": name("another spelling of nickname"),
        },
        "allOf": [one_spelling(("nickname", "name"))],
    },
    "RevokeCredentialRequest": {
        "type": "object",
        "required": ["credentialId"],
        "properties": {
            "credentialId": UUID_FIELD,
            "cascade": {
                "type": "boolean",
                "default": True,
                "description": "disconnect ACTIVE trading accounts; false answers 409 while any exist",
            },
        },
    },
    "ConnectTradingAccountRequest": {
        "description": "Either keys (ConnectWithKeys: the keys are stored, verified and connected in one call), "
        "or credentialId of a VERIFIED credential (ConnectWithCredential), never both (400).",
        "oneOf": [ref("ConnectWithKeys"), ref("ConnectWithCredential")],
    },
    "ConnectWithKeys": {
        "type": "object",
        "description": "docs/api-dialect.md §8's body; the rules of CreateCredentialRequest apply to the keys. "
        "name and nickname are one field in two spellings: give one, not both (400).",
        "required": ["venue", "apiKey", "apiSecret"],
        "properties": {
            "venue": ref("Venue"),
            "apiKey": api_key(),
            "apiSecret": api_secret(),
            "apiPassphrase": passphrase(_PHRASE_NOTE),
            "name": name(),
            "nickname": name("another spelling of name"),
            "accountType": ref("AccountType"),
        },
        "allOf": [
            OKX_PASSPHRASE,
            one_spelling(("name", "nickname")),
            {"not": {"required": ["credentialId"]}},
        ],
    },
    "ConnectWithCredential": {
        "type": "object",
        "description": "A VERIFIED credential's id; no keys (400 with any of venue, apiKey, apiSecret, "
        "apiPassphrase). name and nickname are one field in two spellings: give one, not both (400).",
        "required": ["credentialId"],
        "properties": {
            "credentialId": UUID_FIELD,
            "name": name(),
            "nickname": name("another spelling of name"),
            "accountType": ref("AccountType"),
        },
        "allOf": [
            one_spelling(("name", "nickname")),
            {
                "not": {
                    "anyOf": [
                        {"required": [key]} for key in ("venue", "apiKey", "apiSecret", "apiPassphrase")
                    ]
                }
            },
        ],
    },
    "AccountType": {
        "type": "string",
        "pattern": ACCOUNT_TYPE,
        "description": "SPOT, MARGIN, FUTURES, ... (any case): one of the credential's identities (400 "
        "otherwise); default: its first identity",
    },
    "TradingAccountIdRequest": {
        "type": "object",
        "required": ["tradingAccountId"],
        "properties": {"tradingAccountId": UUID_FIELD},
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
            "url": ref("WebhookUrl"),
            "eventTypes": {
                "type": "array",
                "items": ref("EventType"),
                "description": "absent or empty ([]): every type (null is refused like any wrong value)",
            },
            "description": {
                "type": "string",
                "pattern": TEXT,
                "description": "at most 256 characters once trimmed; tabs and line breaks allowed",
            },
        },
    },
    "UpdateWebhookRequest": {
        "type": "object",
        "required": ["endpointId"],
        "properties": {
            "endpointId": UUID_FIELD,
            "enabled": {"type": "boolean", "description": "false: pending deliveries are given up"},
            "eventTypes": {"type": "array", "items": ref("EventType"), "description": "empty: every type"},
            "url": ref("WebhookUrl"),
        },
    },
    "WebhookUrl": {
        "type": "string",
        "format": "uri",
        "maxLength": 2048,
        "pattern": URL,
        "description": "https; http, and hosts that resolve to private, loopback or link-local addresses, only "
        "where the operator allows them (ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS; 400 otherwise, also for a host that "
        "does not resolve); no user info, no fragment",
    },
    "EndpointIdRequest": {
        "type": "object",
        "required": ["endpointId"],
        "properties": {"endpointId": UUID_FIELD},
    },
    "DeliveryIdRequest": {
        "type": "object",
        "required": ["deliveryId"],
        "properties": {"deliveryId": UUID_FIELD},
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "ReadinessFailure": {
        "type": "object",
        "description": "503 of /readyz: the error envelope whose data names each check",
        "required": ["data", "success", "errno", "error"],
        "properties": {
            "data": ref("Readiness"),
            "success": {"const": False},
            "errno": {"type": "integer", "maximum": -1},
            "error": {"type": "string"},
        },
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
