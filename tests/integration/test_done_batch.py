"""Successful verifications written in batches (engine/donebatch.py, queries.sql ``verified_and_done_batch``):
each verification of a batch ends exactly as the single statement (``verified_and_done``) would end it, and
batches neither deadlock nor lose writes beside other writers of the same credentials."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import asyncpg
import pytest

from engine import db as dbmod
from engine import errors, events, hotpath, jobs, queue
from engine.coalesce import CoalescerClosed
from engine.donebatch import DoneBatch, Verified
from engine.engine import CredentialEngine
from engine.models import CredentialStatus
from engine.payloads import Verify
from engine.testing import FakeVenue, broken_invariants
from venues.base import Permissions, ProbeResult, Venue

EngineFactory = Callable[..., Awaitable[CredentialEngine]]
OWNER = "owner-batch"
OTHER = "owner-batch-hooked"
HOOK = "http://127.0.0.1:9/hook"


def found(account: str = "uid-1", *, trade: bool = True) -> ProbeResult:
    """What a probe of the FakeVenue's keys finds (trade switched off: new permissions)."""
    return ProbeResult(
        venue=Venue.BINANCE,
        venue_account_id=account,
        permissions=Permissions(read=True, trade=trade, ip_restricted=True, ip_allowlist=("203.0.113.7",)),
        identities=("spot",),
    )


