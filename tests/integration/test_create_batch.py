"""Creations written in batches (engine/creates.py) on real PostgreSQL: every caller gets what the single
statement (engine/hotpath.py, ``create_one``) gives when the batch's items run one after another, and what the
database holds afterwards is the same row for row (credentials, secrets, events, jobs and their start tags)."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from engine import errors, hotpath
from engine import logs as logsmod
from engine.bounds import quotas
from engine.config import Quotas
from engine.creates import BatchedCreates
from engine.engine import CredentialEngine
from engine.models import Credential, CredentialType
from engine.testing import broken_invariants
from venues.base import ApiKeys, Venue

EngineFactory = Callable[..., Awaitable[CredentialEngine]]
HOOK = "http://127.0.0.1:9/hooks"  # never called: deliveries are only written here
STAMPS = ("createdAt", "updatedAt")


def new(eng: CredentialEngine, owner: str, key: str, *, venue: Venue = Venue.BINANCE) -> hotpath.Creation:
    """One creation of ``key`` for ``owner``, sealed as create_credential seals it."""
    return hotpath.creation(
        eng.store,
        credential_id=uuid.uuid4(),
        owner_id=owner,
        venue=venue,
        credential_type=CredentialType.EXCHANGE,
        nickname=f"nick {key}",
        keys=ApiKeys(key, f"secret-of-{key}"),
    )


def in_turns(items: list[hotpath.Creation]) -> list[hotpath.Creation]:
    """Items in the order one batch takes them: one of each owner per round, owners in order of arrival, each
    owner's own in the order they came (engine/coalesce.py, ``fair_key``)."""
    lines: dict[str, list[hotpath.Creation]] = {}
    for item in items:
        lines.setdefault(item.owner_id, []).append(item)
    ordered: list[hotpath.Creation] = []
    while any(lines.values()):
        ordered += [line.pop(0) for line in lines.values() if line]
    return ordered


def batcher(eng: CredentialEngine, quota: int | None) -> BatchedCreates:
    return BatchedCreates(eng.store, eng.queue, quota=quota, lock_timeout=quotas.LOCK_TIMEOUT)


def answer(outcome: Credential | BaseException | None) -> Any:
    """An outcome as compared: the error's class, message and fields, or the credential's public row without the
    statement's timestamps."""
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, errors.CredentialEngineError), outcome
        return (type(outcome).__name__, str(outcome), sorted(vars(outcome).items()))
    if outcome is None:
        return None
    public = outcome.public_dict()
    assert public["createdAt"] == public["updatedAt"] > 0
    return {k: v for k, v in public.items() if k not in STAMPS}


async def stored(database_url: str) -> dict[str, list[Any]]:
    """Everything a creation writes, in insertion order, without row timestamps and serial ids."""
    conn = await asyncpg.connect(database_url)
    try:
        credentials = await conn.fetch(
            "SELECT id, owner_id, venue, credential_type, nickname, masked_api_key, status, secret_version,"
            " event_seq, created_at = updated_at AS same FROM credentials ORDER BY id"
        )
        secrets = await conn.fetch(
            "SELECT credential_id, version, state, owner_id, venue, kek_version, wrapped_dek, nonce, ciphertext,"
            " key_fingerprint, masked_api_key FROM credential_secrets ORDER BY credential_id"
        )
        events = await conn.fetch(
            "SELECT e.id, e.type, e.owner_id, e.credential_id, e.sequence, e.data::text AS data,"
            " (e.data->'credential'->>'createdAt')::bigint = floor(extract(epoch FROM c.created_at) * 1000)"
            " AS stamped FROM events e JOIN credentials c ON c.id = e.credential_id ORDER BY e.position"
        )
        jobs = await conn.fetch(
            "SELECT kind, payload::text AS payload, dedupe_key, max_attempts, state, fair_key, fair_seq,"
            " run_at <= now() AS due FROM queue_jobs WHERE kind = 'verify' ORDER BY id"
        )
    finally:
        await conn.close()
    import json

    def event(row: asyncpg.Record) -> dict[str, Any]:
        out = dict(row)
        data = json.loads(out.pop("data"))
        for stamp in STAMPS:
            data["credential"].pop(stamp)
        out["data"] = data
        return out

    return {
        "credentials": [dict(r) for r in credentials],
        "secrets": [dict(r) for r in secrets],
        "events": [event(r) for r in events],
        "jobs": [dict(r) for r in jobs],
    }


