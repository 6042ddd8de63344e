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

import bisect
from dataclasses import dataclass

SWEEP_SECONDS = 60.0  # how often the budgets nobody drew from lately are forgotten (bounded memory)
_COMPACT_AFTER = 1024  # expired window entries kept before the list is cut


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
    """The costs a window recorded, oldest first, with running totals.

    How much is in the window and how long until a cost fits are worked out from the running totals (a
    binary search), never by walking the entries: with enforcement off a budget records every request, so a
    minute's window (Binance weight) holds a minute of traffic, and a walk per request made the simulator
    slower with every request it had served within that minute.
    """

    __slots__ = ("_base", "_head", "_stamps", "_totals", "seconds")

    def __init__(self) -> None:
        self._stamps: list[float] = []  # when each entry was recorded
        self._totals: list[float] = []  # _totals[i]: the costs of every entry up to i, summed (from _base)
        self._head = 0  # entries before it have left the window
        self._base = 0.0  # the running total of the entries that have left
        self.seconds = 0.0  # the window's length as last asked (RateLimits.sweep reads it)

    @property
    def used(self) -> float:
        """The cost within the window."""
        return self._totals[-1] - self._base if self._head < len(self._totals) else 0.0

    def empty(self, now: float) -> bool:
        """True when every entry has left the window at ``now`` (the state can be forgotten)."""
        return not self._totals or self._stamps[-1] <= now - self.seconds

    def _expire(self, now: float, seconds: float) -> None:
        stamps, head = self._stamps, self._head
        while head < len(stamps) and stamps[head] <= now - seconds:
            head += 1
        if head == self._head:
            return
        if head == len(stamps):  # all gone: start afresh (no float drift carried over)
            stamps.clear()
            self._totals.clear()
            self._head, self._base = 0, 0.0
            return
        self._base = self._totals[head - 1]
        self._head = head
        if head >= _COMPACT_AFTER and head * 2 >= len(stamps):  # drop the expired half, amortised O(1)
            base = self._base
            self._totals = [total - base for total in self._totals[head:]]
            del stamps[:head]
            self._head, self._base = 0, 0.0

    def wait(self, limit: Window, now: float, cost: float) -> float:
        """Seconds until ``cost`` fits (0.0 when it fits now)."""
        self.seconds = limit.seconds
        self._expire(now, limit.seconds)
        used = self.used
        if used + cost <= limit.limit:
            return 0.0
        # the first entry whose leaving frees enough: its running total reaches the excess over the limit
        index = bisect.bisect_left(self._totals, self._totals[-1] + cost - limit.limit, lo=self._head)
        if index == len(self._totals):  # the cost alone is above the limit: it never fits
            return limit.seconds
        return max(0.001, self._stamps[index] + limit.seconds - now)

    def take(self, now: float, cost: float) -> None:
        total = self._totals[-1] if self._totals else 0.0
        self._stamps.append(now)
        self._totals.append(total + cost)


class _BucketState:
    __slots__ = ("level", "rate", "updated")

    def __init__(self, now: float) -> None:
        self.level = 0.0
        self.updated = now
        self.rate = 0.0  # the decay rate as last asked (RateLimits.sweep reads it)

    def empty(self, now: float) -> bool:
        """True when the counter has decayed to nothing at ``now`` (the state can be forgotten)."""
        return self.level - (now - self.updated) * self.rate <= 0.0

    def wait(self, limit: Bucket, now: float, cost: float) -> float:
        self.rate = limit.rate
        self.level = max(0.0, self.level - (now - self.updated) * limit.rate)
        self.updated = now
        if self.level + cost <= limit.capacity:
            return 0.0
        return (self.level + cost - limit.capacity) / limit.rate

    def take(self, now: float, cost: float) -> None:
        self.level += cost


class RateLimits:
    """The budgets of one simulator, keyed by rule subject.

    Subjects name accounts, claimed keys and IPs, so there is one per key a client ever sent: every
    :data:`SWEEP_SECONDS` the budgets that are empty (a window whose entries have all left, a bucket decayed
    to nothing) are forgotten, which changes no answer (a budget made afresh is empty too) and keeps the
    memory of a simulator that runs for days to what its recent traffic drew.
    """

    def __init__(self) -> None:
        self._windows: dict[str, _WindowState] = {}
        self._buckets: dict[str, _BucketState] = {}
        self._next_sweep: float | None = None

    def __len__(self) -> int:
        """How many budgets are held (windows and buckets)."""
        return len(self._windows) + len(self._buckets)

    def admit(self, rules: list[Rule], now: float, *, enforce: bool = True) -> tuple[Rule, float] | None:
        """Check the request against ``rules``: None when within every budget, else (first rule exceeded,
        seconds until it would fit). The request is recorded unless it is refused (exceeded and ``enforce``).
        """
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_SECONDS
        elif now >= self._next_sweep:
            self.sweep(now)
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

    def sweep(self, now: float) -> None:
        """Forget the budgets that are empty at ``now`` (admit calls it every :data:`SWEEP_SECONDS`)."""
        self._windows = {subject: state for subject, state in self._windows.items() if not state.empty(now)}
        self._buckets = {subject: state for subject, state in self._buckets.items() if not state.empty(now)}
        self._next_sweep = now + SWEEP_SECONDS

    def _state_wait(self, rule: Rule, now: float) -> float:
        if isinstance(rule.limit, Window):
            window = self._windows.setdefault(rule.subject, _WindowState())
            return window.wait(rule.limit, now, rule.cost)
        bucket = self._buckets.setdefault(rule.subject, _BucketState(now))
        return bucket.wait(rule.limit, now, rule.cost)

    def reset(self) -> None:
        self._windows.clear()
        self._buckets.clear()
        self._next_sweep = None