@pytest.fixture
async def raw(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def create(eng: CredentialEngine, fake: FakeVenue, owner: str = OWNER) -> uuid.UUID:
    key = f"batch-key-{uuid.uuid4().hex[:12]}"
    fake.add_key(key, "s3cret")
    cred = await eng.create_credential(owner, venue=Venue.BINANCE, api_key=key, api_secret="s3cret")
    return cred.credential_id


async def claim(raw: asyncpg.Connection, cid: uuid.UUID) -> queue.Job:
    """The credential's queued verification job, taken as a worker's claim takes it (running, attempt + 1)."""
    row = await raw.fetchrow(
        """UPDATE queue_jobs
           SET state = 'running', attempt = attempt + 1, worker_id = 'test',
               lease_expires_at = now() + interval '10 minutes', lease_cap = now() + interval '1 hour'
           WHERE dedupe_key = $1 AND state = 'queued'
           RETURNING id, kind, payload, attempt, max_attempts, dedupe_key, run_at, created_at""",
        f"verify:{cid}",
    )
    assert row is not None, "no queued verification job"
    payload = row["payload"]
    return queue.Job(
        id=row["id"],
        kind=row["kind"],
        payload=payload if isinstance(payload, dict) else json.loads(payload),
        attempt=row["attempt"],
        max_attempts=row["max_attempts"],
        dedupe_key=row["dedupe_key"],
        run_at=row["run_at"],
        created_at=row["created_at"],
    )


async def read(eng: CredentialEngine, job: queue.Job, result: ProbeResult) -> Verified:
    """What the verification job read before its probe, with what the probe found."""
    cid = Verify.from_payload(job.payload).credential_id
    cred, _secret, sequence = await eng.store.read_for_job(cid, 1)
    return Verified(job, cred, 1, result, (), sequence)


async def verified(
    eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection
) -> tuple[uuid.UUID, queue.Job]:
    """A VERIFIED credential (pinned to uid-1) with a new verification job taken."""
    cid = await create(eng, fake)
    await eng.run_until_idle(timeout=30)
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.VERIFIED
    await eng.verify_credential(OWNER, cid)
    return cid, await claim(raw, cid)


class _Undone(Exception):
    """Raised to roll back the single statement's transaction."""


async def single(eng: CredentialEngine, v: Verified) -> str:
    """What the single statement answers for ``v``, in a transaction rolled back afterwards (nothing stays)."""
    outcome = "?"
    try:
        async with eng.db.transaction() as conn:
            try:
                written = await hotpath.verified_and_done(
                    cast(dbmod.Database, conn), v.job, v.cred, v.version, v.result, v.warnings, v.sequence
                )
            except queue.StaleAttempt:
                outcome = "lost"
                raise
            outcome = "written" if written else "refused"
            raise _Undone
    except (_Undone, queue.StaleAttempt):
        pass
    return outcome


def answer(outcome: bool | BaseException) -> str:
    if isinstance(outcome, queue.StaleAttempt):
        return "lost"
    assert isinstance(outcome, bool), outcome
    return "written" if outcome else "refused"


async def mixed(eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection) -> dict[str, Verified]:
    """One verification for each way the single statement can end."""
    cases: dict[str, Verified] = {}
    for name in ("written", "written too"):
        cid = await create(eng, fake)
        cases[name] = await read(eng, await claim(raw, cid), found())
    cid, job = await verified(eng, fake, raw)
    cases["permissions changed"] = await read(eng, job, found(trade=False))
    cid, job = await verified(eng, fake, raw)
    cases["refused: another account is pinned"] = await read(eng, job, found("uid-2", trade=False))

    cid = await create(eng, fake)
    cases["refused: reported on since it was read"] = await read(eng, await claim(raw, cid), found())
    await raw.execute("UPDATE credentials SET event_seq = event_seq + 1 WHERE id = $1", cid)
    await raw.execute(
        "INSERT INTO events (id, type, owner_id, credential_id, sequence, data) "
        "VALUES ($1, 'credential.rotation_started', $2, $3, 2, '{}')",
        uuid.uuid4(), OWNER, cid,
    )  # fmt: skip

    cid = await create(eng, fake)
    cases["refused: revoked"] = await read(eng, await claim(raw, cid), found())
    await eng.revoke_credential(OWNER, cid)

    cid = await create(eng, fake)
    cases["refused: a rotation failure to show"] = await read(eng, await claim(raw, cid), found())
    await raw.execute("UPDATE credentials SET rotation_failure_reason = 'KEY_REJECTED' WHERE id = $1", cid)

    cid = await create(eng, fake, OTHER)
    job = await claim(raw, cid)
    cred, _secret, sequence = await eng.store.read_for_job(cid, 1)
    cases["refused: an endpoint wants the event"] = Verified(job, cred, 1, found(), (), sequence)

    cid = await create(eng, fake)
    job = await claim(raw, cid)
    cases["attempt lost"] = await read(eng, dataclasses.replace(job, attempt=job.attempt + 1), found())

    cid = await create(eng, fake)
    job = await claim(raw, cid)
    lost_and_revoked = await read(eng, dataclasses.replace(job, attempt=job.attempt + 1), found())
    await eng.revoke_credential(OWNER, cid)
    cases["refused: revoked, and its attempt lost"] = lost_and_revoked
    return cases


async def test_a_mixed_batch_gives_each_caller_what_the_single_statement_gives(
    make_engine: EngineFactory, fake: FakeVenue, raw: asyncpg.Connection
) -> None:
    """Written (first verification, new permissions), refused for each reason, attempt lost: one statement for
    the batch, and each caller gets the single statement's answer; what is written is what it writes."""
    eng = await make_engine(allow_private_webhook_urls=True)
    await eng.add_webhook_endpoint(OTHER, HOOK, ["credential.verified"])
    await eng.add_webhook_endpoint(OWNER, HOOK, ["credential.rotated"])  # wants another type: no effect
    cases = await mixed(eng, fake, raw)
    expected = {name: await single(eng, v) for name, v in cases.items()}
    assert expected == {
        name: "written"
        if name.startswith(("written", "permissions"))
        else name.split(":")[0].replace("attempt ", "")
        for name in cases
    }
    before = {
        name: await eng.get_credential(v.cred.owner_id, v.cred.credential_id) for name, v in cases.items()
    }
    batch = DoneBatch(eng.db)
    names = list(cases)
    random.Random(7).shuffle(names)
    got = await asyncio.gather(
        *(
            batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence)
            for v in (cases[n] for n in names)
        ),
        return_exceptions=True,
    )
    assert {n: answer(o) for n, o in zip(names, got, strict=True)} == expected
    assert batch.stats.batches == 1 and batch.stats.largest == len(cases)
    assert batch.outcomes.fallbacks == 0 and batch.outcomes.written == 3 and batch.outcomes.lost == 1

    for name, v in cases.items():
        cid = v.cred.credential_id
        after = await eng.get_credential(v.cred.owner_id, cid)
        history = await eng.list_events(v.cred.owner_id, cid)
        done = [
            j
            for j in await eng.queue.list_jobs(state="done", kind=jobs.VERIFY, limit=100)
            if j.id == v.job.id
        ]
        if expected[name] != "written":
            assert after == before[name], name  # nothing written for it
            assert not done, name
            continue
        event = history[-1]
        assert (event.type, event.sequence) == (
            "credential.permissions_changed" if name.startswith("permissions") else "credential.verified",
            v.sequence + 1,
        )
        assert event.data == {
            "credential": after.public_dict(),
            "previousStatus": before[name].status.value,
            "previousPermissions": before[name].public_dict()["permissions"],
        }
        assert after.verified_at_ms == after.updated_at_ms == event.data["credential"]["verifiedAt"]
        assert after.status is CredentialStatus.VERIFIED and after.permissions == v.result.permissions
        assert done, name
    assert await broken_invariants(eng) == {}


