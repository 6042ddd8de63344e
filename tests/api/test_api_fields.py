"""Absent is absent; an explicit ``null`` or an empty query value is a wrong value.

The table is the OpenAPI document itself: every query parameter and every request-body property of every
``/api`` operation (plus the spellings of docs/api-dialect.md that the document names in descriptions only). Each
one, sent as JSON ``null`` (body) or as an empty value (query), must answer 400 naming that field, like any
other wrong value, never "no filter" or "the default". The control: each operation with only its required
fields (every optional one absent) is not a 400.
"""

from __future__ import annotations

import uuid
from typing import Any

from engine.api import openapi
from engine.testing import FakeVenue

DOCUMENT = openapi.document()
SCHEMAS = DOCUMENT["components"]["schemas"]
INVALID_REQUEST = -100001

# a well-typed value for every property name the request bodies use (ids are unknown: 404 at most)
VALID: dict[str, Any] = {
    "venue": "BINANCE",
    "credentialType": "EXCHANGE",
    "type": "EXCHANGE",
    "apiKey": "binance-key-0001",
    "apiSecret": "binance-secret-0001",
    "apiPassphrase": "pass-1",
    "nickname": "desk",
    "name": "desk",
    "immediate": True,
    "cascade": True,
    "enabled": True,
    "accountType": "spot",
    "url": "http://127.0.0.1:9/hooks",
    "eventTypes": [],
    "description": "risk desk",
    "automatic": False,
    "subAccount": "sub-1",
    "permissions": {},
    "ipAllowlist": [],
}
# query spellings the handlers accept that the document mentions in descriptions only
QUERY_ALIASES = {
    "/api/v3/credential/list": ["status", "type"],
    "/api/v3/tradingAccount/list": ["tradingAccountStatus"],
}


def value_for(name: str) -> Any:
    return VALID.get(name, str(uuid.uuid4()))  # every other field is an id


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in DOCUMENT["paths"].items()
        if path.startswith("/api/")
        for method, operation in item.items()
    ]


def body_schema(operation: dict[str, Any]) -> dict[str, Any] | None:
    body = operation.get("requestBody")
    if body is None:
        return None
    ref: str = body["content"]["application/json"]["schema"]["$ref"]
    schema: dict[str, Any] = SCHEMAS[ref.rsplit("/", 1)[1]]
    if "oneOf" in schema:  # connect, rotate: their two bodies, every property of either
        branches = [SCHEMAS[branch["$ref"].rsplit("/", 1)[1]] for branch in schema["oneOf"]]
        properties = {name: p for branch in branches for name, p in branch["properties"].items()}
        return {"oneOf": schema["oneOf"], "properties": properties}
    return schema


def required_body(schema: dict[str, Any]) -> dict[str, Any]:
    """Only the required fields; for a oneOf of required sets (connect), the credentialId form."""
    required = schema.get("required") or (["credentialId"] if "oneOf" in schema else [])
    return {name: value_for(name) for name in required}


def required_query(operation: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: value_for(p["name"]) for p in operation.get("parameters", []) if p["required"]}


def query_names(path: str, operation: dict[str, Any]) -> list[str]:
    return [p["name"] for p in operation.get("parameters", [])] + QUERY_ALIASES.get(path, [])


def test_the_table_covers_every_route_with_inputs() -> None:
    """The document lists inputs for every /api operation, and every body property has a typed value here."""
    for method, path, operation in operations():
        schema = body_schema(operation)
        assert schema is not None or operation.get("parameters"), (method, path)
        if schema is not None:
            assert set(schema["properties"]) <= set(VALID) | {n for n in schema["properties"] if "Id" in n}


async def test_null_body_fields_are_400_naming_the_field(api: Any) -> None:
    """JSON null for any property of any request body: 400 InvalidRequest whose message starts with it."""
    wrong = []
    for _, path, operation in operations():
        schema = body_schema(operation)
        if schema is None:
            continue
        for name in schema["properties"]:
            body = {**required_body(schema), name: None}
            reply = await api.post(path, body)
            if reply.status != 400 or reply.body["errno"] != INVALID_REQUEST:
                wrong.append(f"{path} {name}=null -> {reply.status} {reply.body}")
            elif not reply.body["error"].startswith(f"{name}: "):
                wrong.append(f"{path} {name}=null -> {reply.body['error']!r} does not name {name}")
    assert not wrong, "\n".join(wrong)
    assert (await api.get("/api/v3/credential/list")).body["pagination"]["total"] == 0  # nothing stored


async def test_empty_query_values_are_400_naming_the_parameter(api: Any) -> None:
    """``?name=`` (and ``?name=%20``) for any query parameter of any route: 400 naming the parameter."""
    wrong = []
    for method, path, operation in operations():
        for name in query_names(path, operation):
            for empty in ("", " "):
                params = {**required_query(operation), name: empty}
                reply = await api.call(method, path, params=params)
                if reply.status != 400 or reply.body["errno"] != INVALID_REQUEST:
                    wrong.append(f"{path}?{name}={empty!r} -> {reply.status} {reply.body}")
                elif not reply.body["error"].startswith(f"{name}: "):
                    wrong.append(f"{path}?{name}={empty!r} -> {reply.body['error']!r} does not name {name}")
    assert not wrong, "\n".join(wrong)


async def test_absent_optional_fields_keep_their_defaults(api: Any, fake: FakeVenue) -> None:
    """The control: every operation with its required fields only answers 2xx or 404, never 400."""
    wrong = []
    for method, path, operation in operations():
        schema = body_schema(operation)
        if schema is not None:
            reply = await api.post(path, required_body(schema))
        else:
            reply = await api.call(method, path, params=required_query(operation))
        if reply.status not in (200, 404):
            wrong.append(f"{method} {path} -> {reply.status} {reply.body}")
    assert not wrong, "\n".join(wrong)
    listed = await api.get("/api/v3/credential/list")
    assert listed.body["pagination"] == {"offset": 0, "limit": 50, "total": 1}  # create's defaults applied
    assert listed.data[0]["credentialType"] == "EXCHANGE" and listed.data[0]["nickname"] is None


REQUIRED_CREATE = {k: VALID[k] for k in ("venue", "apiKey", "apiSecret")}


async def test_empty_typed_body_values_are_400(api: Any) -> None:
    """Empty text for a typed body field is a wrong value too (accountType, state-like enums, flags)."""
    cases = [
        (
            "/api/v3/tradingAccount/connect",
            {"credentialId": str(uuid.uuid4()), "accountType": ""},
            "accountType",
        ),
        ("/api/v3/credential/create", {**REQUIRED_CREATE, "credentialType": ""}, "credentialType"),
        ("/api/v3/credential/revoke", {"credentialId": str(uuid.uuid4()), "cascade": ""}, "cascade"),
        ("/api/v3/webhook/update", {"endpointId": str(uuid.uuid4()), "enabled": ""}, "enabled"),
    ]
    for path, body, name in cases:
        reply = await api.post(path, body)
        assert reply.status == 400 and reply.body["error"].startswith(f"{name}: "), (path, reply.body)
