"""Per-owner quotas (engine/bounds/quotas.py) on real PostgreSQL: counts taken under one per-owner lock, so concurrent
calls through real connections can never exceed them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from engine import Credential, CredentialEngine, CredentialStatus, errors
from engine.bounds import quotas
from engine.config import Quotas
from engine.testing import FakeVenue

OWNER = "owner-q"
HOOK = "http://127.0.0.1:9/hooks"  # never called: no event is emitted in these tests


async def test_300_concurrent_endpoint_creates_stop_exactly_at_the_cap(make_engine: Any) -> None:
    """Defect 6: 300 concurrent add_webhook_endpoint calls of one owner over 30 pooled connections: exactly the
    cap (50) succeed, the rest are refused, and the table holds 50 rows (the review saw 56 before the fix)."""
    eng: CredentialEngine = await make_engine(
        allow_private_webhook_urls=True, pool_min_size=30, pool_max_size=30
    )
    gate = asyncio.Event()

    async def add(i: int) -> bool:
        await gate.wait()
        try:
            await eng.add_webhook_endpoint(OWNER, f"{HOOK}/{i}")
        except errors.QuotaExceeded:
            return False
        return True

    tasks = [asyncio.create_task(add(i)) for i in range(300)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert sum(results) == 50
    assert len(await eng.list_webhook_endpoints(OWNER)) == 50


async def test_endpoint_quota_is_configurable_and_removing_one_makes_room(make_engine: Any) -> None:
    """The endpoint quota comes from EngineConfig.quotas; the refusal names the quota; a removal frees a place."""
    eng: CredentialEngine = await make_engine(
        allow_private_webhook_urls=True, quotas=Quotas(webhook_endpoints=2)
    )
    first = await eng.add_webhook_endpoint(OWNER, f"{HOOK}/1")
    await eng.add_webhook_endpoint(OWNER, f"{HOOK}/2")
    with pytest.raises(errors.QuotaExceeded) as refused:
        await eng.add_webhook_endpoint(OWNER, f"{HOOK}/3")
    assert (refused.value.quota, refused.value.limit, refused.value.http_status) == (
        "webhook_endpoints",
        2,
        409,
    )
    assert refused.value.message.startswith("webhook_endpoints:")
    await eng.add_webhook_endpoint("another-owner", f"{HOOK}/x")  # quotas are per owner
    await eng.remove_webhook_endpoint(OWNER, first.endpoint_id)
    await eng.add_webhook_endpoint(OWNER, f"{HOOK}/3")


async def test_concurrent_creates_cannot_exceed_the_credential_quota(make_engine: Any) -> None:
    """60 concurrent create_credential calls with a quota of 10 over 20 connections: exactly 10 are stored.
    Revoked credentials do not count: revoking one lets one more in; FAILED ones do count."""
    eng: CredentialEngine = await make_engine(
        quotas=Quotas(credentials=10), pool_min_size=20, pool_max_size=20
    )
    gate = asyncio.Event()

    refusals: list[errors.QuotaExceeded] = []

    async def create(i: int) -> Credential | None:
        await gate.wait()
        try:
            return await eng.create_credential(
                OWNER, venue="BINANCE", api_key=f"quota-key-{i:04d}", api_secret=f"quota-secret-{i:04d}"
            )
        except errors.QuotaExceeded as exc:
            refusals.append(exc)
            return None

    tasks = [asyncio.create_task(create(i)) for i in range(60)]
    await asyncio.sleep(0)
    gate.set()
    made = [c for c in await asyncio.wait_for(asyncio.gather(*tasks), timeout=60) if c is not None]
    assert len(made) == 10
    assert {(r.quota, r.limit) for r in refusals} == {("credentials", 10)} and len(refusals) == 50
    assert (await eng.list_credentials(OWNER)).total == 10
    with pytest.raises(errors.QuotaExceeded):
        await eng.create_credential(OWNER, venue="BINANCE", api_key="quota-key-x", api_secret="s" * 16)
    await eng.revoke_credential(OWNER, made[0].credential_id)
    await eng.create_credential(OWNER, venue="BINANCE", api_key="quota-key-x", api_secret="s" * 16)
    await eng.create_credential("another-owner", venue="BINANCE", api_key="quota-key-y", api_secret="s" * 16)
    await eng.run_until_idle()  # the unknown keys FAIL verification: FAILED credentials still hold keys
    assert {c.status for c in (await eng.list_credentials(OWNER, limit=50)).items} >= {
        CredentialStatus.FAILED
    }
    with pytest.raises(errors.QuotaExceeded):
        await eng.create_credential(OWNER, venue="BINANCE", api_key="quota-key-z", api_secret="s" * 16)


async def test_the_quota_edge_within_one_batch_lets_the_first_submitted_in(make_engine: Any) -> None:
    """Creations in batches (engine/creates.py): an owner holding 7 of 10, 20 concurrent create_credential
    calls go as one batch; the first three submitted are stored, the 17 others get QuotaExceeded (the single
    statement's error), and the owner holds 10."""
    eng = await make_engine(quotas=Quotas(credentials=10))
    for i in range(7):
        await eng.create_credential("edge", venue="BINANCE", api_key=f"held-{i:03d}", api_secret="s" * 16)
    first = eng.create_batches.batches
    calls = [
        eng.create_credential("edge", venue="BINANCE", api_key=f"edge-{i:03d}", api_secret="s" * 16)
        for i in range(20)
    ]
    outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=30)
    assert eng.create_batches.batches == first + 1 and eng.create_batches.largest == 20
    assert [isinstance(o, Credential) for o in outcomes] == [True] * 3 + [False] * 17
    assert all(isinstance(o, errors.QuotaExceeded) and o.limit == 10 for o in outcomes[3:])
    assert (await eng.list_credentials("edge")).total == 10
    for made in outcomes[:3]:  # the answer is the row as stored
        assert isinstance(made, Credential)
        assert (await eng.get_credential("edge", made.credential_id)).public_dict() == made.public_dict()