async def wipe(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE credentials, credential_secrets, events, queue_jobs CASCADE")
    finally:
        await conn.close()


async def test_a_mixed_batch_answers_and_writes_what_one_at_a_time_does(
    make_engine: EngineFactory, database_url: str
) -> None:
    """One batch of every outcome (created, in-batch duplicate, a duplicate of a stored key, the quota reached
    within the batch and before it, wanted by an endpoint, two venues, three owners with jobs queued before)
    against the same creations sent one after another by the single statement on the same starting state:
    the same answers, and the same credentials, secrets, events, jobs and start tags, row by row."""
    eng = await make_engine(allow_private_webhook_urls=True)
    await eng.add_webhook_endpoint("hooked", HOOK, ["credential.created"])
    quota = 3
    before = [
        new(eng, "full", "f-1"),
        new(eng, "full", "f-2"),
        new(eng, "dup", "d-1"),
        new(eng, "other", "o-1"),
    ]
    batch = [
        new(eng, "alice", "k-1"),
        new(eng, "bob", "k-1"),  # another owner may hold the same key
        new(eng, "alice", "k-1"),  # duplicate of the first item
        new(eng, "alice", "k-1", venue=Venue.OKX),  # another venue: not a duplicate
        new(eng, "full", "f-3"),  # the last place of "full"
        new(eng, "dup", "d-1"),  # duplicate of a stored key
        new(eng, "hooked", "h-1"),  # wanted
        new(eng, "alice", "k-2"),  # alice's third: the quota is reached after it
        new(eng, "full", "f-4"),  # quota (held before the batch and in it)
        new(eng, "alice", "k-1"),  # a duplicate but the quota is reached: quota first, as alone
        new(eng, "alice", "k-3"),  # quota
        new(eng, "bob", "k-2"),
        new(eng, "other", "o-2"),
    ]

    async def prepare() -> None:
        for item in before:
            await hotpath.create_one(eng.store, eng.queue, item, quota=quota, lock_timeout="5s")

    await prepare()
    by_id: dict[uuid.UUID, Any] = {}
    for item in in_turns(batch):  # the order the batch writes them: the owners take turns
        try:
            by_id[item.credential_id] = answer(
                await hotpath.create_one(eng.store, eng.queue, item, quota=quota, lock_timeout="5s")
            )
        except errors.CredentialEngineError as exc:
            by_id[item.credential_id] = answer(exc)
    alone = [by_id[item.credential_id] for item in batch]
    after_alone = await stored(database_url)

    await wipe(database_url)
    await prepare()
    creates = batcher(eng, quota)
    outcomes = await asyncio.gather(*(creates.create(item) for item in batch), return_exceptions=True)
    assert (creates.stats.batches, creates.stats.largest, creates.fallbacks) == (1, len(batch), 0)
    assert [answer(o) for o in outcomes] == alone
    kinds = [a[0] if isinstance(a, tuple) else "created" if a is not None else None for a in alone]
    assert kinds == [
        "created", "created", "DuplicateCredential", "created", "created", "DuplicateCredential", None,
        "created", "QuotaExceeded", "QuotaExceeded", "QuotaExceeded", "created", "created",
    ]  # fmt: skip
    after_batch = await stored(database_url)
    assert after_batch == after_alone
    assert all(e["stamped"] for e in after_batch["events"])
    tags = [(j["fair_key"], j["fair_seq"]) for j in after_batch["jobs"]]
    assert [t for t in tags if t[0] == "alice"] == [("alice", 0), ("alice", 1), ("alice", 2)]
    assert ("other", 1) in tags  # after the owner's job queued before the batch
    assert await broken_invariants(eng) == {}


async def test_fallback_on_a_key_stored_by_another_transaction_meanwhile(
    make_engine: EngineFactory, database_url: str
) -> None:
    """A key that another transaction stores while the batch waits for it (the batch's snapshot cannot see it):
    the batch fails as a whole on the unique index, nothing of it stays, and every item is sent again alone:
    that caller gets DuplicateCredential, the others are created, once each."""
    eng = await make_engine(quotas=Quotas(credentials=0))  # no quota: no owner lock, the index decides
    racer = new(eng, "owner-r", "racing-key")
    creates = batcher(eng, None)
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "INSERT INTO credentials (id, owner_id, venue, credential_type, masked_api_key, status,"
            " secret_version, event_seq) VALUES ($1, 'owner-r', 'BINANCE', 'EXCHANGE', 'ra****ey', 'PENDING', 1, 0)",
            uuid.uuid4(),
        )
        await holder.execute(
            "INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version,"
            " wrapped_dek, nonce, ciphertext, key_fingerprint, masked_api_key)"
            " SELECT id, 1, 'CURRENT', owner_id, venue, 1, '\\x00', '\\x00', '\\x00', $1, 'ra****ey'"
            " FROM credentials WHERE owner_id = 'owner-r'",
            racer.fingerprint,
        )
        items = [new(eng, "owner-r", "calm-1"), racer, new(eng, "owner-s", "calm-2")]
        running = asyncio.gather(*(creates.create(i) for i in items), return_exceptions=True)
        deadline = time.monotonic() + 20
        while not await holder.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ):
            assert time.monotonic() < deadline, "the batch never waited for the other transaction"
            await asyncio.sleep(0.02)
        await tx.commit()
        outcomes = await asyncio.wait_for(running, timeout=30)
    finally:
        await holder.close()
    assert creates.fallbacks == 1 and creates.stats.batches == 1
    assert isinstance(outcomes[0], Credential) and isinstance(outcomes[2], Credential)
    assert isinstance(outcomes[1], errors.DuplicateCredential)
    rows = await stored(database_url)
    assert sorted(c["id"] for c in rows["credentials"] if c["event_seq"] == 1) == sorted(
        [items[0].credential_id, items[2].credential_id]
    )
    assert len(rows["events"]) == 2 and len(rows["jobs"]) == 2


