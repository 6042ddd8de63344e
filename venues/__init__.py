"""Exchange modules behind one probe protocol (``venues.base``), plus the exchange simulator.

Importing this package (or :mod:`venues.base`) loads no HTTP client: the venue modules, and aiohttp with
them, are imported by :func:`build_probe` on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from venues.base import ApiKeys, Outcome, Permissions, Probe, ProbeFailure, ProbeResult, Venue

if TYPE_CHECKING:
    import aiohttp

    from venues.limits import IpBudgets

__all__ = [
    "ApiKeys",
    "Outcome",
    "Permissions",
    "Probe",
    "ProbeFailure",
    "ProbeResult",
    "Venue",
    "build_probe",
]

# venue -> (module, class): imported on first use so a missing optional piece never breaks the rest
_PROBES: dict[Venue, tuple[str, str]] = {
    Venue.BINANCE: ("venues.binance", "BinanceProbe"),
    Venue.OKX: ("venues.okx", "OkxProbe"),
    Venue.BYBIT: ("venues.bybit", "BybitProbe"),
    Venue.COINBASE: ("venues.coinbase", "CoinbaseProbe"),
    Venue.KRAKEN: ("venues.kraken", "KrakenProbe"),
}


def build_probe(
    venue: Venue,
    session: aiohttp.ClientSession,
    *,
    base_url: str | None = None,
    timeout: float = 10.0,
    rate_limited: bool = True,
    budgets: IpBudgets | None = None,
) -> Probe:
    """The probe for ``venue``, sending through ``session`` (owned by the caller) to ``base_url`` if given.

    ``rate_limited=False`` lifts the client-side limits (a simulator or test server whose limits are not the
    venue's); never against a real exchange. ``budgets`` shares the venue's per-IP limits with the other
    processes of the same egress IP (``venues.limits.IpBudgets``; the engine passes its own).
    """
    module_name, class_name = _PROBES[venue]
    cls = getattr(importlib.import_module(module_name), class_name)
    probe: Probe = cls(
        session, base_url=base_url, timeout=timeout, rate_limited=rate_limited, budgets=budgets
    )
    return probe
