"""Fair work across owners: one owner's backlog of verifications against another owner's single credential.

    python -m bench.fairness [--n 5000] [--samples 30] [--workers 10] [--latency 0.05]

The engine (embedded in this process, ``workers`` jobs at a time, the engine's default 10) verifies against the
simulator (its own process, ``latency`` added to every request, limits lifted as in the other benchmarks).

1. **No backlog**: owner B creates ``samples`` credentials one after another, each waited for until VERIFIED.
2. **Backlog**: owner A holds N VERIFIED credentials (bulk-loaded) and asks for their re-verification, N
   ``verify_credential`` calls (the API's path, ``PRODUCERS`` at a time); once they are all enqueued, B creates
   ``samples`` more credentials the same way, while A's backlog is being worked off.

B's create -> VERIFIED latency (server timestamps, ``created_at`` to ``verified_at``) is reported as p50 and p99,
in milliseconds and as a multiple of the per-request latency, for both phases. Target: with the
backlog, B's p99 stays within 3 x its p99 without the backlog. ``a_backlog_left`` tells how much of A's
backlog was still queued when B's last sample finished (the figures mean something only if it is large).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from bench import common
from engine.config import Quotas
from engine.engine import CredentialEngine
from engine.models import CredentialStatus

TARGET = 3.0  # B's p99 with the backlog over its p99 without
PRODUCERS = 20  # concurrent verify_credential calls of owner A
OWNER_A = "owner-a-bulk"
OWNER_B = "owner-b"
WAIT = 120.0  # seconds one of B's credentials may take before the benchmark gives up


async def b_samples(
    engine: CredentialEngine, watch: asyncpg.Connection, keys: Sequence[common.SimKey]
) -> list[float]:
    """B creates one credential per key, one after another, each waited for; latencies in seconds."""
    ids: list[uuid.UUID] = []
    for key in keys:
        cred = await engine.create_credential(
            OWNER_B,
            venue=key.venue,
            api_key=key.keys.api_key,
            api_secret=key.keys.api_secret,
            api_passphrase=key.keys.api_passphrase,
        )
        done = await engine.wait_for_status(
            OWNER_B, cred.credential_id, {CredentialStatus.VERIFIED, CredentialStatus.FAILED}, timeout=WAIT
        )
        if done.status is not CredentialStatus.VERIFIED:
            raise RuntimeError(f"B's credential ended {done.status.value}: {done.failure_reason}")
        ids.append(cred.credential_id)
    rows = await watch.fetch(
        "SELECT extract(epoch FROM verified_at - created_at)::float8 AS s FROM credentials WHERE id = ANY($1)",
        ids,
    )
    return [float(r["s"]) for r in rows]


def figures(latencies: Sequence[float], latency: float) -> dict[str, float]:
    p50, p99 = common.percentile(latencies, 0.5), common.percentile(latencies, 0.99)
    return {
        "n": len(latencies),
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": max(latencies) * 1000,
        "p50_over_latency": p50 / latency,
        "p99_over_latency": p99 / latency,
    }


async def run(
    n: int = 5000, samples: int = 30, workers: int = 10, latency: float = 0.05, log_level: str = "INFO"
) -> dict[str, Any]:
    """Both phases on one engine; see the module docstring."""
    common.quiet_logs(log_level)
    async with common.bench_database("fairness") as db, common.SimulatorProcess(latency=latency) as sim:
        a_keys = await sim.add_keys([(venue, kind, None) for venue, kind in common.spread(n)])
        b_keys = await sim.add_keys([(venue, kind, None) for venue, kind in common.spread(2 * samples + 5)])
        warm, quiet, loaded = b_keys[:5], b_keys[5 : 5 + samples], b_keys[5 + samples :]
        # no verify-request quota: A's backlog of n verify requests is the point here (the quota, 1,000 an hour
        # by default, would refuse it; engine/bounds/quotas.py), fairness is about the claims
        config = common.engine_config(
            db.dsn, venue_urls=sim.urls, workers=workers, quotas=Quotas(verify_requests_per_hour=0)
        )
        watch = await asyncpg.connect(db.dsn)
        try:
            async with CredentialEngine(config) as engine:
                items = [
                    common.BulkCredential(uuid.uuid4(), OWNER_A, key.venue, key.keys, verified=True)
                    for key in a_keys
                ]
                await common.bulk_load(db.dsn, engine.store, items)
                await b_samples(engine, watch, warm)  # connections to every venue, caches
                without = await b_samples(engine, watch, quiet)

                started = time.perf_counter()
                gate = asyncio.Semaphore(PRODUCERS)

                async def verify(item: common.BulkCredential) -> None:
                    async with gate:
                        await engine.verify_credential(OWNER_A, item.credential_id)

                await asyncio.gather(*(verify(item) for item in items))
                enqueue_seconds = time.perf_counter() - started
                queued_at_start = await backlog(watch)
                with_backlog = await b_samples(engine, watch, loaded)
                left = await backlog(watch)
                sampled_seconds = time.perf_counter() - started - enqueue_seconds
        finally:
            await watch.close()
    quiet_figures = figures(without, latency)
    loaded_figures = figures(with_backlog, latency)
    ratio = loaded_figures["p99_ms"] / quiet_figures["p99_ms"]
    result: dict[str, Any] = {
        "n": n,
        "samples": samples,
        "workers": workers,
        "latency_ms": latency * 1000,
        "without_backlog": quiet_figures,
        "with_backlog": loaded_figures,
        "p99_ratio": ratio,
        "a_enqueue_seconds": enqueue_seconds,
        "a_backlog_at_start": queued_at_start,
        "a_backlog_left": left,
        "b_sampling_seconds": sampled_seconds,
        "ok": ratio <= TARGET and left > 0,
    }
    result["summary"] = summary(result)
    return result


async def backlog(watch: asyncpg.Connection) -> int:
    """A's verifications not yet finished (queued or running)."""
    return int(
        await watch.fetchval(
            "SELECT count(*) FROM queue_jobs WHERE kind = 'verify' AND state IN ('queued', 'running') "
            "AND payload->>'credentialId' IN (SELECT id::text FROM credentials WHERE owner_id = $1)",
            OWNER_A,
        )
    )