async def test_hourly_verify_quota_is_a_sliding_window_shared_by_concurrent_calls(
    make_engine: Any, fake: FakeVenue, database_url: str
) -> None:
    """verify_requests_per_hour = 3: of 12 concurrent verify calls exactly 3 pass; the others answer 429-kind
    RequestQuotaExceeded with a retry_after close to an hour; as the window slides (the log rows are moved back
    in time, as a clock would) requests are accepted again. Refused calls (NotFound) do not count, and another
    owner is not affected."""
    fake.add_key("verify-key-0001", "verify-secret-0001")
    eng: CredentialEngine = await make_engine(quotas=Quotas(verify_requests_per_hour=3), pool_max_size=12)
    cred = await eng.create_credential(
        OWNER, venue="BINANCE", api_key="verify-key-0001", api_secret="verify-secret-0001"
    )
    with pytest.raises(errors.NotFound):  # an unknown id is refused and its request rolled back
        await eng.verify_credential(OWNER, uuid.uuid4())
    gate = asyncio.Event()

    refusals: list[errors.RequestQuotaExceeded] = []

    async def verify() -> None:
        await gate.wait()
        try:
            await eng.verify_credential(OWNER, cred.credential_id)
        except errors.RequestQuotaExceeded as exc:
            refusals.append(exc)

    tasks = [asyncio.create_task(verify()) for _ in range(12)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert len(refusals) == 9
    assert {(r.http_status, r.quota, r.limit) for r in refusals} == {(429, "verify_requests_per_hour", 3)}
    waits = [r.retry_after for r in refusals]
    assert all(3500 <= w <= 3601 for w in waits), waits
    other = await eng.create_credential(
        "another-owner", venue="BINANCE", api_key="verify-key-0001", api_secret="verify-secret-0001"
    )
    await eng.verify_credential("another-owner", other.credential_id)

    async with eng.db.connection() as conn:  # 50 minutes pass for this owner's requests
        await conn.execute_script(
            f"UPDATE owner_verify_requests SET at = at - interval '50 minutes' WHERE owner_id = '{OWNER}'"
        )
    with pytest.raises(errors.RequestQuotaExceeded) as later:
        await eng.verify_credential(OWNER, cred.credential_id)
    assert 590 <= later.value.retry_after <= 601
    async with eng.db.connection() as conn:  # and ten more: the three leave the window
        await conn.execute_script(
            f"UPDATE owner_verify_requests SET at = at - interval '601 seconds' WHERE owner_id = '{OWNER}'"
        )
    for _ in range(3):
        await eng.verify_credential(OWNER, cred.credential_id)
    with pytest.raises(errors.RequestQuotaExceeded):
        await eng.verify_credential(OWNER, cred.credential_id)
    conn = await asyncpg.connect(database_url)  # the rows that left the window were deleted by later requests
    try:
        kept = await conn.fetchval("SELECT count(*) FROM owner_verify_requests WHERE owner_id = $1", OWNER)
    finally:
        await conn.close()
    assert kept == 3


async def test_zero_means_no_quota(make_engine: Any) -> None:
    """A quota of 0 turns that quota off (no lock, no count)."""
    eng: CredentialEngine = await make_engine(
        allow_private_webhook_urls=True, quotas=Quotas(webhook_endpoints=0, verify_requests_per_hour=0)
    )
    for i in range(60):
        await eng.add_webhook_endpoint(OWNER, f"{HOOK}/{i}")
    assert len(await eng.list_webhook_endpoints(OWNER)) == 60


async def test_waiting_for_the_owner_lock_is_bounded(
    make_engine: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another transaction holds an owner's quota lock, that owner's quota-checked call gives up after
    quotas.LOCK_TIMEOUT with a StorageError (503), never waits for ever; other owners are not held up."""
    monkeypatch.setattr(quotas, "LOCK_TIMEOUT", "300ms")
    eng: CredentialEngine = await make_engine(allow_private_webhook_urls=True)
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(774412, hashtext($1))", OWNER)
            with pytest.raises(errors.StorageError):
                await asyncio.wait_for(eng.add_webhook_endpoint(OWNER, f"{HOOK}/held"), timeout=10)
            await asyncio.wait_for(eng.add_webhook_endpoint("another-owner", f"{HOOK}/free"), timeout=10)
    finally:
        await holder.close()
    await eng.add_webhook_endpoint(OWNER, f"{HOOK}/after")  # the lock is gone with the transaction
    assert [e.url for e in await eng.list_webhook_endpoints(OWNER)] == [f"{HOOK}/after"]


async def _counters_hold(database_url: str) -> list[Any]:
    """The rows breaking engine.testing's counter invariant (none: the counters are exact)."""
    from engine.testing import INVARIANT_SQL

    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                INVARIANT_SQL[
                    "the quota's counters hold each owner's count of credentials that are not REVOKED"
                ]
            )
        )
    finally:
        await conn.close()


