"""Fault injection: each kind answers in the venue's documented shape; latency and hangs are applied."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from venues.base import Venue
from venues.simulator import Faults, Simulator, TestKey

# One authenticated request per venue, as the probes make them.
CALLS = {
    Venue.BINANCE: ("binance", "/sapi/v1/account/apiRestrictions"),
    Venue.OKX: ("okx", "/api/v5/account/config"),
    Venue.BYBIT: ("bybit", "/v5/user/query-api"),
    Venue.COINBASE: ("cdp", "/api/v3/brokerage/key_permissions"),
    Venue.KRAKEN: ("kraken", "GetApiKeyInfo"),
}

# (HTTP status, venue code) of each kind, per venue (docs/venues.md §x.5 and the simulator's documented choices).
EXPECTED: dict[Venue, dict[str, tuple[int, Any]]] = {
    Venue.BINANCE: {"server_error": (500, -1001), "rate_limited": (429, -1003), "maintenance": (503, -1016)},
    Venue.OKX: {
        "server_error": (500, "50026"),
        "rate_limited": (429, "50011"),
        "maintenance": (503, "50001"),
    },
    Venue.BYBIT: {"server_error": (500, 10016), "rate_limited": (200, 10006), "maintenance": (503, 10016)},
    Venue.COINBASE: {
        "server_error": (500, "internal_server_error"),
        "rate_limited": (429, "rate_limit_exceeded"),
        "maintenance": (503, "unavailable"),
    },
    Venue.KRAKEN: {
        "server_error": (500, ["EGeneral:Internal error"]),
        "rate_limited": (200, ["EAPI:Rate limit exceeded"]),
        "maintenance": (200, ["EService:Unavailable"]),
    },
}


def venue_code(venue: Venue, body: Any) -> Any:
    field = {Venue.BINANCE: "code", Venue.OKX: "code", Venue.BYBIT: "retCode", Venue.COINBASE: "error"}
    return body["error"] if venue is Venue.KRAKEN else body[field[venue]]


async def call(client: Any, key: TestKey, venue: Venue) -> Any:
    method, path = CALLS[venue]
    return await getattr(client, method)(key, path)


@pytest.mark.parametrize("venue", list(Venue))
@pytest.mark.parametrize("kind", ["server_error", "rate_limited", "maintenance"])
async def test_fault_kind_answers_the_venue_shape(
    sim: Simulator, client: Any, venue: Venue, kind: str
) -> None:
    """With error_rate 1 and one kind, every request gets that kind's documented answer."""
    key = sim.add_key(venue)
    sim.set_faults(venue, Faults(error_rate=1.0, kinds=(kind,), retry_after=2.0))
    answer = await call(client, key, venue)
    status, code = EXPECTED[venue][kind]
    assert answer.status == status
    assert venue_code(venue, answer.body) == code
    if kind == "rate_limited":
        assert answer.headers["Retry-After"] == "2"
    assert sim.stats(venue).faults == 1


@pytest.mark.parametrize("venue", list(Venue))
async def test_malformed_fault_is_truncated_json(sim: Simulator, client: Any, venue: Venue) -> None:
    """The malformed kind answers HTTP 200 whose body is not valid JSON."""
    key = sim.add_key(venue)
    sim.set_faults(venue, Faults(error_rate=1.0, kinds=("malformed",)))
    answer = await call(client, key, venue)
    assert answer.status == 200
    assert answer.body is None
    with pytest.raises(ValueError):  # noqa: PT011 - json's error is a ValueError subclass
        json.loads(answer.text)


@pytest.mark.parametrize(
    ("kind", "path"),
    [("exchange", "/accounts"), ("futures", "/api/auth/v1/api-keys/v3/check")],
)
async def test_faults_of_the_second_api_use_its_shape(
    sim: Simulator, client: Any, kind: str, path: str
) -> None:
    """Coinbase Exchange and Kraken Futures paths get their own API's rate-limit shape."""
    venue = Venue.COINBASE if kind == "exchange" else Venue.KRAKEN
    key = sim.add_key(venue, kind=kind)
    sim.set_faults(venue, Faults(error_rate=1.0, kinds=("rate_limited",), retry_after=0.5))
    answer = await (client.exchange(key, path) if kind == "exchange" else client.futures(key, path))
    assert answer.status == 429
    assert answer.headers["Retry-After"] == "0.5"
    if kind == "exchange":
        assert answer.body == {"message": "Private rate limit exceeded"}
    else:
        assert answer.body["error"] == "apiLimitExceeded"


