"""The rules the OpenAPI document states and the server applies, one by one (schemathesis checks them at large
in test_api_contract.py; these name each rule and pin both sides of it).

Each request is checked twice: the server's answer, and whether the document's request schema accepts the body
(openapi-schema-validator, the same OpenAPI 3.1 dialect): a body the server refuses with 400 is one the
document refuses, and one it accepts is one the document accepts.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator

from engine.api import openapi

DOCUMENT = openapi.document()
INVALID_REQUEST = -100001


def documented(schema_name: str, body: dict[str, Any]) -> bool:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": DOCUMENT["components"]}
    return bool(OAS31Validator(schema).is_valid(body))


CREATE = {"venue": "BINANCE", "apiKey": "binance-key-0001", "apiSecret": "binance-secret-0001"}


@pytest.mark.parametrize(
    ("extra", "accepted"),
    [
        ({"nickname": "desk"}, True),
        ({"name": "desk"}, True),
        ({"nickname": "desk", "name": "desk"}, False),  # both spellings, even the same value
        ({"credentialType": "EXCHANGE", "type": "EXCHANGE"}, False),
        ({"nickname": "  padded  "}, True),  # trimmed
        ({"nickname": "two\nlines"}, False),
        ({"nickname": " " * 150 + "x" * 100 + "\t"}, True),  # 100 characters once trimmed
        ({"nickname": "x" * 101}, False),
    ],
)
async def test_create_fields_server_and_document_agree(
    api: Any, extra: dict[str, Any], accepted: bool
) -> None:
    """One spelling per field, trimmed bounds, one-line names: the server and the document say the same."""
    body = {**CREATE, **extra}
    reply = await api.post("/api/v3/credential/create", body)
    assert (reply.status == 200) is accepted, reply.body
    if not accepted:
        assert (reply.status, reply.body["errno"]) == (400, INVALID_REQUEST)
    assert documented("CreateCredentialRequest", body) is accepted


@pytest.mark.parametrize(
    ("key", "accepted"),
    [("binance-key-0001", True), ("  binance-key-0001\n", True), ("binance key", False), ("", False)],
)
def test_api_key_pattern(key: str, accepted: bool) -> None:
    """apiKey: one token, whitespace around it trimmed (inside: 422 on the server, refused by the document)."""
    assert documented("CreateCredentialRequest", {**CREATE, "apiKey": key}) is accepted


async def test_okx_needs_its_passphrase(api: Any) -> None:
    """OKX without apiPassphrase (or with a blank one) is 400, and the document's if/then says so."""
    body = {"venue": "OKX", "apiKey": "okx-key-0001", "apiSecret": "okx-secret-0001"}
    for sent in (body, {**body, "apiPassphrase": "   "}):
        reply = await api.post("/api/v3/credential/create", sent)
        assert (reply.status, reply.body["error"]) == (400, "apiPassphrase: is required for OKX")
        assert not documented("CreateCredentialRequest", sent)
    good = {**body, "apiPassphrase": "okx-pass-1"}
    assert (await api.post("/api/v3/credential/create", good)).status == 200
    assert documented("CreateCredentialRequest", good)
    assert documented("CreateCredentialRequest", {**CREATE, "apiPassphrase": " "})  # blank: none, not OKX


@pytest.mark.parametrize(
    "credential_id",
    [
        "{%s}" % uuid.UUID(int=1),  # noqa: UP031
        uuid.UUID(int=1).hex,  # no hyphens
        f" {uuid.UUID(int=1)} ",
        f"urn:uuid:{uuid.UUID(int=1)}",
    ],
)
async def test_ids_are_uuids_in_their_36_character_form(api: Any, credential_id: str) -> None:
    """Forms Python's uuid.UUID would read are refused (400), as the document's pattern refuses them; the
    canonical form in either case is an id (404 here: no such credential)."""
    reply = await api.get("/api/v3/credential/get", {"credentialId": credential_id})
    assert (reply.status, reply.body["errno"]) == (400, INVALID_REQUEST)
    assert reply.body["error"].startswith("credentialId: must be a UUID")
    assert not documented("CredentialIdRequest", {"credentialId": credential_id})
    for canonical in (str(uuid.UUID(int=1)), str(uuid.UUID(int=2**128 - 1)).upper()):
        assert (await api.get("/api/v3/credential/get", {"credentialId": canonical})).status == 404
        assert documented("CredentialIdRequest", {"credentialId": canonical})


