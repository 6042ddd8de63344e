"""The simulated Binance: docs/venues.md §1 and the contract of venues/README.md."""

from __future__ import annotations

import time
from typing import Any

from venues.base import Venue
from venues.simulator import Simulator, binance

RESTRICTIONS = "/sapi/v1/account/apiRestrictions"


def test_official_vector_is_accepted() -> None:
    """The spot doc example of docs/venues.md §1.8 (first payload) verifies; one changed byte does not."""
    secret = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
    payload = (
        "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
        "&recvWindow=5000&timestamp=1499827319559"
    )
    signature = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
    assert binance.signature_valid(secret, payload, signature)
    assert binance.signature_valid(secret, payload, signature.upper())  # HMAC signatures are case-insensitive
    assert not binance.signature_valid(secret, payload.replace("price=0.1", "price=0.2"), signature)


def test_signature_must_be_the_last_parameter() -> None:
    """pop_signature splits off a trailing signature and refuses one that is not last."""
    assert binance.pop_signature("a=1&b=2&signature=ab") == ("a=1&b=2", "ab")
    assert binance.pop_signature("signature=ab") == ("", "ab")
    assert binance.pop_signature("a=1&signature=ab&b=2") == ("a=1&signature=ab&b=2", None)


async def test_api_restrictions_reports_registered_permissions(sim: Simulator, client: Any) -> None:
    """A signed apiRestrictions call answers the documented shape with the key's permissions."""
    key = sim.add_key(Venue.BINANCE, trade=True, withdraw=True, ip_allowlist=["127.0.0.1"])
    answer = await client.binance(key, RESTRICTIONS)
    assert answer.status == 200
    assert answer.body["enableReading"] is True
    assert answer.body["enableWithdrawals"] is True
    assert answer.body["enableSpotAndMarginTrading"] is True
    assert answer.body["ipRestrict"] is True
    assert answer.body["createTime"] == key.created_at_ms


async def test_read_only_key_without_ip_has_no_trading_expiry(sim: Simulator, client: Any) -> None:
    """A read-only key answers enableSpotAndMarginTrading false and no tradingAuthorityExpirationTime."""
    key = sim.add_key(Venue.BINANCE, trade=False)
    answer = await client.binance(key, RESTRICTIONS)
    assert answer.body["enableSpotAndMarginTrading"] is False
    assert answer.body["enableFutures"] is False
    assert "tradingAuthorityExpirationTime" not in answer.body


async def test_trading_key_without_ip_expires_after_30_days(sim: Simulator, client: Any) -> None:
    """docs/venues.md §1.7: trading on a key with no IP whitelist lapses 30 days after creation."""
    key = sim.add_key(Venue.BINANCE, trade=True)
    answer = await client.binance(key, RESTRICTIONS)
    assert answer.body["tradingAuthorityExpirationTime"] == key.created_at_ms + 30 * 86_400_000


async def test_spot_account_reports_the_uid(sim: Simulator, client: Any) -> None:
    """GET /api/v3/account answers the registered uid (an integer, as Binance sends it)."""
    key = sim.add_key(Venue.BINANCE, uid="123456789")
    answer = await client.binance(key, "/api/v3/account", params="omitZeroBalances=true")
    assert answer.status == 200
    assert answer.body["uid"] == 123456789
    assert answer.body["accountType"] == "SPOT"


async def test_wrong_secret_answers_1022(sim: Simulator, client: Any) -> None:
    """A signature made with another secret answers -1022."""
    key = sim.add_key(Venue.BINANCE)
    answer = await client.binance(key, RESTRICTIONS, secret="x" * 64)
    assert (answer.status, answer.body["code"]) == (400, -1022)


async def test_unknown_key_answers_2015_naming_the_ip(sim: Simulator, client: Any) -> None:
    """An unknown key answers -2015 (HTTP 401) with the caller's IP in the message (contract)."""
    key = sim.add_key(Venue.BINANCE)
    answer = await client.binance(key, RESTRICTIONS, api_key="A" * 64)
    assert answer.status == 401
    assert answer.body == {
        "code": -2015,
        "msg": "Invalid API-key, IP, or permissions for action, request ip: 127.0.0.1",
    }


async def test_malformed_key_answers_2014(sim: Simulator, client: Any) -> None:
    """An API key with characters Binance never issues answers -2014."""
    key = sim.add_key(Venue.BINANCE)
    answer = await client.binance(key, RESTRICTIONS, api_key="not a key!")
    assert answer.body["code"] == -2014


async def test_ip_not_allowed_answers_2015(sim: Simulator, client: Any) -> None:
    """A key bound to another IP answers -2015."""
    key = sim.add_key(Venue.BINANCE, ip_allowlist=["10.1.2.3"])
    answer = await client.binance(key, RESTRICTIONS)
    assert (answer.status, answer.body["code"]) == (401, -2015)


