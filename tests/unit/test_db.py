"""The SQL-file loader and the database choke point."""

from __future__ import annotations

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
