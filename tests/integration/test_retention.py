"""Retention (engine/bounds/retention.py): old rows purged in bounded batches, recent ones kept, never an event that a
live event bus has not read or that a webhook delivery still needs. Rows are aged by moving their timestamps back
(the purge compares them with now())."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from test_webhooks_support import FAST_SCHEDULE, OWNER, Receiver, new_credential

from engine import CredentialEngine, Event
from engine import db as dbmod
from engine.bounds import retention
from engine.testing import FakeVenue, settle

DAY = 86_400


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def webhook_engine(make_engine: Any, **overrides: Any) -> CredentialEngine:
    settings: dict[str, Any] = {"allow_private_webhook_urls": True, "webhook_retry_schedule": FAST_SCHEDULE}
    eng: CredentialEngine = await make_engine(**{**settings, **overrides})
    return eng


async def publish(eng: CredentialEngine) -> None:
    """Publish the bus's cursor now (a bus does it every CURSOR_PUBLISH_INTERVAL seconds by itself)."""
    await eng.bus.drain()
    assert eng.bus.beacon is not None
    await eng.bus.beacon.publish(eng.bus.cursor)


async def age_credential(sql: asyncpg.Connection, cid: uuid.UUID, days: float) -> None:
    """Move a credential's events and webhook deliveries ``days`` into the past."""
    shift = datetime.timedelta(days=days)
    await sql.execute(
        "UPDATE events SET created_at = created_at - $2::interval WHERE credential_id = $1", cid, shift
    )
    await sql.execute(
        "UPDATE webhook_deliveries SET created_at = created_at - $2::interval, updated_at = updated_at - $2::interval,"
        " delivered_at = delivered_at - $2::interval WHERE credential_id = $1",
        cid,
        shift,
    )


async def counts(sql: asyncpg.Connection, cid: uuid.UUID) -> tuple[int, int, int]:
    """(events, deliveries, attempts) of a credential."""
    events = await sql.fetchval("SELECT count(*) FROM events WHERE credential_id = $1", cid)
    deliveries = await sql.fetchval("SELECT count(*) FROM webhook_deliveries WHERE credential_id = $1", cid)
    attempts = await sql.fetchval(
        "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id"
        " WHERE d.credential_id = $1",
        cid,
    )
    return int(events), int(deliveries), int(attempts)


async def test_old_rows_are_purged_and_recent_ones_kept(
    make_engine: Any, fake: FakeVenue, sql: asyncpg.Connection
) -> None:
    eng = await webhook_engine(make_engine)
    async with Receiver() as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url)
        old = [await new_credential(eng, fake, f"old-key-{i}-aaaaaaaa") for i in range(2)]
        new = [await new_credential(eng, fake, f"new-key-{i}-bbbbbbbb") for i in range(2)]
        await eng.run_until_idle()
    for cid in old + new:
        assert await counts(sql, cid) == (2, 2, 2)  # created, verified; each delivered at the first attempt
        await eng.reveal_keys(OWNER, cid, purpose="signing")
    for cid in old:
        await age_credential(sql, cid, 31)
    await sql.execute(
        "UPDATE key_access_audit SET accessed_at = now() - interval '401 days' WHERE credential_id = $1",
        old[0],
    )
    await sql.execute(
        "UPDATE key_access_audit SET accessed_at = now() - interval '399 days' WHERE credential_id = $1",
        old[1],
    )
    await sql.execute(
        "INSERT INTO owner_verify_requests (owner_id, at) VALUES ('o', now() - interval '61 minutes'), ('o', now())"
    )
    await sql.execute(
        "INSERT INTO api_instances (id, seen_at) VALUES ('gone', now() - interval '2 hours'), ('live', now())"
    )
    await publish(eng)

    report = await eng.retention.run()

    for cid in old:
        assert await counts(sql, cid) == (0, 0, 0)
    for cid in new:
        assert await counts(sql, cid) == (2, 2, 2)
    assert report.deleted["events"] == 4
    assert report.deleted["webhook_deliveries_delivered"] == 4
    assert report.deleted["webhook_attempts"] == 4
    assert report.deleted["key_access_audit"] == 1
    audit = await sql.fetch("SELECT credential_id FROM key_access_audit ORDER BY credential_id")
    assert sorted(r["credential_id"] for r in audit) == sorted([old[1], *new])
    assert await sql.fetchval("SELECT count(*) FROM owner_verify_requests") == 1
    assert [r["id"] for r in await sql.fetch("SELECT id FROM api_instances")] == ["live"]
    assert report.capped == []


