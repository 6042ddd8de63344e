"""Shared venue budgets: 4 worker processes behind one IP verifying a Binance and Bybit backlog, with the per-IP
budgets shared through PostgreSQL and, in the same run for contrast, kept per process.

    python -m bench.budgets [--processes 4] [--seconds 75] [--bybit 900] [--binance 500] [--modes shared,per-process]

For each mode: a fresh exchange simulator (in this process) enforcing the venues' documented per-IP limits
(Binance request weight per minute per host family, Bybit 600 requests per 5 s: docs/venues.md §1.6, §3.6; every
request comes from 127.0.0.1), ``bybit`` + ``binance`` credentials loaded PENDING, ``processes`` real worker
processes (``python -m bench.budgets --worker``, 16 jobs each, client-side venue limits ON, egress group
"bench", ``shared_venue_budgets`` as the mode says), then every verification enqueued in one commit. After
``seconds`` (or once the backlog is verified) the processes stop and the simulator's counts are read: requests,
per-IP rate-limit violations (each one a refused request: a 429 or 403 the venue would answer, on Binance a step
towards a 418 IP ban), verified credentials. Binance's budget is a minute long: ``seconds`` must exceed it for
the per-process limits to show their violations there (4 processes x 50 weight/s take about 55 s to spend the
6,000 of ``/api``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

import asyncpg

from bench import common
from engine import jobs
from engine.config import EngineConfig
from engine.engine import CredentialEngine
from venues.base import ApiKeys, Venue
from venues.simulator import Simulator

CONFIG_ENV = "BENCH_BUDGETS_CONFIG"
READY_TIMEOUT = 90.0
WORKERS = 16
POLL = 0.5
MODES = {"shared": True, "per-process": False}


async def worker_process() -> None:
    """A worker process: an engine with workers and the venues' client-side limits; runs until stdin closes."""
    spec = json.loads(os.environ[CONFIG_ENV])
    common.quiet_logs(spec.get("log_level", "INFO"))
    config = EngineConfig(
        database_url=spec["dsn"],
        venue_urls={Venue(name): url for name, url in spec["venue_urls"].items()},
        workers=WORKERS,
        master_keys=spec["master_keys"],
        venue_rate_limits=True,  # the point: the venues' documented limits, client side
        shared_venue_budgets=spec["shared"],
        egress_group="bench",
        max_attempts=1000,
        backoff_base=0.2,
        backoff_max=2.0,
        poll_interval=0.5,
    )
    async with CredentialEngine(config):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.read)


async def start_workers(count: int, spec: dict[str, Any]) -> list[asyncio.subprocess.Process]:
    env = common.child_env()
    env[CONFIG_ENV] = json.dumps(spec)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.budgets",
            "--worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=common.REPO_ROOT,
            env=env,
        )
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        if line.strip() != b"ready":
            raise RuntimeError("a worker process did not start (see its stderr above)")
    return procs