async def test_batches_of_two_engines_keep_every_quota_exact_without_deadlock(
    make_engine: EngineFactory,
) -> None:
    """300 concurrent creates of two owners through two engines (so batches of each engine race the other's,
    each batch taking both owners' locks, submitted in opposite orders): exactly 50 per owner are stored, the
    rest are QuotaExceeded; no batch fell back (no deadlock, no lock timeout)."""
    engines = [await make_engine(quotas=Quotas(credentials=50), pool_max_size=10) for _ in range(2)]
    owners = ("quota-a", "quota-b")

    async def create(eng: CredentialEngine, i: int) -> bool:
        owner = owners[(i // 2 + engines.index(eng)) % 2]  # each engine alternates, in opposite orders
        try:
            await eng.create_credential(owner, venue="BINANCE", api_key=f"many-{i:04d}", api_secret="s" * 16)
        except errors.QuotaExceeded:
            return False
        return True

    calls = [create(engines[i % 2], i) for i in range(300)]
    made = await asyncio.wait_for(asyncio.gather(*calls), timeout=120)
    assert sum(made) == 100
    for owner in owners:
        assert (await engines[0].list_credentials(owner)).total == 50
    assert all(e._batched_creates().fallbacks == 0 for e in engines)
    assert max(e.create_batches.largest for e in engines) > 1
    assert await broken_invariants(engines[0]) == {}


async def lock_waits(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
    )


async def wait_for_lock_waits(conn: asyncpg.Connection, n: int) -> None:
    deadline = time.monotonic() + 20
    while await lock_waits(conn) < n:
        assert time.monotonic() < deadline, f"never {n} statements waiting for a lock"
        await asyncio.sleep(0.02)


async def test_an_owners_lock_held_elsewhere_holds_up_only_that_owners_creations(
    make_engine: EngineFactory, database_url: str
) -> None:
    """Owner P's quota lock is held by another transaction (another process's create or mint). A batch with
    creations of P and Q: Q's are written at once by the batch; P's come back busy and wait alone for P's lock
    (as a single create does), and are written when it is released. With a batch that waited for every lock,
    Q's creations would wait for P's lock too (they did: the first version of batching)."""
    eng = await make_engine(quotas=Quotas(credentials=10))
    holder = await asyncpg.connect(database_url)
    try:
        b = batcher(eng, 10)
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(774412, hashtext('owner-p'))")
            ps = [asyncio.ensure_future(b.create(new(eng, "owner-p", f"p-{i}"))) for i in range(2)]
            qs = [asyncio.ensure_future(b.create(new(eng, "owner-q", f"q-{i}"))) for i in range(3)]
            q_made = await asyncio.wait_for(asyncio.gather(*qs), timeout=5)  # P's lock still held
            assert all(isinstance(c, Credential) and c.owner_id == "owner-q" for c in q_made)
            await wait_for_lock_waits(holder, 1)  # P's creations wait for the lock, alone
            assert not any(p.done() for p in ps)
        p_made = await asyncio.wait_for(asyncio.gather(*ps), timeout=30)
    finally:
        await holder.close()
    assert all(isinstance(c, Credential) and c.owner_id == "owner-p" for c in p_made)
    assert b.stats.largest == 5 and b.fallbacks == 0
    assert await broken_invariants(eng) == {}


async def test_one_owners_flood_of_creations_puts_no_batch_ahead_of_another_owners(
    eng: CredentialEngine,
) -> None:
    """Owner A submits 40 creations, owner B one right after, batches of 10: B's is written in the first batch
    (owners take turns in each batch), not the fifth behind all of A's, as a first-come line would have it."""
    b = BatchedCreates(eng.store, eng.queue, quota=None, lock_timeout=quotas.LOCK_TIMEOUT, max_batch=10)
    finished: list[str] = []

    async def create(owner: str, key: str) -> Credential | None:
        made = await b.create(new(eng, owner, key))
        finished.append(owner)
        return made

    floods = [asyncio.ensure_future(create("owner-a", f"a-{i}")) for i in range(40)]
    late = asyncio.ensure_future(create("owner-b", "b-0"))
    made = await asyncio.wait_for(asyncio.gather(*floods, late), timeout=30)
    assert all(isinstance(c, Credential) for c in made)
    assert finished.index("owner-b") < 10, finished
    assert b.stats.batches == 5 and b.stats.largest == 10
    assert await broken_invariants(eng) == {}


async def test_the_quota_stays_exact_when_a_busy_owners_creations_go_alone(
    make_engine: EngineFactory, database_url: str
) -> None:
    """Owner P holds 8 of 10 and its lock is held elsewhere while a batch carries 4 of P's creations: they go
    alone after the lock is released, and exactly 2 are stored (the first submitted are not guaranteed to win
    here: each waits for the lock on its own)."""
    eng = await make_engine(quotas=Quotas(credentials=10))
    b = batcher(eng, 10)
    for i in range(8):
        await b.create(new(eng, "owner-p", f"pre-{i}"))
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(774412, hashtext('owner-p'))")
            calls = asyncio.gather(
                *(b.create(new(eng, "owner-p", f"late-{i}")) for i in range(4)), return_exceptions=True
            )
            await wait_for_lock_waits(holder, 1)
        outcomes = await asyncio.wait_for(calls, timeout=30)
    finally:
        await holder.close()
    assert sum(isinstance(o, Credential) for o in outcomes) == 2
    assert sum(isinstance(o, errors.QuotaExceeded) for o in outcomes) == 2, outcomes


async def test_wanted_creations_take_the_transaction_path_and_get_their_deliveries(
    make_engine: EngineFactory,
) -> None:
    """An owner whose endpoint wants credential.created: in a batch with others, its creations are written by
    the transaction path (a delivery each), the others by the batch."""
    eng = await make_engine(allow_private_webhook_urls=True)
    endpoint = await eng.add_webhook_endpoint("hooked", HOOK, ["credential.created"])
    calls = [
        eng.create_credential(owner, venue="BINANCE", api_key=f"w-{i:03d}", api_secret="s" * 16)
        for i, owner in enumerate(["plain", "hooked", "plain", "hooked"])
    ]
    made = await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    assert eng.create_batches.largest == 4
    assert [c.owner_id for c in made] == ["plain", "hooked", "plain", "hooked"]
    deliveries = await eng.list_webhook_deliveries("hooked", endpoint.endpoint_id)
    assert sorted(d.event_type for d in deliveries) == ["credential.created"] * 2
    for cred in made:
        [created] = await eng.list_events(cred.owner_id, cred.credential_id)
        assert created.type == "credential.created" and created.data["credential"] == cred.public_dict()
    assert await broken_invariants(eng) == {}


async def test_close_cuts_off_a_batch_that_waits_and_stores_nothing_of_it(
    make_engine: EngineFactory, database_url: str
) -> None:
    """A batch waiting for a lock held elsewhere when the engine closes: the close ends within its
    bound, every caller gets EngineClosed, nothing of the batch is stored; later calls are refused."""
    eng = await make_engine(shutdown_timeout=0.5)
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            # the batch's inserts wait for this (the owners' quota locks are only tried, never waited for)
            await holder.execute("LOCK TABLE credentials IN SHARE MODE")
            calls = asyncio.gather(
                *(
                    eng.create_credential("held", venue="BINANCE", api_key=f"c-{i:03d}", api_secret="s" * 16)
                    for i in range(5)
                ),
                return_exceptions=True,
            )
            deadline = time.monotonic() + 20
            while eng.create_batches.batches == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # the batch waits for the lock
            started = time.monotonic()
            await asyncio.wait_for(eng.close(), timeout=30)
            assert time.monotonic() - started < 10
            outcomes = await asyncio.wait_for(calls, timeout=10)
    finally:
        await holder.close()
    assert all(isinstance(o, errors.EngineClosed) for o in outcomes), outcomes
    assert "may or may not be stored" in str(outcomes[0])
    check = await asyncpg.connect(database_url)
    try:
        assert await check.fetchval("SELECT count(*) FROM credentials") == 0
        assert await check.fetchval("SELECT count(*) FROM queue_jobs WHERE kind = 'verify'") == 0
    finally:
        await check.close()
    with pytest.raises(errors.EngineClosed):
        await eng.create_credential("held", venue="BINANCE", api_key="late-0001", api_secret="s" * 16)


async def test_a_caller_holding_a_transaction_is_refused(eng: CredentialEngine) -> None:
    """create_credential from a task that holds a pool connection: PoolReentry at once (the batch needs a
    connection of its own), nothing stored."""
    with pytest.raises(errors.PoolReentry):
        async with eng.db.transaction():
            await eng.create_credential(
                "owner-t", venue="BINANCE", api_key="tx-key-0001", api_secret="s" * 16
            )
    assert (await eng.list_credentials("owner-t")).total == 0


CANARY_SECRET = "CANARYSECRET-batch-5e1d7c3b9a"
CANARY_KEY = "CANARYKEY-batch-0a1b2c3d4e5f6"


async def test_secrets_canary_batch_and_fallback(make_engine: EngineFactory, database_url: str) -> None:
    """Canary keys through a batch, its duplicates and quota refusals, and a fallback: no secret (nor the key's
    fingerprint, nor its ciphertext) in logs, errors, reprs of the creations, or answers."""
    import base64

    out = io.StringIO()
    logsmod.configure_logging("DEBUG", json=True, stream=out)
    eng = await make_engine(quotas=Quotas(credentials=2))
    creates = eng._batched_creates()
    texts: list[str] = []
    calls = [
        eng.create_credential(
            "canary", venue="BINANCE", api_key=CANARY_KEY + str(i % 2), api_secret=CANARY_SECRET
        )
        for i in range(4)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(o, Credential) for o in outcomes) == 2
    items = [new(eng, "canary-2", CANARY_KEY + "x"), new(eng, "canary-2", CANARY_KEY + "x")]
    texts += [repr(i) for i in items]
    # a fallback: the batch statement fails as a whole (a lock not granted in time), each item alone then too.
    # The lock is a row's: another transaction's uncommitted key of the same fingerprint (a table lock such as
    # LOCK TABLE is taken before the statement sets its lock_timeout: only the command timeout bounds that wait)
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            racing = uuid.uuid4()
            await holder.execute(
                "INSERT INTO credentials (id, owner_id, venue, credential_type, masked_api_key, status,"
                " secret_version, event_seq) VALUES ($1, 'canary-2', 'BINANCE', 'EXCHANGE', 'ca****ey', 'PENDING',"
                " 1, 0)",
                racing,
            )
            await holder.execute(
                "INSERT INTO credential_secrets (credential_id, version, state, owner_id, venue, kek_version,"
                " wrapped_dek, nonce, ciphertext, key_fingerprint, masked_api_key)"
                " VALUES ($1, 1, 'CURRENT', 'canary-2', 'BINANCE', 1, '\\x00', '\\x00', '\\x00', $2, 'ca****ey')",
                racing,
                items[0].fingerprint,
            )  # the batch's insert waits for this transaction, for at most its lock_timeout
            short = BatchedCreates(eng.store, eng.queue, quota=2, lock_timeout="100ms")
            outcomes += await asyncio.gather(*(short.create(i) for i in items), return_exceptions=True)
            assert short.fallbacks == 1
    finally:
        await holder.close()
    for outcome in outcomes:
        texts += [str(outcome), repr(outcome)]
        if isinstance(outcome, BaseException):
            texts.append(repr(outcome.args))
    assert creates.stats.largest == 4
    texts.append(out.getvalue())
    text = "\n".join(texts)
    forms = [CANARY_SECRET, CANARY_SECRET.encode().hex(), base64.b64encode(CANARY_SECRET.encode()).decode()]
    for item in items:
        forms += [
            item.fingerprint.hex(),
            item.ciphertext.hex(),
            repr(item.fingerprint),
            repr(item.ciphertext),
        ]
    assert [f for f in forms if f in text] == []
