"""The engine through PgBouncer in transaction mode (``make test-postgres``, second pass): no named prepared
statements, LISTEN on the direct DSN, a LISTEN that hears nothing found and said, no session state left on the
pooler's server connections. README "Connection poolers".

These tests need ``ENGINE_TEST_POOLER=transaction`` with ``ENGINE_TEST_DATABASE_URL`` pointing at the pooler
and ``ENGINE_TEST_ADMIN_DATABASE_URL`` / ``ENGINE_TEST_LISTEN_DATABASE_URL`` at the server itself; elsewhere
they are skipped.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import structlog

from engine import CredentialEngine, Event, Venue, errors
from engine import db as dbmod
from engine.testing import FakeVenue

pytestmark = pytest.mark.skipif(
    os.environ.get("ENGINE_TEST_POOLER") != "transaction"
    or not os.environ.get("ENGINE_TEST_ADMIN_DATABASE_URL"),
    reason="needs PgBouncer in transaction mode in front of the test server (make test-postgres, second pass)",
)

OWNER = "owner-pooler"
CONCURRENT = 20


def direct_url(pg_admin: str, database_url: str) -> str:
    """The per-test database on the server itself (not through the pooler)."""
    parts = urlsplit(pg_admin)
    return parts._replace(path=urlsplit(database_url).path).geturl()


async def test_twenty_concurrent_creates_through_a_transaction_pooler_all_succeed(
    make_engine: Any, fake: FakeVenue
) -> None:
    """With ``db_pooler="transaction"`` (statement cache off) every one of 20 concurrent creates commits; with
    asyncpg's default cache, most failed with 26000 (the test below)."""
    eng = await make_engine(pool_max_size=10)
    assert eng.config.statement_cache_size == 0
    for i in range(CONCURRENT):
        fake.add_key(f"pool-{i}", "s")
    created = await asyncio.gather(
        *(eng.create_credential(OWNER, venue=Venue.BINANCE, api_key=f"pool-{i}", api_secret="s")
          for i in range(CONCURRENT))
    )  # fmt: skip
    assert len({c.credential_id for c in created}) == CONCURRENT
    await eng.run_until_idle()
    listed = await eng.list_credentials(OWNER)
    assert len(listed) == CONCURRENT


async def test_with_the_statement_cache_on_the_error_keeps_the_drivers_hint(database_url: str) -> None:
    """asyncpg's named prepared statements through the pooler fail with 26000 (or 42P05); the StorageError
    keeps the driver's hint (statement_cache_size=0) and names our setting, in a fixed text: no query value."""
    database = await dbmod.Database.connect(database_url, min_size=CONCURRENT, max_size=CONCURRENT)
    marker = "canary-" + uuid.uuid4().hex
    failures: list[errors.StorageError] = []

    async def one() -> None:
        for _ in range(10):
            try:
                async with database.transaction() as conn:
                    await conn.fetchval("schema_digest")
                await database.fetchval("schema_digest")
            except errors.StorageError as exc:
                failures.append(exc)

    try:
        for _ in range(5):  # bounded: it fails in the first round in practice
            await asyncio.gather(*(one() for _ in range(CONCURRENT)))
            if failures:
                break
    finally:
        await database.close()
    assert failures, "named prepared statements through a transaction pooler should have failed"
    for exc in failures:
        text = str(exc)
        assert text.startswith(("database error 26000", "database error 42P05")), text
        assert "statement_cache_size=0" in text and "ENGINE_DB_POOLER=transaction" in text
        assert marker not in text


async def test_claims_through_the_pooler_leave_no_session_setting(
    make_engine: Any, fake: FakeVenue, database_url: str, pg_admin: str
) -> None:
    """The claim's ``enable_sort = off`` is SET LOCAL: after claims through the pooler, every server connection
    the pooler holds for the database answers ``SHOW enable_sort`` with on (a session SET stayed on one)."""
    eng = await make_engine()
    for i in range(5):
        fake.add_key(f"claim-{i}", "s")
        await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key=f"claim-{i}", api_secret="s")
    await eng.run_until_idle()  # claims on the queue's claims connection, through the pooler
    await eng.close()
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin)
    try:
        servers = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", name
        )
    finally:
        await admin.close()
    assert servers >= 1  # the pooler keeps its server connections to the database
    # one client per server connection, each inside a transaction: the pooler hands each an idle one
    clients = [await asyncpg.connect(database_url, statement_cache_size=0) for _ in range(servers)]
    seen: list[str] = []
    try:
        for client in clients:
            await client.execute("BEGIN")
            seen.append(await client.fetchval("SHOW enable_sort"))
    finally:
        for client in clients:
            await client.close()
    assert seen == ["on"] * servers


