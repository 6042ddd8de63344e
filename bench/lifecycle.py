"""The credential lifecycle at load on the exchange simulator, against the limit: the same signed requests with no
engine at all.

    python -m bench.lifecycle [--n 5000] [--workers 50] [--latency 0.05]      (--n 500 for a quick run)

N credentials spread over the five venues and every key kind go through the engine (embedded in this process, as
a trading backend embeds it) against the simulator (its own process, ``latency`` added to every request, rate
limits not enforced; the engine's client-side venue limits are lifted too: a simulator has no documented limits):

* **create -> VERIFIED**: N ``create_credential`` calls (``producers`` at a time) while ``workers`` jobs run;
  throughput is N over the span from the first create to the last VERIFIED (server timestamps); latency
  percentiles under that full load (queueing included), and again at half that rate (``latency_n`` credentials
  created at an even pace), which is the latency a caller sees when the engine keeps up;
* CPU seconds per 1,000 credentials: this process (the engine and the calls into it), PostgreSQL, the simulator;
* **rotate** (staged, new keys of the same venue account, promoted once verified) and **revoke** (terminal; the
  ``revoke_cascade`` job that follows) throughput over the same N credentials;
* **verify only**: the same N keys loaded as PENDING credentials of another owner (straight into the tables, sealed
  by the engine's vault) and their verify jobs enqueued in one statement, so that what creating costs on top of
  verifying shows in the same run.

The **limit** is a bare aiohttp client making the same signed requests to the same simulator at the same
concurrency: the venues' real probe modules (``build_probe(..., rate_limited=False).probe(keys)``) under a
semaphore of ``workers``, with no database and no queue. It runs right before and right after the create ->
VERIFIED phase (the engine closed meanwhile, the server's autovacuum finished and a checkpoint written before
each: :func:`quiet_database`), so that both flank the phase they are compared with; the ratio uses their mean
and both are printed (a shared machine is noisy). Target: the engine reaches at least 0.9 x the limit's
credentials/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg

from bench import common
from engine import jobs
from engine.engine import CredentialEngine
from venues import build_probe
from venues.base import ProbeFailure, Venue

TARGET_RATIO = 0.9  # issue #14: create -> VERIFIED at 0.9 x the bare client on an idle machine
OWNERS = 50  # credentials are spread over this many owners
POLL = 0.2  # seconds between progress checks (the figures come from server timestamps, not from this)
PHASE_TIMEOUT = 600.0


# ---- the limit ---------------------------------------------------------------------------------------------


async def run_limit(
    urls: dict[Venue, str], keys: Sequence[common.SimKey], concurrency: int
) -> dict[str, Any]:
    """The same probes as the engine's, ``concurrency`` at a time, from a bare client: credentials/s and CPU."""
    connector = aiohttp.TCPConnector(limit=200, ttl_dns_cache=300)  # what the engine's session uses
    async with aiohttp.ClientSession(connector=connector) as session:
        probes = {
            venue: build_probe(venue, session, base_url=urls[venue], rate_limited=False) for venue in Venue
        }
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        failures: dict[str, int] = {}

        async def one(key: common.SimKey) -> None:
            async with gate:
                started = time.perf_counter()
                try:
                    await probes[key.venue].probe(key.keys)
                except ProbeFailure as failure:
                    failures[failure.outcome.value] = failures.get(failure.outcome.value, 0) + 1
                latencies.append(time.perf_counter() - started)

        meter = common.CpuMeter()
        meter.start()
        await asyncio.gather(*(one(key) for key in keys))
        cpu = meter.stop()
    elapsed = float(cpu["wall"] or 0.0)
    return {
        "n": len(keys),
        "seconds": elapsed,
        "per_second": len(keys) / elapsed,
        "probe_p50_ms": common.percentile(latencies, 0.5) * 1000,
        "probe_p99_ms": common.percentile(latencies, 0.99) * 1000,
        "cpu_per_1000": (cpu["self"] or 0.0) / len(keys) * 1000,
        "failures": failures,
    }


# ---- the engine --------------------------------------------------------------------------------------------