async def test_expired_key_answers_2015(sim: Simulator, client: Any) -> None:
    """An expired key answers -2015 (contract)."""
    key = sim.add_key(Venue.BINANCE, expires_at_ms=1)
    answer = await client.binance(key, RESTRICTIONS)
    assert (answer.status, answer.body["code"]) == (401, -2015)


async def test_reading_disabled_answers_2015(sim: Simulator, client: Any) -> None:
    """A key with reading disabled answers -2015 even on apiRestrictions."""
    key = sim.add_key(Venue.BINANCE, read=False)
    answer = await client.binance(key, RESTRICTIONS)
    assert answer.body["code"] == -2015


async def test_stale_timestamp_answers_1021(sim: Simulator, client: Any) -> None:
    """A timestamp older than recvWindow answers -1021."""
    key = sim.add_key(Venue.BINANCE)
    answer = await client.binance(key, RESTRICTIONS, timestamp=1_499_827_319_559)
    assert (answer.status, answer.body["code"]) == (400, -1021)


async def test_recv_window_is_honoured(sim: Simulator, client: Any) -> None:
    """A 10 s old timestamp fails with the default recvWindow and passes with recvWindow=20000."""
    key = sim.add_key(Venue.BINANCE)
    old = int(time.time() * 1000) - 10_000
    assert (await client.binance(key, RESTRICTIONS, timestamp=old)).body["code"] == -1021
    assert (await client.binance(key, RESTRICTIONS, timestamp=old, recv_window=20000)).status == 200


async def test_timestamp_ahead_answers_1021(sim: Simulator, client: Any) -> None:
    """A timestamp 1 s or more ahead of the server answers -1021."""
    key = sim.add_key(Venue.BINANCE)
    answer = await client.binance(key, RESTRICTIONS, timestamp=int(time.time() * 1000) + 2000)
    assert answer.body["code"] == -1021
    assert "ahead" in answer.body["msg"]


async def test_recv_window_above_60000_answers_1131(sim: Simulator, client: Any) -> None:
    """recvWindow above its maximum answers -1131."""
    key = sim.add_key(Venue.BINANCE)
    answer = await client.binance(key, RESTRICTIONS, recv_window=70000)
    assert answer.body["code"] == -1131


async def test_clock_offset_moves_time_and_window(sim: Simulator, client: Any) -> None:
    """With the venue clock 1 h ahead, the time endpoint says so and our timestamps are stale."""
    key = sim.add_key(Venue.BINANCE)
    sim.set_clock_offset(Venue.BINANCE, 3_600_000)
    served = (await client.get(Venue.BINANCE, "/api/v3/time")).body["serverTime"]
    assert served - int(time.time() * 1000) > 3_500_000
    assert (await client.binance(key, RESTRICTIONS)).body["code"] == -1021
    assert (await client.binance(key, RESTRICTIONS, timestamp=served)).status == 200


async def test_margin_identity_missing_answers_3003(sim: Simulator, client: Any) -> None:
    """Without a margin account, /sapi/v1/margin/account answers -3003; with one, 200."""
    without = sim.add_key(Venue.BINANCE, identities=["spot", "futures"])
    with_margin = sim.add_key(Venue.BINANCE)
    answer = await client.binance(without, "/sapi/v1/margin/account")
    assert (answer.status, answer.body["code"]) == (400, -3003)
    assert (await client.binance(with_margin, "/sapi/v1/margin/account")).status == 200


async def test_futures_identity_missing_answers_2015(sim: Simulator, client: Any) -> None:
    """Futures not enabled for the key: /fapi/v2/account answers -2015, while apiRestrictions passes."""
    key = sim.add_key(Venue.BINANCE, identities=["spot"])
    assert (await client.binance(key, RESTRICTIONS)).status == 200
    answer = await client.binance(key, "/fapi/v2/account")
    assert (answer.status, answer.body["code"]) == (401, -2015)
    assert (await client.binance(key, "/dapi/v1/account")).body["code"] == -2015


async def test_futures_identity_present_answers_account(sim: Simulator, client: Any) -> None:
    """A key reaching futures gets the USD-M and COIN-M account answers."""
    key = sim.add_key(Venue.BINANCE)
    for path in ("/fapi/v2/account", "/fapi/v3/account", "/dapi/v1/account"):
        answer = await client.binance(key, path)
        assert answer.status == 200, path
        assert "assets" in answer.body


async def test_account_info_reports_product_flags(sim: Simulator, client: Any) -> None:
    """/sapi/v1/account/info mirrors the registered identities."""
    key = sim.add_key(Venue.BINANCE, identities=["spot", "margin"])
    body = (await client.binance(key, "/sapi/v1/account/info")).body
    assert body["isMarginEnabled"] is True
    assert body["isFutureEnabled"] is False
