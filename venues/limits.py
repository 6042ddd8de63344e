"""Client-side rate limits every probe shares: a token bucket, one bucket per key, sliding windows per key,
and the interface of the per-IP budgets several processes share.

They spread a burst of probes out instead of tripping the venue's limit (a 429, or on Binance a 418 IP ban).
Pure asyncio: no HTTP client here; :class:`venues.http.VenueProbe` combines them in ``throttle``.

Limits a venue counts per IP address (Binance's request weight, Bybit's 600 requests per 5 s: docs/venues.md
§1.6, §3.6) are described by :class:`IpBudget` values. The buckets above keep one process within them; every
process behind the same egress IP draws on the same budget at the venue, so a probe may also be given an
:class:`IpBudgets` (the engine's PostgreSQL-backed one, ``engine/bounds/budgets.py``), which it asks before each call.
This module defines only the protocol: the venue modules never talk to a database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class RateLimiter:
    """A token bucket: at most ``rate`` acquisitions per second on average, bursts up to ``burst``.

    Acquirers queue in arrival order (an ``asyncio.Lock`` is FIFO; Kraken's per-key nonce order relies on
    it: requests leave in the order they took their nonces), so a burst of probes spreads out
    instead of tripping the venue's limit and getting a 429 (or, on Binance, a 418 IP ban).
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, cost: float = 1.0) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= cost:
                    self._tokens -= cost
                    return
                await asyncio.sleep((cost - self._tokens) / self.rate)


class KeyLimiters:
    """One token bucket per API key, for limits the venue counts per key or per user (OKX and Bybit per UID,
    Coinbase per user/profile, Kraken spot per key: docs/venues.md §2.6, 3.6, 4A.6, 4B, 5A.6).

    Bounded (least recently used keys are forgotten past ``max_keys``) and holds no key: buckets are found by
    the SHA-256 of the key.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._by_key: OrderedDict[bytes, RateLimiter] = OrderedDict()

    async def acquire(self, api_key: str, cost: float = 1.0) -> None:
        slot = hashlib.sha256(api_key.encode()).digest()
        limiter = self._by_key.get(slot)
        if limiter is None:
            limiter = self._by_key[slot] = RateLimiter(self.rate, self.burst)
        self._by_key.move_to_end(slot)
        if len(self._by_key) > self._max_keys:
            self._by_key.popitem(last=False)
        await limiter.acquire(cost)


class SlidingWindows:
    """At most ``limit`` calls in any ``seconds`` window, per (key, endpoint): exactly how OKX and Bybit count
    per UID and endpoint, and Coinbase per user (docs/venues.md §2.6, 3.6, 4A.6). A token bucket of burst B and
    rate R lets B + R calls through in one second; a window never lets more than ``limit`` through.

    Windows are widened by ``margin`` (10 %): requests leave here in order but reach the venue with jitter.
    Bounded (LRU past ``max_slots``); slots are found by the SHA-256 of the key, so no key is held.
    """

    def __init__(self, *, margin: float = 0.10, max_slots: int = 20_000) -> None:
        self._margin = margin
        self._max_slots = max_slots
        self._slots: OrderedDict[bytes, tuple[asyncio.Lock, collections.deque[float]]] = OrderedDict()

    async def acquire(self, api_key: str, endpoint: str, limit: int, seconds: float) -> None:
        """Wait for a place in one window and take it now."""
        async with self.reserved([(api_key, endpoint, limit, seconds)]):
            pass

    @contextlib.asynccontextmanager
    async def reserved(self, rules: Sequence[tuple[str, str, int, float]]) -> AsyncIterator[None]:
        """Wait until every window of ``rules`` (api key, endpoint, limit, seconds) has a place, keep them (the
        windows' locks: FIFO per window, like RateLimiter) while the body runs, and take the places when it
        ends, all stamped with that moment: a caller waits for its other limits inside, so the windows record
        when the request leaves, not when its turn in them came. Nothing is taken when the body raises."""
        chosen: dict[bytes, tuple[asyncio.Lock, collections.deque[float], int, float]] = {}
        for api_key, endpoint, limit, seconds in rules:
            slot, lock, sent = self._entry(api_key, endpoint)
            chosen[slot] = (lock, sent, limit, seconds)
        entries = [chosen[slot] for slot in sorted(chosen)]  # one lock order for every caller
        async with contextlib.AsyncExitStack() as held:
            for lock, sent, limit, seconds in entries:
                await held.enter_async_context(lock)
                window = seconds * (1 + self._margin)
                while True:  # a place only grows while we hold the lock: nobody else can take one
                    now = time.monotonic()
                    while sent and now - sent[0] >= window:
                        sent.popleft()
                    if len(sent) < limit:
                        break
                    await asyncio.sleep(sent[0] + window - now)
            yield
            now = time.monotonic()
            for _, sent, _, _ in entries:
                sent.append(now)

    def _entry(self, api_key: str, endpoint: str) -> tuple[bytes, asyncio.Lock, collections.deque[float]]:
        slot = hashlib.sha256(f"{endpoint}\x00{api_key}".encode()).digest()
        entry = self._slots.get(slot)
        if entry is None:
            entry = self._slots[slot] = (asyncio.Lock(), collections.deque())
        self._slots.move_to_end(slot)
        if len(self._slots) > self._max_slots:
            self._slots.popitem(last=False)
        return (slot, *entry)


@dataclass(frozen=True, slots=True)
class IpBudget:
    """A limit the venue counts per IP address: at most ``limit`` cost (requests, or request weight) in any
    ``seconds`` (docs/venues.md §x.6). ``share`` is the part of it this engine may use, all its processes
    behind one egress IP together; the rest stays free for the trading backend calling from the same IP.
    ``name`` is unique across venues (``binance:api``, ``bybit``): processes sharing the budget find it by name.
    """

    name: str
    limit: float
    seconds: float
    share: float = 0.5

    def __post_init__(self) -> None:
        if self.limit <= 0 or self.seconds <= 0 or not 0 < self.share <= 1:
            raise ValueError("an IpBudget needs limit > 0, seconds > 0 and 0 < share <= 1")

    @property
    def allowance(self) -> float:
        """The cost this engine may spend within any ``seconds``: ``limit`` x ``share``."""
        return self.limit * self.share


class IpBudgets(Protocol):
    """Per-IP budgets shared by every process of one egress IP (implemented by ``engine.bounds.budgets``).

    :meth:`take` returns once ``cost`` of ``budget`` belongs to the caller; the caller sends its request at once
    (the grant is valid only briefly). It waits, never refuses, and never raises for the store's sake: an
    implementation that cannot reach its store falls back to a conservative local share of the budget.
    """

    async def take(self, budget: IpBudget, cost: float) -> None: ...


UNLIMITED = 1e9  # a rate that never waits: for simulators and benchmarks that must not be throttled
