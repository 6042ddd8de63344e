"""The verification jobs' credential reads coalesced (engine/readbatch.py, on engine/coalesce.py): concurrent
reads share one statement and each gets its own row; reads that arrive while batches are in flight go together in
the next one; refusals, failures, cancellation and closing behave as for a single read."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bench import statements
from engine import db as dbmod
from engine import errors, jobs, queue, readbatch
from engine.coalesce import CoalescerClosed
from engine.engine import CredentialEngine
from engine.models import CredentialStatus
from engine.payloads import REVERIFY_SWEEP, ROTATION_VERIFY, VERIFY
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


async def test_a_closed_engine_reads_no_more(make_engine: EngineFactory, fake: FakeVenue) -> None:
    """The engine closes its reads after its jobs: a read after that is refused, never left waiting."""
    eng = await make_engine(workers=0)
    (cid,) = await created(eng, fake, 1)
    reads = eng.store.reads
    await eng.close()
    with pytest.raises(CoalescerClosed):
        await reads.read(cid, 1)


async def test_the_claim_reads_what_a_verification_job_reads(eng: CredentialEngine, fake: FakeVenue) -> None:
    """The claim statement reads each verify job's credential and secret version (claim_jobs_reading_credentials):
    what read_for_job answers, typed the same (jsonb as dicts, bytes as bytes), in no statement of its own; a
    secret version that is gone reads as None; a job of another kind, a payload that names no credential and a
    credential that does not exist read nothing, and never fail the claim."""
    ids = await created(eng, fake, 3)
    store, queue = eng.store, eng._ready().queue
    await queue.run_until_idle(timeout=30)  # VERIFIED: permissions (jsonb), identities, timestamps set
    for cid in ids:
        await eng.verify_credential(OWNER, cid)
    extra = [
        (VERIFY, {"credentialId": str(ids[1]), "version": 7}),  # a secret version that does not exist
        (ROTATION_VERIFY, {"credentialId": str(ids[2]), "version": 1}),
        (VERIFY, {"credentialId": "not-a-uuid", "version": "1e999"}),
        (VERIFY, {"credentialId": str(uuid.uuid4()), "version": 1}),
        (VERIFY, {"version": [1]}),
        (REVERIFY_SWEEP, {"credentialId": str(ids[2]), "version": 1}),
    ]
    for kind, payload in extra:
        await queue.enqueue(kind, payload)
    backend = queue._backend
    before = store.reads.stats.items
    async with backend.claim_session(0) as session:
        claimed = await backend.claim(session, 20, [])
    assert len(claimed) == 3 + len(extra)
    assert store.reads.stats.items == before  # nothing read apart from the claim
    read = {}
    for job in claimed:
        assert job.attached is not None and "cred_id" in job.attached
        known = job.kind in (VERIFY, ROTATION_VERIFY) and job.payload.get("credentialId") in {
            str(cid) for cid in ids
        }
        assert (job.attached["cred_id"] is not None) == known, job.payload
        if known:
            cid, version = uuid.UUID(job.payload["credentialId"]), int(job.payload["version"])
            read[(job.kind, cid, version)] = store.read_with_claim(job.attached, cid, version)
    assert set(read) == {
        (VERIFY, ids[0], 1),
        (VERIFY, ids[1], 1),
        (VERIFY, ids[2], 1),
        (VERIFY, ids[1], 7),
        (ROTATION_VERIFY, ids[2], 1),
    }
    for (_, cid, version), got in read.items():
        assert got == await store.read_for_job(cid, version)
    got = read[(VERIFY, ids[1], 7)]
    assert got is not None and got[0].credential_id == ids[1] and got[1] is None
    got = read[(VERIFY, ids[0], 1)]
    assert got is not None
    cred, secret, _ = got
    assert cred.status is CredentialStatus.VERIFIED and cred.permissions is not None
    assert secret is not None and store.open_secret(secret).api_key == "read-key-0000"
    assert "cred_" not in repr(claimed[0]) and "secret_" not in repr(claimed[0])  # the row stays out of reprs
    assert store.read_with_claim(None, ids[0], 1) is None
    assert store.read_with_claim(claimed[0].attached, uuid.uuid4(), 1) is None  # another job's row: not used


async def test_verifications_read_with_their_claim(make_engine: EngineFactory, fake: FakeVenue) -> None:
    """A backlog of verifications run by the engine's workers: every credential VERIFIED, no read of its own."""
    eng = await make_engine(workers=0)
    ids = await created(eng, fake, 30)
    await eng.close()
    runner = await make_engine(workers=10)
    for cid in ids:
        await runner.wait_for_status(OWNER, cid, [CredentialStatus.VERIFIED], timeout=60)
    assert runner.store.reads.stats.items == 0


