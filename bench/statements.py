"""Statements per credential: how many SQL statements (BEGIN and COMMIT included) the engine sends to
PostgreSQL for one credential created and verified (FakeVenue), one staged rotation promoted, one revocation.

    python -m bench.statements [--n 200] [--clients 10] [--workers 10]

Counted on every connection of the run with asyncpg's query logger (``Connection.add_query_logger``): the pool's
connections get it from the pool's ``init`` hook, the connections the engine opens outside the pool (the
queue's claims, outcomes and heartbeat connections, both LISTEN connections) from a wrapped ``asyncpg.connect``
for the duration of the run (:func:`counting`). Everything counts: background polls, claims, outbox reads.
Each phase starts with the engine idle (every job done, every event read) and ends when it is idle again.
``clients`` calls run at a time, as a service serves several users.

Two ways to run the jobs. **Backlog** (the figure with a limit, as counted before: CHANGELOG "Performance"):
the calls are made by an engine without workers (an API process), then a second engine with ``workers``
runners (a worker process, sharing the pool; its opening statements count too) runs the queued jobs, so claims
take several jobs each and an outbox read several events; rotations and revocations are then run by that
worker engine as they come. **Live**: workers run while the calls are made and take each job as its NOTIFY
arrives, so each job pays a claim and a look at the next due job of its own (one client at a time: the worst
case).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bench import common
from engine import Credential, CredentialEngine, CredentialStatus, Venue
from engine import db as dbmod
from engine.testing import FakeVenue

LIMIT = 6.0  # statements per created-and-verified credential (issue #10: 15; issue #14: one statement each)
OWNER = "bench-statements"


@dataclass(eq=False)  # hashable by identity: asyncpg keeps its query loggers in a set
class StatementCounter:
    """Every statement sent on the connections it was attached to: the total and the first words of each."""

    total: int = 0
    by_statement: Counter[str] = field(default_factory=Counter)

    def __call__(self, record: Any) -> None:  # an asyncpg LoggedQuery
        self.total += 1
        words = " ".join(str(record.query).split())
        self.by_statement[words[:60]] += 1

    def attach(self, conn: asyncpg.Connection) -> None:
        conn.add_query_logger(self)

    def reset(self) -> None:
        self.total = 0
        self.by_statement.clear()

    def snapshot(self) -> tuple[int, Counter[str]]:
        return self.total, Counter(self.by_statement)


@contextlib.contextmanager
def counting(counter: StatementCounter) -> Iterator[None]:
    """While active, every connection made through ``asyncpg.connect`` (the engine's dedicated and LISTEN
    connections) reports its statements to ``counter``."""
    original = asyncpg.connect

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        conn = await original(*args, **kwargs)
        counter.attach(conn)
        return conn

    asyncpg.connect = connect  # type: ignore[assignment]
    try:
        yield
    finally:
        asyncpg.connect = original


@contextlib.asynccontextmanager
async def counted_pool(dsn: str, counter: StatementCounter, *, max_size: int) -> AsyncIterator[Any]:
    """A pool like ``Database.connect`` makes (same codecs, no reset query on release) whose connections report
    every statement to ``counter``."""

    async def init(conn: asyncpg.Connection) -> None:
        counter.attach(conn)
        await dbmod.Database.init_connection(conn)

    async def no_reset(conn: asyncpg.Connection) -> None:  # as engine.db: pooled connections carry no state
        return None

    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=max_size, init=init, reset=no_reset)
    try:
        yield pool
    finally:
        await pool.close()


async def idle(eng: CredentialEngine) -> None:
    """Every due job run and every event read."""
    await eng.run_until_idle(timeout=120)


async def each(calls: list[Callable[[], Awaitable[Credential]]], clients: int) -> list[Credential]:
    """Run ``calls``, ``clients`` at a time; their results in the same order."""
    gate = asyncio.Semaphore(clients)

    async def one(call: Callable[[], Awaitable[Credential]]) -> Credential:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def measure(
    n: int = 200, clients: int = 10, workers: int = 10, *, live: bool = False, dsn: str | None = None
) -> dict[str, Any]:
    """Create ``n`` credentials (``clients`` calls at a time) and wait until all are VERIFIED, then rotate each
    (staged, promoted), then revoke each; the statements per credential of each phase, and of the first by text.
    ``live``: workers run during the calls (else the jobs run as a backlog afterwards). ``dsn``: an empty
    database (default: a fresh one from ``bench.common``)."""
    fake = FakeVenue()
    counter = StatementCounter()
    result: dict[str, Any] = {"n": n, "clients": clients, "workers": workers, "live": live}
    async with contextlib.AsyncExitStack() as stack:
        if dsn is None:
            bdb = await stack.enter_async_context(common.bench_database("statements"))
            dsn = bdb.dsn
        stack.enter_context(counting(counter))
        pool = await stack.enter_async_context(counted_pool(dsn, counter, max_size=workers + clients + 2))
        config = common.engine_config(
            dsn,
            workers=workers if live else 0,  # no workers: run_until_idle runs the backlog with a burst worker
            pool_max_size=workers + clients + 2,
        )
        eng = await stack.enter_async_context(CredentialEngine(config, pool=pool, probes=fake.probes()))
        runner = eng  # the engine whose workers run the jobs
        for i in range(n):
            fake.add_key(f"key-{i}", "secret", account_id=f"uid-{i}")
            fake.add_key(f"new-{i}", "secret", account_id=f"uid-{i}")
        await idle(eng)

        def create(i: int) -> Callable[[], Awaitable[Credential]]:
            return lambda: eng.create_credential(
                OWNER, venue=Venue.BINANCE, api_key=f"key-{i}", api_secret="secret"
            )

        def rotate(i: int, cid: uuid.UUID) -> Callable[[], Awaitable[Credential]]:
            return lambda: eng.rotate_credential(OWNER, cid, api_key=f"new-{i}", api_secret="secret")

        def revoke(cid: uuid.UUID) -> Callable[[], Awaitable[Credential]]:
            return lambda: eng.revoke_credential(OWNER, cid)

        counter.reset()
        started = time.monotonic()
        ids = [cred.credential_id for cred in await each([create(i) for i in range(n)], clients)]
        await eng.bus.drain()
        result["create"] = counter.total / n  # live: some verifications ran meanwhile
        if not live:  # a worker process takes the backlog
            worker_config = common.engine_config(
                dsn, workers=workers, master_keys=str(config.master_keys), pool_max_size=workers + clients + 2
            )
            runner = await stack.enter_async_context(
                CredentialEngine(worker_config, pool=pool, probes=fake.probes())
            )
        await idle(runner)
        await eng.bus.drain()
        total, by_statement = counter.snapshot()
        page = await eng.list_credentials(OWNER, status=CredentialStatus.VERIFIED, limit=500)
        if page.total != n:
            raise RuntimeError(f"{page.total} of {n} credentials VERIFIED")
        result["create_verify"] = total / n
        result["create_verify_seconds"] = round(time.monotonic() - started, 2)
        result["create_verify_statements"] = dict(by_statement.most_common())

        counter.reset()
        await each([rotate(i, cid) for i, cid in enumerate(ids)], clients)
        await idle(runner)
        await eng.bus.drain()
        result["rotate"] = counter.total / n

        counter.reset()
        await each([revoke(cid) for cid in ids], clients)
        await idle(runner)
        await eng.bus.drain()
        result["revoke"] = counter.total / n
    return result


async def run(n: int = 200, clients: int = 10, workers: int = 10) -> dict[str, Any]:
    """For ``python -m bench``: the backlog figures, the live ones with one client, and summary rows."""
    result = await measure(n, clients, workers)
    live = await measure(n, 1, workers, live=True)
    result["live_one_client"] = {k: live[k] for k in ("create_verify", "rotate", "revoke")}
    result["summary"] = [
        common.figure(
            "statements per credential, create -> VERIFIED (BEGIN, COMMIT included; jobs as a backlog)",
            result["create_verify"],
            "statements",
            target=f"<= {LIMIT:g}",
            ok=result["create_verify"] <= LIMIT,
        ),
        common.figure("... create alone", result["create"], "statements"),
        common.figure("... live workers, one client at a time", live["create_verify"], "statements"),
        common.figure("statements per credential, staged rotation promoted", result["rotate"], "statements"),
        common.figure("statements per credential, revoke", result["revoke"], "statements"),
    ]
    return result


def render(result: dict[str, Any]) -> str:
    lines = [
        f"statements per credential (n = {result['n']}, {result['clients']} clients, {result['workers']} workers, "
        f"FakeVenue, jobs {'live' if result['live'] else 'as a backlog'}):",
        f"  create -> VERIFIED  {result['create_verify']:.2f}  (limit {LIMIT:g}; create alone {result['create']:.2f})",
        f"  rotate (staged)     {result['rotate']:.2f}",
        f"  revoke              {result['revoke']:.2f}",
    ]
    if "live_one_client" in result:
        live = result["live_one_client"]
        lines.append(
            f"  live workers, one client at a time: create -> VERIFIED {live['create_verify']:.2f}, "
            f"rotate {live['rotate']:.2f}, revoke {live['revoke']:.2f}"
        )
    lines.append("  create -> VERIFIED by statement:")
    for text, count in result["create_verify_statements"].items():
        lines.append(f"    {count / result['n']:6.2f}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="credentials")
    parser.add_argument("--clients", type=int, default=10, help="calls at a time (the live run uses one)")
    parser.add_argument("--workers", type=int, default=10, help="jobs run at a time")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    common.quiet_logs("WARNING")
    result = asyncio.run(run(args.n, args.clients, args.workers))
    result.pop("summary", None)
    print(json.dumps(result, indent=2) if args.json else render(result))


if __name__ == "__main__":
    main()
