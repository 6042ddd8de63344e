"""The verification jobs' credential reads coalesced (engine/readbatch.py, on engine/coalesce.py): concurrent
reads share one statement and each gets its own row; reads that arrive while batches are in flight go together in
the next one; refusals, failures, cancellation and closing behave as for a single read."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from engine import errors, readbatch
from engine.coalesce import CoalescerClosed
from engine.engine import CredentialEngine
from engine.models import CredentialStatus
from engine.testing import FakeVenue
from venues.base import Venue

OWNER = "owner-reads"
EngineFactory = Callable[..., Awaitable[CredentialEngine]]


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop turn until ``condition`` holds (at most 1,000 turns)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def created(eng: CredentialEngine, fake: FakeVenue, n: int) -> list[uuid.UUID]:
    ids = []
    for i in range(n):
        fake.add_key(f"read-key-{i:04d}", "s3cret")
        cred = await eng.create_credential(
            OWNER, venue=Venue.BINANCE, api_key=f"read-key-{i:04d}", api_secret="s3cret"
        )
        ids.append(cred.credential_id)
    return ids


async def test_concurrent_reads_share_one_statement(eng: CredentialEngine, fake: FakeVenue) -> None:
    """20 reads started together: one pool statement (one per read before), each read its own credential, the
    secret version it asked for (gone: None), the event sequence of its row."""
    ids = await created(eng, fake, 20)
    store = eng.store
    reads = await asyncio.gather(*(store.read_for_job(cid, 1) for cid in ids), store.read_for_job(ids[0], 7))
    assert store.reads.stats.batches == 1 and store.reads.stats.sizes == {21: 1}
    for cid, (cred, secret, sequence) in zip(ids, reads[:-1], strict=True):
        assert cred.credential_id == cid and sequence == 1
        assert secret is not None and secret.credential_id == cid and secret.version == 1
        key = store.open_secret(secret)
        assert key.api_key == f"read-key-{ids.index(cid):04d}"
    cred, secret, _ = reads[-1]
    assert cred.credential_id == ids[0] and secret is None
    with pytest.raises(errors.NotFound):
        await store.read_for_job(uuid.uuid4(), 1)


async def test_reads_of_a_later_turn_go_out_beside_the_batch_in_flight(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """Reads started while a batch is in flight do not wait for it (up to MAX_IN_FLIGHT batches at once): their
    own batch, on another connection."""
    assert readbatch.MAX_IN_FLIGHT >= 2
    ids = await created(eng, fake, 6)
    store = eng.store
    first = asyncio.ensure_future(asyncio.gather(*(store.read_for_job(cid, 1) for cid in ids[:3])))
    await until(lambda: store.reads.in_flight == 1)  # the first batch is being sent
    later = await asyncio.gather(*(store.read_for_job(cid, 1) for cid in ids[3:]))
    earlier = await first
    assert store.reads.stats.batches == 2 and store.reads.stats.sizes == {3: 2}
    assert [r[0].credential_id for r in [*earlier, *later]] == ids


async def test_reads_that_arrive_while_batches_are_in_flight_go_together(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """Group commit: with MAX_IN_FLIGHT batches in flight, reads started in later turns of the loop wait in line
    and go as one batch when a batch ends (one statement for them, not one each)."""
    ids = await created(eng, fake, 2 + 5)
    store = eng.store
    gate = asyncio.Event()
    original = store.reads._send
    blocked = 0

    async def held(pairs: list[readbatch.Pair]) -> list[Any]:
        nonlocal blocked
        if blocked < readbatch.MAX_IN_FLIGHT:
            blocked += 1
            await gate.wait()
        return await original(pairs)

    store.reads._coalescer._send = held  # the seam: the batch's statement, held back
    busy = []
    for n, cid in enumerate(ids[: readbatch.MAX_IN_FLIGHT], start=1):  # each its own batch, held back
        busy.append(asyncio.ensure_future(store.read_for_job(cid, 1)))
        await until(lambda: store.reads.stats.batches == n)  # noqa: B023
    waiting = []
    for cid in ids[readbatch.MAX_IN_FLIGHT :]:  # five reads, each started in a turn of its own
        waiting.append(asyncio.ensure_future(store.read_for_job(cid, 1)))
        await asyncio.sleep(0)
    assert store.reads.stats.batches == readbatch.MAX_IN_FLIGHT
    gate.set()
    results = await asyncio.gather(*busy, *waiting)
    assert [r[0].credential_id for r in results] == ids
    assert store.reads.stats.sizes == {1: readbatch.MAX_IN_FLIGHT, 5: 1}


async def test_a_task_in_a_transaction_is_refused(eng: CredentialEngine, fake: FakeVenue) -> None:
    """As a pool statement is: a task holding a connection may not wait on another one."""
    (cid,) = await created(eng, fake, 1)
    async with eng.store.db.transaction():
        with pytest.raises(errors.PoolReentry):
            await eng.store.read_for_job(cid, 1)
    cred, _, _ = await eng.store.read_for_job(cid, 1)
    assert cred.credential_id == cid


async def test_a_failed_statement_fails_every_read_of_its_batch(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """Every read of the batch gets the typed storage error; the next reads start a new batch and succeed."""
    ids = await created(eng, fake, 3)
    db = eng.store.db
    queries = dict(db.queries)
    db.queries = {
        **queries,
        "get_credentials_with_secrets": "SELECT * FROM no_such_table WHERE $1::jsonb IS NOT NULL",
    }
    results = await asyncio.gather(*(eng.store.read_for_job(cid, 1) for cid in ids), return_exceptions=True)
    assert all(isinstance(r, errors.StorageError) for r in results), results
    db.queries = queries
    reads = await asyncio.gather(*(eng.store.read_for_job(cid, 1) for cid in ids))
    assert [r[0].credential_id for r in reads] == ids


async def test_a_cancelled_read_leaves_the_others_whole(eng: CredentialEngine, fake: FakeVenue) -> None:
    ids = await created(eng, fake, 4)
    tasks = [asyncio.ensure_future(eng.store.read_for_job(cid, 1)) for cid in ids]
    await asyncio.sleep(0)
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r[0].credential_id for i, r in enumerate(results) if i != 1] == [ids[0], ids[2], ids[3]]  # type: ignore[index]


async def test_verifications_run_together_read_in_batches(
    make_engine: EngineFactory, fake: FakeVenue
) -> None:
    """A backlog of 40 verifications with 10 runners: all VERIFIED, with fewer reads than credentials."""
    eng = await make_engine(workers=0)
    ids = await created(eng, fake, 40)
    reads = eng.store.reads
    await eng.close()
    runner = await make_engine(workers=10)
    for cid in ids:
        await runner.wait_for_status(OWNER, cid, [CredentialStatus.VERIFIED], timeout=60)
    stats = runner.store.reads.stats
    assert stats.items == 40 and stats.batches < 40 and stats.largest > 1
    assert reads is not runner.store.reads


async def test_a_closed_engine_reads_no_more(make_engine: EngineFactory, fake: FakeVenue) -> None:
    """The engine closes its reads after its jobs: a read after that is refused, never left waiting."""
    eng = await make_engine(workers=0)
    (cid,) = await created(eng, fake, 1)
    reads = eng.store.reads
    await eng.close()
    with pytest.raises(CoalescerClosed):
        await reads.read(cid, 1)
