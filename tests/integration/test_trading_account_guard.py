"""The database's own guard of "no ACTIVE trading account on a REVOKED credential" under concurrency: a revoke and
a connect in two real connections, interleaved step by step (each step waits for the server to say where the
other session stands), never both commit with the account ACTIVE.

The engine's connect locks the credential row first, so it already waits for a revoke; the trigger is the guard for
every other writer (a future code path, an operator's SQL), which is why these tests write with the engine's
named queries on plain connections rather than through ``connect_trading_account``."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from engine import CredentialEngine, CredentialStatus, Venue, lifecycle
from engine import db as dbmod
from engine.testing import INVARIANT_SQL, FakeVenue, settle

OWNER = "owner-guard"
QUERIES = dbmod.load_queries(*dbmod.QUERY_FILES)
ACTIVE_ON_REVOKED = INVARIANT_SQL["an ACTIVE trading account points at a non-revoked credential"]


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    """Two client sessions of their own (not the engine's pool): one revokes, one connects."""
    first = await asyncpg.connect(database_url)
    second = await asyncpg.connect(database_url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def verified(eng: CredentialEngine, fake: FakeVenue) -> uuid.UUID:
    fake.add_key("guard-key", "guard-secret", identities=("spot", "margin"))
    cred = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="guard-key", api_secret="guard-secret"
    )
    await settle(eng)
    assert (await eng.get_credential(OWNER, cred.credential_id)).status is CredentialStatus.VERIFIED
    return cred.credential_id


async def revoke_steps(conn: asyncpg.Connection, cid: uuid.UUID) -> None:
    """What revoke_credential writes, in its order, inside ``conn``'s open transaction (events left out)."""
    assert await conn.fetchrow(QUERIES["lock_credential"], cid, OWNER) is not None
    await conn.fetch(QUERIES["disable_credential_accounts"], cid)
    await conn.execute(QUERIES["delete_all_secrets"], cid)
    assert await conn.fetchrow(QUERIES["mark_revoked"], cid, OWNER, lifecycle.sources("revoke")) is not None


def insert_account(conn: asyncpg.Connection, cid: uuid.UUID) -> Any:
    return conn.fetchrow(
        QUERIES["insert_trading_account"], uuid.uuid4(), OWNER, cid, "BINANCE", "Spot", "spot"
    )


async def blocked_or_done(watcher: asyncpg.Connection, pid: int, task: asyncio.Future[Any]) -> bool:
    """True once session ``pid`` waits for a lock, False if ``task`` finished first (bounded: 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if task.done():
            return False
        waiting = await watcher.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            return True
        await asyncio.sleep(0.01)
    pytest.fail("the session neither finished nor waited for a lock within 30 s")


async def test_a_connect_during_an_uncommitted_revoke_waits_and_is_refused(
    eng: CredentialEngine, fake: FakeVenue, sessions: tuple[asyncpg.Connection, asyncpg.Connection]
) -> None:
    """Revoke has written but not committed; the insert of an ACTIVE account waits for it (FOR SHARE), then sees
    REVOKED and is refused. A plain read saw the credential as before the revoke and let both commit."""
    cid = await verified(eng, fake)
    revoker, connector = sessions
    revoke = revoker.transaction()
    await revoke.start()
    await revoke_steps(revoker, cid)
    connect = connector.transaction()
    await connect.start()
    inserting = asyncio.ensure_future(insert_account(connector, cid))
    async with eng.db.connection() as watch:
        waited = await blocked_or_done(watch._conn, connector.get_server_pid(), inserting)
    await revoke.commit()
    refused = False
    try:
        await asyncio.wait_for(inserting, timeout=30)
        await connect.commit()
    except asyncpg.CheckViolationError:
        refused = True
        await connect.rollback()
    assert waited, "the insert did not wait for the uncommitted revoke"
    assert refused
    async with eng.db.connection() as conn:
        assert await conn._conn.fetch(ACTIVE_ON_REVOKED) == []
        assert await conn._conn.fetchval("SELECT count(*) FROM trading_accounts") == 0


async def test_a_revoke_during_an_uncommitted_connect_waits_and_disables_it(
    eng: CredentialEngine, fake: FakeVenue, sessions: tuple[asyncpg.Connection, asyncpg.Connection]
) -> None:
    """The ACTIVE account is inserted but not committed; the revoke waits for it, then disables it."""
    cid = await verified(eng, fake)
    revoker, connector = sessions
    connect = connector.transaction()
    await connect.start()
    inserted = await insert_account(connector, cid)
    revoke = revoker.transaction()
    await revoke.start()
    revoking = asyncio.ensure_future(revoke_steps(revoker, cid))
    async with eng.db.connection() as watch:
        assert await blocked_or_done(watch._conn, revoker.get_server_pid(), revoking)
    await connect.commit()
    await asyncio.wait_for(revoking, timeout=30)
    await revoke.commit()
    async with eng.db.connection() as conn:
        assert await conn._conn.fetch(ACTIVE_ON_REVOKED) == []
        status = await conn._conn.fetchval(
            "SELECT status FROM trading_accounts WHERE id = $1", inserted["id"]
        )
    assert status == "DISABLED"
