"""Issue 9, defect 5: a hung handler must not hold its job (nor the jobs prefetched behind it) for ever.

Handler timeouts per kind (cancelled, counted as a failed try: backoff, then dead), leases capped at the
kind's timeout plus a margin, and claimed-but-unstarted jobs handed back to whoever is free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
import structlog

from engine import db as dbmod
from engine import queue

CANARY = "canary-hung-7f3e9d"  # a payload value that must never reach a log line

MakeQueue = Callable[..., queue.JobQueue]


@pytest.fixture
async def make_queue(db: dbmod.Database) -> AsyncIterator[MakeQueue]:
    made: list[queue.JobQueue] = []

    def make(
        handlers: dict[str, queue.Handler], settings: queue.QueueSettings, *, worker_id: str | None = None
    ) -> queue.JobQueue:
        q = queue.JobQueue(db, handlers, settings, worker_id=worker_id)
        made.append(q)
        return q

    yield make
    for q in made:
        await q.stop()


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def job_row(sql: asyncpg.Connection, job_id: int | None) -> dict[str, Any]:
    row = await sql.fetchrow("SELECT *, attempt - uncounted AS tries FROM queue_jobs WHERE id = $1", job_id)
    assert row is not None
    return dict(row)


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


async def test_a_handler_that_never_returns_is_cancelled_retried_then_dead(
    make_queue: MakeQueue, sql: asyncpg.Connection
) -> None:
    """Past its kind's timeout the handler is cancelled and the try counts (backoff, retry, then dead); the log
    names the job and the timeout, never the payload."""
    cancelled = 0

    async def hang(job: queue.Job) -> None:
        nonlocal cancelled
        try:
            await asyncio.Event().wait()  # for ever
        except asyncio.CancelledError:
            cancelled += 1
            raise

    settings = queue.QueueSettings(
        lease_seconds=2.0,
        heartbeat_interval=0.5,
        poll_interval=0.1,
        max_attempts=2,
        backoff_base=0.01,
        backoff_max=0.05,
        handler_timeouts={"hang": 0.3},
    )
    q = make_queue({"hang": hang}, settings)
    job_id = await q.enqueue("hang", {"apiSecret": CANARY})
    with structlog.testing.capture_logs() as logs:
        await q.start()

        async def dead() -> bool:
            return (await job_row(sql, job_id))["state"] == "dead"

        await wait_for(dead, within=20)
    row = await job_row(sql, job_id)
    assert (row["attempt"], row["tries"]) == (2, 2)
    assert row["last_error"].startswith("HandlerTimeout: the handler ran longer than 0.3 s and was cancelled")
    assert cancelled == 2
    assert (q.counters.failed, q.counters.retried, q.counters.dead, q.counters.timed_out) == (2, 1, 1, 2)
    timeouts = [entry for entry in logs if entry["event"] == "queue_handler_timeout"]
    assert [(e["job_id"], e["kind"], e["timeout"]) for e in timeouts] == [(job_id, "hang", 0.3)] * 2
    assert CANARY not in repr(logs)
    assert CANARY not in row["last_error"]


async def test_a_handler_that_swallows_its_cancellation_is_abandoned(
    make_queue: MakeQueue, sql: asyncpg.Connection
) -> None:
    """A handler that ignores the cancellation cannot hold its runner: after the grace period the attempt
    fails anyway and the runner goes on with the next job."""
    release = asyncio.Event()
    ran: list[str] = []

    async def stubborn(job: queue.Job) -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # a buggy handler: swallows its cancellation

    async def quick(job: queue.Job) -> None:
        ran.append("quick")

    settings = queue.QueueSettings(
        concurrency=1,
        lease_seconds=0.8,  # cancel grace: a quarter lease = 0.2 s
        heartbeat_interval=0.2,
        poll_interval=0.1,
        max_attempts=1,
        handler_timeouts={"stubborn": 0.3},
    )
    q = make_queue({"stubborn": stubborn, "quick": quick}, settings)
    stuck = await q.enqueue("stubborn")
    await q.start()

    async def dead() -> bool:
        return (await job_row(sql, stuck))["state"] == "dead"

    try:
        await wait_for(dead, within=15)
        after = await q.enqueue("quick")

        async def done() -> bool:
            return (await job_row(sql, after))["state"] == "done"

        await wait_for(done, within=15)
    finally:
        release.set()
    assert "ignored its cancellation and was abandoned" in (await job_row(sql, stuck))["last_error"]
    assert ran == ["quick"]


async def test_a_job_prefetched_behind_a_stuck_runner_goes_to_another_worker(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """Worker a claims two jobs in one batch; its only runner hangs on the first (long timeout). The second,
    claimed but never started, is not held by a's heartbeat: a hands it back and worker b runs it, on a
    try that does not count."""
    entered = asyncio.Event()
    release = asyncio.Event()
    ran_by: list[str] = []

    async def block(job: queue.Job) -> None:
        entered.set()
        await release.wait()

    def quick_for(name: str) -> queue.Handler:
        async def quick(job: queue.Job) -> None:
            ran_by.append(name)

        return quick

    common = {"lease_seconds": 1.0, "heartbeat_interval": 0.2, "poll_interval": 0.1}
    a = make_queue(
        {"block": block, "quick": quick_for("a")},
        queue.QueueSettings(concurrency=1, batch_size=5, **common),  # type: ignore[arg-type]
        worker_id="a",
    )
    b = make_queue({"quick": quick_for("b")}, queue.QueueSettings(**common), worker_id="b")  # type: ignore[arg-type]
    async with db.transaction() as conn:
        await a.enqueue("block", conn=conn)
        quick_id = await a.enqueue("quick", conn=conn)
    await a.start()
    try:
        await asyncio.wait_for(entered.wait(), 10)
        row = await job_row(sql, quick_id)
        assert (row["state"], row["worker_id"]) == ("running", "a")  # prefetched behind the stuck runner
        await b.start()
        started = time.monotonic()

        async def done() -> bool:
            return (await job_row(sql, quick_id))["state"] == "done"

        await wait_for(done, within=10)
        waited = time.monotonic() - started
    finally:
        release.set()
    assert ran_by == ["b"]
    row = await job_row(sql, quick_id)
    assert row["tries"] == 1  # a's claim was handed back uncounted
    assert waited < 10


async def test_the_heartbeat_never_extends_a_lease_past_its_cap(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A worker whose handler timeout cannot fire (a blocked loop, a bug) but whose heartbeat goes on: the
    lease stops at claim + the kind's timeout + LEASE_CAP_LEASES leases, then another worker takes the job
    back (the try counts)."""
    settings = queue.QueueSettings(lease_seconds=0.5, heartbeat_interval=0.1, handler_timeouts={"work": 0.5})
    cap = settings.lease_cap_for("work")
    assert cap == 0.5 + queue.LEASE_CAP_LEASES * 0.5

    async def never(job: queue.Job) -> None:
        raise AssertionError("only claimed here, never run")

    holder = make_queue({"work": never}, settings, worker_id="holder")
    job_id = await holder.enqueue("work")
    backend = holder._backend  # the seam the worker's heartbeat calls: claim, then extend
    async with db.connection() as conn:
        claimed = await backend.claim(conn, 1, [])
    assert [job.id for job in claimed] == [job_id]
    claimed_at = await sql.fetchval("SELECT lease_cap FROM queue_jobs WHERE id = $1", job_id) - timedelta(
        seconds=cap
    )
    extended_at_least_once = False
    deadline = time.monotonic() + cap + 1.0
    while time.monotonic() < deadline:
        extended = await backend.extend(claimed)
        row = await job_row(sql, job_id)
        assert row["lease_expires_at"] <= claimed_at + timedelta(seconds=cap)
        extended_at_least_once |= extended == 1 and row["lease_expires_at"] > claimed_at + timedelta(
            seconds=0.6
        )
        await asyncio.sleep(0.1)
    assert extended_at_least_once  # the heartbeat did extend it, up to the cap
    assert (await job_row(sql, job_id))["lease_expires_at"] < await sql.fetchval("SELECT now()")

    ran: list[int] = []

    async def record(job: queue.Job) -> None:
        ran.append(job.attempt)

    taker = make_queue({"work": record}, queue.QueueSettings(poll_interval=0.1), worker_id="taker")
    assert await taker.run_until_idle(timeout=10) == 1
    row = await job_row(sql, job_id)
    assert (row["state"], ran) == ("done", [2])
    assert row["last_error"].startswith("LeaseExpired")
