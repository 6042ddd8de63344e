"""The job queue on a real PostgreSQL: claims, outcomes, retries, dedupe, scheduling, wake-ups, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from engine import db as dbmod
from engine import errors, queue

FAST = queue.QueueSettings(
    lease_seconds=5.0,
    heartbeat_interval=1.0,
    poll_interval=0.2,
    backoff_base=0.01,
    backoff_max=0.05,
    shutdown_timeout=1.0,
)

MakeQueue = Callable[..., queue.JobQueue]


@pytest.fixture
async def make_queue(db: dbmod.Database) -> AsyncIterator[MakeQueue]:
    """Build JobQueues on the test database (or another pool); every one is stopped at the end."""
    made: list[queue.JobQueue] = []

    def make(
        handlers: dict[str, queue.Handler],
        settings: queue.QueueSettings = FAST,
        *,
        database: dbmod.Database | None = None,
        worker_id: str | None = None,
    ) -> queue.JobQueue:
        q = queue.JobQueue(database or db, handlers, settings, worker_id=worker_id)
        made.append(q)
        return q

    yield make
    for q in made:
        await q.stop()


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for the literal SQL a test uses to look at (or tamper with) the table (no statement
    cache: it works through the transaction pooler of make test-postgres too)."""
    conn = await asyncpg.connect(database_url, statement_cache_size=0)
    try:
        yield conn
    finally:
        await conn.close()


async def job_row(sql: asyncpg.Connection, job_id: int | None) -> dict[str, Any]:
    row = await sql.fetchrow("SELECT *, attempt - uncounted AS tries FROM queue_jobs WHERE id = $1", job_id)
    assert row is not None
    return dict(row)


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float = 5.0) -> float:
    """Poll until ``predicate`` holds; returns the seconds it took (fails the test after ``within`` s)."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def noop(job: queue.Job) -> None:
    return None


# ------------------------------------------------------------------------------------------- draining and claims


async def test_run_until_idle_drains_without_start(make_queue: MakeQueue) -> None:
    """Burst mode: an unstarted queue runs every ready job, then returns how many it ran."""
    seen: list[int] = []

    async def handler(job: queue.Job) -> None:
        seen.append(job.payload["n"])

    q = make_queue({"work": handler})
    for n in range(25):
        await q.enqueue("work", {"n": n})
    assert await q.run_until_idle(timeout=10) == 25
    assert sorted(seen) == list(range(25))
    assert (await q.counts())["done"] == 25
    assert not q.running


async def test_run_until_idle_waits_for_started_workers(make_queue: MakeQueue) -> None:
    """With background workers running, run_until_idle returns once they have drained the queue."""
    q = make_queue({"work": noop})
    await q.start()
    assert q.running
    await q.enqueue_many("work", [{"n": n} for n in range(30)])
    await q.run_until_idle(timeout=10)
    counts = await q.counts()
    assert counts["done"] == 30
    assert counts["queued"] == counts["running"] == 0


async def test_one_claim_takes_a_batch(make_queue: MakeQueue, db: dbmod.Database) -> None:
    """A single claim statement takes up to batch_size ready jobs at once (they are all running together)."""
    running_seen: list[int] = []

    async def handler(job: queue.Job) -> None:
        if not running_seen:
            running_seen.append((await queue.JobQueue(db, {}).counts())["running"])

    settings = queue.QueueSettings(concurrency=1, batch_size=10, poll_interval=0.2)
    q = make_queue({"work": handler}, settings)
    await q.enqueue_many("work", [{} for _ in range(25)])
    assert await q.run_until_idle(timeout=10) == 25
    assert running_seen == [10]


async def test_claims_only_kinds_this_process_handles(make_queue: MakeQueue) -> None:
    """A job of a kind without a handler here stays queued for a process that has one."""
    q = make_queue({"mine": noop})
    await q.enqueue("mine")
    theirs = await q.enqueue("theirs")
    assert await q.run_until_idle(timeout=10) == 1
    assert (await q.counts())["queued"] == 1
    assert theirs is not None


# -------------------------------------------------------------------------------------------------- producing


async def test_enqueue_joins_the_callers_transaction(make_queue: MakeQueue, db: dbmod.Database) -> None:
    """With conn, the job exists only if the caller's transaction commits."""
    q = make_queue({"work": noop})

    async def enqueue_then_fail() -> None:
        async with db.transaction() as conn:
            assert await q.enqueue("work", {"a": 1}, conn=conn) is not None
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await enqueue_then_fail()
    assert (await q.counts())["queued"] == 0
    async with db.transaction() as conn:
        await q.enqueue("work", {"a": 1}, conn=conn)
    assert (await q.counts())["queued"] == 1