async def test_a_verification_sends_no_read_of_its_own(database_url: str) -> None:
    """Statements per created and verified credential (bench.statements): the job's read is no statement at all
    (3.44 to 3.52 with a statement per read, before)."""
    result = await statements.measure(200, clients=10, workers=10, dsn=database_url)
    sent = result["create_verify_statements"]
    queries = dbmod.load_queries(*dbmod.QUERY_FILES)
    for name in ("get_credentials_with_secrets", "claim_jobs"):
        assert " ".join(queries[name].split())[:60] not in sent, sent
    assert " ".join(queries[jobs.CLAIM_QUERY].split())[:60] in sent, sent
    assert result["create_verify"] <= 3.0, sent


async def test_the_claim_statement_is_chosen_before_the_queue_starts(database_url: str) -> None:
    """JobQueue.claim_with names a known query, before start; a queue that does not use it hands no row on."""
    seen: list[Any] = []

    async def noop(job: queue.Job) -> None:
        seen.append(job.attached)

    db = await dbmod.Database.connect(database_url, min_size=1, max_size=2)
    try:
        q = queue.JobQueue(db, {"noop": noop})
        with pytest.raises(errors.ConfigurationError, match="no named query"):
            q.claim_with("no_such_query")
        await q.enqueue("noop", {"credentialId": str(uuid.uuid4()), "version": 1})
        assert await q.run_until_idle(timeout=30) == 1
        assert seen == [None]  # claim_jobs: nothing attached
        q.claim_with(jobs.CLAIM_QUERY)
        await q.enqueue("noop", {})
        assert await q.run_until_idle(timeout=30) == 1
        assert seen[-1] is not None and seen[-1]["cred_id"] is None  # not a verification: nothing read
        await q.start()
        with pytest.raises(errors.ConfigurationError, match=r"before JobQueue\.start"):
            q.claim_with(jobs.CLAIM_QUERY)
        await q.stop()
    finally:
        await db.close()


async def test_a_claim_row_older_than_its_job_is_read_again_before_the_job_is_dropped(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """The claim statement's row can predate the job's own transaction: queue_claim() (VOLATILE) finds a job
    committed after the statement began, and the statement joins the credential with its older snapshot. A row
    that would drop the job as stale (here: the staged secret not visible yet) must be read again: before, one
    of 5,000 staged rotations in bench.lifecycle was dropped this way and stayed PENDING for ever. The older
    snapshot is rebuilt by blanking the claimed row's secret columns (what the join gave without the version)."""
    [cid] = await created(eng, fake, 1)
    queue = eng._ready().queue
    await queue.run_until_idle(timeout=30)
    fake.add_key("read-key-new", "s3cret-2")  # same venue account as the first key
    await eng.rotate_credential(OWNER, cid, api_key="read-key-new", api_secret="s3cret-2")
    backend = queue._backend
    async with backend.claim_session(0) as session:
        [job] = await backend.claim(session, 5, [])
    assert job.kind == ROTATION_VERIFY and job.attached is not None
    assert job.attached["secret_row_version"] == 2  # as claimed now; then as an older snapshot shows it:
    older = {k: (None if k.startswith("secret_") else v) for k, v in dict(job.attached).items()}
    assert eng.store.read_with_claim(older, cid, 2) is not None  # a row the job would have dropped
    stale = dataclasses.replace(job, attached=older)
    assert eng._jobs is not None
    await eng._jobs.rotation_verify(stale)
    cred = await eng.get_credential(OWNER, cid)
    assert cred.secret_version == 2 and cred.pending_rotation is None  # promoted, not left PENDING

    # the same for a verification: a row from before the credential's version 2 was promoted
    await eng.verify_credential(OWNER, cid)
    async with backend.claim_session(0) as session:
        [job] = await backend.claim(session, 5, [])
    assert job.kind == VERIFY and job.payload["version"] == 2
    older = dict(job.attached or {}) | {"cred_secret_version": 1}
    before = fake.calls.count("read-key-new")
    await eng._jobs.verify(dataclasses.replace(job, attached=older))
    assert fake.calls.count("read-key-new") == before + 1  # probed: the fresh read let it go ahead
