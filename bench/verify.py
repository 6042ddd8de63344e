"""Verification latency per venue with 50 ms of simulated latency per request, against the same requests
made one after another.

    python -m bench.verify [--probes 30] [--latency 0.05]

Each venue's real probe verifies simulator keys over loopback HTTP; the simulator adds ``latency`` to every
request. A probe sends its verify call and every identity call at once (one round trip, issue #14).
"Sequential" runs the very same probe with its calls forced one request after another
(``venues.http.gather_identities`` replaced by a loop), so the two columns differ only in concurrency.
Target: p50 at most 1.3 x the per-request latency (one round trip plus overhead), whatever the number of
identities.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp

from venues import build_probe, http
from venues.base import Venue
from venues.simulator import Faults, Simulator

KINDS: list[tuple[Venue, str | None]] = [
    (Venue.BINANCE, None),
    (Venue.OKX, None),
    (Venue.BYBIT, None),
    (Venue.COINBASE, "cdp"),
    (Venue.COINBASE, "exchange"),
    (Venue.KRAKEN, "spot"),
    (Venue.KRAKEN, "futures"),
]
TARGET_RATIO = 1.3


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@contextmanager
def sequential_identities() -> Iterator[None]:
    """Make every probe discover identities one request after another (the comparison column)."""
    original = http.gather_identities

    async def one_by_one(checks: Iterable[Awaitable[Any]]) -> list[Any]:
        results: list[Any] = []
        for check in checks:
            try:
                results.append(await check)
            except Exception as exc:  # same contract as gather(return_exceptions=True)
                results.append(exc)
        return results

    http.gather_identities = one_by_one
    try:
        yield
    finally:
        http.gather_identities = original


async def measure(
    sim: Simulator, session: aiohttp.ClientSession, venue: Venue, kind: str | None, probes: int
) -> tuple[list[float], int]:
    """Wall time of ``probes`` verifications (one at a time, fresh keys) and requests per verification.

    Each verification gets a fresh probe (same session, so connections are reused): its client-side rate
    limiter starts idle, so this measures latency. Back to back, Binance's weight budget (36 weight a probe
    against 50/s) would make it a throughput measurement instead.
    """
    keys = [sim.add_key(venue, kind=kind, ip_allowlist=("127.0.0.1",)) for _ in range(probes)]
    before = sim.stats(venue).requests
    times = []
    for key in keys:
        probe = build_probe(venue, session, base_url=sim.urls[venue])
        started = time.perf_counter()
        await probe.probe(key.api_keys)
        times.append(time.perf_counter() - started)
    return times, round((sim.stats(venue).requests - before) / probes)


async def run(probes: int = 30, latency: float = 0.05) -> dict[str, Any]:
    rows = []
    async with Simulator(seed=3, enforce_rate_limits=False) as sim, aiohttp.ClientSession() as session:
        for venue in Venue:
            sim.set_faults(venue, Faults(latency=latency))
        for venue, kind in KINDS:
            await measure(sim, session, venue, kind, 2)  # warm the connection pool
            concurrent, requests = await measure(sim, session, venue, kind, probes)
            with sequential_identities():
                sequential, _ = await measure(sim, session, venue, kind, probes)
            p50 = statistics.median(concurrent)
            rows.append(
                {
                    "venue": venue.value + (f"/{kind}" if kind else ""),
                    "requests": requests,
                    "p50_ms": p50 * 1000,
                    "p99_ms": percentile(concurrent, 0.99) * 1000,
                    "sequential_p50_ms": statistics.median(sequential) * 1000,
                    "p50_over_latency": p50 / latency,
                    "ok": p50 / latency <= TARGET_RATIO,
                }
            )
    return {"latency_ms": latency * 1000, "probes": probes, "rows": rows, "ok": all(r["ok"] for r in rows)}


def render(result: dict[str, Any]) -> str:
    lines = [
        f"verification latency, {result['probes']} probes per venue, {result['latency_ms']:.0f} ms per request",
        f"{'venue':<20}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'seq p50':>9}{'p50/lat':>9}  target <= {TARGET_RATIO}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['venue']:<20}{r['requests']:>9}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
            f"{r['sequential_p50_ms']:>9.1f}{r['p50_over_latency']:>9.2f}  {'ok' if r['ok'] else 'MISSED'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.probes, args.latency))
    print(render(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