def summary(r: dict[str, Any]) -> list[dict[str, Any]]:
    f = common.figure
    quiet, loaded = r["without_backlog"], r["with_backlog"]
    lat = r["latency_ms"]
    return [
        f("B p50, no backlog", quiet["p50_ms"], "ms", note=f"{quiet['p50_over_latency']:.1f} x {lat:.0f} ms"),
        f("B p99, no backlog", quiet["p99_ms"], "ms", note=f"{quiet['p99_over_latency']:.1f} x {lat:.0f} ms"),
        f(
            "B p50, A's backlog",
            loaded["p50_ms"],
            "ms",
            note=f"{loaded['p50_over_latency']:.1f} x {lat:.0f} ms",
        ),
        f(
            "B p99, A's backlog",
            loaded["p99_ms"],
            "ms",
            note=f"{loaded['p99_over_latency']:.1f} x {lat:.0f} ms",
        ),
        f(
            "B p99 with / without backlog",
            r["p99_ratio"],
            "x",
            target=f"<= {TARGET:g}",
            ok=r["p99_ratio"] <= TARGET,
            note=f"A: {r['n']:,} verifications, {r['workers']} workers, {r['samples']} B creates per phase",
        ),
        f(
            "A's backlog left after B's samples",
            r["a_backlog_left"],
            "jobs",
            target="> 0",
            ok=r["a_backlog_left"] > 0,
            note=f"{r['a_backlog_at_start']:,} when B started",
        ),
    ]


def render(result: dict[str, Any]) -> str:
    head = (
        f"fairness: owner A's {result['n']:,} verifications vs owner B's creates, {result['latency_ms']:.0f} ms per "
        f"request, {result['workers']} workers"
    )
    return head + "\n" + common.render_summary(result["summary"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json", help="also write the full result to this file")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.n, args.samples, args.workers, args.latency, args.log_level))
    print(render(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
