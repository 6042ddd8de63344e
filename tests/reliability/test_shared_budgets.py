"""Shared venue budgets: four engine worker processes behind one egress IP stay within the per-IP limits.

Binance counts request weight per IP and Bybit 600 requests per 5 s per IP (docs/venues.md §1.6, §3.6). Each
process's own buckets allow half of that, so four processes behind one IP would together send up to twice the
venue's limit. Here four real worker processes (``worker_process.py``) of one egress group verify a backlog of
Binance and Bybit credentials against the simulator over loopback HTTP, with the simulator enforcing the
venues' per-IP limits (every request counts against 127.0.0.1); no request may go over them.

``bench/budgets.py`` runs the same backlog with the sharing off too (``ENGINE_SHARED_VENUE_BUDGETS=0``: the
per-process limits), to show the violations that gives.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from reliability_support import WorkerProcess, fetch, wait_until

from engine import CredentialEngine, Venue
from venues.simulator import Simulator

OWNER = "owner-budgets"
PROCESSES = 4
WORKERS = 16  # concurrent jobs per process: enough to spend each process's own budget many times over


async def verify_backlog(
    make_engine: Any,
    database_url: str,
    master_keys: str,
    folder: Path,
    *,
    counts: dict[Venue, int],
    shared: bool,
    timeout: float,  # noqa: ASYNC109 - the run's deadline
) -> dict[str, Any]:
    """Create the backlog, start the processes, wait until every credential is VERIFIED; the simulator's figures."""
    async with Simulator(seed=41, enforce_rate_limits=True) as sim:
        producer: CredentialEngine = await make_engine(probes={}, venue_urls=sim.urls, workers=0)
        for venue, count in counts.items():
            for _ in range(count):
                key = sim.add_key(venue)
                await producer.create_credential(
                    OWNER, venue=venue, api_key=key.api_key, api_secret=key.api_secret
                )
        env = {
            "DATABASE_URL": database_url,
            "ENGINE_MASTER_KEYS": master_keys,
            "ENGINE_DATA_DIR": str(folder),
            "ENGINE_VENUE_URLS": ",".join(f"{v.value}={url}" for v, url in sim.urls.items()),
            "ENGINE_WORKERS": str(WORKERS),
            "ENGINE_LOG_LEVEL": "INFO",
            "ENGINE_EGRESS_GROUP": "rack-1",
            "ENGINE_SHARED_VENUE_BUDGETS": "1" if shared else "0",
            "RELIABILITY_OVERRIDES": json.dumps(
                {"poll_interval": 0.2, "backoff_base": 0.2, "backoff_max": 2.0, "max_attempts": 500}
            ),
        }
        workers = [WorkerProcess(env, folder / f"worker-{i}.stderr") for i in range(PROCESSES)]
        started = time.monotonic()
        try:
            await asyncio.gather(*(w.start() for w in workers))

            async def all_verified() -> bool:
                rows = await fetch(
                    database_url,
                    "SELECT count(*) AS n FROM credentials WHERE owner_id = $1 AND status <> 'VERIFIED'",
                    OWNER,
                )
                return int(rows[0]["n"]) == 0

            await wait_until(all_verified, timeout=timeout, interval=0.5, what="backlog verified")
            seconds = time.monotonic() - started
        finally:
            codes = await asyncio.gather(*(w.stop() for w in workers))
        assert codes == [0] * PROCESSES, codes
        figures: dict[str, Any] = {"seconds": seconds}
        spans = await fetch(
            database_url,
            "SELECT venue, extract(epoch FROM max(verified_at) - min(verified_at))::float8 AS span"
            " FROM credentials WHERE owner_id = $1 GROUP BY venue",
            OWNER,
        )
        for row in spans:
            figures[f"{row['venue'].lower()}_verify_seconds"] = row["span"]
        for venue in counts:
            stats = sim.stats(venue)
            name = venue.value.lower()
            figures[f"{name}_requests"] = stats.requests
            figures[f"{name}_ip_violations"] = stats.ip_rate_limit_violations
            figures[f"{name}_violations"] = stats.rate_limit_violations
        return figures


async def test_four_processes_share_the_per_ip_budgets(
    make_engine: Any, database_url: str, master_keys: str, tmp_path: Path, size: Any, report: Any
) -> None:
    """4 worker processes, one egress group, a backlog on Binance and Bybit: 0 per-IP rate-limit violations."""
    counts = {Venue.BYBIT: size(240, 1500), Venue.BINANCE: size(16, 400)}
    figures = await verify_backlog(
        make_engine, database_url, master_keys, tmp_path, counts=counts, shared=True, timeout=size(90, 600)
    )
    report("shared venue budgets", processes=PROCESSES, **figures)
    assert figures["bybit_ip_violations"] == 0, figures
    assert figures["binance_ip_violations"] == 0, figures
    assert figures["bybit_violations"] == 0 and figures["binance_violations"] == 0, figures
    # the processes drew on their group's shared rows (with the sharing off the same backlog gave 194 refused
    # Bybit requests: 240 probes are 720 requests, over the 600 per 5 s the four processes' buckets let through)
    rows = await fetch(database_url, "SELECT budget, egress_group FROM venue_budgets ORDER BY budget")
    assert {(r["budget"], r["egress_group"]) for r in rows} >= {
        ("bybit", "rack-1"),
        ("binance:api", "rack-1"),
    }