async def test_enqueue_many_is_one_batch(make_queue: MakeQueue, db: dbmod.Database) -> None:
    """enqueue_many inserts every payload (all or none) and returns the count."""
    q = make_queue({"work": noop})
    assert await q.enqueue_many("work", [{"n": n} for n in range(1234)]) == 1234

    async def enqueue_then_fail() -> None:
        async with db.transaction() as conn:
            assert await q.enqueue_many("work", [{"n": 1}] * 10, conn=conn) == 10
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await enqueue_then_fail()
    assert (await q.counts())["queued"] == 1234
    assert await q.enqueue_many("work", []) == 0


async def test_enqueue_rejects_bad_arguments(make_queue: MakeQueue) -> None:
    """Naive run_at, negative delay and max_attempts < 1 are refused before touching the database."""
    q = make_queue({"work": noop})
    with pytest.raises(errors.InvalidRequest):
        await q.enqueue("work", run_at=datetime(2030, 1, 1))  # naive on purpose
    with pytest.raises(errors.InvalidRequest):
        await q.enqueue("work", delay=-1)
    with pytest.raises(errors.InvalidRequest):
        await q.enqueue("work", max_attempts=0)


# ----------------------------------------------------------------------------------------- fencing and leases


async def test_late_finisher_of_an_old_attempt_changes_nothing(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A worker whose lease expired and whose job was re-run elsewhere cannot overwrite the newer outcome."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def stalled(job: queue.Job) -> None:
        entered.set()
        await release.wait()
        raise ValueError("late failure of attempt 1")

    # a neither heartbeats nor polls during the test: only b may take the job back
    slow = queue.QueueSettings(lease_seconds=30, heartbeat_interval=10, poll_interval=30, shutdown_timeout=5)
    a = make_queue({"work": stalled}, slow, worker_id="a")
    b = make_queue({"work": noop}, worker_id="b")
    job_id = await a.enqueue("work")
    assert job_id is not None
    await a.start()
    await asyncio.wait_for(entered.wait(), 5)
    await wait_for(_async(lambda: a.listening))  # its catch-up claim after LISTEN connects is done ...
    await asyncio.sleep(0.3)  # ... and its fetcher sleeps on its 30 s poll
    async with db.connection() as conn:  # the lease runs out (a partition, a GC pause ...)
        await conn.execute_script("UPDATE queue_jobs SET lease_expires_at = now() - interval '1 second'")
    assert await b.run_until_idle(timeout=10) == 1
    release.set()
    await a.stop()  # a's outcome (a retry) is written now, fenced on attempt 1
    row = await job_row(sql, job_id)
    assert row["state"] == "done"
    assert row["attempt"] == 2
    assert row["last_error"].startswith("LeaseExpired")
    assert a.counters.failed == 1  # a did see its handler fail ...
    assert row["run_at"] <= datetime.now(UTC)  # ... but its retry was not written


async def test_complete_in_commits_with_the_domain_change(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """complete_in marks the job done in the handler's transaction; the worker's own write is then a no-op."""
    await sql.execute("CREATE TABLE side_effects (job_id bigint PRIMARY KEY)")
    q: queue.JobQueue

    async def handler(job: queue.Job) -> None:
        async with db.transaction() as conn:
            await conn.execute_script(f"INSERT INTO side_effects VALUES ({int(job.id)})")
            await q.complete_in(conn, job)

    q = make_queue({"work": handler})
    job_id = await q.enqueue("work")
    assert await q.run_until_idle(timeout=10) == 1
    row = await job_row(sql, job_id)
    assert (row["state"], row["attempt"]) == ("done", 1)
    assert await sql.fetchval("SELECT array_agg(job_id) FROM side_effects") == [job_id]
    assert q.counters.processed == 1


async def test_complete_in_spares_the_worker_a_second_write(
    make_queue: MakeQueue, db: dbmod.Database
) -> None:
    """A job completed in its handler's transaction sends no outcome to the worker's batch write; one that
    completed in a transaction that then rolled back still gets its retry written."""
    q: queue.JobQueue
    written: list[tuple[int, str]] = []

    async def handler(job: queue.Job) -> None:
        async with db.transaction() as conn:
            await q.complete_in(conn, job)
            if job.payload.get("fail") and job.tries == 1:
                raise RuntimeError("after complete_in, before commit")

    q = make_queue({"work": handler})
    finish = q._backend.finish

    async def spy(session: Any, outcomes: Any, *args: Any, **kwargs: Any) -> Any:
        written.extend((o.job_id, o.state) for o in outcomes)
        return await finish(session, outcomes, *args, **kwargs)

    q._backend.finish = spy  # type: ignore[method-assign]
    done_id = await q.enqueue("work")
    failing_id = await q.enqueue("work", {"fail": True})
    await q.run_until_idle(timeout=10)
    assert done_id not in [job_id for job_id, _ in written]
    assert (failing_id, "queued") in written  # the rolled-back completion was retried ...
    assert q._backend.completed_in == set()  # ... and nothing is remembered past its attempt


async def test_complete_in_refuses_a_stale_attempt(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """complete_in on an attempt that no longer owns its job raises StaleAttempt and the transaction rolls back."""
    await sql.execute("CREATE TABLE side_effects (job_id bigint PRIMARY KEY)")
    seen: list[queue.Job] = []

    async def handler(job: queue.Job) -> None:
        seen.append(job)

    q = make_queue({"work": handler})
    await q.enqueue("work")
    await q.run_until_idle(timeout=10)
    (stale,) = seen  # its attempt is over: the worker already marked it done

    async def change_and_complete() -> None:
        async with db.transaction() as conn:
            await conn.execute_script(f"INSERT INTO side_effects VALUES ({int(stale.id)})")
            await q.complete_in(conn, stale)

    with pytest.raises(queue.StaleAttempt) as info:
        await change_and_complete()
    assert isinstance(info.value, errors.Conflict)
    assert await sql.fetchval("SELECT count(*) FROM side_effects") == 0


async def test_stale_attempt_from_a_handler_records_nothing(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A handler whose complete_in raises StaleAttempt neither retries nor fails the job."""
    q: queue.JobQueue

    async def handler(job: queue.Job) -> None:
        async with db.connection() as conn:  # someone else finished this attempt meanwhile
            await conn.execute_script(f"UPDATE queue_jobs SET attempt = attempt + 1 WHERE id = {int(job.id)}")
        async with db.transaction() as conn:
            await q.complete_in(conn, job)

    q = make_queue({"work": handler})
    job_id = await q.enqueue("work")
    assert await q.run_until_idle(timeout=10) == 1
    row = await job_row(sql, job_id)
    assert row["state"] == "running"  # untouched by this worker: the attempt was not its own any more
    assert (q.counters.retried, q.counters.failed, q.counters.processed) == (0, 0, 0)


async def test_heartbeat_keeps_a_long_job_leased(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A job running longer than its lease keeps it (the heartbeat extends it), so nobody else takes it."""
    short = queue.QueueSettings(lease_seconds=1.0, heartbeat_interval=0.2, poll_interval=0.1)
    entered = asyncio.Event()

    async def slow(job: queue.Job) -> None:
        entered.set()
        await asyncio.sleep(2.0)

    a = make_queue({"work": slow}, short, worker_id="a")
    b = make_queue({"work": noop}, short, worker_id="b")
    job_id = await a.enqueue("work")
    await a.start()
    await asyncio.wait_for(entered.wait(), 5)
    for _ in range(6):
        await asyncio.sleep(0.3)
        assert await b.run_until_idle(timeout=5) == 0
    await a.run_until_idle(timeout=5)
    row = await job_row(sql, job_id)
    assert (row["state"], row["attempt"]) == ("done", 1)


async def test_expired_lease_on_the_last_try_goes_dead(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A job whose worker died on its last try is buried by the claim instead of being run again."""
    q = make_queue({"work": noop})
    job_id = await q.enqueue("work", max_attempts=1)
    async with db.connection() as conn:
        await conn.execute_script(
            "UPDATE queue_jobs SET state = 'running', attempt = 1, lease_expires_at = now() - interval '1 s'"
        )
    assert await q.run_until_idle(timeout=10) == 0
    row = await job_row(sql, job_id)
    assert row["state"] == "dead"
    assert row["last_error"].startswith("LeaseExpired")
    assert q.counters.dead == 1


# ---------------------------------------------------------------------------------------------------- retries


async def test_retry_after_delays_the_job(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """Retry(after=30) reschedules the job 30 s ahead (a venue's Retry-After) and keeps the reason."""

    async def limited(job: queue.Job) -> None:
        raise queue.Retry(after=30, reason="RATE_LIMITED")

    q = make_queue({"work": limited})
    job_id = await q.enqueue("work")
    before = datetime.now(UTC)
    assert await q.run_until_idle(timeout=10) == 1  # the retry is in the future: not waited for
    row = await job_row(sql, job_id)
    assert row["state"] == "queued"
    assert timedelta(seconds=28) < row["run_at"] - before < timedelta(seconds=32)
    assert row["last_error"] == "Retry: RATE_LIMITED"
    assert (q.counters.retried, q.counters.failed) == (1, 0)


async def test_error_backs_off_and_stores_type_and_message_only(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """Any exception reschedules with backoff (base..cap) and last_error holds its type and message, no payload."""

    async def broken(job: queue.Job) -> None:
        raise ValueError("boom")

    settings = queue.QueueSettings(backoff_base=10, backoff_max=100, poll_interval=0.2)
    q = make_queue({"work": broken}, settings)
    job_id = await q.enqueue("work", {"apiSecret": "canary-6f1d"})
    before = datetime.now(UTC)
    await q.run_until_idle(timeout=10)
    row = await job_row(sql, job_id)
    assert row["state"] == "queued"
    assert timedelta(seconds=4) < row["run_at"] - before < timedelta(seconds=11)  # first try: 5..10 s
    assert row["last_error"] == "ValueError: boom"
    assert (q.counters.retried, q.counters.failed) == (1, 1)


async def test_max_attempts_then_dead_then_retry_dead(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """After max_attempts failures the job is dead; retry_dead queues it again with its tries reset."""
    fail = True
    tries: list[tuple[int, int]] = []

    async def flaky(job: queue.Job) -> None:
        tries.append((job.attempt, job.tries))
        if fail:
            raise RuntimeError(f"try {job.tries}")

    settings = queue.QueueSettings(backoff_base=0, backoff_max=0, poll_interval=0.2, max_attempts=3)
    q = make_queue({"work": flaky}, settings)
    job_id = await q.enqueue("work")
    assert job_id is not None
    assert await q.run_until_idle(timeout=10) == 3
    (dead,) = await q.list_dead()
    assert (dead.id, dead.state, dead.tries, dead.max_attempts) == (job_id, "dead", 3, 3)
    assert dead.last_error == "RuntimeError: try 3"
    assert q.counters.dead == 1
    assert await q.retry_dead(job_id) is True
    assert await q.retry_dead(job_id) is False  # not dead any more
    fail = False
    assert await q.run_until_idle(timeout=10) == 1
    assert tries == [(1, 1), (2, 2), (3, 3), (4, 1)]  # attempt keeps counting (the fence); tries restarted
    assert (await job_row(sql, job_id))["state"] == "done"
    assert await q.list_dead() == []


async def test_abort_goes_straight_to_dead(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """Abort(reason) sends the job to dead after one try, whatever max_attempts says."""

    async def hopeless(job: queue.Job) -> None:
        raise queue.Abort("INVALID_KEY")

    q = make_queue({"work": hopeless})
    job_id = await q.enqueue("work", max_attempts=10)
    assert await q.run_until_idle(timeout=10) == 1
    row = await job_row(sql, job_id)
    assert (row["state"], row["tries"], row["last_error"]) == ("dead", 1, "Abort: INVALID_KEY")


async def test_retry_comes_due_without_waiting_for_the_poll(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A started worker sleeps only until the next job is due, not a whole poll interval."""
    calls: list[float] = []

    async def once_limited(job: queue.Job) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise queue.Retry(after=0.3, reason="RATE_LIMITED")

    q = make_queue({"work": once_limited}, queue.QueueSettings(poll_interval=30))
    job_id = await q.enqueue("work")
    await q.start()
    await wait_for(lambda: _state_is(sql, job_id, "done"), within=5)
    assert 0.25 < calls[1] - calls[0] < 3


# ----------------------------------------------------------------------------------------------------- dedupe


async def test_dedupe_keeps_one_queued_job_per_key(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A second enqueue with a queued job's key is a no-op (None); a running job does not block a new one."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold(job: queue.Job) -> None:
        entered.set()
        await release.wait()

    q = make_queue({"verify": hold})
    first = await q.enqueue("verify", {"v": 1}, dedupe_key="verify:c1")
    assert first is not None
    assert await q.enqueue("verify", {"v": 2}, dedupe_key="verify:c1") is None
    assert await q.enqueue("verify", {"v": 3}, dedupe_key="verify:c2") is not None
    await q.start()
    await asyncio.wait_for(entered.wait(), 5)
    await wait_for(lambda: _state_is(sql, first, "running"))
    second = await q.enqueue("verify", {"v": 4}, dedupe_key="verify:c1")  # first is running: allowed
    assert second not in (None, first)
    release.set()
    await q.run_until_idle(timeout=10)
    assert (await q.counts())["done"] == 3


async def test_requeue_beside_a_queued_twin_keeps_both(make_queue: MakeQueue, db: dbmod.Database) -> None:
    """A running job going back to the queue while a twin holds its key loses the key instead of failing."""
    # The twin is due only in an hour, so no worker can claim it (and free the key) before the retry of the
    # first job is written: the requeue always meets a queued twin, however loaded the machine is.
    producer = make_queue({})

    async def handler(job: queue.Job) -> None:
        if job.payload["n"] == 1:
            await producer.enqueue("verify", {"n": 2}, dedupe_key="verify:c1", delay=3600)
            raise queue.Retry(after=60, reason="RATE_LIMITED")

    q = make_queue({"verify": handler})
    first = await q.enqueue("verify", {"n": 1}, dedupe_key="verify:c1")
    await q.run_until_idle(timeout=10)
    jobs = {j.payload["n"]: j for j in await q.list_jobs()}
    assert (jobs[1].id, jobs[1].state, jobs[1].dedupe_key) == (first, "queued", None)
    assert (jobs[2].state, jobs[2].dedupe_key) == ("queued", "verify:c1")


# ------------------------------------------------------------------------------------------ scheduled, periodic


async def test_scheduled_job_runs_at_its_time(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A job with run_at in the future is not run early; a started worker runs it when it comes due."""
    q = make_queue({"work": noop}, queue.QueueSettings(poll_interval=30))
    job_id = await q.enqueue("work", run_at=datetime.now(UTC) + timedelta(seconds=0.4))
    later = await q.enqueue("work", delay=3600)
    assert await q.run_until_idle(timeout=10) == 0
    await q.start()
    took = await wait_for(lambda: _state_is(sql, job_id, "done"), within=5)
    assert took < 4  # well before the 30 s poll interval
    assert (await job_row(sql, later))["state"] == "queued"


async def test_periodic_job_stays_single_across_processes(make_queue: MakeQueue, database_url: str) -> None:
    """Two queues sharing a database keep one queued occurrence of a periodic job, never two chains."""
    other = await dbmod.Database.connect(database_url, min_size=1, max_size=4)
    try:
        ticks: list[int] = []

        async def tick(job: queue.Job) -> None:
            ticks.append(job.id)

        settings = queue.QueueSettings(poll_interval=0.05)
        a = make_queue({"tick": tick}, settings)
        b = make_queue({"tick": tick}, settings, database=other)
        a.every("tick", 0.25)
        b.every("tick", 0.25)
        await asyncio.gather(a.start(), b.start())
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:
            queued = [j for j in await a.list_jobs(kind="tick") if j.state in ("queued", "running")]
            assert len([j for j in queued if j.state == "queued"]) <= 1
            assert len(queued) <= 2  # at most the occurrence running and the next one
            await asyncio.sleep(0.03)
        await asyncio.gather(a.stop(), b.stop())
        assert 2 <= len(ticks) <= 9  # one chain: about 1.6 / 0.25 runs, not twice as many
        assert len(set(ticks)) == len(ticks)
    finally:
        await other.close()


# ------------------------------------------------------------------------------------------------ wake-ups


async def test_notify_wakes_the_worker_before_the_poll(
    make_queue: MakeQueue, database_url: str, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A job enqueued from another connection pool is picked up via LISTEN/NOTIFY, long before the poll."""
    q = make_queue({"work": noop}, queue.QueueSettings(poll_interval=30))
    await q.start()
    await wait_for(_async(lambda: q.listening))
    await asyncio.sleep(0.1)  # the fetcher is asleep on its 30 s poll now
    other = await dbmod.Database.connect(database_url, min_size=1, max_size=2)
    try:
        job_id = await queue.JobQueue(other, {}).enqueue("work")
        took = await wait_for(lambda: _state_is(sql, job_id, "done"), within=10)
    finally:
        await other.close()
    assert took < 5


async def test_listener_reconnects_after_its_connection_is_killed(
    make_queue: MakeQueue, database_url: str, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """Killing the LISTEN backend (pg_terminate_backend) does not stop the queue: it reconnects and wakes again."""
    q = make_queue({"work": noop}, queue.QueueSettings(poll_interval=30))
    await q.start()
    await wait_for(_async(lambda: q.listening))
    (old_pid,) = await _listen_pids(sql)
    async with db.connection() as conn:
        await conn.execute_script(f"SELECT pg_terminate_backend({int(old_pid)})")
    await wait_for(lambda: _has_new_listener(sql, old_pid), within=10)
    await wait_for(_async(lambda: q.listening))
    other = await dbmod.Database.connect(database_url, min_size=1, max_size=2)
    try:
        job_id = await queue.JobQueue(other, {}).enqueue("work")
        took = await wait_for(lambda: _state_is(sql, job_id, "done"), within=10)
    finally:
        await other.close()
    assert took < 5
    assert q.running


async def test_polling_finds_jobs_that_sent_no_notify(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A job inserted without NOTIFY (or while LISTEN was down) is found by the poll."""
    q = make_queue({"work": noop}, queue.QueueSettings(poll_interval=0.2))
    await q.start()
    await wait_for(_async(lambda: q.listening))
    async with db.connection() as conn:
        await conn.execute_script("INSERT INTO queue_jobs (kind, max_attempts) VALUES ('work', 3)")
    await wait_for(lambda: _count_is(sql, "done", 1), within=5)


# ----------------------------------------------------------------------------------------------------- shutdown


async def test_stop_hands_back_unfinished_jobs(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """stop() waits shutdown_timeout, then hands running and buffered jobs back: queued, due now, try uncounted."""
    started = 0

    async def forever(job: queue.Job) -> None:
        nonlocal started
        started += 1
        await asyncio.Event().wait()

    settings = queue.QueueSettings(concurrency=2, batch_size=10, shutdown_timeout=0.2, poll_interval=0.2)
    q = make_queue({"work": forever}, settings)
    ids = [await q.enqueue("work", {"n": n}) for n in range(3)]
    await q.start()
    await wait_for(_async(lambda: started == 2))
    await q.stop()
    assert not q.running
    assert q.counters.handed_back == 3
    now = datetime.now(UTC)
    for job_id in ids:
        row = await job_row(sql, job_id)
        assert (row["state"], row["attempt"], row["tries"]) == ("queued", 1, 0)
        assert row["run_at"] <= now
    seen: list[int] = []

    async def record(job: queue.Job) -> None:
        seen.append(job.tries)

    assert await make_queue({"work": record}).run_until_idle(timeout=10) == 3
    assert seen == [1, 1, 1]  # the handed-back claim did not count as a try


async def test_stop_lets_running_jobs_finish_within_the_timeout(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A job that finishes within shutdown_timeout is completed, not handed back."""
    entered = asyncio.Event()

    async def short(job: queue.Job) -> None:
        entered.set()
        await asyncio.sleep(0.3)

    q = make_queue({"work": short}, queue.QueueSettings(shutdown_timeout=5, poll_interval=0.2))
    job_id = await q.enqueue("work")
    await q.start()
    await asyncio.wait_for(entered.wait(), 5)
    await q.stop()
    assert (await job_row(sql, job_id))["state"] == "done"
    assert q.counters.handed_back == 0
    with pytest.raises(errors.EngineClosed):
        await q.run_until_idle()
    with pytest.raises(errors.EngineClosed):
        await q.start()


# ----------------------------------------------------------------------------------------------------- operators


async def test_list_jobs_counts_cancel_and_purge(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """Operators list by state and kind with paging, count per state, cancel queued jobs, purge old ones."""

    async def broken(job: queue.Job) -> None:
        raise queue.Abort("no")

    q = make_queue({"a": noop, "b": broken})
    for n in range(3):
        await q.enqueue("a", {"n": n})
    await q.enqueue("b")
    await q.run_until_idle(timeout=10)
    await q.enqueue("a", {"credentialId": "c1"})
    await q.enqueue("a", {"credentialId": "c2"})
    assert await q.counts() == {"queued": 2, "running": 0, "done": 3, "dead": 1, "cancelled": 0}
    assert [j.kind for j in await q.list_jobs(state="dead")] == ["b"]
    page = await q.list_jobs(kind="a", limit=2, offset=1)
    assert len(page) == 2
    assert page[0].id > page[1].id  # newest first
    assert await q.cancel_queued(payload_contains={"credentialId": "c1"}) == 1
    assert (await q.counts())["cancelled"] == 1
    with pytest.raises(errors.InvalidRequest):
        await q.list_jobs(state="lost")
    with pytest.raises(errors.InvalidRequest):
        await q.cancel_queued()
    assert await q.purge(older_than=3600) == 0
    assert await q.purge(older_than=0) == 4  # 3 done + 1 cancelled
    assert await q.counts() == {"queued": 1, "running": 0, "done": 0, "dead": 1, "cancelled": 0}


# ----------------------------------------------------------------------------------------------------- helpers


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def predicate() -> bool:
        return check()

    return predicate


async def _state_is(sql: asyncpg.Connection, job_id: int | None, state: str) -> bool:
    return bool(await sql.fetchval("SELECT state = $2 FROM queue_jobs WHERE id = $1", job_id, state))


async def _count_is(sql: asyncpg.Connection, state: str, n: int) -> bool:
    return bool(await sql.fetchval("SELECT count(*) = $2 FROM queue_jobs WHERE state = $1", state, n))


async def _listen_pids(sql: asyncpg.Connection) -> list[int]:
    rows = await sql.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
    )
    return [int(r["pid"]) for r in rows]


async def _has_new_listener(sql: asyncpg.Connection, old_pid: int) -> bool:
    pids = await _listen_pids(sql)
    return bool(pids) and old_pid not in pids


# ------------------------------------------------------------------------------- connections of their own

SHORT_LEASE = queue.QueueSettings(
    lease_seconds=1.0, heartbeat_interval=0.2, poll_interval=0.1, shutdown_timeout=1.0
)


@pytest.fixture
async def small_pool(database_url: str) -> AsyncIterator[dbmod.Database]:
    """A pool of two connections whose acquires give up after 0.3 s (PoolExhausted)."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=2, acquire_timeout=0.3)
    try:
        yield database
    finally:
        await database.close()


@contextlib.asynccontextmanager
async def pool_held(database: dbmod.Database) -> AsyncIterator[None]:
    """Every connection of ``database``'s pool held by other tasks (as requests flooding the API would) for
    the duration of the block."""
    release = asyncio.Event()
    size = database._pool.get_max_size()
    holding: list[int] = []

    async def hold() -> None:
        async with database.connection():
            holding.append(1)
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(size)]
    try:
        await wait_for(_async(lambda: len(holding) == size))
        with pytest.raises(dbmod.PoolExhausted):  # nothing is left for anyone else
            await database.fetchval("ping")
        yield
    finally:
        release.set()
        await asyncio.gather(*tasks)


async def test_heartbeat_keeps_leases_while_the_pool_is_held(
    make_queue: MakeQueue, small_pool: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """With every pool connection held by other tasks for more than twice the lease, the heartbeat (on its own
    connection) keeps the running job's lease: no other worker takes it, and its outcome is written."""
    entered, finish = asyncio.Event(), asyncio.Event()

    async def slow(job: queue.Job) -> None:
        entered.set()
        await finish.wait()

    a = make_queue({"work": slow}, SHORT_LEASE, database=small_pool, worker_id="a")
    b = make_queue(
        {"work": noop}, SHORT_LEASE, worker_id="b"
    )  # on another pool: it would take an expired lease
    job_id = await a.enqueue("work")
    await a.start()
    await asyncio.wait_for(entered.wait(), 5)
    async with pool_held(small_pool):
        for _ in range(8):  # 2.4 s, the lease is 1 s
            await asyncio.sleep(0.3)
            assert await b.run_until_idle(timeout=5) == 0
            row = await job_row(sql, job_id)
            assert (row["state"], row["attempt"], row["worker_id"]) == ("running", 1, "a")
        finish.set()
        await wait_for(lambda: _state_is(sql, job_id, "done"))  # written on the flusher's own connection
    assert (await job_row(sql, job_id))["attempt"] == 1


async def test_claims_and_outcomes_do_not_wait_for_the_pool(
    make_queue: MakeQueue, small_pool: dbmod.Database, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """A job enqueued while every pool connection is held is claimed, run and marked done all the same."""
    q = make_queue({"work": noop}, FAST, database=small_pool)
    await q.start()
    async with pool_held(small_pool):
        job_id = await queue.JobQueue(db, {}).enqueue("work")
        await wait_for(lambda: _state_is(sql, job_id, "done"))


async def test_the_queues_own_connections_come_back_after_they_are_killed(
    make_queue: MakeQueue, db: dbmod.Database, sql: asyncpg.Connection
) -> None:
    """Killing the claims, outcomes and heartbeat connections (pg_terminate_backend) mid-job: the lease still
    holds, the job finishes on attempt 1, and the next job is claimed and written on new connections."""
    entered, finish = asyncio.Event(), asyncio.Event()

    async def slow(job: queue.Job) -> None:
        if job.payload.get("slow"):
            entered.set()
            await finish.wait()

    a = make_queue({"work": slow}, SHORT_LEASE, worker_id="a")
    b = make_queue({"work": noop}, SHORT_LEASE, worker_id="b")
    await a.start()
    warm_up = await a.enqueue("work")  # opens the claims and outcomes connections
    await wait_for(lambda: _state_is(sql, warm_up, "done"))
    job_id = await a.enqueue("work", {"slow": True})
    await asyncio.wait_for(entered.wait(), 5)
    names = (queue.CLAIMS_CONNECTION, queue.OUTCOMES_CONNECTION, queue.HEARTBEAT_CONNECTION)
    await wait_for(lambda: _has_connections(sql, names))
    killed = await sql.fetch(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = ANY($1::text[])",
        list(names),
    )
    assert len(killed) == 3
    for _ in range(5):  # 1.5 s, the lease is 1 s
        await asyncio.sleep(0.3)
        assert await b.run_until_idle(timeout=5) == 0
    finish.set()
    await wait_for(lambda: _state_is(sql, job_id, "done"), within=10)
    assert (await job_row(sql, job_id))["attempt"] == 1
    after = await a.enqueue("work")
    await wait_for(lambda: _state_is(sql, after, "done"), within=10)
    alive = await sql.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = ANY($1::text[])",
        list(names),
    )
    assert alive and not {r["pid"] for r in alive} & {r["pid"] for r in killed}


async def test_stop_closes_the_queues_own_connections(make_queue: MakeQueue, sql: asyncpg.Connection) -> None:
    """After stop() no connection of the queue's own is left on the server."""
    q = make_queue({"work": noop}, FAST)
    await q.start()
    job_id = await q.enqueue("work")
    await wait_for(lambda: _state_is(sql, job_id, "done"))
    assert await _queue_connections(sql)
    await q.stop()
    await wait_for(lambda: _no_queue_connections(sql))


async def _has_connections(sql: asyncpg.Connection, names: tuple[str, ...]) -> bool:
    found = await sql.fetchval(
        "SELECT count(DISTINCT application_name) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = ANY($1::text[])",
        list(names),
    )
    return int(found) == len(names)


async def _queue_connections(sql: asyncpg.Connection) -> list[str]:
    rows = await sql.fetch(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'ce-queue-%'"
    )
    return [r["application_name"] for r in rows]


async def _no_queue_connections(sql: asyncpg.Connection) -> bool:
    return not await _queue_connections(sql)
