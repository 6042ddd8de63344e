"""Fault injection settings: what can go wrong on a simulated venue, and how often.

A :class:`Faults` value is set per venue (``Simulator.set_faults``). ``latency`` delays every request;
``error_rate`` is the chance, per request, that one of ``kinds`` (picked at random with the simulator's
seeded ``random.Random``) answers instead of the handler. Each venue module renders a kind in its own
documented shape (``VenueServer.fault``).

Kinds:

* ``server_error``: an HTTP 5xx in the venue's error shape.
* ``rate_limited``: the venue's rate-limit answer, with ``Retry-After: retry_after``.
* ``timeout``: the request hangs ``hang`` seconds (cut short when the simulator closes), then is served
  normally; a client with a shorter timeout sees a timeout.
* ``malformed``: HTTP 200 with a truncated JSON body.
* ``maintenance``: the venue's maintenance / unavailable answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVER_ERROR = "server_error"
RATE_LIMITED = "rate_limited"
TIMEOUT = "timeout"
MALFORMED = "malformed"
MAINTENANCE = "maintenance"
KINDS: tuple[str, ...] = (SERVER_ERROR, RATE_LIMITED, TIMEOUT, MALFORMED, MAINTENANCE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """What goes wrong on one venue. The default value injects nothing."""

    latency: float = 0.0  # seconds added to every request
    error_rate: float = 0.0  # chance per request that one of ``kinds`` answers
    kinds: tuple[str, ...] = KINDS
    retry_after: float = 1.0  # seconds, sent as Retry-After on rate-limited answers
    hang: float = 30.0  # seconds a "timeout" request hangs before it is served

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError("latency must be a finite number >= 0")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if not self.kinds:
            raise ValueError("kinds must name at least one fault kind")
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(KINDS)}")
        if not (math.isfinite(self.retry_after) and self.retry_after >= 0):
            raise ValueError("retry_after must be a finite number >= 0")
        if not (math.isfinite(self.hang) and self.hang >= 0):
            raise ValueError("hang must be a finite number >= 0")

    def pick(self, rng: random.Random) -> str | None:
        """The fault kind for one request, or None when it is served normally."""
        if self.error_rate <= 0.0 or rng.random() >= self.error_rate:
            return None
        return rng.choice(self.kinds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency": self.latency,
            "error_rate": self.error_rate,
            "kinds": list(self.kinds),
            "retry_after": self.retry_after,
            "hang": self.hang,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from JSON (the admin API); unknown fields are an error."""
        known = {"latency", "error_rate", "kinds", "retry_after", "hang"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        values: dict[str, Any] = {}
        for name in ("latency", "error_rate", "retry_after", "hang"):
            if name in data:
                values[name] = float(data[name])
        if "kinds" in data:
            kinds = data["kinds"]
            if isinstance(kinds, str) or not isinstance(kinds, list | tuple):
                raise ValueError("kinds must be a list of fault kinds")
            values["kinds"] = tuple(str(kind) for kind in kinds)
        return cls(**values)


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` value: whole seconds when integral, else a decimal (Reply.retry_after parses both)."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0")
