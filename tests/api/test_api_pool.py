"""The pool cannot be hung by a tenant (issue 9, defect 1): over real loopback HTTP, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

from engine import CredentialEngine

DISCONNECT = "/api/v3/tradingAccount/disconnect"
BOUND = 60.0  # seconds: far beyond what the requests need; only a hang reaches it

T = TypeVar("T")


async def bounded(work: Awaitable[T], database_url: str, what: str) -> T:
    """``work`` within BOUND seconds, or the test fails. A pool deadlock would keep the server's handlers (and
    so the fixtures' teardown) waiting for ever, and it forms again from the requests still queued each time
    it is broken: so the failing path terminates the database's sessions until none is stuck any more."""
    try:
        return await asyncio.wait_for(work, BOUND)
    except TimeoutError:
        stuck = await _break_deadlocks(database_url)
        pytest.fail(f"{what} did not end within {BOUND:g} s ({stuck} sessions idle in transaction)")


async def _break_deadlocks(database_url: str) -> int:
    admin = await asyncpg.connect(database_url)
    try:
        first = None
        calm = 0
        while calm < 3:
            stuck = int(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND (state = 'idle in transaction' OR wait_event_type = 'Lock')"
                )
            )
            first = stuck if first is None else first
            calm = calm + 1 if stuck == 0 else 0
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND (state = 'idle in transaction' OR wait_event_type = 'Lock')"
            )
            await asyncio.sleep(0.2)
        return first or 0
    finally:
        await admin.close()


async def disabled_account(api: Any, eng: CredentialEngine, create_body: Callable[..., Any]) -> str:
    """A trading account of a VERIFIED credential, already disconnected (DISABLED)."""
    cid = (await api.post("/api/v3/credential/create", create_body())).data["credentialId"]
    await eng.run_until_idle()
    account = await api.post(
        "/api/v3/tradingAccount/connect", {"credentialId": cid, "accountType": "SPOT", "name": "Spot"}
    )
    aid: str = account.data["tradingAccountId"]
    assert (await api.post(DISCONNECT, {"tradingAccountId": aid})).data["status"] == "DISABLED"
    return aid


async def test_concurrent_disconnects_of_a_disabled_account_do_not_hang(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any], database_url: str
) -> None:
    """60 concurrent disconnects of an already DISABLED account, default pool (10): each answers 200, the
    engine stays ready. Before the fix each request held a pool connection (its transaction, waiting for the
    row lock) while the lock holder waited for a second pool connection: every request hung for ever."""
    assert eng.config.pool_max_size == 10  # the default
    aid = await disabled_account(api, eng, create_body)

    async def disconnect() -> int:
        reply = await api.post(DISCONNECT, {"tradingAccountId": aid})
        assert reply.status != 200 or reply.data["status"] == "DISABLED"
        return int(reply.status)

    statuses = await bounded(
        asyncio.gather(*(disconnect() for _ in range(60))), database_url, "60 disconnects"
    )
    assert statuses == [200] * 60
    ready = await bounded(api.get("/readyz", token=None), database_url, "/readyz")
    assert ready.status == 200
