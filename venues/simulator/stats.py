"""What each simulated venue saw: requests, injected faults, auth failures, bursts, rate-limit violations.

``max_per_second_by_key`` is the largest number of requests one API key sent within any 1 s window; a
reliability test compares it with the venue's documented limit. Requests that carry no key (public time
calls), or a key the simulator does not hold (a flood of made-up keys would grow the figures without end),
count in ``requests`` only. The API keys in it are the simulator's own test keys, handed back to
whoever registered them; they never go to a log.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from venues.base import Venue

BURST_WINDOW = 1.0  # seconds: the window of max_per_second
SWEEP_SECONDS = 60.0  # how often the burst windows of keys that went quiet are forgotten (bounded memory)


@dataclass(frozen=True, slots=True)
class VenueStats:
    """A snapshot of one venue's counters."""

    venue: Venue
    requests: int = 0
    faults: int = 0
    auth_failures: int = 0
    rate_limit_violations: int = 0
    # the violations of a budget the venue counts per IP (Binance weight, Bybit 600/5 s)
    ip_rate_limit_violations: int = 0
    max_per_second: int = 0  # over all keys
    max_per_second_by_key: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "venue": self.venue.value,
            "requests": self.requests,
            "faults": self.faults,
            "auth_failures": self.auth_failures,
            "rate_limit_violations": self.rate_limit_violations,
            "ip_rate_limit_violations": self.ip_rate_limit_violations,
            "max_per_second": self.max_per_second,
            "max_per_second_by_key": dict(self.max_per_second_by_key),
        }


class StatsRecorder:
    """Mutable counters of one venue; :meth:`snapshot` gives the frozen view."""

    def __init__(self, venue: Venue) -> None:
        self.venue = venue
        self.requests = 0
        self.faults = 0
        self.auth_failures = 0
        self.rate_limit_violations = 0
        self.ip_rate_limit_violations = 0
        self._recent: dict[str, collections.deque[float]] = {}  # the last second's requests, by key
        self._max_by_key: dict[str, int] = {}
        self._next_sweep: float | None = None

    @property
    def tracked_keys(self) -> int:
        """How many keys have a burst window held (those heard from in the last :data:`SWEEP_SECONDS` or so)."""
        return len(self._recent)

    def request(self, api_key: str | None, now: float) -> None:
        self.requests += 1
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_SECONDS
        elif now >= self._next_sweep:
            self._sweep(now)
        if not api_key:
            return
        recent = self._recent.setdefault(api_key, collections.deque())
        while recent and recent[0] <= now - BURST_WINDOW:
            recent.popleft()
        recent.append(now)
        if len(recent) > self._max_by_key.get(api_key, 0):
            self._max_by_key[api_key] = len(recent)

    def _sweep(self, now: float) -> None:
        """Forget the burst windows with nothing left in them at ``now`` (a window made afresh is empty too,
        so no figure changes; ``max_per_second_by_key`` keeps every key's peak)."""
        self._recent = {
            key: recent for key, recent in self._recent.items() if recent and recent[-1] > now - BURST_WINDOW
        }
        self._next_sweep = now + SWEEP_SECONDS

    def snapshot(self) -> VenueStats:
        return VenueStats(
            venue=self.venue,
            requests=self.requests,
            faults=self.faults,
            auth_failures=self.auth_failures,
            rate_limit_violations=self.rate_limit_violations,
            ip_rate_limit_violations=self.ip_rate_limit_violations,
            max_per_second=max(self._max_by_key.values(), default=0),
            max_per_second_by_key=dict(self._max_by_key),
        )
