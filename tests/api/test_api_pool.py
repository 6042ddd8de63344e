"""The pool cannot be hung by a tenant: over real loopback HTTP, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import asyncpg
import pytest

from engine import CredentialEngine

CONNECT = "/api/v3/tradingAccount/connect"
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


async def test_a_starved_pool_answers_503_with_retry_after(
    make_engine: Any, make_api: Any, create_body: Callable[..., Any]
) -> None:
    """While every pool connection is held, a request waits pool_acquire_timeout and answers 503 StorageError
    in the envelope with Retry-After; /readyz says the database is down; released, both answer 200 again."""
    eng = await make_engine(pool_max_size=1, pool_acquire_timeout=0.5)
    api = await make_api(eng)
    async with eng.db.connection():  # this test's task holds the only connection; the server's handlers wait
        reply = await bounded_plain(api.get("/api/v3/credential/list"))
        assert reply.status == 503
        assert reply.body["errno"] == -100011 and reply.body["success"] is False
        assert reply.headers["Retry-After"] == "1"
        assert "service unavailable; correlation id" in reply.body["error"]
        assert reply.headers["X-Request-Id"] in reply.body["error"]
        create = await bounded_plain(api.post("/api/v3/credential/create", create_body()))
        assert create.status == 503
        ready = await bounded_plain(api.get("/readyz", token=None))
        assert ready.status == 503 and ready.body["data"]["checks"]["database"] == "down"
    assert (await api.get("/api/v3/credential/list")).status == 200
    assert (await api.get("/readyz", token=None)).status == 200


async def bounded_plain(work: Awaitable[T]) -> T:
    return await asyncio.wait_for(work, BOUND)


# ---- a flood at a pool of 5 ------------------------------------------------------------------------------------

FLOOD = 200
REQUEST_BOUND = (
    30.0  # seconds any one request may take: acquire timeout (10) + connect-with-keys wait (5) + slack
)
OTHER = "owner-2"
HOOK = "http://127.0.0.1:9/hook"  # discard port: deliveries fail and are retried later, as they would


async def test_a_flood_of_every_pool_using_request_at_a_pool_of_5_ends_and_spares_other_owners(
    make_engine: Any, make_api: Any, create_body: Callable[..., Any], database_url: str
) -> None:
    """200 concurrent requests of every kind that touches the pool (reads, writes, the idempotent paths,
    webhooks, operator routes) at an engine whose pool holds 5 connections: every one ends within
    REQUEST_BOUND with 2xx, 4xx or 503 (never 500, never a hang); meanwhile another owner's reads answer 200
    and /readyz answers; afterwards no session is left idle in transaction and the other owner's credential
    still goes from create to VERIFIED through the workers."""
    eng = await make_engine(pool_max_size=5)
    base = await make_api(eng, connect_wait_timeout=5.0)
    connector = aiohttp.TCPConnector(limit=0)  # the client must not be what limits the concurrency
    async with aiohttp.ClientSession(connector=connector) as session:
        api = type(base)(session, base.url, base.secret)
        cred = (await api.post("/api/v3/credential/create", create_body())).data["credentialId"]
        doomed = (await api.post("/api/v3/credential/create", create_body(apiKey="doomed-key"))).data
        await eng.run_until_idle()
        spot = (await api.post(CONNECT, {"credentialId": cred, "accountType": "SPOT", "name": "s"})).data
        margin = (await api.post(CONNECT, {"credentialId": cred, "accountType": "MARGIN", "name": "m"})).data
        await api.post(DISCONNECT, {"tradingAccountId": margin["tradingAccountId"]})
        hook = (await api.post("/api/v3/webhook/create", {"url": HOOK})).data["endpointId"]
        gone = (await api.post("/api/v3/webhook/create", {"url": HOOK})).data["endpointId"]
        await api.post("/api/v3/webhook/delete", {"endpointId": gone})
        theirs = (
            await api.post("/api/v3/credential/create", create_body(venue="OKX", apiKey="okx-key-0001",
                           apiSecret="okx-secret-0001", apiPassphrase="okx-pass-1"), owner=OTHER)
        ).data["credentialId"]  # fmt: skip

        kinds: list[Callable[[int], Awaitable[Any]]] = [
            lambda i: api.post("/api/v3/credential/create", create_body(apiKey=f"flood-key-{i:04d}")),
            lambda i: api.post("/api/v3/credential/create", create_body()),  # duplicate: 409
            lambda i: api.get("/api/v3/credential/get", {"credentialId": cred}),
            lambda i: api.get("/api/v3/credential/list", {"limit": "20"}),
            lambda i: api.post("/api/v3/credential/verify", {"credentialId": cred}),
            lambda i: api.post("/api/v3/credential/rotate", {"credentialId": cred, **_keys(create_body)}),
            lambda i: api.post("/api/v3/credential/revoke", {"credentialId": doomed["credentialId"]}),
            lambda i: api.post(CONNECT, {"credentialId": cred, "accountType": "SPOT", "name": "again"}),
            lambda i: api.post(CONNECT, {"venue": "BINANCE", **_keys(create_body, 1), "name": "with keys"}),
            lambda i: api.post(
                DISCONNECT, {"tradingAccountId": margin["tradingAccountId"]}
            ),  # the bug's path
            lambda i: api.get("/api/v3/tradingAccount/get", {"tradingAccountId": spot["tradingAccountId"]}),
            lambda i: api.get("/api/v3/tradingAccount/list", {"credentialId": cred}),
            lambda i: api.post("/api/v3/webhook/create", {"url": HOOK, "description": f"flood {i}"}),
            lambda i: api.get("/api/v3/webhook/list"),
            lambda i: api.get("/api/v3/webhook/get", {"endpointId": hook}),
            lambda i: api.post("/api/v3/webhook/update", {"endpointId": hook, "enabled": True}),
            lambda i: api.post("/api/v3/webhook/rotateSecret", {"endpointId": hook}),
            lambda i: api.post("/api/v3/webhook/delete", {"endpointId": gone}),  # already deleted: 404
            lambda i: api.get("/api/v3/webhook/delivery/list", {"endpointId": hook}),
            lambda i: api.get("/readyz", token=None),
            lambda i: api.call("GET", "/metrics", token=None),
        ]

        async def timed(i: int) -> tuple[int, float]:
            started = time.monotonic()
            reply = await kinds[i % len(kinds)](i)
            return reply.status, time.monotonic() - started

        flooding = True
        other_reads: list[tuple[int, float]] = []
        readiness: list[int] = []

        async def other_owner() -> None:
            while flooding:
                started = time.monotonic()
                reply = await api.get("/api/v3/credential/get", {"credentialId": theirs}, owner=OTHER)
                other_reads.append((reply.status, time.monotonic() - started))
                readiness.append((await api.get("/readyz", token=None)).status)
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(other_owner())
        started = time.monotonic()
        try:
            results = await bounded(
                asyncio.gather(*(timed(i) for i in range(FLOOD))), database_url, f"{FLOOD} requests"
            )
        finally:
            flooding = False
        took = time.monotonic() - started
        await bounded(watcher, database_url, "the other owner's reads")

    statuses = Counter(status for status, _ in results)
    slowest = max(seconds for _, seconds in results)
    print(
        f"\n{FLOOD} requests at a pool of 5: {took:.2f} s in all, slowest {slowest:.2f} s, statuses {statuses}"
    )
    other_slowest = max(seconds for _, seconds in other_reads)
    print(
        f"other owner: {len(other_reads)} reads, slowest {other_slowest:.2f} s; /readyz {Counter(readiness)}"
    )
    assert all(200 <= s < 300 or 400 <= s < 500 or s == 503 for s in statuses), statuses
    assert slowest < REQUEST_BOUND
    assert statuses[200] > FLOOD // 2  # most of it simply worked
    assert other_reads and all(status == 200 for status, _ in other_reads), other_reads
    assert other_slowest < REQUEST_BOUND
    assert readiness and set(readiness) <= {200, 503}

    admin = await asyncpg.connect(database_url)
    try:
        assert not await admin.fetchval(  # the workers' transactions come and go; none is stuck
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction' AND state_change < now() - interval '5 seconds'"
        )
    finally:
        await admin.close()
    assert (await base.get("/readyz", token=None)).status == 200
    mine = await base.post("/api/v3/credential/create", create_body(), owner=OTHER)  # same key, other owner
    verified = await eng.wait_for_status(
        OTHER, mine.data["credentialId"], {"VERIFIED"}, timeout=REQUEST_BOUND
    )
    assert verified.status.value == "VERIFIED"


def _keys(create_body: Callable[..., Any], n: int = 2) -> dict[str, str]:
    """apiKey/apiSecret of FakeVenue's n-th Binance key (1 or 2; same account uid-b1)."""
    body = create_body(apiKey=f"binance-key-000{n}", apiSecret=f"binance-secret-000{n}")
    return {"apiKey": body["apiKey"], "apiSecret": body["apiSecret"]}
