"""Credential endpoints over HTTP: create, verify, get, list, rotate, revoke, and owner isolation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from engine import CredentialEngine
from engine.testing import FakeVenue

CREATE = "/api/v3/credential/create"
SECRETS = ("binance-secret-0001", "binance-secret-0002", "okx-secret-0001", "okx-pass-1")


def no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


async def test_create_answers_a_pending_credential_with_a_masked_key(
    api: Any, create_body: Callable[..., Any]
) -> None:
    """Create answers 200 with docs/api-dialect.md §4's fields, PENDING, the key masked and no secret anywhere."""
    reply = await api.post(CREATE, create_body())
    assert reply.status == 200
    data = reply.data
    assert data["status"] == "PENDING"
    assert data["venue"] == "BINANCE"
    assert data["credentialType"] == data["type"] == "EXCHANGE"
    assert data["nickname"] == data["name"] == "My Binance API"
    assert data["userId"] == "owner-1"
    assert data["apiKey"].endswith("***") and data["apiKey"] != "binance-key-0001"
    assert data["identities"] == []
    assert isinstance(data["createdAt"], int) and data["createdAt"] > 1_600_000_000_000
    assert "apiSecret" not in data
    no_secret_in(reply.text)


async def test_create_accepts_seed_02_spellings(api: Any) -> None:
    """docs/api-dialect.md §4's body (name, type, no credentialType) creates the same credential."""
    reply = await api.post(
        CREATE,
        {
            "venue": "binance",
            "apiKey": "binance-key-0001",
            "apiSecret": "binance-secret-0001",
            "name": "K",
            "type": "EXCHANGE",
        },
    )
    assert reply.status == 200
    assert reply.data["nickname"] == "K"
    assert reply.data["credentialType"] == "EXCHANGE"


async def test_create_refuses_two_spellings_that_disagree(api: Any, create_body: Callable[..., Any]) -> None:
    """nickname and name with different values are refused naming the field, not guessed between."""
    reply = await api.post(CREATE, create_body(name="other"))
    assert reply.status == 400
    assert reply.body["errno"] == -100001
    assert "nickname" in reply.body["error"]


