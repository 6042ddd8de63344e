"""The simulated OKX: docs/venues.md §2 and the contract of venues/README.md."""

from __future__ import annotations

import time
from typing import Any

from venues.base import Venue
from venues.simulator import Simulator

CONFIG = "/api/v5/account/config"


async def test_config_reports_registered_permissions(sim: Simulator, client: Any) -> None:
    """A signed account/config answers code "0" with perm, ip, uid and label of the key."""
    key = sim.add_key(
        Venue.OKX, trade=True, withdraw=True, ip_allowlist=["127.0.0.1", "10.0.0.0/8"], label="bot"
    )
    answer = await client.okx(key, CONFIG)
    assert answer.status == 200
    assert answer.body["code"] == "0"
    config = answer.body["data"][0]
    assert config["perm"] == "read_only,trade,withdraw"
    assert config["ip"] == "127.0.0.1,10.0.0.0/8"
    assert config["uid"] == key.uid == config["mainUid"]
    assert config["label"] == "bot"


async def test_read_only_key_perm(sim: Simulator, client: Any) -> None:
    """A read-only key's perm is just read_only."""
    key = sim.add_key(Venue.OKX, trade=False)
    assert (await client.okx(key, CONFIG)).body["data"][0]["perm"] == "read_only"


async def test_query_string_is_signed(sim: Simulator, client: Any) -> None:
    """For GET the ?query is part of requestPath: signed with it, the call passes."""
    key = sim.add_key(Venue.OKX)
    answer = await client.okx(key, "/api/v5/account/balance", query="ccy=BTC")
    assert (answer.status, answer.body["code"]) == (200, "0")


async def test_wrong_secret_answers_50113(sim: Simulator, client: Any) -> None:
    """A signature made with another secret answers 50113."""
    key = sim.add_key(Venue.OKX)
    answer = await client.okx(key, CONFIG, secret="0" * 32)
    assert (answer.status, answer.body["code"]) == (401, "50113")


async def test_unknown_key_answers_50111(sim: Simulator, client: Any) -> None:
    """An unknown key answers 50111."""
    key = sim.add_key(Venue.OKX)
    answer = await client.okx(key, CONFIG, api_key="00000000-0000-0000-0000-000000000000")
    assert (answer.status, answer.body["code"]) == (401, "50111")


async def test_wrong_passphrase_answers_50105(sim: Simulator, client: Any) -> None:
    """A wrong passphrase answers 50105."""
    key = sim.add_key(Venue.OKX)
    answer = await client.okx(key, CONFIG, passphrase="Wrong-passphrase1!")
    assert (answer.status, answer.body["code"]) == (401, "50105")


async def test_missing_passphrase_answers_50104(sim: Simulator, client: Any) -> None:
    """An empty passphrase header answers 50104 (header cannot be empty)."""
    key = sim.add_key(Venue.OKX)
    assert (await client.okx(key, CONFIG, passphrase="")).body["code"] == "50104"


async def test_ip_not_allowed_answers_50110(sim: Simulator, client: Any) -> None:
    """A key bound to another IP answers 50110 naming the caller's IP."""
    key = sim.add_key(Venue.OKX, ip_allowlist=["10.1.2.3"])
    answer = await client.okx(key, CONFIG)
    assert answer.body["code"] == "50110"
    assert "127.0.0.1" in answer.body["msg"]


async def test_expired_key_answers_50119(sim: Simulator, client: Any) -> None:
    """An expired key answers 50119 "API key doesn't exist" (contract)."""
    key = sim.add_key(Venue.OKX, expires_at_ms=1)
    answer = await client.okx(key, CONFIG)
    assert answer.body == {"code": "50119", "msg": "API key doesn't exist", "data": []}


async def test_stale_timestamp_answers_50102(sim: Simulator, client: Any) -> None:
    """A timestamp 31 s old answers 50102; 20 s old passes (+-30 s window)."""
    key = sim.add_key(Venue.OKX)
    now = int(time.time() * 1000)
    assert (await client.okx(key, CONFIG, timestamp_ms=now - 31_000)).body["code"] == "50102"
    assert (await client.okx(key, CONFIG, timestamp_ms=now + 31_000)).body["code"] == "50102"
    assert (await client.okx(key, CONFIG, timestamp_ms=now - 20_000)).body["code"] == "0"


async def test_malformed_timestamp_answers_50112(sim: Simulator, client: Any) -> None:
    """A timestamp that is not ISO-8601 answers 50112."""
    key = sim.add_key(Venue.OKX)
    headers = {
        "OK-ACCESS-KEY": key.api_key,
        "OK-ACCESS-SIGN": "x",
        "OK-ACCESS-TIMESTAMP": "1700000000000",
        "OK-ACCESS-PASSPHRASE": key.api_passphrase,
    }
    answer = await client.get(Venue.OKX, CONFIG, headers=headers)
    assert answer.body["code"] == "50112"


async def test_demo_key_needs_the_simulated_trading_header(sim: Simulator, client: Any) -> None:
    """A demo key answers 50101 without x-simulated-trading: 1 and passes with it (contract)."""
    key = sim.add_key(Venue.OKX, environment="demo")
    assert (await client.okx(key, CONFIG)).body["code"] == "50101"
    assert (await client.okx(key, CONFIG, demo=True)).body["code"] == "0"


async def test_production_key_with_demo_header_answers_50101(sim: Simulator, client: Any) -> None:
    """A production key sent with x-simulated-trading: 1 answers 50101 (contract)."""
    key = sim.add_key(Venue.OKX)
    assert (await client.okx(key, CONFIG, demo=True)).body["code"] == "50101"


async def test_identities_follow_the_registry(sim: Simulator, client: Any) -> None:
    """account/balance and asset/balances answer 0 for reached identities, 50120 otherwise."""
    trading_only = sim.add_key(Venue.OKX, identities=["trading"])
    assert (await client.okx(trading_only, "/api/v5/account/balance")).body["code"] == "0"
    denied = await client.okx(trading_only, "/api/v5/asset/balances")
    assert denied.body["code"] == "50120"
    both = sim.add_key(Venue.OKX)
    assert (await client.okx(both, "/api/v5/asset/balances")).body == {"code": "0", "msg": "", "data": []}


async def test_public_time_follows_the_clock_offset(sim: Simulator, client: Any) -> None:
    """GET /api/v5/public/time answers ts shifted by the venue's clock offset."""
    sim.set_clock_offset(Venue.OKX, -120_000)
    answer = await client.get(Venue.OKX, "/api/v5/public/time")
    served = int(answer.body["data"][0]["ts"])
    assert abs(served - (int(time.time() * 1000) - 120_000)) < 5_000
