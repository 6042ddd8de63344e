"""Several workers on one database: an attempt runs once, and a killed worker's job is taken back."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from engine import db as dbmod
from engine import queue

WORKER_SCRIPT = Path(__file__).with_name("queue_blocking_worker.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def second_db(database_url: str) -> AsyncIterator[dbmod.Database]:
    """Another pool on the same database, as a second process would have."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=8)
    try:
        yield database
    finally:
        await database.close()


async def test_two_queues_never_run_one_attempt_twice(db: dbmod.Database, second_db: dbmod.Database) -> None:
    """2,000 jobs drained by two queues on separate pools: every job runs exactly once, on its first attempt."""
    runs: collections.Counter[tuple[int, int]] = collections.Counter()
    by_queue: collections.Counter[str] = collections.Counter()

    def handler_for(name: str) -> queue.Handler:
        async def handler(job: queue.Job) -> None:
            runs[(job.id, job.attempt)] += 1
            by_queue[name] += 1
            await asyncio.sleep(0)  # let the other queue interleave

        return handler

    settings = queue.QueueSettings(concurrency=8, batch_size=25, poll_interval=0.2)
    a = queue.JobQueue(db, {"work": handler_for("a")}, settings, worker_id="a")
    b = queue.JobQueue(second_db, {"work": handler_for("b")}, settings, worker_id="b")
    assert await a.enqueue_many("work", [{"n": n} for n in range(2000)]) == 2000
    ran = await asyncio.gather(a.run_until_idle(timeout=60), b.run_until_idle(timeout=60))
    assert sum(ran) == 2000
    assert len(runs) == 2000
    assert set(runs.values()) == {1}
    assert {attempt for _, attempt in runs} == {1}
    assert by_queue["a"] > 0 and by_queue["b"] > 0  # both really competed
    assert (await a.counts())["done"] == 2000


async def test_killed_worker_job_is_taken_back_after_its_lease(db: dbmod.Database, database_url: str) -> None:
    """A worker process killed with SIGKILL mid-job loses its lease; another queue then runs the job to done."""
    lease = 1.0
    q = queue.JobQueue(db, {"block": _finish}, queue.QueueSettings(poll_interval=0.1), worker_id="survivor")
    job_id = await q.enqueue("block")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        database_url,
        str(lease),
        env=env,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    sql = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 30
        while await sql.fetchval("SELECT worker_id FROM queue_jobs WHERE id = $1", job_id) != "doomed-worker":
            assert proc.returncode is None, "the worker process died on its own"
            assert time.monotonic() < deadline, "the worker process never claimed the job"
            await asyncio.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
        # nobody heartbeats it now: it is not claimable until the lease runs out, then it is
        assert await q.run_until_idle(timeout=10) == 0
        deadline = time.monotonic() + 10
        while await q.run_until_idle(timeout=10) == 0:
            assert time.monotonic() < deadline, "the job was never taken back"
            await asyncio.sleep(0.1)
        row = await sql.fetchrow(
            "SELECT state, attempt, worker_id, last_error FROM queue_jobs WHERE id = $1", job_id
        )
    finally:
        await sql.close()
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    assert row is not None
    assert (row["state"], row["attempt"], row["worker_id"]) == ("done", 2, None)
    assert row["last_error"].startswith("LeaseExpired")


async def _finish(job: queue.Job) -> None:
    return None