async def test_create_then_verification_makes_it_verified(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """The enqueued verification runs in the server's workers: get shows VERIFIED with the identities."""
    created = (await api.post(CREATE, create_body())).data
    await eng.run_until_idle()
    got = await api.get("/api/v3/credential/get", {"credentialId": created["credentialId"]})
    assert got.status == 200
    assert got.data["status"] == "VERIFIED"
    assert got.data["identities"] == ["margin", "spot"]
    assert got.data["venueAccountId"] == "uid-b1"
    assert got.data["permissions"]["withdraw"] is False


async def test_duplicate_key_is_409(api: Any, create_body: Callable[..., Any]) -> None:
    """The same API key twice for one owner answers 409 with the duplicate errno."""
    assert (await api.post(CREATE, create_body())).status == 200
    reply = await api.post(CREATE, create_body(nickname="again"))
    assert reply.status == 409
    assert reply.body["errno"] == -100004
    assert "already exists" in reply.body["error"]
    assert "binance-key-0001" not in reply.text


async def test_same_key_for_another_owner_is_not_a_duplicate(
    api: Any, create_body: Callable[..., Any]
) -> None:
    """Duplicate detection is per owner: another owner may store the same key."""
    assert (await api.post(CREATE, create_body())).status == 200
    assert (await api.post(CREATE, create_body(), owner="owner-2")).status == 200


async def test_okx_without_passphrase_is_400_naming_it(api: Any) -> None:
    """OKX requires apiPassphrase (docs/api-dialect.md §4): the error names the field."""
    reply = await api.post(CREATE, {"venue": "OKX", "apiKey": "okx-key-0001", "apiSecret": "okx-secret-0001"})
    assert reply.status == 400
    assert reply.body["error"].startswith("apiPassphrase")


async def test_verify_enqueues_and_answers_the_credential(
    api: Any, eng: CredentialEngine, fake: FakeVenue, create_body: Callable[..., Any]
) -> None:
    """Verify answers the credential now and probes again in the background."""
    created = (await api.post(CREATE, create_body())).data
    await eng.run_until_idle()
    calls = len(fake.calls)
    reply = await api.post("/api/v3/credential/verify", {"credentialId": created["credentialId"]})
    assert reply.status == 200
    assert reply.data["credentialId"] == created["credentialId"]
    await eng.run_until_idle()
    assert len(fake.calls) == calls + 1


async def test_list_filters_and_paginates(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """List honours credentialStatus, credentialType, venue, offset and limit, with pagination (api-dialect §6)."""
    await api.post(CREATE, create_body())
    await api.post(
        CREATE, create_body(apiKey="binance-key-0002", apiSecret="binance-secret-0002", nickname="two")
    )
    await api.post(CREATE, create_body(apiKey="unknown-key-1", apiSecret="x-secret", nickname="bad"))
    await api.post(
        CREATE,
        {
            "venue": "OKX",
            "apiKey": "okx-key-0001",
            "apiSecret": "okx-secret-0001",
            "apiPassphrase": "okx-pass-1",
        },
    )
    await eng.run_until_idle()
    everything = await api.get("/api/v3/credential/list")
    assert everything.body["pagination"] == {"offset": 0, "limit": 50, "total": 4}
    verified = await api.get("/api/v3/credential/list", {"credentialStatus": "VERIFIED"})
    assert verified.body["pagination"]["total"] == 3
    assert {c["status"] for c in verified.data} == {"VERIFIED"}
    failed = await api.get("/api/v3/credential/list", {"status": "failed"})
    assert [c["nickname"] for c in failed.data] == ["bad"]
    assert failed.data[0]["failureReason"] == "INVALID_KEY"
    okx = await api.get("/api/v3/credential/list", {"venue": "OKX", "credentialType": "EXCHANGE"})
    assert [c["venue"] for c in okx.data] == ["OKX"]
    broker = await api.get("/api/v3/credential/list", {"type": "BROKER"})
    assert broker.data == [] and broker.body["pagination"]["total"] == 0
    page = await api.get("/api/v3/credential/list", {"offset": "1", "limit": "2"})
    assert len(page.data) == 2
    assert page.body["pagination"] == {"offset": 1, "limit": 2, "total": 4}


async def test_list_refuses_bad_paging(api: Any) -> None:
    """Non-integer, negative or too large paging values are 400 naming the parameter."""
    for params, field in (
        ({"limit": "abc"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"limit": "501"}, "limit"),
    ):
        reply = await api.get("/api/v3/credential/list", params)
        assert reply.status == 400, params
        assert reply.body["error"].startswith(field)


async def test_rotate_stages_then_promotes(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """Rotate answers a pending rotation; once verified the new masked key is current."""
    created = (await api.post(CREATE, create_body())).data
    await eng.run_until_idle()
    reply = await api.post(
        "/api/v3/credential/rotate",
        {
            "credentialId": created["credentialId"],
            "apiKey": "binance-key-0002",
            "apiSecret": "binance-secret-0002",
        },
    )
    assert reply.status == 200
    assert reply.data["status"] == "VERIFIED"
    assert reply.data["pendingRotation"]["secretVersion"] == 2
    await eng.run_until_idle()
    after = (await api.get("/api/v3/credential/get", {"credentialId": created["credentialId"]})).data
    assert after["pendingRotation"] is None
    assert after["secretVersion"] == 2
    assert after["apiKey"] == reply.data["pendingRotation"]["apiKey"]
    no_secret_in(reply.text)


async def test_rotate_immediate_goes_pending(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """immediate=true (compromised key) answers PENDING until the new keys verify."""
    created = (await api.post(CREATE, create_body())).data
    await eng.run_until_idle()
    body = {
        "credentialId": created["credentialId"],
        "apiKey": "binance-key-0002",
        "apiSecret": "binance-secret-0002",
        "immediate": True,
    }
    reply = await api.post("/api/v3/credential/rotate", body)
    assert reply.status == 200
    assert reply.data["status"] == "PENDING"
    await eng.run_until_idle()
    got = await api.get("/api/v3/credential/get", {"credentialId": created["credentialId"]})
    assert got.data["status"] == "VERIFIED"


async def test_rotate_twice_is_409_rotation_pending(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """A second staged rotation while one waits answers 409 with its own errno."""
    created = (await api.post(CREATE, create_body())).data
    await eng.run_until_idle()
    body = {
        "credentialId": created["credentialId"],
        "apiKey": "binance-key-0002",
        "apiSecret": "binance-secret-0002",
    }
    await eng.queue.stop()  # nobody works the queue: the rotation stays staged
    assert (await api.post("/api/v3/credential/rotate", body)).status == 200
    again = await api.post("/api/v3/credential/rotate", {**body, "apiKey": "binance-key-0003"})
    assert again.status == 409
    assert again.body["errno"] == -100007


async def test_revoke_is_terminal(api: Any, eng: CredentialEngine, create_body: Callable[..., Any]) -> None:
    """Revoke answers REVOKED; revoking or rotating again is 409 with the transition errno."""
    created = (await api.post(CREATE, create_body())).data
    await eng.run_until_idle()
    reply = await api.post("/api/v3/credential/revoke", {"credentialId": created["credentialId"]})
    assert reply.status == 200
    assert reply.data["status"] == "REVOKED"
    assert isinstance(reply.data["revokedAt"], int)
    again = await api.post("/api/v3/credential/revoke", {"credentialId": created["credentialId"]})
    assert again.status == 409 and again.body["errno"] == -100006
    rotate = await api.post(
        "/api/v3/credential/rotate",
        {
            "credentialId": created["credentialId"],
            "apiKey": "binance-key-0002",
            "apiSecret": "binance-secret-0002",
        },
    )
    assert rotate.status == 409 and rotate.body["errno"] == -100006


async def test_other_owners_ids_answer_404(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """Every endpoint taking a credential id answers 404 for another owner's credential, and lists hide it."""
    cid = (await api.post(CREATE, create_body())).data["credentialId"]
    await eng.run_until_idle()
    other = "owner-2"
    assert (await api.get("/api/v3/credential/get", {"credentialId": cid}, owner=other)).status == 404
    for path, body in (
        ("/api/v3/credential/verify", {"credentialId": cid}),
        ("/api/v3/credential/rotate", {"credentialId": cid, "apiKey": "binance-key-0002", "apiSecret": "s"}),
        ("/api/v3/credential/revoke", {"credentialId": cid}),
        ("/api/v3/tradingAccount/connect", {"credentialId": cid}),
    ):
        reply = await api.post(path, body, owner=other)
        assert reply.status == 404, path
        assert reply.body["errno"] == -100003
    listed = await api.get("/api/v3/credential/list", owner=other)
    assert listed.data == []
    mine = await api.get("/api/v3/credential/get", {"credentialId": cid})
    assert mine.data["status"] == "VERIFIED"  # nothing the other owner did touched it


async def test_unknown_and_malformed_ids(api: Any) -> None:
    """A well-formed unknown id is 404; a malformed one is 400 naming credentialId."""
    unknown = await api.get(
        "/api/v3/credential/get", {"credentialId": "00000000-0000-0000-0000-000000000000"}
    )
    assert unknown.status == 404
    bad = await api.get("/api/v3/credential/get", {"credentialId": "nope"})
    assert bad.status == 400 and bad.body["error"].startswith("credentialId")
    missing = await api.get("/api/v3/credential/get")
    assert missing.status == 400 and bad.body["errno"] == -100001


async def test_responses_never_hold_secrets(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """After a full lifecycle, no answer of any read endpoint holds a secret or a passphrase."""
    await api.post(CREATE, create_body())
    await api.post(
        CREATE,
        {
            "venue": "OKX",
            "apiKey": "okx-key-0001",
            "apiSecret": "okx-secret-0001",
            "apiPassphrase": "okx-pass-1",
        },
    )
    await eng.run_until_idle()
    listed = await api.get("/api/v3/credential/list")
    no_secret_in(listed.text)
    for cred in listed.data:
        got = await api.get("/api/v3/credential/get", {"credentialId": cred["credentialId"]})
        no_secret_in(got.text)
        assert "okx-key-0001" not in json.dumps(got.body)
