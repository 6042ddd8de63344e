"""The simulated Bybit: docs/venues.md §3 and the contract of venues/README.md."""

from __future__ import annotations

import time
from typing import Any

from venues.base import Venue
from venues.simulator import Simulator

QUERY_API = "/v5/user/query-api"


async def test_query_api_reports_registered_permissions(sim: Simulator, client: Any) -> None:
    """A signed query-api answers retCode 0 with readOnly, Withdraw, ips and userID of the key."""
    key = sim.add_key(Venue.BYBIT, uid="987654321", withdraw=True, ip_allowlist=["127.0.0.1"])
    answer = await client.bybit(key, QUERY_API)
    assert answer.status == 200
    assert answer.body["retCode"] == 0
    result = answer.body["result"]
    assert result["readOnly"] == 0
    assert "Withdraw" in result["permissions"]["Wallet"]
    assert result["ips"] == ["127.0.0.1"]
    assert result["userID"] == 987654321
    assert result["apiKey"] == key.api_key
    assert result["secret"] == ""
    assert result["expiredAt"] == "1970-01-01T00:00:00Z"  # IP-bound keys do not expire


async def test_read_only_key_without_ip(sim: Simulator, client: Any) -> None:
    """A read-only key with no IP: readOnly 1, ips ["*"], an expiry 90 days out (docs/venues.md §3.7)."""
    key = sim.add_key(Venue.BYBIT, trade=False)
    result = (await client.bybit(key, QUERY_API)).body["result"]
    assert result["readOnly"] == 1
    assert result["ips"] == ["*"]
    assert result["permissions"]["Spot"] == []
    assert result["deadlineDay"] in (89, 90)


async def test_wrong_secret_answers_10004(sim: Simulator, client: Any) -> None:
    """A signature made with another secret answers 10004."""
    key = sim.add_key(Venue.BYBIT)
    assert (await client.bybit(key, QUERY_API, secret="s" * 36)).body["retCode"] == 10004


async def test_unknown_key_answers_10003_with_401(sim: Simulator, client: Any) -> None:
    """An unknown key answers retCode 10003 with HTTP 401."""
    key = sim.add_key(Venue.BYBIT)
    answer = await client.bybit(key, QUERY_API, api_key="K" * 18)
    assert (answer.status, answer.body["retCode"]) == (401, 10003)


async def test_key_of_another_environment_answers_10003(sim: Simulator, client: Any) -> None:
    """A testnet key sent to the (mainnet) simulator answers 10003 (contract)."""
    key = sim.add_key(Venue.BYBIT, environment="testnet")
    assert (await client.bybit(key, QUERY_API)).body["retCode"] == 10003


async def test_ip_not_allowed_answers_10010(sim: Simulator, client: Any) -> None:
    """A key bound to another IP answers 10010."""
    key = sim.add_key(Venue.BYBIT, ip_allowlist=["10.1.2.3"])
    assert (await client.bybit(key, QUERY_API)).body["retCode"] == 10010


async def test_expired_key_answers_33004(sim: Simulator, client: Any) -> None:
    """An expired key answers 33004 "Your api key has expired" (contract)."""
    key = sim.add_key(Venue.BYBIT, expires_at_ms=1)
    answer = await client.bybit(key, QUERY_API)
    assert (answer.body["retCode"], answer.body["retMsg"]) == (33004, "Your api key has expired")


async def test_timestamp_window(sim: Simulator, client: Any) -> None:
    """Accepted iff server - recvWindow <= ts < server + 1000 (docs/venues.md §3.2), else 10002."""
    key = sim.add_key(Venue.BYBIT)
    now = int(time.time() * 1000)
    assert (await client.bybit(key, QUERY_API, timestamp=now - 6_000)).body["retCode"] == 10002
    assert (await client.bybit(key, QUERY_API, timestamp=now + 1_500)).body["retCode"] == 10002
    assert (await client.bybit(key, QUERY_API, timestamp=now - 6_000, recv_window="10000")).body[
        "retCode"
    ] == 0


async def test_identities_of_a_unified_account(sim: Simulator, client: Any) -> None:
    """A unified-only account: status 5, wallets FUND+UNIFIED, UNIFIED balance ok, SPOT refused."""
    key = sim.add_key(Venue.BYBIT, identities=["unified"])
    info = (await client.bybit(key, "/v5/account/info")).body["result"]
    assert info["unifiedMarginStatus"] == 5
    members = (await client.bybit(key, "/v5/user/get-member-type")).body["result"]
    assert members["accounts"][0]["accountType"] == ["FUND", "UNIFIED"]
    unified = await client.bybit(key, "/v5/account/wallet-balance", query="accountType=UNIFIED")
    assert unified.body["retCode"] == 0
    assert unified.body["result"]["list"][0]["accountType"] == "UNIFIED"
    spot = await client.bybit(key, "/v5/account/wallet-balance", query="accountType=SPOT")
    assert spot.body["retCode"] == 100028


async def test_identities_of_a_classic_account(sim: Simulator, client: Any) -> None:
    """A classic account (spot + contract): status 1, UNIFIED balance answers 10028."""
    key = sim.add_key(Venue.BYBIT, identities=["spot", "contract"])
    assert (await client.bybit(key, "/v5/account/info")).body["result"]["unifiedMarginStatus"] == 1
    answer = await client.bybit(key, "/v5/account/wallet-balance", query="accountType=UNIFIED")
    assert answer.body["retCode"] == 10028
    contract = await client.bybit(key, "/v5/account/wallet-balance", query="accountType=CONTRACT")
    assert contract.body["retCode"] == 0


async def test_market_time_follows_the_clock_offset(sim: Simulator, client: Any) -> None:
    """GET /v5/market/time answers timeSecond shifted by the venue's clock offset."""
    sim.set_clock_offset(Venue.BYBIT, 60_000)
    body = (await client.get(Venue.BYBIT, "/v5/market/time")).body
    assert body["retCode"] == 0
    assert int(body["result"]["timeSecond"]) - int(time.time()) in range(55, 65)


async def test_uta1_account_reports_status_3(sim: Simulator, client: Any) -> None:
    """Unified plus a legacy wallet (the default full set) reports UTA1.0 (status 3)."""
    key = sim.add_key(Venue.BYBIT)
    assert key.identities == ("contract", "spot", "unified")
    assert (await client.bybit(key, "/v5/account/info")).body["result"]["unifiedMarginStatus"] == 3
