"""The SQL-file loader and the database choke point."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from engine import db as dbmod
from engine import errors


def test_parse_queries_splits_named_blocks() -> None:
    """Each ``-- name --`` header starts a block that runs to the next header."""
    text = "-- first --\n-- says what\nSELECT 1;\n\n-- second_one --\n-- more\nSELECT\n  2;\n"
    assert dbmod.parse_queries(text) == {
        "first": "-- says what\nSELECT 1;",
        "second_one": "-- more\nSELECT\n  2;",
    }


def test_parse_queries_rejects_duplicates_and_empty_blocks() -> None:
    """A name used twice, or a block with only comments, is an error rather than a silent override."""
    with pytest.raises(ValueError, match="duplicate"):
        dbmod.parse_queries("-- a --\nSELECT 1;\n-- a --\nSELECT 2;\n")
    with pytest.raises(ValueError, match="no SQL"):
        dbmod.parse_queries("-- a --\n-- only a comment\n-- b --\nSELECT 1;\n")


def test_shipped_query_files_parse() -> None:
    """Every SQL file the engine ships loads without clashes."""
    queries = dbmod.load_queries(*dbmod.QUERY_FILES)
    assert "ping" in queries


async def test_schema_is_idempotent(db: dbmod.Database) -> None:
    """Applying schema.sql again on a database that has it changes nothing and raises nothing."""
    await db.apply_schema()
    await db.apply_schema()
    assert await db.fetchval("ping") == 1


async def test_driver_errors_are_translated(db: dbmod.Database) -> None:
    """A failing statement surfaces as StorageError with no driver type and no SQL values in it."""
    with pytest.raises(errors.StorageError) as info:
        async with db.connection() as conn:
            await conn.execute_script("SELECT * FROM no_such_table_canary_value")
    assert "canary" not in str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("script", "sqlstate"),
    [
        ("EXECUTE canary_statement_name", "26000"),
        ("PREPARE canary_statement_name AS SELECT 1; PREPARE canary_statement_name AS SELECT 2", "42P05"),
    ],
)
async def test_prepared_statement_errors_keep_the_drivers_hint(
    db: dbmod.Database, script: str, sqlstate: str
) -> None:
    """26000 and 42P05 (what a transaction pooler does to named prepared statements) keep the driver's hint,
    statement_cache_size=0, and name the engine's setting, in a fixed text: nothing of the statement."""
    with pytest.raises(errors.StorageError) as info:
        async with db.connection() as conn:
            await conn.execute_script(script)
    text = str(info.value)
    assert text.startswith(f"database error {sqlstate} (")
    assert "statement_cache_size=0" in text and "ENGINE_DB_POOLER=transaction" in text
    assert "canary" not in text


async def test_a_listener_that_hears_its_own_notify_is_recorded_as_working(db: dbmod.Database) -> None:
    """check_listener: the NOTIFY sent through the pool arrives on a direct LISTEN connection; the private
    channel is UNLISTENed afterwards and nothing is warned."""
    listener = await db.open_listener(application_name="ce-test-listen")
    try:
        assert db.listen_works is None
        assert await db.check_listener(listener) is True
        assert db.listen_works is True
        assert await listener._raw.fetch("SELECT pg_listening_channels()") == []
    finally:
        await listener.close()