async def test_batches_write_what_one_statement_at_a_time_writes(
    make_engine: EngineFactory, fake: FakeVenue, raw: asyncpg.Connection
) -> None:
    """The same verifications written through batches and one statement at a time leave the same rows and the
    same events (types, sequences, data but the write's own timestamps)."""
    eng = await make_engine()

    own = (
        "credentialId",
        "apiKey",
        "createdAt",
        "updatedAt",
        "verifiedAt",
    )  # each credential's, each write's

    def plain(cred: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in cred.items() if k not in own}

    async def state(cids: list[uuid.UUID]) -> list[Any]:
        out = []
        for cid in cids:
            cred = plain((await eng.get_credential(OWNER, cid)).public_dict())
            history = [
                (e.type, e.sequence, {**e.data, "credential": plain(e.data["credential"])})
                for e in await eng.list_events(OWNER, cid)
            ]
            out.append((cred, history))
        return out

    ones = [await create(eng, fake) for _ in range(6)]
    batched = [await create(eng, fake) for _ in range(6)]
    for i, cid in enumerate(ones):
        v = await read(eng, await claim(raw, cid), found(trade=i % 2 == 0))
        assert await hotpath.verified_and_done(
            eng.db, v.job, v.cred, v.version, v.result, v.warnings, v.sequence
        )
    batch = DoneBatch(eng.db)
    items = [await read(eng, await claim(raw, cid), found(trade=i % 2 == 0)) for i, cid in enumerate(batched)]
    assert (
        await asyncio.gather(
            *(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence) for v in items)
        )
        == [True] * 6
    )
    assert batch.stats.batches == 1
    assert await state(batched) == await state(ones)


async def test_a_job_row_held_elsewhere_is_skipped_not_waited_for(
    eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection, database_url: str
) -> None:
    """Another transaction holding a job's row (a heartbeat) makes the batch answer False for that one (the
    transaction path decides) without waiting; the others are written."""
    items = [await read(eng, await claim(raw, await create(eng, fake)), found()) for _ in range(3)]
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM queue_jobs WHERE id = $1 FOR UPDATE", items[1].job.id)
        batch = DoneBatch(eng.db)
        got = await asyncio.wait_for(
            asyncio.gather(
                *(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence) for v in items)
            ),
            10,
        )
        await tx.rollback()
    finally:
        await holder.close()
    assert got == [True, False, True] and batch.outcomes.busy == 1
    held = items[1]
    assert (await eng.get_credential(OWNER, held.cred.credential_id)).status is CredentialStatus.PENDING
    # the caller's transaction path (here: the single statement) writes it once the row is free
    assert await hotpath.verified_and_done(
        eng.db, held.job, held.cred, held.version, held.result, held.warnings, held.sequence
    )


async def test_a_credential_row_held_elsewhere_is_skipped_not_waited_for(
    eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection, database_url: str
) -> None:
    """Another transaction holding one credential's row (a revoke, a rotation, an operator's session): the batch
    does not wait for it (one batch in flight per process: waiting would hold up every other owner's
    verifications up to the statement timeout, and its fallback as long again). That one reads False (its
    caller's transaction path waits for the row alone), the others are written at once, in one statement."""
    cids = sorted([await create(eng, fake) for _ in range(3)], key=lambda c: c.int)
    items = [await read(eng, await claim(raw, cid), found()) for cid in cids]
    other = await asyncpg.connect(database_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM credentials WHERE id = $1 FOR UPDATE", cids[1])
        batch = DoneBatch(eng.db)
        got = await asyncio.wait_for(
            asyncio.gather(
                *(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence) for v in items)
            ),
            10,  # the row stays held throughout: waiting for it would never end
        )
        await tx.rollback()
    finally:
        await other.close()
    assert got == [True, False, True]
    assert batch.outcomes.fallbacks == 0 and batch.stats.batches == 1
    held = items[1]
    assert (await eng.get_credential(OWNER, held.cred.credential_id)).status is CredentialStatus.PENDING
    assert await hotpath.verified_and_done(  # the caller's own path, once the row is free
        eng.db, held.job, held.cred, held.version, held.result, held.warnings, held.sequence
    )
    for cid in cids:
        assert [e.type for e in await eng.list_events(OWNER, cid)] == [
            "credential.created",
            "credential.verified",
        ]
    assert await broken_invariants(eng) == {}


