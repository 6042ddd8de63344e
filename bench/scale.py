"""Scaling out: 1, 2 and 4 worker processes on one database draining the same backlog of verify jobs.

    python -m bench.scale [--n 3000] [--processes 1,2,4] [--workers 50] [--latency 0.05] [--rounds 2]

For each process count P: N credentials (spread over the five venues and every key kind, keys registered on the
simulator) are loaded PENDING for a fresh owner; P real OS processes each open a ``CredentialEngine`` with
``workers`` concurrent jobs (``python -m bench.scale --worker``, the simulator's URLs, client-side venue limits
lifted) and report ready; then the parent enqueues the N verify jobs in one statement (one commit, one NOTIFY:
every process starts together) and waits until none is PENDING. Throughput is N over the span from that commit to
the last ``verified_at``; the scaling ratio is against one process, measured in the same run. The counts run in
``rounds`` interleaved rounds (1, 2, 4, 1, 2, 4) and each keeps its best: on a shared machine the least disturbed
round is the closest to what the engine can do.

Every process runs ``workers`` jobs, so P processes also bring P times the concurrency: the ratio shows what
another process buys on this machine. The exchange simulator (its own process, ``latency`` per request) and
PostgreSQL share the same cores; on 2 cores, 4 processes cannot scale linearly.
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
from engine.engine import CredentialEngine
from venues.base import Venue

CONFIG_ENV = "BENCH_SCALE_CONFIG"
READY_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0
POLL = 0.2


# ---- the worker process ------------------------------------------------------------------------------------


async def worker_process() -> None:
    """A worker process: open an engine with workers, say ready, run until stdin closes, close."""
    spec = json.loads(os.environ[CONFIG_ENV])
    common.quiet_logs(spec.get("log_level", "INFO"))
    config = common.engine_config(
        spec["dsn"],
        venue_urls={Venue(name): url for name, url in spec["venue_urls"].items()},
        workers=int(spec["workers"]),
        master_keys=spec["master_keys"],
    )
    async with CredentialEngine(config):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.read)  # the parent closes our stdin to stop us


class WorkerProcesses:
    """P worker processes sharing one configuration."""

    def __init__(self, count: int, spec: dict[str, Any]) -> None:
        self.count = count
        self.spec = spec
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> WorkerProcesses:
        env = common.child_env()
        env[CONFIG_ENV] = json.dumps(self.spec)
        for _ in range(self.count):
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.scale",
                    "--worker",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=common.REPO_ROOT,
                    env=env,
                )
            )
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
            if line.strip() != b"ready":
                raise RuntimeError("a worker process did not start (see its stderr above)")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def cpu(self) -> float:
        return sum(common.process_cpu(p.pid) or 0.0 for p in self.procs)


# ---- the parent --------------------------------------------------------------------------------------------


async def one_count(
    engine: CredentialEngine,
    watch: asyncpg.Connection,
    db: common.BenchDatabase,
    sim: common.SimulatorProcess,
    keys: list[common.SimKey],
    processes: int,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Load N PENDING credentials, start the processes, enqueue, time until all are VERIFIED."""
    owner = f"scale-{processes}p-{uuid.uuid4().hex[:6]}"  # a fresh owner: the same keys are not duplicates
    items = [common.BulkCredential(uuid.uuid4(), owner, key.venue, key.keys) for key in keys]
    await common.bulk_load(db.dsn, engine.store, items)
    payloads = [{"credentialId": str(item.credential_id), "version": 1} for item in items]
    async with WorkerProcesses(processes, spec) as workers:
        meter = common.CpuMeter(pg_pid=db.pg_pid, others={"simulator": sim.pid})
        meter.start()
        cpu_before = workers.cpu()
        async with engine.db.transaction() as conn:  # one commit: every process is woken by the same NOTIFY
            start: Any = await watch.fetchval("SELECT clock_timestamp()")
            await engine.queue.enqueue_many(jobs.VERIFY, payloads, conn=conn)
        deadline = time.monotonic() + RUN_TIMEOUT
        while await watch.fetchval(
            "SELECT count(*) FROM credentials WHERE owner_id = $1 AND status = 'PENDING'", owner
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{processes} process(es): backlog not drained after {RUN_TIMEOUT:.0f} s")
            await asyncio.sleep(POLL)
        cpu = meter.stop()
        worker_cpu = workers.cpu() - cpu_before
    row = await watch.fetchrow(
        "SELECT max(verified_at) AS done, count(*) FILTER (WHERE status = 'VERIFIED') AS verified "
        "FROM credentials WHERE owner_id = $1",
        owner,
    )
    assert row is not None
    seconds = (row["done"] - start).total_seconds()
    n = len(items)
    return {
        "processes": processes,
        "n": n,
        "verified": int(row["verified"]),
        "seconds": seconds,
        "per_second": int(row["verified"]) / seconds,
        "cpu_per_1000": {
            "workers": worker_cpu / n * 1000,
            "postgres": None if cpu.get("postgres") is None else float(cpu["postgres"] or 0) / n * 1000,
            "simulator": None if cpu.get("simulator") is None else float(cpu["simulator"] or 0) / n * 1000,
        },
    }


async def run(
    n: int = 3000,
    processes: tuple[int, ...] = (1, 2, 4),
    workers: int = 50,
    latency: float = 0.05,
    rounds: int = 2,
    log_level: str = "INFO",
) -> dict[str, Any]:
    """The backlog drained by each process count, one after another (``rounds`` times, interleaved: 1, 2, 4,
    1, 2, 4), on one database and one simulator; each count keeps its best round (the least disturbed)."""
    common.quiet_logs(log_level)
    runs: list[dict[str, Any]] = []
    async with common.bench_database("scale") as db, common.SimulatorProcess(latency=latency) as sim:
        keys = await sim.add_keys([(venue, kind, None) for venue, kind in common.spread(n)])
        config = common.engine_config(db.dsn, venue_urls=sim.urls, workers=0)
        spec = {
            "dsn": db.dsn,
            "venue_urls": {venue.value: url for venue, url in sim.urls.items()},
            "workers": workers,
            "master_keys": config.master_keys,
            "log_level": log_level,
        }
        watch = await asyncpg.connect(db.dsn)
        try:
            async with CredentialEngine(config) as engine:  # no workers here: loads, enqueues, watches
                for _ in range(rounds):
                    for count in processes:
                        runs.append(await one_count(engine, watch, db, sim, keys, count, spec))
        finally:
            await watch.close()
    rows = []
    for count in processes:
        mine = [r for r in runs if r["processes"] == count]
        best = dict(max(mine, key=lambda r: r["per_second"]))
        best["rounds"] = [round(r["per_second"], 1) for r in mine]
        rows.append(best)
    base = rows[0]["per_second"]
    for row in rows:
        row["ratio"] = row["per_second"] / base
        row["ideal"] = row["processes"] / rows[0]["processes"]
    result: dict[str, Any] = {
        "n": n,
        "workers_per_process": workers,
        "latency_ms": latency * 1000,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "rows": rows,
        "runs": runs,
        "ok": all(r["verified"] == r["n"] for r in runs),
    }
    result["summary"] = [
        common.figure(
            f"{r['processes']} process{'es' if r['processes'] > 1 else ''}: verify backlog",
            r["per_second"],
            "cred/s",
            note=f"{r['ratio']:.2f} x 1 process (ideal {r['ideal']:.0f} x); rounds {r['rounds']}",
        )
        for r in rows
    ] + [
        common.figure(
            "all verified",
            sum(r["verified"] for r in runs),
            "",
            target=f"= {n * len(runs):,}",
            ok=result["ok"],
        )
    ]
    return result


def render(result: dict[str, Any]) -> str:
    head = (
        f"scale: backlog of {result['n']:,} verify jobs, {result['workers_per_process']} workers per process, "
        f"{result['latency_ms']:.0f} ms per request, {result['cpus']} CPUs (simulator and PostgreSQL included), "
        f"best of {result['rounds']} interleaved rounds"
    )
    rows = [
        [
            r["processes"],
            r["per_second"],
            f"{r['ratio']:.2f} x",
            f"{r['ideal']:.0f} x",
            r["cpu_per_1000"]["workers"],
            r["cpu_per_1000"]["postgres"],
            r["cpu_per_1000"]["simulator"],
        ]
        for r in result["rows"]
    ]
    body = common.table(
        ["processes", "cred/s", "vs 1", "ideal", "CPU s/1000 workers", "PostgreSQL", "simulator"],
        rows,
        right=[0, 1, 2, 3, 4, 5, 6],
    )
    return head + "\n" + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json", help="also write the full result to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a child of this benchmark
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(worker_process())
        return 0
    counts = tuple(int(p) for p in args.processes.split(","))
    result = asyncio.run(run(args.n, counts, args.workers, args.latency, args.rounds, args.log_level))
    print(render(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