async def test_a_starved_pool_skips_the_listen_check_without_failing_the_listener(database_url: str) -> None:
    """The check's NOTIFY goes through the pool: when no pool connection comes free, the check is skipped
    (None, nothing recorded, nothing warned) instead of keeping the LISTEN connection from starting."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=1, acquire_timeout=0.3)
    release = asyncio.Event()
    listener = await database.open_listener()
    try:
        holder = asyncio.create_task(_hold_one(database, release))
        await asyncio.sleep(0.1)
        assert await database.check_listener(listener) is None
        assert database.listen_works is None
        assert await listener._raw.fetch("SELECT pg_listening_channels()") == []
        release.set()
        await holder
        assert await database.check_listener(listener) is True
    finally:
        await listener.close()
        await database.close()


async def test_listen_connections_use_the_listen_dsn(database_url: str) -> None:
    """With ``listen_dsn`` the LISTEN connections go there (an unreachable one here: opening fails) while the
    pool and the other dedicated connections keep the main DSN."""
    database = await dbmod.Database.connect(
        database_url,
        min_size=1,
        max_size=2,
        acquire_timeout=2,
        listen_dsn="postgresql://nobody@127.0.0.1:1/x",
    )
    try:
        assert await database.fetchval("ping") == 1
        dedicated = dbmod.DedicatedConnection(database, "ce-test-dedicated")
        async with dedicated.session() as conn:
            assert await conn.fetchval("ping") == 1
        await dedicated.close()
        with pytest.raises(errors.StorageError, match="database unreachable"):
            await database.open_listener()
    finally:
        await database.close()


async def test_released_connections_roll_back_open_transactions(db: dbmod.Database) -> None:
    """Skipping the reset query on release still never hands out a connection inside a transaction."""
    async with db.connection() as conn:
        await conn.execute_script("BEGIN; CREATE TEMP TABLE leftover (x int)")
    for _ in range(8):  # every pooled connection
        async with db.connection() as conn:
            status = await conn._conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in%'"
            )
            assert status == 0


async def test_schema_is_not_reapplied_when_unchanged(db: dbmod.Database) -> None:
    """With the shipped schema recorded, a start runs no DDL (no locks on live tables); force re-applies it."""
    assert await db.apply_schema() is False
    async with db.connection() as conn:
        await conn.execute_script("DROP INDEX credentials_verified_sweep")
    assert await db.apply_schema() is False  # unchanged digest: nothing ran, the drift stays
    assert await db.fetchval("schema_digest") == dbmod.schema_digest()
    assert await db.apply_schema(force=True) is True  # `credential-engine migrate`
    async with db.connection() as conn:
        assert await conn._conn.fetchval("SELECT to_regclass('credentials_verified_sweep') IS NOT NULL")


async def test_a_changed_schema_is_applied_and_recorded(db: dbmod.Database) -> None:
    """A different recorded digest (an older schema) makes the next start apply and record the new one."""
    async with db.connection() as conn:
        await conn.execute_script("UPDATE engine_schema SET digest = 'older'")
    assert await db.apply_schema() is True
    assert await db.fetchval("schema_digest") == dbmod.schema_digest()


# ---- one pool connection per task ---------------------------------------------------------------------

STUCK = 5.0  # seconds: a pool wait the guard or a timeout should have cut short fails the test here


@pytest.fixture
async def one_connection(database_url: str) -> AsyncIterator[dbmod.Database]:
    """A pool of one connection whose acquires would wait a minute: a refused second acquire shows at once."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=1, acquire_timeout=60)
    try:
        yield database
    finally:
        await database.close()


async def _every_acquire(database: dbmod.Database) -> list[Callable[[], Awaitable[Any]]]:
    async def in_connection() -> None:
        async with database.connection():
            pass

    async def in_transaction() -> None:
        async with database.transaction():
            pass

    return [
        lambda: database.fetch("ping"),
        lambda: database.fetchrow("ping"),
        lambda: database.fetchval("ping"),
        lambda: database.execute("ping"),
        database.ping,
        in_connection,
        in_transaction,
    ]