async def test_dead_deliveries_are_kept_longer_and_keep_their_event(
    make_engine: Any, fake: FakeVenue, sql: asyncpg.Connection
) -> None:
    eng = await webhook_engine(make_engine, webhook_disable_after=10 * DAY)
    async with Receiver(down=True) as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        cid = await new_credential(eng, fake, "dead-key-cccccccc")
        for _ in range(100):  # the retries come due one after another
            await settle(eng, horizon=1.0)
            state = await sql.fetchval("SELECT state FROM webhook_deliveries WHERE credential_id = $1", cid)
            if state == "dead":
                break
    assert state == "dead"
    events, deliveries, attempts = await counts(sql, cid)
    assert (events, deliveries, attempts) == (2, 1, len(FAST_SCHEDULE))
    await age_credential(sql, cid, 31)
    await publish(eng)

    report = await eng.retention.run()
    assert await counts(sql, cid) == (1, 1, attempts)  # the dead delivery (31 < 90 days) keeps its event
    assert report.deleted["events"] == 1  # the verified event, which no endpoint wanted

    await age_credential(sql, cid, 60)  # dead for 91 days
    report = await eng.retention.run()
    assert await counts(sql, cid) == (0, 0, 0)
    assert report.deleted["webhook_deliveries_dead"] == 1
    assert report.deleted["webhook_attempts"] == attempts


async def test_an_event_with_a_pending_delivery_is_never_purged(
    make_engine: Any, fake: FakeVenue, sql: asyncpg.Connection
) -> None:
    eng = await webhook_engine(
        make_engine, event_retention=1.0, delivery_retention=1.0, dead_delivery_retention=1.0
    )
    async with Receiver() as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        cid = await new_credential(
            eng, fake, "pending-key-dddddddd"
        )  # its delivery is pending: no job ran yet
        await age_credential(sql, cid, 365)
        await publish(eng)
        report = await eng.retention.run()
        assert report.deleted["events"] == 0
        assert await counts(sql, cid) == (1, 1, 0)
        assert (
            await sql.fetchval("SELECT state FROM webhook_deliveries WHERE credential_id = $1", cid)
            == "pending"
        )

        await eng.run_until_idle()  # the delivery goes out: its event was still there to be sent
        assert [r.key for r in rx.requests] == [(str(cid), 1)]
    await age_credential(sql, cid, 1)
    await publish(eng)
    report = await eng.retention.run()
    assert await counts(sql, cid) == (0, 0, 0)


async def test_a_lagging_live_listener_keeps_every_event_it_has_not_read(
    make_engine: Any, fake: FakeVenue, sql: asyncpg.Connection
) -> None:
    writer = await make_engine(event_retention=1.0)
    before = await new_credential(
        writer, fake, "before-key-eeeeeeee"
    )  # committed before the lagging bus starts
    lagging = await make_engine()
    heard: list[Event] = []

    async def on_event(event: Event) -> None:
        heard.append(event)

    lagging.subscribe(on_event)
    async with lagging.bus._read_lock:  # the lagging bus cannot read (as when its reads fail or stall)
        cids = [await new_credential(writer, fake, f"lag-key-{i}-ffffffff") for i in range(3)]
        await writer.run_until_idle()
        for cid in [before, *cids]:
            await age_credential(sql, cid, 365)
        await publish(writer)
        report = await writer.retention.run()
        assert report.deleted["events"] == 1  # only the event from before the lagging bus started ...
        assert await counts(sql, before) == (1, 0, 0)  # ... not the verification of that credential, after it
        for cid in cids:
            assert (await counts(sql, cid))[0] == 2  # created and verified, not yet read by the lagging bus
        live = await writer.db.fetch("event_cursors_live", retention.CURSOR_STALE_AFTER)
        assert len(live) == 2
    await lagging.bus.drain()
    expected = [(before, 2)] + [(c, s) for c in cids for s in (1, 2)]
    assert sorted((e.credential_id, e.sequence) for e in heard) == sorted(expected)  # no gap
    await publish(lagging)
    report = await writer.retention.run()
    assert report.deleted["events"] == 7
    assert await sql.fetchval("SELECT count(*) FROM events") == 0