async def test_the_quota_counters_follow_creates_revokes_deletes_and_an_upgrade(
    make_engine: Any, database_url: str
) -> None:
    """The quota reads two counters per owner (schema.sql) instead of counting rows: they follow single and
    batched creates, revocations, deletes and a TRUNCATE, and a database from before them is filled when the
    schema is applied again, after which the quota refuses exactly where counting the rows would."""
    eng: CredentialEngine = await make_engine(quotas=Quotas(credentials=4))
    made = [
        await eng.create_credential(OWNER, venue="BINANCE", api_key=f"count-{i:03d}", api_secret="s" * 16)
        for i in range(3)
    ]
    await asyncio.gather(  # one batch: another owner's three
        *(
            eng.create_credential("counted-b", venue="OKX", api_key=f"b-{i:03d}", api_secret="s" * 16,
                                  api_passphrase="p" * 8)
            for i in range(3)
        )
    )  # fmt: skip
    await eng.revoke_credential(OWNER, made[0].credential_id)
    assert await _counters_hold(database_url) == []
    conn = await asyncpg.connect(database_url)
    try:
        held = await conn.fetchval("SELECT ce_credentials_held($1)", OWNER)
        assert held == 2
        # an operator taking a credential out of REVOKED by hand (the engine never does): counted again
        await conn.execute(
            "UPDATE credentials SET status = 'FAILED', secret_version = 1 WHERE id = $1",
            made[0].credential_id,
        )
        assert await conn.fetchval("SELECT ce_credentials_held($1)", OWNER) == 3
        await conn.execute(
            "UPDATE credentials SET status = 'REVOKED', secret_version = 0 WHERE id = $1",
            made[0].credential_id,
        )
        assert await conn.fetchval("SELECT ce_credentials_held($1)", OWNER) == 2
        # a live credential deleted (not something the engine does; an operator might): it leaves the count
        await conn.execute("DELETE FROM credentials WHERE id = $1", made[1].credential_id)
        assert await conn.fetchval("SELECT ce_credentials_held($1)", OWNER) == 1
        # a database from before the counters: tables and triggers gone, then the schema applied again
        await conn.execute(
            "DROP TRIGGER credentials_count_created ON credentials;"
            "DROP TRIGGER credentials_count_revoked ON credentials;"
            "DROP TRIGGER credentials_count_deleted ON credentials;"
            "DROP TRIGGER credentials_count_truncated ON credentials;"
            "DROP TABLE credential_counts_created, credential_counts_gone CASCADE;"
        )
    finally:
        await conn.close()
    assert await eng.db.apply_schema(force=True)
    assert await _counters_hold(database_url) == []
    for i in range(3):  # 1 held: three more reach the quota of 4
        await eng.create_credential(OWNER, venue="BINANCE", api_key=f"more-{i:03d}", api_secret="s" * 16)
    with pytest.raises(errors.QuotaExceeded):
        await eng.create_credential(OWNER, venue="BINANCE", api_key="more-x", api_secret="s" * 16)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE credentials CASCADE")
        assert await conn.fetchval("SELECT count(*) FROM credential_counts_created") == 0
    finally:
        await conn.close()
    assert await _counters_hold(database_url) == []
    await eng.create_credential(OWNER, venue="BINANCE", api_key="after-truncate", api_secret="s" * 16)
    assert await _counters_hold(database_url) == []