async def test_a_task_holding_a_transaction_is_refused_a_second_connection(
    one_connection: dbmod.Database,
) -> None:
    """Inside a transaction, every way of taking a pool connection raises PoolReentry at once (the pool of one
    would otherwise wait for the connection this very task holds)."""
    async with one_connection.transaction() as conn:
        for acquire in await _every_acquire(one_connection):
            with pytest.raises(errors.PoolReentry) as info:
                async with asyncio.timeout(STUCK):  # not wait_for: that would run it in a task of its own
                    await acquire()
            assert info.value.http_status == 500 and info.value.errno == -100016
        assert await conn.fetchval("ping") == 1  # the connection held is fine, and the transaction goes on
    async with one_connection.connection():
        with pytest.raises(errors.PoolReentry):
            async with asyncio.timeout(STUCK):
                await one_connection.fetchval("ping")


async def test_child_tasks_of_a_transaction_may_use_the_pool(database_url: str) -> None:
    """Tasks created inside the block inherit its context variables but hold no connection: they are let
    through (the guard compares tasks, not a flag), and then they do their own transactions too."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=3, acquire_timeout=60)
    try:
        async with database.transaction():

            async def child() -> int:
                async with database.transaction() as conn:
                    return int(await conn.fetchval("ping"))

            assert await asyncio.wait_for(asyncio.create_task(database.fetchval("ping")), STUCK) == 1
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(child()) for _ in range(2)]
            assert [t.result() for t in tasks] == [1, 1]
    finally:
        await database.close()


async def test_the_pool_is_open_again_after_the_transaction(one_connection: dbmod.Database) -> None:
    """After the block (committed, or rolled back by an exception) the same task takes connections again."""
    async with one_connection.transaction():
        pass
    assert await asyncio.wait_for(one_connection.fetchval("ping"), STUCK) == 1
    with pytest.raises(ValueError, match="body"):
        async with one_connection.transaction():
            raise ValueError("body")
    for acquire in await _every_acquire(one_connection):
        await asyncio.wait_for(acquire(), STUCK)
    assert not dbmod.holds_pool_connection()


# ---- bounded waits ----------------------------------------------------------------------------------------------


async def test_a_starved_pool_answers_pool_exhausted_instead_of_waiting(database_url: str) -> None:
    """Every acquire on a pool whose connections are all held raises PoolExhausted (a 503 StorageError that
    says the pool is exhausted) after acquire_timeout; ping says False; once released, all works again."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=2, acquire_timeout=0.3)
    release = asyncio.Event()
    held = asyncio.Event()

    async def hog() -> None:
        async with database.connection(), asyncio.TaskGroup() as group:
            group.create_task(_hold_one(database, release))
            held.set()
            await release.wait()

    try:
        hogging = asyncio.create_task(hog())
        await asyncio.wait_for(held.wait(), STUCK)
        await asyncio.sleep(0.1)  # the second connection is taken by the child task
        for acquire in await _every_acquire(database):
            if acquire == database.ping:
                assert await asyncio.wait_for(database.ping(), STUCK) is False
                continue
            with pytest.raises(dbmod.PoolExhausted) as info:
                await asyncio.wait_for(acquire(), STUCK)
            exc = info.value
            assert isinstance(exc, errors.StorageError)
            assert (exc.http_status, exc.errno, exc.retry_after) == (503, -100011, 1)
            assert "pool exhausted" in exc.message
        release.set()
        await asyncio.wait_for(hogging, STUCK)
        assert await database.ping() is True
    finally:
        release.set()
        await database.close()


async def _hold_one(database: dbmod.Database, release: asyncio.Event) -> None:
    async with database.connection():
        await release.wait()


