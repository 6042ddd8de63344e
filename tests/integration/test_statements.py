"""Statements per created-and-verified credential (issue #10: at most 15; issue #14: at most 6), BEGIN and COMMIT
included.

A count, not a timing: ``bench.statements`` attaches asyncpg's query logger to every connection the engines
open (the pool's through its ``init`` hook, the dedicated and LISTEN connections through ``asyncpg.connect``)
and counts everything sent while credentials are created by an engine without workers and verified (FakeVenue)
by a second engine with 10 runners taking them as a backlog.
"""

from __future__ import annotations

import asyncpg

from bench import statements

VERIFIED_IN_BATCHES = 3.6  # statements per created-and-verified credential with the writes batched


async def test_the_counter_sees_every_statement_begin_and_commit_included(database_url: str) -> None:
    """The seam counts what the server receives: a transaction of one statement is three."""
    counter = statements.StatementCounter()
    with statements.counting(counter):
        async with statements.counted_pool(database_url, counter, max_size=2) as pool:
            counter.reset()
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchval("SELECT 1")
            assert counter.total == 3
            dedicated = await asyncpg.connect(database_url)  # as the engine's dedicated connections are made
            try:
                await dedicated.execute("SELECT 1")
            finally:
                await dedicated.close()
    assert counter.total == 4


async def test_a_created_and_verified_credential_costs_at_most_6_statements(database_url: str) -> None:
    """The create statement, the job's read and its write (engine/hotpath.py), a share of the claims and of the
    event bus's cursor moves."""
    result = await statements.measure(100, clients=10, workers=10, dsn=database_url)
    per_statement = {
        text: round(count / 100, 2) for text, count in result["create_verify_statements"].items()
    }
    assert result["create_verify"] <= statements.LIMIT, per_statement
    # the verifications' writes go in batches (engine/donebatch.py): 3.0 measured here, 4.1 one statement each
    assert result["create_verify"] <= VERIFIED_IN_BATCHES, per_statement
    assert result["create"] <= 2, per_statement  # one statement, a share of the event bus's cursor moves