async def test_a_failed_batch_statement_falls_back_with_the_same_answers(
    make_engine: EngineFactory, fake: FakeVenue, raw: asyncpg.Connection
) -> None:
    """Any error of the batch's statement (here: the server refuses it) sends each verification through the
    single statement, which gives each caller its own answer."""
    eng = await make_engine(allow_private_webhook_urls=True)
    await eng.add_webhook_endpoint(OTHER, HOOK, ["credential.verified"])
    cases = await mixed(eng, fake, raw)
    expected = {name: await single(eng, v) for name, v in cases.items()}
    broken = dict(eng.db.queries)
    broken["verified_and_done_batch"] = "SELECT 1 / 0"
    eng.db.queries = broken
    batch = DoneBatch(eng.db)
    got = await asyncio.gather(
        *(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence) for v in cases.values()),
        return_exceptions=True,
    )
    assert {n: answer(o) for n, o in zip(cases, got, strict=True)} == expected
    assert batch.outcomes.fallbacks == 1
    assert await broken_invariants(eng) == {}


async def test_concurrent_batches_and_revokes_neither_deadlock_nor_lose_writes(
    make_engine: EngineFactory, fake: FakeVenue, raw: asyncpg.Connection
) -> None:
    """Three batch writers take the same credentials in different orders while half of them are revoked:
    everything ends within its bound, no batch falls back, every credential written is VERIFIED with its
    event in order (then revoked after it), every other one untouched by the batches, sequences gapless."""
    eng = await make_engine()
    cids = [await create(eng, fake) for _ in range(40)]
    items = [await read(eng, await claim(raw, cid), found()) for cid in cids]
    writers = [DoneBatch(eng.db, max_batch=8) for _ in range(3)]

    async def write_all(batch: DoneBatch, seed: int) -> list[bool | BaseException]:
        order = list(items)
        random.Random(seed).shuffle(order)
        return await asyncio.gather(
            *(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence) for v in order),
            return_exceptions=True,
        )

    async def revoke_half() -> None:
        for cid in cids[::2]:
            await eng.revoke_credential(OWNER, cid)
            await asyncio.sleep(0)

    results = await asyncio.wait_for(
        asyncio.gather(*(write_all(w, s) for s, w in enumerate(writers)), revoke_half()), 60
    )
    assert all(w.outcomes.fallbacks == 0 for w in writers)
    answers = [o for r in results[:3] for o in r]
    assert all(isinstance(o, bool) for o in answers), [o for o in answers if not isinstance(o, bool)]
    written = sum(w.outcomes.written for w in writers)
    for cid in cids:
        types = [e.type for e in await eng.list_events(OWNER, cid)]
        status = (await eng.get_credential(OWNER, cid)).status
        if cid in cids[::2]:
            assert types in (
                ["credential.created", "credential.revoked"],
                ["credential.created", "credential.verified", "credential.revoked"],
            ), types
        else:
            assert (
                types == ["credential.created", "credential.verified"] and status is CredentialStatus.VERIFIED
            )
    verified_events = 0
    for cid in cids:
        verified_events += sum(
            1 for e in await eng.list_events(OWNER, cid) if e.type == "credential.verified"
        )
    assert verified_events == written  # every write answered True is there, once
    assert await broken_invariants(eng) == {}