async def bounded(items: Sequence[Any], concurrency: int, call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    """``call(item)`` for every item, ``concurrency`` at a time; results in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Any) -> Any:
        async with gate:
            return await call(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, within: float = PHASE_TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {within:.0f} s")
        await asyncio.sleep(POLL)


def span(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


class Phases:
    """Runs the lifecycle phases on one open engine, measuring with a separate connection."""

    def __init__(
        self,
        engine: CredentialEngine,
        watch: asyncpg.Connection,
        *,
        producers: int,
        pg_pid: int | None,
        sim: common.SimulatorProcess,
    ) -> None:
        self.engine = engine
        self.watch = watch
        self.producers = producers
        self.pg_pid = pg_pid
        self.sim = sim

    def meter(self) -> common.CpuMeter:
        meter = common.CpuMeter(pg_pid=self.pg_pid, others={"simulator": self.sim.pid})
        meter.start()
        return meter

    async def server_now(self) -> datetime:
        now: datetime = await self.watch.fetchval("SELECT clock_timestamp()")
        return now

    async def none_left(self, sql: str, *args: Any) -> bool:
        """True when ``sql`` (a cheap count over the whole table: every row belongs to this run) gives 0."""
        return int(await self.watch.fetchval(sql, *args)) == 0

    async def create(self, keys: Sequence[common.SimKey], *, pace: float | None = None) -> dict[str, Any]:
        """Create a credential per key (``producers`` at a time, or one every ``pace`` seconds) and wait until
        every one is VERIFIED (or FAILED). Figures from the rows' own timestamps."""
        slots: list[uuid.UUID | None] = [None] * len(keys)  # in the order of ``keys``
        meter = self.meter()
        start = await self.server_now()
        began_wall = time.perf_counter()

        async def create_one(index_key: tuple[int, common.SimKey]) -> None:
            index, key = index_key
            cred = await self.engine.create_credential(
                f"owner-{index % OWNERS}",
                venue=key.venue,
                api_key=key.keys.api_key,
                api_secret=key.keys.api_secret,
                api_passphrase=key.keys.api_passphrase,
                nickname=f"bench {index}",
            )
            slots[index] = cred.credential_id

        if pace is None:
            await bounded(list(enumerate(keys)), self.producers, create_one)
        else:
            tasks = []
            began = time.perf_counter()
            for index_key in enumerate(keys):
                delay = began + index_key[0] * pace - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(create_one(index_key)))
            await asyncio.gather(*tasks)
        created = time.perf_counter()
        ids = [cid for cid in slots if cid is not None]

        async def settled() -> bool:
            """Every create has returned: nothing PENDING means each one is VERIFIED or FAILED."""
            return await self.none_left("SELECT count(*) FROM credentials WHERE status = 'PENDING'")

        await wait_until(settled, "create -> VERIFIED")
        cpu = meter.stop()
        rows = await self.watch.fetch(
            "SELECT status, created_at, verified_at FROM credentials WHERE id = ANY($1::uuid[])", ids
        )
        verified = [r for r in rows if r["status"] == "VERIFIED"]
        latencies = [span(r["created_at"], r["verified_at"]) for r in verified]
        end = max((r["verified_at"] for r in verified), default=start)
        seconds = span(start, end)
        return {
            "ids": ids,
            "n": len(ids),
            "verified": len(verified),
            "failed": len(rows) - len(verified),
            "seconds": seconds,
            "per_second": len(verified) / seconds if seconds > 0 else 0.0,
            "create_calls_per_second": len(ids) / (created - began_wall),
            "p50_ms": common.percentile(latencies, 0.5) * 1000,
            "p99_ms": common.percentile(latencies, 0.99) * 1000,
            "cpu": cpu,
        }

    async def rotate(
        self, ids: Sequence[uuid.UUID], owners: dict[uuid.UUID, str], new_keys: Sequence[common.SimKey]
    ) -> dict[str, Any]:
        """Stage new keys (same venue account) on every credential; wait until every rotation is promoted."""
        meter = self.meter()
        start = await self.server_now()

        async def rotate_one(pair: tuple[uuid.UUID, common.SimKey]) -> None:
            cid, key = pair
            await self.engine.rotate_credential(
                owners[cid],
                cid,
                api_key=key.keys.api_key,
                api_secret=key.keys.api_secret,
                api_passphrase=key.keys.api_passphrase,
            )

        await bounded(list(zip(ids, new_keys, strict=True)), self.producers, rotate_one)

        async def settled() -> bool:
            """Every rotate has returned: no staged version left means each one was promoted or rejected."""
            return await self.none_left("SELECT count(*) FROM credential_secrets WHERE state = 'PENDING'")

        await wait_until(settled, "rotate -> VERIFIED")
        cpu = meter.stop()
        rows = await self.watch.fetch(
            "SELECT c.secret_version, c.verified_at, s.created_at AS staged_at FROM credentials c "
            "JOIN credential_secrets s ON s.credential_id = c.id AND s.version = c.secret_version "
            "WHERE c.id = ANY($1::uuid[])",
            list(ids),
        )
        rotated = [r for r in rows if r["secret_version"] == 2]
        end = max((r["verified_at"] for r in rotated), default=start)
        seconds = span(start, end)
        latencies = [span(r["staged_at"], r["verified_at"]) for r in rotated]
        return {
            "n": len(ids),
            "rotated": len(rotated),
            "rejected": len(ids) - len(rotated),
            "seconds": seconds,
            "per_second": len(rotated) / seconds if seconds > 0 else 0.0,
            "p50_ms": common.percentile(latencies, 0.5) * 1000,
            "p99_ms": common.percentile(latencies, 0.99) * 1000,
            "cpu": cpu,
        }

    async def backlog(self, keys: Sequence[common.SimKey]) -> dict[str, Any]:
        """Verification alone: the same keys loaded as PENDING credentials of a new owner (the engine's own
        vault seals them), their verify jobs enqueued in one statement; until none is PENDING."""
        owner = "backlog"
        items = [common.BulkCredential(uuid.uuid4(), owner, key.venue, key.keys) for key in keys]
        await common.bulk_load(self.engine.config.database_url or "", self.engine.store, items)
        meter = self.meter()
        async with self.engine.db.transaction() as conn:
            start = await self.server_now()
            await self.engine.queue.enqueue_many(
                jobs.VERIFY, [{"credentialId": str(i.credential_id), "version": 1} for i in items], conn=conn
            )

        async def settled() -> bool:
            return await self.none_left("SELECT count(*) FROM credentials WHERE status = 'PENDING'")

        await wait_until(settled, "verify backlog")
        cpu = meter.stop()
        row = await self.watch.fetchrow(
            "SELECT max(verified_at) AS done, count(*) FILTER (WHERE status = 'VERIFIED') AS verified "
            "FROM credentials WHERE owner_id = $1",
            owner,
        )
        assert row is not None
        seconds = span(start, row["done"])
        return {
            "n": len(items),
            "verified": int(row["verified"]),
            "seconds": seconds,
            "per_second": int(row["verified"]) / seconds if seconds > 0 else 0.0,
            "cpu": cpu,
        }

    async def revoke(self, ids: Sequence[uuid.UUID], owners: dict[uuid.UUID, str]) -> dict[str, Any]:
        """Revoke every credential; wait until the revoke_cascade jobs that follow are done too."""
        meter = self.meter()
        start = await self.server_now()

        async def revoke_one(cid: uuid.UUID) -> None:
            await self.engine.revoke_credential(owners[cid], cid)

        await bounded(list(ids), self.producers, revoke_one)

        async def settled() -> bool:
            """Every revoke has returned (its cascade job is enqueued): none queued or running is all done."""
            return await self.none_left(
                "SELECT count(*) FROM queue_jobs WHERE kind = $1 AND state IN ('queued', 'running')",
                jobs.REVOKE_CASCADE,
            )

        await wait_until(settled, "revoke cascade jobs")
        cpu = meter.stop()
        revoked_end = await self.watch.fetchval(
            "SELECT max(revoked_at) FROM credentials WHERE id = ANY($1::uuid[]) AND status = 'REVOKED'",
            list(ids),
        )
        cascade_end = await self.watch.fetchval(
            "SELECT max(finished_at) FROM queue_jobs WHERE kind = $1 AND state = 'done'", jobs.REVOKE_CASCADE
        )
        revoked = int(
            await self.watch.fetchval(
                "SELECT count(*) FROM credentials WHERE id = ANY($1::uuid[]) AND status = 'REVOKED'",
                list(ids),
            )
        )
        return {
            "n": len(ids),
            "revoked": revoked,
            "seconds": span(start, revoked_end),
            "per_second": revoked / span(start, revoked_end),
            "with_cascade_seconds": span(start, cascade_end),
            "with_cascade_per_second": revoked / span(start, cascade_end),
            "cpu": cpu,
        }