async def test_a_dead_process_cursor_stops_holding_events_and_says_so_if_it_returns(
    make_engine: Any, fake: FakeVenue, sql: asyncpg.Connection
) -> None:
    writer = await make_engine(event_retention=1.0)
    silent = await make_engine()
    cid = await new_credential(writer, fake, "stale-key-gggggggg")
    await age_credential(sql, cid, 365)
    await publish(writer)
    assert silent.bus.beacon is not None
    await sql.execute(
        "UPDATE event_cursors SET seen_at = now() - interval '1 hour' WHERE id = $1", silent.bus.beacon.id
    )  # as a killed process leaves it
    report = await writer.retention.run()
    assert report.deleted["events"] == 1
    assert report.deleted["event_cursors"] == 1
    await silent.bus.beacon.publish(silent.bus.cursor)  # it was only paused: it comes back, and is told
    assert silent.bus.beacon.expired == 1
    assert await sql.fetchval("SELECT count(*) FROM event_cursors WHERE id = $1", silent.bus.beacon.id) == 1


async def test_a_bus_stopping_removes_its_cursor(make_engine: Any, sql: asyncpg.Connection) -> None:
    eng = await make_engine()
    assert await sql.fetchval("SELECT count(*) FROM event_cursors") == 1
    await eng.close()
    assert await sql.fetchval("SELECT count(*) FROM event_cursors") == 0


async def test_batches_are_bounded_and_a_run_is_capped(db: dbmod.Database, sql: asyncpg.Connection) -> None:
    await sql.execute(
        "INSERT INTO key_access_audit (credential_id, owner_id, secret_version, accessed_at)"
        " SELECT gen_random_uuid(), 'o', 1, now() - interval '500 days' - i * interval '1 second'"
        " FROM generate_series(1, 1050) AS i"
    )
    purge = retention.Retention(db, retention.RetentionSettings(batch_size=100, max_batches=4))
    first = await purge.run()
    assert first.deleted["key_access_audit"] == 400  # 4 statements of at most 100 rows
    assert "key_access_audit" in first.capped
    second = await purge.run()
    assert second.deleted["key_access_audit"] == 400
    third = await purge.run()
    assert third.deleted["key_access_audit"] == 250
    assert third.capped == []
    assert await sql.fetchval("SELECT count(*) FROM key_access_audit") == 0
    # the oldest went first
    await sql.execute(
        "INSERT INTO key_access_audit (credential_id, owner_id, secret_version, accessed_at)"
        " SELECT gen_random_uuid(), 'o', 1, now() - (400 + i) * interval '1 day' FROM generate_series(1, 150) AS i"
    )
    once = retention.Retention(db, retention.RetentionSettings(batch_size=100, max_batches=1))
    await once.run()
    left = await sql.fetchval("SELECT max(now() - accessed_at) FROM key_access_audit")
    assert left.days <= 450


async def test_zero_keeps_rows_for_ever(db: dbmod.Database, sql: asyncpg.Connection) -> None:
    await sql.execute(
        "INSERT INTO key_access_audit (credential_id, owner_id, secret_version, accessed_at)"
        " VALUES (gen_random_uuid(), 'o', 1, now() - interval '5000 days')"
    )
    report = await retention.Retention(db, retention.RetentionSettings(key_access=0)).run()
    assert report.deleted["key_access_audit"] == 0
    assert await sql.fetchval("SELECT count(*) FROM key_access_audit") == 1


