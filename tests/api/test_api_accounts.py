"""Trading account endpoints over HTTP: connect (both forms), disconnect, get, list, and isolation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine import CredentialEngine
from venues.base import Outcome

CONNECT = "/api/v3/tradingAccount/connect"


async def verified_credential(api: Any, eng: CredentialEngine, create_body: Callable[..., Any]) -> str:
    cid: str = (await api.post("/api/v3/credential/create", create_body())).data["credentialId"]
    await eng.run_until_idle()
    return cid


async def test_connect_with_a_verified_credential(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """credentialId + accountType + name connects an ACTIVE account of that identity."""
    cid = await verified_credential(api, eng, create_body)
    reply = await api.post(CONNECT, {"credentialId": cid, "accountType": "MARGIN", "name": "Margin desk"})
    assert reply.status == 200
    account = reply.data
    assert account["status"] == "ACTIVE"
    assert account["accountType"] == "MARGIN"
    assert account["name"] == "Margin desk"
    assert account["credentialId"] == cid
    assert account["venue"] == "BINANCE"
    assert account["userId"] == "owner-1"


async def test_connect_with_keys_creates_verifies_and_connects(api: Any) -> None:
    """docs/api-dialect.md §8's body with keys: the answer is the ACTIVE account, and the credential is VERIFIED."""
    reply = await api.post(
        CONNECT,
        {
            "venue": "BINANCE",
            "apiKey": "binance-key-0001",
            "apiSecret": "binance-secret-0001",
            "name": "My Binance",
        },
    )
    assert reply.status == 200, reply.body
    assert reply.data["status"] == "ACTIVE"
    assert (
        reply.data["accountType"] == "MARGIN"
    )  # the first identity, as docs/api-dialect.md §8 leaves it optional
    cred = await api.get("/api/v3/credential/get", {"credentialId": reply.data["credentialId"]})
    assert cred.data["status"] == "VERIFIED"


async def test_connect_with_bad_keys_is_seed_05s_error(api: Any) -> None:
    """Keys the exchange refuses answer the example error of docs/api-dialect.md §9 exactly."""
    reply = await api.post(
        CONNECT, {"venue": "BINANCE", "apiKey": "not-a-known-key", "apiSecret": "whatever", "name": "x"}
    )
    assert reply.status == 400
    assert reply.body == {
        "data": None,
        "success": False,
        "errno": -120001,
        "error": "Invalid API credentials for BINANCE",
    }
    listed = await api.get("/api/v3/credential/list", {"credentialStatus": "VERIFIED"})
    assert listed.data == []


async def test_connect_twice_is_409(api: Any, eng: CredentialEngine, create_body: Callable[..., Any]) -> None:
    """The same account type of one credential connected twice answers 409 naming accountType."""
    cid = await verified_credential(api, eng, create_body)
    assert (await api.post(CONNECT, {"credentialId": cid, "accountType": "spot"})).status == 200
    again = await api.post(CONNECT, {"credentialId": cid, "accountType": "spot"})
    assert again.status == 409
    assert again.body["errno"] == -100005
    assert "already connected" in again.body["error"]


