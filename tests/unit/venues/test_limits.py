"""Client-side rate limits shared by every probe (venues.limits) and the clock resync of venues.http."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp

from venues import build_probe, http, limits
from venues.base import Venue


async def test_key_buckets_are_independent() -> None:
    """Two keys each get their own burst: one key's traffic never delays another's."""
    limiters = limits.KeyLimiters(rate=1.0, burst=2.0)
    started = time.monotonic()
    await asyncio.gather(*(limiters.acquire(k) for k in ("key-a", "key-a", "key-b", "key-b")))
    assert time.monotonic() - started < 0.2
    started = time.monotonic()
    await limiters.acquire("key-a")  # third call of key-a waits for the refill
    assert time.monotonic() - started >= 0.8


async def test_key_buckets_are_bounded_and_hold_no_key() -> None:
    """Past max_keys the least recently used bucket is dropped; buckets are found by hash, not by key."""
    limiters = limits.KeyLimiters(rate=10.0, burst=10.0, max_keys=3)
    for key in ("k1", "k2", "k3", "k4"):
        await limiters.acquire(key)
    assert len(limiters._by_key) == 3
    assert all(isinstance(slot, bytes) and len(slot) == 32 for slot in limiters._by_key)


async def test_per_user_venues_use_per_key_buckets() -> None:
    """OKX, Bybit, Coinbase and Kraken count per key/user (docs/venues.md §x.6); Binance per IP only (1.6)."""
    async with aiohttp.ClientSession() as session:
        for venue in Venue:
            probe = build_probe(venue, session)
            per_key = probe.key_limiters is not None or probe.windows is not None  # type: ignore[attr-defined]
            assert per_key is (venue is not Venue.BINANCE), venue


async def test_sliding_window_never_exceeds_its_limit() -> None:
    """No ``limit``+1 calls ever fall inside one window (a token bucket would let burst + rate through)."""
    windows = limits.SlidingWindows(margin=0.0)
    stamps: list[float] = []

    async def call() -> None:
        await windows.acquire("key", "/v5/user/query-api", 5, 0.2)
        stamps.append(time.monotonic())

    await asyncio.gather(*(call() for _ in range(16)))
    for i in range(len(stamps) - 5):
        assert stamps[i + 5] - stamps[i] >= 0.2 - 0.005
    assert stamps[-1] - stamps[0] >= 0.6  # 16 calls at 5 per 0.2 s need three full windows


async def test_sliding_windows_are_per_key_and_endpoint() -> None:
    """Another key, or another endpoint of the same key, has its own window."""
    windows = limits.SlidingWindows()
    started = time.monotonic()
    for key, endpoint in (("a", "/x"), ("a", "/y"), ("b", "/x")):
        for _ in range(3):
            await windows.acquire(key, endpoint, 3, 5.0)
    assert time.monotonic() - started < 0.2


async def test_requests_refused_for_one_skew_share_one_resync(
    session: aiohttp.ClientSession, mocked: Any
) -> None:
    """Resyncs asked with the same generation fetch the venue's time once; the offset is server minus local."""
    from venues.binance import BinanceProbe

    probe = BinanceProbe(session)
    server_ms = int(time.time() * 1000) + 60_000
    mocked.get("https://api.binance.com/api/v3/time", payload={"serverTime": server_ms})  # answers once
    seen = probe.clock_generation

    def read(reply: http.Reply) -> float:
        return float(reply.body["serverTime"])

    url = "https://api.binance.com/api/v3/time"
    await asyncio.gather(*(probe.resync_clock(url, read, seen=seen) for _ in range(5)))
    assert probe.clock_generation == seen + 1
    assert 59_000 < probe.clock_offset_ms < 61_000


async def test_a_window_place_is_stamped_when_the_request_leaves() -> None:
    """A place held while the caller waits for its other limits is stamped when it is taken (the request
    leaves), not when its turn came: the next call of the window waits a full window from then."""
    windows = limits.SlidingWindows(margin=0.0)
    async with windows.reserved([("key", "/x", 1, 0.3)]):
        await asyncio.sleep(0.2)  # e.g. the venue-wide bucket during a storm
    left = time.monotonic()
    await windows.acquire("key", "/x", 1, 0.3)
    assert time.monotonic() - left >= 0.3 - 0.005
    with contextlib.suppress(RuntimeError):  # a body that raises takes no place
        async with windows.reserved([("other", "/x", 1, 5.0)]):
            raise RuntimeError("refused before it left")
    started = time.monotonic()
    await windows.acquire("other", "/x", 1, 5.0)
    assert time.monotonic() - started < 0.1


async def test_the_ip_budget_is_spent_only_once_the_keys_window_has_room() -> None:
    """throttle(): a key whose window is full waits *before* the per-IP budget is taken (a budget spent and
    then held up in the window would be freed for others while this request still comes)."""

    class Budgets:
        def __init__(self) -> None:
            self.taken: list[float] = []

        async def take(self, budget: limits.IpBudget, cost: float) -> None:
            self.taken.append(time.monotonic())

    budgets = Budgets()
    async with aiohttp.ClientSession() as session:
        probe = build_probe(Venue.BYBIT, session, budgets=budgets)
        assert isinstance(probe, http.VenueProbe) and probe.windows is not None
        path, (limit, seconds) = next(iter(probe.key_windows.items()))
        assert probe.ip_budget(path) is not None
        started = time.monotonic()
        for _ in range(limit + 1):
            await probe.throttle("a-key", path=path)
    assert len(budgets.taken) == limit + 1
    assert budgets.taken[-1] - started >= seconds  # the last budget was taken after its window's wait
