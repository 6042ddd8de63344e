"""Rate-limit bookkeeping of the simulated venues.

Each venue module turns a request into :class:`Rule` values (whose budget, which limit, what cost), from
the documented limits of its endpoints (docs/venues.md §x.6). Two kinds of limit cover the five venues:

* :class:`Window`: at most ``limit`` cost within any ``seconds`` (Binance weight per minute, OKX "5 requests
  per 2 s", Bybit per-second limits, Coinbase Advanced 30/s, Kraken Futures 500 cost per 10 s).
* :class:`Bucket`: a counter that grows by the cost and decays at ``rate`` per second, refusing a request
  that would take it above ``capacity`` (Kraken Spot's call counter, Coinbase Exchange's "15 rps, burst 30").

A request is admitted only if every rule admits it; only admitted requests are recorded, so a client that
backs off recovers. With enforcement off, every request is recorded and the excess is only reported.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``limit`` cost within any ``seconds``."""

    limit: float
    seconds: float


@dataclass(frozen=True, slots=True)
class Bucket:
    """A counter that decays ``rate`` per second and may not exceed ``capacity``."""

    capacity: float
    rate: float


@dataclass(frozen=True, slots=True)
class Rule:
    """One budget a request draws from. ``subject`` names the budget (e.g. ``ip:127.0.0.1:sapi``)."""

    subject: str
    limit: Window | Bucket
    cost: float = 1.0
    by_ip: bool = False  # the budget is an IP's, not an account's (some venues answer differently)


class _WindowState:
    def __init__(self) -> None:
        self.entries: collections.deque[tuple[float, float]] = collections.deque()
        self.used = 0.0

    def _expire(self, now: float, seconds: float) -> None:
        while self.entries and self.entries[0][0] <= now - seconds:
            _, cost = self.entries.popleft()
            self.used -= cost

    def wait(self, limit: Window, now: float, cost: float) -> float:
        """Seconds until ``cost`` fits (0.0 when it fits now)."""
        self._expire(now, limit.seconds)
        if self.used + cost <= limit.limit:
            return 0.0
        freed = self.used
        for stamp, entry_cost in self.entries:  # oldest first: when enough has left the window
            freed -= entry_cost
            if freed + cost <= limit.limit:
                return max(0.001, stamp + limit.seconds - now)
        return limit.seconds

    def take(self, now: float, cost: float) -> None:
        self.entries.append((now, cost))
        self.used += cost


class _BucketState:
    def __init__(self, now: float) -> None:
        self.level = 0.0
        self.updated = now

    def wait(self, limit: Bucket, now: float, cost: float) -> float:
        self.level = max(0.0, self.level - (now - self.updated) * limit.rate)
        self.updated = now
        if self.level + cost <= limit.capacity:
            return 0.0
        return (self.level + cost - limit.capacity) / limit.rate

    def take(self, now: float, cost: float) -> None:
        self.level += cost


class RateLimits:
    """The budgets of one simulator, keyed by rule subject."""

    def __init__(self) -> None:
        self._windows: dict[str, _WindowState] = {}
        self._buckets: dict[str, _BucketState] = {}

    def admit(self, rules: list[Rule], now: float, *, enforce: bool = True) -> tuple[Rule, float] | None:
        """Check the request against ``rules``: None when within every budget, else (first rule exceeded,
        seconds until it would fit). The request is recorded unless it is refused (exceeded and ``enforce``).
        """
        exceeded: tuple[Rule, float] | None = None
        for rule in rules:
            wait = self._state_wait(rule, now)
            if wait > 0.0 and exceeded is None:
                exceeded = rule, wait
        if exceeded is not None and enforce:
            return exceeded
        for rule in rules:
            if isinstance(rule.limit, Window):
                self._windows[rule.subject].take(now, rule.cost)
            else:
                self._buckets[rule.subject].take(now, rule.cost)
        return exceeded

    def _state_wait(self, rule: Rule, now: float) -> float:
        if isinstance(rule.limit, Window):
            window = self._windows.setdefault(rule.subject, _WindowState())
            return window.wait(rule.limit, now, rule.cost)
        bucket = self._buckets.setdefault(rule.subject, _BucketState(now))
        return bucket.wait(rule.limit, now, rule.cost)

    def reset(self) -> None:
        self._windows.clear()
        self._buckets.clear()
