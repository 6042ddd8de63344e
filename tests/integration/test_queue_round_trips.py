"""Issue 14, item 3: the queue's claim/complete path in round trips (counts, not timings).

A claim is one statement (``queue_claim``: no BEGIN, SET LOCAL and COMMIT around it), the previous batch's
outcomes ride along on it, and its planner setting ends with the call, so nothing stays on the connection.
Counted with ``bench.statements``' seam: asyncpg's query logger on every connection the queue opens itself.
"""

from __future__ import annotations

import math

import asyncpg
import pytest

from bench import statements
from engine import db as dbmod
from engine import queue
from engine.queue.backend import Outcome

N = 1000
BATCH = 50


async def _noop(job: queue.Job) -> None:
    return None


async def test_a_backlog_costs_about_one_statement_per_batch(database_url: str) -> None:
    """N no-op jobs claimed in batches of 50: one claim statement per batch, never a transaction around it;
    done outcomes ride along on the next claim, so all the queue's own connections (claims, outcomes,
    heartbeat, LISTEN) together send at most about two statements per batch. Before: BEGIN, SET LOCAL
    enable_sort, the claim and COMMIT, four per batch."""
    db = await dbmod.Database.connect(database_url, min_size=1, max_size=4)
    try:
        q = queue.JobQueue(db, {"noop": _noop}, queue.QueueSettings(batch_size=BATCH))
        assert await q.enqueue_many("noop", [{"n": i} for i in range(N)]) == N
        counter = statements.StatementCounter()
        with statements.counting(counter):  # the connections the queue opens from now on
            await q.start()
            await q.run_until_idle(timeout=60)
            await q.stop()
        assert (await q.counts())["done"] == N
    finally:
        await db.close()
    seen = counter.by_statement
    claim_key = " ".join(db.queries["claim_jobs"].split())[:60]  # as the counter keys a statement
    claims = seen[claim_key]
    batches = math.ceil(N / BATCH)
    assert batches <= claims <= batches + 3, seen  # + the claims that came back short at the end
    assert not [text for text in seen if text.split()[0].rstrip(";").upper() in ("BEGIN", "COMMIT")], seen
    assert counter.total <= 2 * batches + 10, seen


async def test_the_claim_leaves_no_setting_on_its_connection(database_url: str) -> None:
    """enable_sort is off while queue_claim plans and runs (its SET clause) and on again when it returns: a
    session (or a transaction pooler's server connection) keeps nothing, with no transaction of the caller's."""
    db = await dbmod.Database.connect(database_url, min_size=1, max_size=2)
    try:
        q = queue.JobQueue(db, {"noop": _noop})
        await q.enqueue_many("noop", [{"n": i} for i in range(3)])
    finally:
        await db.close()
    conn = await asyncpg.connect(database_url, statement_cache_size=0)
    try:
        rows = await conn.fetch(
            "SELECT * FROM queue_claim(10, 'w', 30, ARRAY['noop'], '{}'::bigint[], '{}'::integer[], ARRAY[330.0])"
        )
        assert [r["state"] for r in rows] == ["running"] * 3
        assert [r["tries"] for r in rows] == [1, 1, 1]
        assert await conn.fetchval("SHOW enable_sort") == "on"
        assert not conn.is_in_transaction()
        done = await conn.fetch(
            "SELECT * FROM queue_claim(10, 'w', 30, ARRAY['noop'], $1::bigint[], $2::integer[], ARRAY[330.0])",
            [r["id"] for r in rows],
            [r["attempt"] for r in rows],
        )
        assert done == []  # the three rode along as done; nothing left to claim
        states = await conn.fetch("SELECT state, count(*) AS n FROM queue_jobs GROUP BY state")
        assert {r["state"]: r["n"] for r in states} == {"done": 3}
        assert await conn.fetchval("SHOW enable_sort") == "on"
    finally:
        await conn.close()


@pytest.mark.parametrize("written_by", ["claim", "flusher"])
async def test_two_attempts_of_one_job_done_together_mark_the_newest_done(
    database_url: str, written_by: str
) -> None:
    """A job whose lease ran out was claimed again by the same worker, and both attempts finished: both "done"
    outcomes are written together, riding on a claim or by the flusher (complete_jobs). The newest attempt holds
    the row and is marked done; the older one is fenced out (both statements look each id's attempt up by
    position, so each id is sent once, at its newest attempt)."""
    db = await dbmod.Database.connect(database_url, min_size=1, max_size=2)
    conn = await asyncpg.connect(database_url, statement_cache_size=0)
    try:
        q = queue.JobQueue(db, {"noop": _noop}, worker_id="w")
        job_id = await q.enqueue("noop", {})
        backend = q._backend
        async with backend.claim_session(0) as session:
            (first,) = await backend.claim(session, 10, [])
            await conn.execute(
                "UPDATE queue_jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job_id
            )
            (second,) = await backend.claim(session, 10, [])  # taken back from the expired lease: attempt 2
            assert (first.id, first.attempt, second.id, second.attempt) == (job_id, 1, job_id, 2)
            outcomes = [Outcome(j.id, j.attempt, "done") for j in (first, second)]
            if written_by == "claim":
                assert await backend.claim(session, 10, outcomes) == []
            else:
                assert await backend.finish(session, outcomes) is False
        row = await conn.fetchrow("SELECT state, attempt FROM queue_jobs WHERE id = $1", job_id)
        assert (row["state"], row["attempt"]) == ("done", 2)
        await backend.close()
    finally:
        await conn.close()
        await db.close()