async def test_body_flags_are_json_booleans(api: Any) -> None:
    """``"cascade": "true"`` in a JSON body is a wrong type (400), as the document's boolean says."""
    body = {"credentialId": str(uuid.uuid4()), "cascade": "true"}
    reply = await api.post("/api/v3/credential/revoke", body)
    assert (reply.status, reply.body["error"]) == (400, "cascade: must be a boolean")
    assert not documented("RevokeCredentialRequest", body)


async def test_event_types_is_a_list(api: Any) -> None:
    """An object for eventTypes is refused (400) rather than read as the collection of its keys."""
    body = {"url": "http://127.0.0.1:9/hooks", "eventTypes": {"credential.created": 1}}
    reply = await api.post("/api/v3/webhook/create", body)
    assert (reply.status, reply.body["error"]) == (400, "eventTypes: must be a list of event types")
    assert not documented("CreateWebhookRequest", body)
    listed = {"url": "http://127.0.0.1:9/hooks", "eventTypes": ["credential.created"]}
    assert (await api.post("/api/v3/webhook/create", listed)).status == 200
    assert documented("CreateWebhookRequest", listed)


async def test_connect_takes_keys_or_a_credential_never_both(api: Any) -> None:
    """The connect body's two branches (oneOf): keys, or credentialId; both is 400 and matches neither."""
    both = {"credentialId": str(uuid.uuid4()), "venue": "BINANCE", "apiKey": "k" * 8, "apiSecret": "s" * 8}
    reply = await api.post("/api/v3/tradingAccount/connect", both)
    assert (reply.status, reply.body["errno"]) == (400, INVALID_REQUEST)
    assert not documented("ConnectTradingAccountRequest", both)
    assert documented("ConnectTradingAccountRequest", {"credentialId": str(uuid.uuid4())})
    assert documented("ConnectTradingAccountRequest", {k: v for k, v in both.items() if k != "credentialId"})
    assert not documented(
        "ConnectTradingAccountRequest", {"credentialId": str(uuid.uuid4()), "apiPassphrase": "x"}
    )


async def test_offset_maximum(api: Any) -> None:
    """offset above the documented maximum is 400; at it, a page (empty)."""
    maximum = next(
        p for p in DOCUMENT["paths"]["/api/v3/credential/list"]["get"]["parameters"] if p["name"] == "offset"
    )
    top = maximum["schema"]["maximum"]
    assert (await api.get("/api/v3/credential/list", {"offset": str(top)})).status == 200
    over = await api.get("/api/v3/credential/list", {"offset": str(top + 1)})
    assert (over.status, over.body["error"]) == (400, f"offset: must be <= {top}")


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("http://127.0.0.1:9/hooks?x=1", True),
        ("https://hooks.example.com/in/%7Cdesk", True),
        ("https://0.com*", False),  # not a host name (the parser used to take it)
        (" http://127.0.0.1:9/hooks", False),  # sent padded
        ("http://127.0.0.1:9/a|b", False),  # not an RFC 3986 character
        ("http://127.0.0.1:70000/", False),  # no such port
    ],
)
async def test_webhook_url_server_and_document_agree(api: Any, url: str, accepted: bool) -> None:
    """The WebhookUrl pattern is the server's rule: what one refuses, the other refuses."""
    reply = await api.post("/api/v3/webhook/create", {"url": url})
    assert (reply.status == 200) is accepted, reply.body
    if not accepted:
        assert reply.body["error"].startswith("url: ")
    assert documented("CreateWebhookRequest", {"url": url}) is accepted