async def test_connect_refuses_unreached_account_type(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """An account type the credential does not reach is 400 naming accountType."""
    cid = await verified_credential(api, eng, create_body)
    reply = await api.post(CONNECT, {"credentialId": cid, "accountType": "futures"})
    assert reply.status == 400
    assert reply.body["error"].startswith("accountType")


async def test_connect_a_pending_credential_is_409(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """A credential that is not VERIFIED cannot connect accounts (409, the generic conflict errno)."""
    await eng.queue.stop()  # keep it PENDING
    cid = (await api.post("/api/v3/credential/create", create_body())).data["credentialId"]
    reply = await api.post(CONNECT, {"credentialId": cid})
    assert reply.status == 409
    assert reply.body["errno"] == -100005


async def test_connect_refuses_both_forms_at_once(api: Any) -> None:
    """credentialId together with keys is ambiguous: 400 naming credentialId."""
    reply = await api.post(
        CONNECT,
        {
            "credentialId": "00000000-0000-0000-0000-000000000001",
            "venue": "BINANCE",
            "apiKey": "k",
            "apiSecret": "s",
        },
    )
    assert reply.status == 400
    assert reply.body["error"].startswith("credentialId")


async def test_disconnect_get_and_list(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """Disconnect answers DISABLED (idempotently); get and list show it; list filters by status."""
    cid = await verified_credential(api, eng, create_body)
    spot = (await api.post(CONNECT, {"credentialId": cid, "accountType": "spot"})).data
    margin = (await api.post(CONNECT, {"credentialId": cid, "accountType": "margin"})).data
    off = await api.post("/api/v3/tradingAccount/disconnect", {"tradingAccountId": spot["tradingAccountId"]})
    assert off.status == 200 and off.data["status"] == "DISABLED"
    again = await api.post(
        "/api/v3/tradingAccount/disconnect", {"tradingAccountId": spot["tradingAccountId"]}
    )
    assert again.status == 200 and again.data["status"] == "DISABLED"
    got = await api.get("/api/v3/tradingAccount/get", {"tradingAccountId": margin["tradingAccountId"]})
    assert got.data["status"] == "ACTIVE"
    everything = await api.get("/api/v3/tradingAccount/list")
    assert everything.body["pagination"]["total"] == 2
    active = await api.get("/api/v3/tradingAccount/list", {"status": "ACTIVE", "credentialId": cid})
    assert [a["tradingAccountId"] for a in active.data] == [margin["tradingAccountId"]]
    assert (await api.get("/api/v3/tradingAccount/list", {"venue": "OKX"})).data == []


async def test_revoke_disconnects_accounts_or_refuses_without_cascade(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """cascade=false with an ACTIVE account is 409 (docs/api-dialect.md §7); the default cascade disconnects it."""
    cid = await verified_credential(api, eng, create_body)
    account = (await api.post(CONNECT, {"credentialId": cid})).data
    refused = await api.post("/api/v3/credential/revoke", {"credentialId": cid, "cascade": False})
    assert refused.status == 409 and refused.body["errno"] == -100008
    revoked = await api.post("/api/v3/credential/revoke", {"credentialId": cid})
    assert revoked.data["status"] == "REVOKED"
    got = await api.get("/api/v3/tradingAccount/get", {"tradingAccountId": account["tradingAccountId"]})
    assert got.data["status"] == "DISABLED"


async def test_other_owners_accounts_answer_404(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """Another owner's trading account id answers 404 on get and disconnect; lists do not show it."""
    cid = await verified_credential(api, eng, create_body)
    aid = (await api.post(CONNECT, {"credentialId": cid})).data["tradingAccountId"]
    other = "owner-2"
    assert (await api.get("/api/v3/tradingAccount/get", {"tradingAccountId": aid}, owner=other)).status == 404
    off = await api.post("/api/v3/tradingAccount/disconnect", {"tradingAccountId": aid}, owner=other)
    assert off.status == 404 and off.body["errno"] == -100003
    assert (await api.get("/api/v3/tradingAccount/list", owner=other)).data == []
    mine = await api.get("/api/v3/tradingAccount/get", {"tradingAccountId": aid})
    assert mine.data["status"] == "ACTIVE"


async def test_connect_with_keys_that_fail_for_good_reason(api: Any, fake: Any) -> None:
    """A key the exchange refuses for a permanent reason (IP not allowed) is a 400 (docs/api-dialect.md §9) too."""
    fake.fail_key("binance-ip-blocked", Outcome.IP_NOT_ALLOWED, "secret-ip")
    reply = await api.post(
        CONNECT, {"venue": "BINANCE", "apiKey": "binance-ip-blocked", "apiSecret": "secret-ip"}
    )
    assert reply.status == 400
    assert reply.body["errno"] == -120001