async def test_timeout_fault_hangs_then_serves(sim: Simulator, client: Any) -> None:
    """A timeout fault makes a short-timeout client time out; a patient one gets the normal answer."""
    key = sim.add_key(Venue.OKX)
    sim.set_faults(Venue.OKX, Faults(error_rate=1.0, kinds=("timeout",), hang=0.4))
    with pytest.raises(asyncio.TimeoutError):
        await client.send("GET", client.base(Venue.OKX) + "/api/v5/public/time", wait=0.1)
    started = time.monotonic()
    answer = await client.okx(key, "/api/v5/account/config")
    assert time.monotonic() - started >= 0.4
    assert answer.body["code"] == "0"


async def test_close_ends_hanging_requests(client: Any) -> None:
    """Closing the simulator does not wait for a 30 s hang."""
    sim = Simulator()
    await sim.start()
    sim.set_faults(Venue.BYBIT, Faults(error_rate=1.0, kinds=("timeout",), hang=30.0))
    url = sim.urls[Venue.BYBIT] + "/v5/market/time"
    pending = asyncio.ensure_future(client.send("GET", url, wait=10.0))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await sim.close()
    assert time.monotonic() - started < 5.0
    await asyncio.gather(pending, return_exceptions=True)


async def test_latency_is_applied(sim: Simulator, client: Any) -> None:
    """Every request takes at least the configured latency; clearing faults removes it."""
    sim.set_faults(Venue.BINANCE, Faults(latency=0.15))
    started = time.monotonic()
    assert (await client.get(Venue.BINANCE, "/api/v3/time")).status == 200
    assert time.monotonic() - started >= 0.15
    sim.clear_faults()
    started = time.monotonic()
    await client.get(Venue.BINANCE, "/api/v3/time")
    assert time.monotonic() - started < 0.15


async def test_faults_are_per_venue(sim: Simulator, client: Any) -> None:
    """Faults set on one venue leave the others alone."""
    sim.set_faults(Venue.OKX, Faults(error_rate=1.0, kinds=("server_error",)))
    assert (await client.get(Venue.BINANCE, "/api/v3/time")).status == 200
    assert (await client.get(Venue.OKX, "/api/v5/public/time")).status == 500


async def test_partial_error_rate_mixes_answers(sim: Simulator, client: Any) -> None:
    """error_rate 0.5 over 40 requests gives both faults and normal answers, all counted."""
    sim.set_faults(Venue.BYBIT, Faults(error_rate=0.5, kinds=("server_error",)))
    statuses = [(await client.get(Venue.BYBIT, "/v5/market/time")).status for _ in range(40)]
    assert 0 < statuses.count(500) < 40
    assert sim.stats(Venue.BYBIT).faults == statuses.count(500)


async def test_seed_makes_fault_picks_reproducible(client: Any) -> None:
    """Two simulators with the same seed inject the same fault sequence; another seed differs."""

    async def sequence(seed: int) -> list[int]:
        async with Simulator(seed=seed) as sim:
            sim.set_faults(Venue.OKX, Faults(error_rate=0.5, kinds=("server_error", "maintenance")))
            url = sim.urls[Venue.OKX] + "/api/v5/public/time"
            return [(await client.send("GET", url)).status for _ in range(30)]

    first = await sequence(99)
    assert first == await sequence(99)
    assert first != await sequence(100)
    assert {200, 500, 503} <= set(first)


@pytest.mark.parametrize(
    "bad",
    [{"error_rate": 1.5}, {"latency": -1.0}, {"kinds": ("explode",)}, {"kinds": ()}, {"hang": float("inf")}],
)
def test_invalid_faults_are_refused(bad: dict[str, Any]) -> None:
    """Faults refuses impossible settings."""
    with pytest.raises(ValueError):  # noqa: PT011 - the message is what users read
        Faults(**bad)