async def test_closing_mid_batch_ends_its_callers_within_the_bound(
    eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection, database_url: str
) -> None:
    """A batch stuck on a lock when the writer closes: its callers get CoalescerClosed within the
    close's bound, nothing of it was written, and the next attempt writes it (or finds it done)."""
    items = [await read(eng, await claim(raw, await create(eng, fake)), found()) for _ in range(3)]
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        # the batch's event insert waits for this (held rows of credentials and jobs are skipped, not waited for)
        await holder.execute("LOCK TABLE events IN SHARE MODE")
        batch = DoneBatch(eng.db)
        writes = asyncio.gather(
            *(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence) for v in items),
            return_exceptions=True,
        )
        for _ in range(500):  # the batch is sent, and waits for the table lock
            if batch.stats.batches:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        await asyncio.wait_for(batch.close(timeout=0.5), 5)
        got = await asyncio.wait_for(writes, 5)
        with pytest.raises(CoalescerClosed):
            await batch.write(items[0].job, items[0].cred, 1, items[0].result, (), items[0].sequence)
        await tx.rollback()
    finally:
        await holder.close()
    assert all(isinstance(o, CoalescerClosed) for o in got), got
    for v in items:
        assert (await eng.get_credential(OWNER, v.cred.credential_id)).status is CredentialStatus.PENDING
        assert await hotpath.verified_and_done(
            eng.db, v.job, v.cred, v.version, v.result, v.warnings, v.sequence
        )
    assert await broken_invariants(eng) == {}


async def test_a_task_holding_a_connection_is_refused_and_the_engine_closes_the_writer(
    eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection
) -> None:
    """Submitting from inside a transaction would wait for a second pool connection: refused at once. Closing
    the engine closes its batch writer."""
    v = await read(eng, await claim(raw, await create(eng, fake)), found())
    writer = eng._jobs.done_batch  # type: ignore[union-attr]
    with pytest.raises(errors.PoolReentry):
        async with eng.db.transaction():
            await writer.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence)
    assert await writer.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence)
    assert (eng.verify_batches.batches, eng.verify_batches.items) == (1, 1)
    await eng.close()
    with pytest.raises(CoalescerClosed):
        await writer.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence)


async def test_one_notify_per_batch(
    eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection, database_url: str
) -> None:
    """A batch of five written verifications NOTIFYs the events channel once (the statement calls pg_notify
    once, not per row)."""
    items = [await read(eng, await claim(raw, await create(eng, fake)), found()) for _ in range(5)]
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(events.CHANNEL, lambda *_a: heard.append("x"))
        await asyncio.sleep(0.05)
        heard.clear()
        batch = DoneBatch(eng.db)
        await asyncio.gather(
            *(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence) for v in items)
        )
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
    assert batch.stats.batches == 1 and heard == ["x"]
    # PostgreSQL folds equal notifications of one transaction anyway: the statement itself calls it once
    assert eng.db.queries["verified_and_done_batch"].count("pg_notify") == 1


async def test_a_caller_cancelled_while_its_batch_is_written_finds_its_job_done(
    eng: CredentialEngine, fake: FakeVenue, raw: asyncpg.Connection, database_url: str
) -> None:
    """A caller that gives up (its job's timeout) while its batch waits for a lock: the batch goes on for the
    others and may write it too, as a single statement racing its commit would; the next try of that job then
    finds it done and writes nothing more."""
    items = [await read(eng, await claim(raw, await create(eng, fake)), found()) for _ in range(3)]
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE events IN SHARE MODE")  # the batch's event insert waits for it
        batch = DoneBatch(eng.db)
        tasks = [
            asyncio.ensure_future(batch.write(v.job, v.cred, v.version, v.result, v.warnings, v.sequence))
            for v in items
        ]
        for _ in range(500):
            if batch.stats.batches:
                break
            await asyncio.sleep(0.01)
        tasks[0].cancel()
        await asyncio.sleep(0.1)
        await tx.rollback()
        assert await asyncio.wait_for(asyncio.gather(*tasks[1:]), 10) == [True, True]
    finally:
        await holder.close()
    assert tasks[0].cancelled()
    gone = items[0]
    [job] = [j for j in await eng.queue.list_jobs(kind=jobs.VERIFY, limit=100) if j.id == gone.job.id]
    assert job.state == "done"  # written with the batch
    assert not await hotpath.verified_and_done(
        eng.db, gone.job, gone.cred, gone.version, gone.result, gone.warnings, gone.sequence
    )
    assert [e.type for e in await eng.list_events(OWNER, gone.cred.credential_id)] == [
        "credential.created",
        "credential.verified",
    ]