async def quiet_database(watch: asyncpg.Connection, within: float = 30.0) -> None:
    """Wait (at most ``within`` s) until no autovacuum worker runs on the server and a checkpoint has written
    what the last phase dirtied, so that the server's clean-up after one phase does not land in the next one's
    figures. The checkpoint needs a superuser or pg_checkpoint; without it only the wait is done."""
    with contextlib.suppress(asyncpg.PostgresError):
        await watch.execute("CHECKPOINT")
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        busy = await watch.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
        )
        if not busy:
            return
        await asyncio.sleep(POLL)


def cpu_per_1000(cpu: dict[str, float | None], name: str, n: int) -> float | None:
    value = cpu.get(name)
    return None if value is None or n == 0 else value / n * 1000


async def run(
    n: int = 5000,
    workers: int = 50,
    latency: float = 0.05,
    producers: int = 50,
    latency_n: int | None = None,
    pool_size: int | None = None,
    log_level: str = "INFO",
) -> dict[str, Any]:
    """Every lifecycle figure and the limit, measured in one run. See the module docstring."""
    common.quiet_logs(log_level)
    latency_n = latency_n if latency_n is not None else max(100, min(1000, n // 5))
    async with common.bench_database("lifecycle") as db, common.SimulatorProcess(latency=latency) as sim:
        layout = common.spread(n + latency_n)
        keys = await sim.add_keys([(venue, kind, None) for venue, kind in layout])
        main_keys, latency_keys = keys[:n], keys[n:]
        rotation_keys = await sim.add_keys([(k.venue, k.kind, k.uid) for k in main_keys])  # same accounts

        watch = await asyncpg.connect(db.dsn)
        try:
            await quiet_database(watch)
            limit_before = await run_limit(sim.urls, main_keys, workers)

            overrides: dict[str, Any] = {}
            if pool_size is not None:
                overrides["pool_max_size"] = pool_size
            config = common.engine_config(db.dsn, venue_urls=sim.urls, workers=workers, **overrides)
            await quiet_database(watch)
            async with CredentialEngine(config) as engine:
                phases = Phases(engine, watch, producers=producers, pg_pid=db.pg_pid, sim=sim)
                created = await phases.create(main_keys)
            # the limit again right after, in the same state (engine closed, the server's clean-up done), so
            # that the two measurements flank the one they are compared with
            await quiet_database(watch)
            limit_after = await run_limit(sim.urls, main_keys, workers)

            async with CredentialEngine(config) as engine:
                phases = Phases(engine, watch, producers=producers, pg_pid=db.pg_pid, sim=sim)
                ids = created.pop("ids")
                rate = created["per_second"]
                paced = await phases.create(latency_keys, pace=2.0 / rate if rate > 0 else 0.01)
                paced.pop("ids")
                owner_rows = await watch.fetch(
                    "SELECT id, owner_id FROM credentials WHERE id = ANY($1::uuid[])", ids
                )
                owners = {r["id"]: r["owner_id"] for r in owner_rows}
                rotated = await phases.rotate(ids, owners, rotation_keys)
                revoked = await phases.revoke(ids, owners)
                backlog = await phases.backlog(main_keys)
                outcomes = {f"{v}/{o}": c for (v, o), c in engine.probe_metrics.outcomes.items()}
                queue_counters = vars(engine.queue.counters).copy()
        finally:
            await watch.close()

        sim_stats = await sim.stats()

    limit_rate = statistics.mean([limit_before["per_second"], limit_after["per_second"]])
    ratio = created["per_second"] / limit_rate
    result: dict[str, Any] = {
        "n": n,
        "workers": workers,
        "latency_ms": latency * 1000,
        "producers": producers,
        "latency_n": latency_n,
        "pool_max_size": config.pool_max_size,
        "limit_before": limit_before,
        "limit_after": limit_after,
        "limit_per_second": limit_rate,
        "create": created,
        "paced": paced,
        "rotate": rotated,
        "revoke": revoked,
        "backlog": backlog,
        "ratio": ratio,
        "backlog_ratio": backlog["per_second"] / limit_rate,
        "rotate_ratio": rotated["per_second"] / limit_rate,
        "cpu_per_1000": {
            "engine_process": cpu_per_1000(created["cpu"], "self", n),
            "postgres": cpu_per_1000(created["cpu"], "postgres", n),
            "simulator": cpu_per_1000(created["cpu"], "simulator", n),
            "limit_process": statistics.mean([limit_before["cpu_per_1000"], limit_after["cpu_per_1000"]]),
            "verify_only_engine_process": cpu_per_1000(backlog["cpu"], "self", n),
            "verify_only_postgres": cpu_per_1000(backlog["cpu"], "postgres", n),
        },
        "probe_outcomes": outcomes,
        "queue_counters": queue_counters,
        "simulator": sim_stats,
        "ok": ratio >= TARGET_RATIO and created["failed"] == 0 and rotated["rejected"] == 0,
    }
    result["summary"] = summary(result)
    return result


def summary(r: dict[str, Any]) -> list[dict[str, Any]]:
    f = common.figure
    cpu = r["cpu_per_1000"]
    return [
        f(
            "limit: bare client, same signed requests",
            r["limit_per_second"],
            "cred/s",
            note=f"before {r['limit_before']['per_second']:.0f}, after {r['limit_after']['per_second']:.0f}",
        ),
        f(
            "create -> VERIFIED",
            r["create"]["per_second"],
            "cred/s",
            note=f"N={r['n']}, {r['workers']} workers",
        ),
        f(
            "create -> VERIFIED / limit",
            r["ratio"],
            "x",
            target=f">= {TARGET_RATIO}",
            ok=r["ratio"] >= TARGET_RATIO,
        ),
        f("latency p50 at half load", r["paced"]["p50_ms"], "ms", note=f"{r['paced']['n']} credentials"),
        f("latency p99 at half load", r["paced"]["p99_ms"], "ms"),
        f("latency p50 at full load", r["create"]["p50_ms"], "ms", note="queueing included"),
        f("latency p99 at full load", r["create"]["p99_ms"], "ms"),
        f(
            "wrongly FAILED",
            r["create"]["failed"] + r["paced"]["failed"],
            "",
            target="0",
            ok=r["create"]["failed"] + r["paced"]["failed"] == 0,
        ),
        f(
            "verify only (backlog of N PENDING)",
            r["backlog"]["per_second"],
            "cred/s",
            note=f"{r['backlog_ratio']:.2f} x limit: what create costs on top",
        ),
        f("CPU per 1,000: engine process", cpu["engine_process"], "s", note="create -> VERIFIED"),
        f("CPU per 1,000: PostgreSQL", cpu["postgres"], "s", note="create -> VERIFIED"),
        f("CPU per 1,000: engine, verify only", cpu["verify_only_engine_process"], "s"),
        f("CPU per 1,000: PostgreSQL, verify only", cpu["verify_only_postgres"], "s"),
        f("CPU per 1,000: simulator", cpu["simulator"], "s"),
        f("CPU per 1,000: limit client", cpu["limit_process"], "s"),
        f(
            "rotate (staged) -> promoted",
            r["rotate"]["per_second"],
            "cred/s",
            note=f"{r['rotate_ratio']:.2f} x limit",
        ),
        f("rotations rejected", r["rotate"]["rejected"], "", target="0", ok=r["rotate"]["rejected"] == 0),
        f("revoke", r["revoke"]["per_second"], "cred/s"),
        f("revoke incl. cascade job", r["revoke"]["with_cascade_per_second"], "cred/s"),
    ]


def render(result: dict[str, Any]) -> str:
    head = (
        f"lifecycle: N={result['n']} over 5 venues / 8 key kinds, {result['latency_ms']:.0f} ms per request, "
        f"{result['workers']} workers = limit concurrency, pool {result['pool_max_size']}"
    )
    return head + "\n" + common.render_summary(result["summary"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--producers", type=int, default=50)
    parser.add_argument("--latency-n", type=int, default=None)
    parser.add_argument("--pool-size", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json", help="also write the full result to this file")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            args.n, args.workers, args.latency, args.producers, args.latency_n, args.pool_size, args.log_level
        )
    )
    print(render(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
