"""Issue 9, "fair work": one owner's thousands of jobs must not delay another owner's.

Deterministic: one runner, one claim at a time, and the order the handler sees is the claim order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from engine import db as dbmod
from engine import errors, queue

ONE_BY_ONE = queue.QueueSettings(
    concurrency=1, batch_size=10, poll_interval=0.2, backoff_base=0, backoff_max=0
)

MakeQueue = Callable[..., queue.JobQueue]


@pytest.fixture
async def make_queue(db: dbmod.Database) -> AsyncIterator[MakeQueue]:
    made: list[queue.JobQueue] = []

    def make(
        handlers: dict[str, queue.Handler], settings: queue.QueueSettings = ONE_BY_ONE
    ) -> queue.JobQueue:
        q = queue.JobQueue(db, handlers, settings)
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


def recorder(seen: list[str]) -> queue.Handler:
    async def handler(job: queue.Job) -> None:
        seen.append(job.payload["owner"])

    return handler


async def test_another_owners_job_is_claimed_in_the_first_batch(make_queue: MakeQueue) -> None:
    """A backlog of 2,000 jobs of owner A, then one job of owner B: B's job is in the first claimed batch
    (claim order: a FIFO queue would run it last)."""
    seen: list[str] = []
    q = make_queue({"verify": recorder(seen)})
    assert await q.enqueue_many("verify", [{"owner": "A"}] * 2000, fair_key="A") == 2000
    await q.enqueue("verify", {"owner": "B"}, fair_key="B")
    assert await q.run_until_idle(timeout=60) == 2001
    assert seen.index("B") < ONE_BY_ONE.batch_size


async def test_single_enqueues_of_a_backlog_do_not_delay_another_owner(make_queue: MakeQueue) -> None:
    """The same with the backlog enqueued job by job (the API's path), and B arriving last."""
    seen: list[str] = []
    q = make_queue({"verify": recorder(seen)})
    for _ in range(300):
        await q.enqueue("verify", {"owner": "A"}, fair_key="A")
    await q.enqueue("verify", {"owner": "B"}, fair_key="B")
    assert await q.run_until_idle(timeout=60) == 301
    assert seen.index("B") < ONE_BY_ONE.batch_size


async def test_a_newcomer_starts_at_the_head_of_a_half_served_backlog(
    make_queue: MakeQueue, sql: asyncpg.Connection
) -> None:
    """After A's backlog has been partly served, C's burst interleaves with what is left of A's, one for one,
    instead of queueing behind it (or jumping all of it)."""
    seen: list[str] = []
    q = make_queue({"verify": recorder(seen)})
    await q.enqueue_many("verify", [{"owner": "A"}] * 100, fair_key="A")
    # A's first 40 are served (as if claimed and run): the head of the queue is A's 41st
    await sql.execute(
        "UPDATE queue_jobs SET state = 'done', finished_at = now() WHERE id IN "
        "(SELECT id FROM queue_jobs ORDER BY id LIMIT 40)"
    )
    await q.enqueue_many("verify", [{"owner": "C"}] * 20, fair_key="C")
    assert await q.run_until_idle(timeout=60) == 80
    assert collections.Counter(seen[:40]) == {"A": 20, "C": 20}
    assert seen[40:] == ["A"] * 40


async def test_two_backlogs_take_turns(make_queue: MakeQueue) -> None:
    """Two owners with 100 jobs each, the second enqueued after the first: they alternate."""
    seen: list[str] = []
    q = make_queue({"verify": recorder(seen)})
    await q.enqueue_many("verify", [{"owner": "A"}] * 100, fair_key="A")
    await q.enqueue_many("verify", [{"owner": "B"}] * 100, fair_key="B")
    assert await q.run_until_idle(timeout=60) == 200
    for start in range(0, 200, 20):
        assert collections.Counter(seen[start : start + 20]) == {"A": 10, "B": 10}


async def test_jobs_without_an_owner_keep_half_of_every_claim(make_queue: MakeQueue) -> None:
    """Unowned (system, scheduled, retried) jobs and owners' jobs share each claim: neither order can starve
    the other, and each fills in when the other runs short."""
    seen: list[str] = []
    q = make_queue({"verify": recorder(seen), "system": recorder(seen)})
    await q.enqueue_many("system", [{"owner": "-"}] * 100)
    await q.enqueue_many("verify", [{"owner": "A"}] * 100, fair_key="A")
    await q.enqueue("verify", {"owner": "B"}, fair_key="B")
    assert await q.run_until_idle(timeout=60) == 201
    first = collections.Counter(seen[:10])
    assert first["-"] == 5 and first["B"] == 1 and first["A"] == 4
    halfway = collections.Counter(seen[:100])
    assert halfway["-"] >= 45 and halfway["A"] >= 45  # every claim took from both orders


async def test_an_owners_retried_job_runs_again(make_queue: MakeQueue, sql: asyncpg.Connection) -> None:
    """A retry after a delay leaves the fair order (it is claimed by run_at when due); a retry right away and a
    hand-back keep their place. Both run to done."""
    tries: collections.Counter[str] = collections.Counter()

    async def flaky(job: queue.Job) -> None:
        name = job.payload["name"]
        tries[name] += 1
        if tries[name] == 1:
            raise queue.Retry(after=job.payload["after"])

    q = make_queue({"flaky": flaky})
    later = await q.enqueue("flaky", {"name": "later", "after": 0.05}, fair_key="A")
    now = await q.enqueue("flaky", {"name": "now", "after": 0.0}, fair_key="A")
    await q.start()
    # the started workers run the delayed retry when it comes due; wait (bounded) until both outcomes are
    # written: run_until_idle returns at once while the retry is not yet due, so it cannot be the wait
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        rows = await sql.fetch("SELECT id, state, fair_seq FROM queue_jobs ORDER BY id")
        if all(r["state"] == "done" for r in rows) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert [(r["id"], r["state"]) for r in rows] == [(later, "done"), (now, "done")]
    assert tries == {"later": 2, "now": 2}


async def test_fair_key_is_checked(make_queue: MakeQueue) -> None:
    """An empty or oversized fair key is a clear error naming the field."""
    q = make_queue({"verify": recorder([])})
    with pytest.raises(errors.InvalidRequest, match="fair_key"):
        await q.enqueue("verify", {}, fair_key="")
    with pytest.raises(errors.InvalidRequest, match="fair_key"):
        await q.enqueue_many("verify", [{}], fair_key="x" * (queue.FAIR_KEY_MAX + 1))