async def test_a_revocation_in_flight_holds_up_no_creation_batch(make_engine: Any, database_url: str) -> None:
    """A revocation keeps its own counter and takes no quota lock: while another transaction holds a revocation
    of the owner uncommitted, that owner's creations still go through (the revoked credential still counts until
    it commits, as a count of the rows would have it), and nothing waits for the revocation's lock."""
    eng: CredentialEngine = await make_engine(quotas=Quotas(credentials=5))
    made = [
        await eng.create_credential(OWNER, venue="BINANCE", api_key=f"held-{i:03d}", api_secret="s" * 16)
        for i in range(2)
    ]
    other = await asyncpg.connect(database_url)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "UPDATE credentials SET status = 'REVOKED', secret_version = 0 WHERE id = $1",
            made[0].credential_id,
        )
        await other.execute("DELETE FROM credential_secrets WHERE credential_id = $1", made[0].credential_id)
        started = asyncio.get_running_loop().time()
        batches = eng.create_batches.batches
        pair = await asyncio.wait_for(  # one batch (ce_credential_rooms) and ...
            asyncio.gather(
                *(
                    eng.create_credential(OWNER, venue="BINANCE", api_key=f"new-{i:03d}", api_secret="s" * 16)
                    for i in range(2)
                )
            ),
            timeout=5,
        )
        assert eng.create_batches.batches == batches + 1 and eng.create_batches.largest >= 2
        await asyncio.wait_for(  # ... one alone (ce_credential_room)
            eng.create_credential(OWNER, venue="BINANCE", api_key="new-003", api_secret="s" * 16), timeout=5
        )
        assert asyncio.get_running_loop().time() - started < 2.0  # neither waited for the lock timeout
        with pytest.raises(errors.QuotaExceeded):  # the uncommitted revocation does not make room yet
            await eng.create_credential(OWNER, venue="BINANCE", api_key="new-004", api_secret="s" * 16)
        await tx.commit()
    finally:
        await other.close()
    await eng.create_credential(OWNER, venue="BINANCE", api_key="new-004", api_secret="s" * 16)
    assert all(c.owner_id == OWNER for c in pair)
    assert await _counters_hold(database_url) == []