async def stop_workers(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def one_mode(
    engine: CredentialEngine,
    watch: asyncpg.Connection,
    db: common.BenchDatabase,
    *,
    shared: bool,
    processes: int,
    seconds: float,
    counts: dict[Venue, int],
    log_level: str,
) -> dict[str, Any]:
    """One mode on a fresh simulator: load, start the processes, enqueue, run ``seconds``, count."""
    owner = f"budgets-{'shared' if shared else 'alone'}-{uuid.uuid4().hex[:6]}"
    async with Simulator(seed=17, enforce_rate_limits=True) as sim:
        items = []
        for venue, count in counts.items():
            for _ in range(count):
                key = sim.add_key(venue)
                items.append(
                    common.BulkCredential(uuid.uuid4(), owner, venue, ApiKeys(key.api_key, key.api_secret))
                )
        await common.bulk_load(db.dsn, engine.store, items)
        spec = {
            "dsn": db.dsn,
            "venue_urls": {venue.value: url for venue, url in sim.urls.items()},
            "master_keys": engine.config.master_keys,
            "shared": shared,
            "log_level": log_level,
        }
        procs = await start_workers(processes, spec)
        try:
            payloads = [{"credentialId": str(item.credential_id), "version": 1} for item in items]
            async with engine.db.transaction() as conn:  # one commit: every process starts together
                await engine.queue.enqueue_many(jobs.VERIFY, payloads, conn=conn)
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                pending = await watch.fetchval(
                    "SELECT count(*) FROM credentials WHERE owner_id = $1 AND status = 'PENDING'", owner
                )
                if not pending:
                    break
                await asyncio.sleep(POLL)
            elapsed = time.monotonic() - started
        finally:
            await stop_workers(procs)
            # what this mode left undone must not run in the next one (against a simulator that lacks its keys)
            await watch.execute("DELETE FROM queue_jobs WHERE state IN ('queued', 'running')")
        verified = {
            row["venue"]: int(row["n"])
            for row in await watch.fetch(
                "SELECT venue, count(*) AS n FROM credentials WHERE owner_id = $1 AND status = 'VERIFIED'"
                " GROUP BY venue",
                owner,
            )
        }
        venues: dict[str, dict[str, Any]] = {}
        for venue in counts:
            stats = sim.stats(venue)
            venues[venue.value] = {
                "backlog": counts[venue],
                "verified": verified.get(venue.value, 0),
                "requests": stats.requests,
                "ip_violations": stats.ip_rate_limit_violations,
                "violations": stats.rate_limit_violations,
                "verified_per_second": verified.get(venue.value, 0) / elapsed,
            }
    return {"mode": "shared" if shared else "per-process", "seconds": elapsed, "venues": venues}


async def run(
    processes: int = 4,
    seconds: float = 75.0,
    bybit: int = 900,
    binance: int = 500,
    modes: tuple[str, ...] = ("per-process", "shared"),
    log_level: str = "INFO",
) -> dict[str, Any]:
    """Each mode in turn on one database, each on its own simulator (fresh per-IP windows)."""
    common.quiet_logs(log_level)
    counts = {venue: n for venue, n in ((Venue.BYBIT, bybit), (Venue.BINANCE, binance)) if n > 0}
    runs = []
    async with common.bench_database("budgets") as db:
        config = common.engine_config(db.dsn, workers=0)
        watch = await asyncpg.connect(db.dsn)
        try:
            async with CredentialEngine(config) as engine:  # no workers here: loads, enqueues, watches
                for mode in modes:
                    runs.append(
                        await one_mode(
                            engine,
                            watch,
                            db,
                            shared=MODES[mode],
                            processes=processes,
                            seconds=seconds,
                            counts=counts,
                            log_level=log_level,
                        )
                    )
        finally:
            await watch.close()
    by_mode = {r["mode"]: r for r in runs}
    result: dict[str, Any] = {
        "processes": processes,
        "seconds": seconds,
        "counts": {v.value: n for v, n in counts.items()},
    }
    result["runs"] = runs
    summary = []
    for mode, run_ in by_mode.items():
        for venue, figures in run_["venues"].items():
            shared = mode == "shared"
            summary.append(
                common.figure(
                    f"{processes} processes, {mode} budgets: {venue} per-IP violations",
                    figures["ip_violations"],
                    "",
                    target="= 0" if shared else "",
                    ok=(figures["ip_violations"] == 0) if shared else None,
                    note=f"{figures['requests']:,} requests, {figures['verified']:,} of {figures['backlog']:,}"
                    f" verified in {run_['seconds']:.0f} s",
                )
            )
    result["summary"] = summary
    result["ok"] = all(
        figures["ip_violations"] == 0 for figures in by_mode.get("shared", {"venues": {}})["venues"].values()
    )
    return result


def render(result: dict[str, Any]) -> str:
    head = (
        f"budgets: {result['processes']} worker processes behind one IP, backlog {result['counts']}, at most "
        f"{result['seconds']:.0f} s per mode, simulator enforcing the per-IP limits"
    )
    rows = [
        [
            run_["mode"],
            venue,
            f["backlog"],
            f["verified"],
            f["requests"],
            f["ip_violations"],
            f["violations"],
            f["verified_per_second"],
            run_["seconds"],
        ]
        for run_ in result["runs"]
        for venue, f in run_["venues"].items()
    ]
    body = common.table(
        [
            "mode",
            "venue",
            "backlog",
            "verified",
            "requests",
            "per-IP violations",
            "all violations",
            "cred/s",
            "s",
        ],
        rows,
        right=[2, 3, 4, 5, 6, 7, 8],
    )
    return head + "\n" + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=75.0)
    parser.add_argument("--bybit", type=int, default=900)
    parser.add_argument("--binance", type=int, default=500)
    parser.add_argument("--modes", default="per-process,shared")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json", help="also write the full result to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a child of this benchmark
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(worker_process())
        return 0
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    result = asyncio.run(run(args.processes, args.seconds, args.bybit, args.binance, modes, args.log_level))
    print(render(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
