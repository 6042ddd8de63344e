"""One round trip per verification, over loopback HTTP against the simulator (issue #14): every call of a good
key's probe (the verify call and each identity call) is sent before the first of them answers, and the
verdicts stay those of the venue module (a wrong secret still fails with the verify call's outcome)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from venues import build_probe, http
from venues.base import ProbeFailure, Venue
from venues.simulator import Faults, Simulator

LATENCY = 0.2  # seconds the simulator adds to each request: a wide gap between sending and answering

# (venue, key kind, the paths of the calls sent at once)
KINDS: list[tuple[Venue, str | None, set[str]]] = [
    (
        Venue.BINANCE,
        None,
        {
            "/sapi/v1/account/apiRestrictions",
            "/api/v3/account",
            "/sapi/v1/margin/account",
            "/fapi/v2/account",
        },
    ),
    (Venue.OKX, None, {"/api/v5/account/config", "/api/v5/account/balance", "/api/v5/asset/balances"}),
    (Venue.BYBIT, None, {"/v5/user/query-api", "/v5/account/info", "/v5/user/get-member-type"}),
    (
        Venue.COINBASE,
        "cdp",
        {"/api/v3/brokerage/key_permissions", "/api/v3/brokerage/accounts", "/api/v3/brokerage/portfolios"},
    ),
    (Venue.COINBASE, "exchange", {"/accounts", "/profiles"}),
    (
        Venue.KRAKEN,
        "spot",
        {"/0/private/GetApiKeyInfo", "/0/private/Balance", "/0/private/TradeBalance"},
    ),
    (
        Venue.KRAKEN,
        "futures",
        {"/0/private/GetApiKeyInfo", "/api/auth/v1/api-keys/v3/check", "/derivatives/api/v3/accounts"},
    ),
]
IDS = [f"{venue.value.lower()}-{kind or 'default'}" for venue, kind, _ in KINDS]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=5) as simulator:
        for venue in Venue:
            simulator.set_faults(venue, Faults(latency=LATENCY))
        yield simulator


@pytest.fixture
def timeline(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """("sent" | "answered", request path) in the order they happened, for every request a probe makes."""
    events: list[tuple[str, str]] = []
    original = http.VenueProbe._call

    async def spy(self: http.VenueProbe, method: str, url: str, **kwargs: Any) -> http.Reply:
        path = urlsplit(url).path
        events.append(("sent", path))
        try:
            return await original(self, method, url, **kwargs)
        finally:
            events.append(("answered", path))

    monkeypatch.setattr(http.VenueProbe, "_call", spy)
    return events


@pytest.mark.parametrize(("venue", "kind", "paths"), KINDS, ids=IDS)
async def test_every_call_is_sent_before_the_first_answer(
    sim: Simulator, timeline: list[tuple[str, str]], venue: Venue, kind: str | None, paths: set[str]
) -> None:
    key = sim.add_key(venue, kind=kind, ip_allowlist=("127.0.0.1",))
    async with aiohttp.ClientSession() as session:
        result = await build_probe(venue, session, base_url=sim.urls[venue]).probe(key.api_keys)
    assert result.venue_account_id
    first_answer = next(i for i, (event, _) in enumerate(timeline) if event == "answered")
    sent_at_once = {path for event, path in timeline[:first_answer] if event == "sent"}
    assert paths <= sent_at_once, f"sent only {sorted(sent_at_once)} before the first answer"


@pytest.mark.parametrize(("venue", "kind", "paths"), KINDS, ids=IDS)
async def test_a_bad_key_gets_the_verify_calls_verdict_in_one_round_trip(
    sim: Simulator, timeline: list[tuple[str, str]], venue: Venue, kind: str | None, paths: set[str]
) -> None:
    """An unknown key: every call is refused, the verdict is the verify call's (permanent) outcome."""
    key = sim.add_key(venue, kind=kind)
    unknown = replace(key.api_keys, api_key=key.api_keys.api_key[:-4] + "Zz9Q")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ProbeFailure) as caught:
            await build_probe(venue, session, base_url=sim.urls[venue]).probe(unknown)
    assert not caught.value.transient
    assert caught.value.outcome.value == "INVALID_KEY", caught.value.message
    first_answer = next(i for i, (event, _) in enumerate(timeline) if event == "answered")
    assert paths <= {path for event, path in timeline[:first_answer] if event == "sent"}


TIME_PATHS = {
    "/api/v3/time",
    "/fapi/v1/time",
    "/api/v5/public/time",
    "/v5/market/time",
    "/api/v3/brokerage/time",
    "/time",
    "/0/public/Time",
}


@pytest.mark.parametrize(("venue", "kind", "paths"), KINDS, ids=IDS)
async def test_a_skewed_clock_is_fetched_once_for_all_the_calls_sent_together(
    sim: Simulator, timeline: list[tuple[str, str]], venue: Venue, kind: str | None, paths: set[str]
) -> None:
    """The venue's clock is 200 s ahead: the calls sent together are all refused for the same skew, share one
    fetch of the venue's time, retry, and the key verifies."""
    key = sim.add_key(venue, kind=kind, ip_allowlist=("127.0.0.1",))
    sim.set_clock_offset(venue, 200_000)  # past even a CDP JWT's 120 s life
    async with aiohttp.ClientSession() as session:
        result = await build_probe(venue, session, base_url=sim.urls[venue]).probe(key.api_keys)
    assert result.venue_account_id
    fetched = [path for event, path in timeline if event == "sent" and path in TIME_PATHS]
    # Kraken's nonces need only increase (5A.2, 5B.2): a skewed clock refuses none of them
    assert len(fetched) == (0 if venue is Venue.KRAKEN else 1), fetched