async def test_each_purge_statement_is_an_index_scan(db: dbmod.Database, sql: asyncpg.Connection) -> None:
    """EXPLAIN each purge statement on tables of 100,000 rows, 0.2 % of them due (a run every few minutes finds a
    small slice of a month's rows due): the rows are found through an index in age order (no sequential scan of
    the table, no sort)."""
    n = 100_000
    await sql.execute(
        "INSERT INTO webhook_endpoints (id, owner_id, url) VALUES ('00000000-0000-0000-0000-000000000001', 'o', 'x')"
    )
    await sql.execute(
        "INSERT INTO events (id, type, owner_id, credential_id, sequence, data, created_at)"
        " SELECT gen_random_uuid(), 'credential.created', 'o', NULL, i, '{}',"
        " now() - CASE WHEN i % 500 = 0 THEN interval '40 days' ELSE interval '1 day' END"
        " FROM generate_series(1, $1::int) AS i",
        n,
    )
    await sql.execute(
        "INSERT INTO webhook_deliveries (id, endpoint_id, owner_id, event_id, event_type, sequence, state,"
        " updated_at, delivered_at)"
        " SELECT gen_random_uuid(), '00000000-0000-0000-0000-000000000001', 'o', e.id, e.type, e.sequence,"
        " CASE WHEN e.sequence % 3 = 0 THEN 'dead' ELSE 'delivered' END, e.created_at,"
        " CASE WHEN e.sequence % 3 = 0 THEN NULL ELSE e.created_at END FROM events e WHERE e.sequence % 4 = 0"
    )
    await sql.execute(
        "INSERT INTO key_access_audit (credential_id, owner_id, secret_version, accessed_at)"
        " SELECT gen_random_uuid(), 'o', 1, now() - CASE WHEN i % 500 = 0 THEN interval '500 days'"
        " ELSE interval '1 day' END FROM generate_series(1, $1::int) AS i",
        n,
    )
    await sql.execute(
        "INSERT INTO owner_verify_requests (owner_id, at) SELECT 'o' || (i % 50), now() - CASE WHEN i % 500 = 0"
        " THEN interval '2 hours' ELSE interval '1 minute' END FROM generate_series(1, $1::int) AS i",
        n,
    )
    await sql.execute("ANALYZE")
    batch = retention.BATCH_SIZE
    cases = {
        "purge_events": ((30 * DAY, retention.CURSOR_STALE_AFTER, batch), "events_created", "events"),
        "purge_delivered_webhook_deliveries": (
            (30 * DAY, batch),
            "webhook_deliveries_delivered",
            "webhook_deliveries",
        ),
        "purge_dead_webhook_deliveries": ((30 * DAY, batch), "webhook_deliveries_dead", "webhook_deliveries"),
        "purge_key_access_audit": ((400 * DAY, batch), "key_access_audit_accessed", "key_access_audit"),
        "purge_verify_requests": ((3600.0, batch), "owner_verify_requests_at", "owner_verify_requests"),
    }
    for name, (args, index, table) in cases.items():
        plan = "\n".join(r[0] for r in await sql.fetch("EXPLAIN " + db.queries[name], *args))
        assert f"Index Scan using {index} on {table}" in plan or f"Index Only Scan using {index}" in plan, (
            plan
        )
        assert f"Seq Scan on {table}" not in plan, plan
        column = {
            "events": "created_at",
            "key_access_audit": "accessed_at",
            "owner_verify_requests": "at",
        }.get(table, "updated_at" if "dead" in name else "delivered_at")
        assert f"Index Cond: ({column} < " in plan, plan  # a range: the scan ends where the due rows end
        sorts = [line for line in plan.splitlines() if "Sort Key" in line and "event_cursors" not in line]
        assert sorts == [], plan  # (the live cursors, one row per process, are sorted: a handful of rows)
        print(f"\n-- {name}\n{plan}")
    # a bus starting reads its cursor one step back along events_tail, not through the whole outbox
    plan = "\n".join(r[0] for r in await sql.fetch("EXPLAIN " + db.queries["event_cursor_register"], "bus"))
    assert "Scan Backward using events_tail on events" in plan, plan
    assert "Seq Scan on events" not in plan, plan


async def test_a_bus_publishes_its_cursor_by_itself(
    make_engine: Any, fake: FakeVenue, sql: asyncpg.Connection
) -> None:
    eng = await make_engine()
    assert eng.bus.beacon is not None
    start = tuple(
        await sql.fetchrow("SELECT txid, position FROM event_cursors WHERE id = $1", eng.bus.beacon.id)
    )
    await new_credential(eng, fake, "publish-key-hhhhhhhh")
    await eng.bus.drain()
    assert eng.bus.cursor != start
    deadline = asyncio.get_running_loop().time() + retention.CURSOR_PUBLISH_INTERVAL * 3
    while True:
        row = await sql.fetchrow("SELECT txid, position FROM event_cursors WHERE id = $1", eng.bus.beacon.id)
        if tuple(row) == eng.bus.cursor:
            break
        assert asyncio.get_running_loop().time() < deadline, "the bus did not publish its cursor"
        await asyncio.sleep(0.1)
