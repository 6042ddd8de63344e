"""Client-side rate limits shared by every probe: per-key buckets and the venue-wide bucket."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from venues import base, build_probe
from venues.base import Venue


async def test_key_buckets_are_independent() -> None:
    """Two keys each get their own burst: one key's traffic never delays another's."""
    limiters = base.KeyLimiters(rate=1.0, burst=2.0)
    started = time.monotonic()
    await asyncio.gather(*(limiters.acquire(k) for k in ("key-a", "key-a", "key-b", "key-b")))
    assert time.monotonic() - started < 0.2
    started = time.monotonic()
    await limiters.acquire("key-a")  # third call of key-a waits for the refill
    assert time.monotonic() - started >= 0.8


async def test_key_buckets_are_bounded_and_hold_no_key() -> None:
    """Past max_keys the least recently used bucket is dropped; buckets are found by hash, not by key."""
    limiters = base.KeyLimiters(rate=10.0, burst=10.0, max_keys=3)
    for key in ("k1", "k2", "k3", "k4"):
        await limiters.acquire(key)
    assert len(limiters._by_key) == 3
    assert all(isinstance(slot, bytes) and len(slot) == 32 for slot in limiters._by_key)


async def test_per_user_venues_use_per_key_buckets() -> None:
    """OKX, Bybit, Coinbase and Kraken count per key/user (venues.md x.6); Binance per IP only (1.6)."""
    async with aiohttp.ClientSession() as session:
        for venue in Venue:
            probe = build_probe(venue, session)
            if venue is Venue.BINANCE:
                assert probe.key_limiters is None  # type: ignore[attr-defined]
            else:
                assert probe.key_limiters is not None  # type: ignore[attr-defined]
