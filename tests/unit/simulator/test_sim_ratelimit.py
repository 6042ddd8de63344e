"""Rate limits: documented budgets are enforced with the venue's answer, and always recorded in stats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from venues.base import Venue
from venues.simulator import Simulator, ratelimit

CONFIG = "/api/v5/account/config"


def test_window_refuses_past_its_limit_and_recovers() -> None:
    """A 5-per-2 s window admits 5, refuses the 6th with the wait until the oldest leaves, then admits."""
    limits = ratelimit.RateLimits()
    rule = ratelimit.Rule("s", ratelimit.Window(5, 2.0))
    assert all(limits.admit([rule], 10.0 + i * 0.1) is None for i in range(5))
    refused = limits.admit([rule], 10.5)
    assert refused is not None
    assert refused[1] == pytest.approx(1.5)
    assert limits.admit([rule], 12.01) is None


def test_bucket_decays() -> None:
    """A bucket of 15 decaying 0.33/s refuses the 16th call, then admits one after ~3 s."""
    limits = ratelimit.RateLimits()
    rule = ratelimit.Rule("k", ratelimit.Bucket(capacity=15, rate=0.33))
    assert all(limits.admit([rule], 0.0) is None for _ in range(15))
    refused = limits.admit([rule], 0.0)
    assert refused is not None
    assert refused[1] == pytest.approx(1 / 0.33)
    assert limits.admit([rule], 3.1) is None


def test_weighted_cost_counts() -> None:
    """Costs add up: a 100-weight window takes five 20-weight calls, not six."""
    limits = ratelimit.RateLimits()
    rule = ratelimit.Rule("ip", ratelimit.Window(100, 60.0), cost=20)
    assert [limits.admit([rule], 1.0) is None for _ in range(6)] == [True] * 5 + [False]


async def test_okx_config_limit_answers_50011(sim: Simulator, client: Any) -> None:
    """The 6th account/config call of one account within 2 s answers 429 + 50011 + Retry-After."""
    key = sim.add_key(Venue.OKX)
    answers = [await client.okx(key, CONFIG) for _ in range(6)]
    assert [a.body["code"] for a in answers] == ["0"] * 5 + ["50011"]
    assert answers[-1].status == 429
    assert float(answers[-1].headers["Retry-After"]) > 0
    stats = sim.stats(Venue.OKX)
    assert stats.rate_limit_violations == 1
    assert stats.max_per_second_by_key[key.api_key] == 6


async def test_okx_limit_is_per_account(sim: Simulator, client: Any) -> None:
    """Two keys of one account share the budget; a key of another account has its own."""
    first = sim.add_key(Venue.OKX)
    second = sim.add_key(Venue.OKX, uid=first.uid)
    stranger = sim.add_key(Venue.OKX)
    for _ in range(5):
        assert (await client.okx(first, CONFIG)).body["code"] == "0"
    assert (await client.okx(second, CONFIG)).body["code"] == "50011"
    assert (await client.okx(stranger, CONFIG)).body["code"] == "0"


async def test_kraken_call_counter_answers_rate_limit_exceeded(sim: Simulator, client: Any) -> None:
    """The 16th quick spot call of one key answers EAPI:Rate limit exceeded (Starter tier)."""
    key = sim.add_key(Venue.KRAKEN)
    answers = [await client.kraken(key, "GetApiKeyInfo") for _ in range(16)]
    assert all(a.body["error"] == [] for a in answers[:15])
    assert answers[15].body == {"error": ["EAPI:Rate limit exceeded"]}
    assert sim.stats(Venue.KRAKEN).rate_limit_violations == 1


async def test_bybit_query_api_limit_answers_10006(sim: Simulator, client: Any) -> None:
    """The 11th query-api call within a second answers retCode 10006 with the X-Bapi-Limit headers."""
    key = sim.add_key(Venue.BYBIT)
    answers = [await client.bybit(key, "/v5/user/query-api") for _ in range(11)]
    assert [a.body["retCode"] for a in answers].count(10006) >= 1
    limited = next(a for a in answers if a.body["retCode"] == 10006)
    assert limited.headers["X-Bapi-Limit"] == "10"
    assert "Retry-After" in limited.headers


async def test_coinbase_exchange_burst_of_30(sim: Simulator, client: Any) -> None:
    """Coinbase Exchange lets a burst of 30 private calls through and answers 429 past it."""
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    statuses = [(await client.exchange(key, "/accounts")).status for _ in range(40)]
    assert statuses.count(200) >= 30
    assert 429 in statuses


@pytest.fixture
async def lenient() -> AsyncIterator[Simulator]:
    async with Simulator(enforce_rate_limits=False) as simulator:
        yield simulator


async def test_unenforced_limits_are_still_recorded(lenient: Simulator, make_client: Any) -> None:
    """With enforcement off, calls past the limit pass but count as violations."""
    client = make_client(lenient)
    key = lenient.add_key(Venue.OKX)
    answers = [await client.okx(key, CONFIG) for _ in range(8)]
    assert all(a.body["code"] == "0" for a in answers)
    stats = lenient.stats(Venue.OKX)
    assert stats.rate_limit_violations == 3
    assert stats.requests == 8
    assert stats.max_per_second == 8