async def test_a_statement_past_the_command_timeout_is_a_storage_error(database_url: str) -> None:
    """asyncpg's command_timeout (a lock wait included) surfaces as StorageError, not a bare TimeoutError."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=2, command_timeout=0.3)
    try:
        with pytest.raises(errors.StorageError, match="timed out"):
            async with database.connection() as conn:
                await asyncio.wait_for(conn.execute_script("SELECT pg_sleep(10)"), STUCK)
        async with database.transaction() as conn:  # a row lock held by one transaction ...
            await conn.execute_script("SELECT pg_advisory_xact_lock(42)")

            async def waiter() -> None:
                async with database.transaction() as other:  # ... and waited for by another
                    await other.execute_script("SELECT pg_advisory_xact_lock(42)")

            with pytest.raises(errors.StorageError, match="timed out"):
                await asyncio.wait_for(asyncio.create_task(waiter()), STUCK)
        assert await database.fetchval("ping") == 1
    finally:
        await database.close()


async def test_close_does_not_wait_for_ever_for_a_connection_in_use(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection never given back does not hold close() up beyond CLOSE_TIMEOUT: the pool is terminated."""
    monkeypatch.setattr(dbmod, "CLOSE_TIMEOUT", 0.3)
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=2)
    release = asyncio.Event()
    holder = asyncio.create_task(_hold_one(database, release))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(database.close(), STUCK)
    holder.cancel()
    with contextlib.suppress(asyncio.CancelledError, errors.StorageError):
        await holder


def test_a_database_refuses_an_acquire_timeout_that_is_no_bound() -> None:
    """acquire_timeout must be a positive number of seconds."""
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(errors.ConfigurationError):
            dbmod.Database(None, owns_pool=False, queries={}, acquire_timeout=bad)


# ---- dedicated connections (the job queue's) -------------------------------------------------------------------


async def test_a_dedicated_connection_is_outside_the_pool_and_comes_back_when_lost(
    database_url: str,
) -> None:
    """It answers while the pool is exhausted, reconnects after its backend is killed, and refuses sessions
    once closed."""
    database = await dbmod.Database.connect(database_url, min_size=1, max_size=1, acquire_timeout=0.3)
    dedicated = dbmod.DedicatedConnection(database, "ce-test-dedicated")
    release = asyncio.Event()
    try:
        holder = asyncio.create_task(_hold_one(database, release))
        await asyncio.sleep(0.1)
        with pytest.raises(dbmod.PoolExhausted):
            await database.fetchval("ping")
        async with dedicated.session() as conn:
            assert await conn.fetchval("ping") == 1
            assert (
                await conn._conn.fetchval("SELECT current_setting('application_name')") == "ce-test-dedicated"
            )
        first = dedicated.backend_pid
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", first)
        finally:
            await admin.close()
        failures = 0
        while True:  # a statement may meet the dead connection before the driver has seen it close: it fails,
            try:  # and the next session connects afresh (or the first one does, when the driver saw it)
                async with dedicated.session() as conn:
                    assert await conn.fetchval("ping") == 1
                break
            except errors.StorageError:
                failures += 1
                assert failures == 1
        assert dedicated.backend_pid not in (None, first)
        assert dedicated.opened == 2
        release.set()
        await holder
    finally:
        release.set()
        await dedicated.close()
        await database.close()
    with pytest.raises(errors.EngineClosed):
        async with dedicated.session():
            pass


async def test_a_failed_single_statement_gives_its_connection_back(database_url: str) -> None:
    """The single-statement methods (no context manager of their own) return the connection whatever the
    statement did: past the command timeout (the release waits, within the acquire bound, for the server to
    cancel it), refused by the server, or fine; on a pool of one, the next statement gets it at once."""
    database = await dbmod.Database.connect(
        database_url, min_size=1, max_size=1, command_timeout=0.3, acquire_timeout=5
    )
    database.queries = {**database.queries, "slow": "SELECT pg_sleep(10)", "bad": "SELECT 1/0"}
    try:
        for run in (database.fetch, database.fetchrow, database.fetchval, database.execute):
            with pytest.raises(errors.StorageError, match="timed out"):
                await asyncio.wait_for(run("slow"), STUCK)
            with pytest.raises(errors.StorageError, match="22012"):
                await asyncio.wait_for(run("bad"), STUCK)
            await asyncio.wait_for(run("ping"), STUCK)
            assert not dbmod.holds_pool_connection()
        assert await database.fetchval("ping") == 1
    finally:
        await database.close()