async def test_a_listen_through_the_pooler_is_found_deaf_warned_once_and_polling_goes_on(
    make_engine: Any, fake: FakeVenue
) -> None:
    """Without ENGINE_LISTEN_DATABASE_URL, LISTEN goes through the transaction pooler and hears nothing: the
    engine finds it (its own NOTIFY does not arrive), warns once with the reason, and still delivers events
    by polling."""
    with structlog.testing.capture_logs() as logged:
        deaf = await make_engine(listen_database_url=None, workers=1, poll_interval=0.2)
        heard: list[Event] = []

        async def listener(event: Event) -> None:
            heard.append(event)

        deaf.subscribe(listener, ["credential.created"])
        deadline = time.monotonic() + 3 * dbmod.LISTEN_CHECK_TIMEOUT
        while (
            deaf._db is not None and deaf._db.listen_works is None
        ):  # both listeners check in the background
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(dbmod.LISTEN_CHECK_TIMEOUT + 1)  # the second listener's check ends too
        producer = await make_engine()
        fake.add_key("deaf-1", "s")
        cred = await producer.create_credential(OWNER, venue=Venue.BINANCE, api_key="deaf-1", api_secret="s")
        deadline = time.monotonic() + 10
        while not [e for e in heard if e.credential_id == cred.credential_id]:
            assert time.monotonic() < deadline, "polling did not deliver the event"
            await asyncio.sleep(0.05)
    assert deaf._db is not None and deaf._db.listen_works is False
    warnings = [e for e in logged if e["event"] == "listen_receives_nothing"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["reason"] == dbmod.LISTEN_DEAF_WARNING
    assert "ENGINE_LISTEN_DATABASE_URL" in warnings[0]["reason"]
    assert producer._db is not None and producer._db.listen_works is True  # LISTEN on the direct DSN


async def _latencies(
    listening: CredentialEngine, producing: CredentialEngine, fake: FakeVenue
) -> list[float]:
    """Seconds from the start of each create in ``producing`` to its event in ``listening`` (another engine:
    own pool, own LISTEN connection, so only NOTIFY or polling can bring it)."""
    arrived: dict[uuid.UUID, float] = {}
    got = asyncio.Event()

    async def listener(event: Event) -> None:
        if event.credential_id is not None:
            arrived[event.credential_id] = time.monotonic()
            got.set()

    listening.subscribe(listener, ["credential.created"])
    samples: list[float] = []
    for _ in range(15):
        key = "lat-" + uuid.uuid4().hex[:12]
        fake.add_key(key, "s")
        got.clear()
        started = time.monotonic()
        cred = await producing.create_credential(OWNER, venue=Venue.BINANCE, api_key=key, api_secret="s")
        async with asyncio.timeout(15):  # a bound, far below the 30 s poll interval: NOTIFY woke it
            while cred.credential_id not in arrived:
                await got.wait()
                got.clear()
        samples.append(arrived[cred.credential_id] - started)
    return samples


async def test_listener_latency_through_the_pooler_with_a_direct_listen_dsn(
    make_engine: Any, fake: FakeVenue, database_url: str, pg_admin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Events committed by another engine reach a listener polling only every 30 s: through the pooler (LISTEN
    on the direct DSN) as through a direct connection. The figures are printed, not asserted (noisy machine)."""
    direct = direct_url(pg_admin, database_url)
    figures: dict[str, list[float]] = {}
    for mode, settings in (
        ("direct", {"database_url": direct, "db_pooler": "none", "listen_database_url": None}),
        ("pgbouncer", {}),
    ):
        listening = await make_engine(poll_interval=30.0, **settings)
        producing = await make_engine(**settings)
        figures[mode] = await _latencies(listening, producing, fake)
        assert listening._db is not None and listening._db.listen_works is True
        await listening.close()
        await producing.close()
    with capsys.disabled():  # the figures in the run's output, passed or not
        for mode, samples in figures.items():
            print(
                f"\nlistener latency {mode}: median {statistics.median(samples) * 1000:.1f} ms,"
                f" max {max(samples) * 1000:.1f} ms over {len(samples)} creates (create + NOTIFY + read)"
            )
