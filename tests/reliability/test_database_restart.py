"""Database restart: PostgreSQL restarts (``pg_ctl restart -m fast``) in the middle of a run; nothing is lost.

Two engines share a dedicated embedded server: a producer that creates and rotates credentials and listens to
every event (no workers), and a worker engine that runs the jobs. Both poll the database only every 30 s, so
the run can finish in time only if every LISTEN connection (the queue's and both event buses') comes back on
its own after the restart, as do the pools. The producer keeps calling through the outage, as a client would,
retrying what failed; every error it sees must be the engine's own StorageError.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from reliability_support import EventLog, fetch, stored_events

from engine import CredentialEngine, EngineConfig, Venue, errors
from engine import db as dbmod
from engine.testing import FakeVenue, broken_invariants, unfinished_jobs
from venues.base import Outcome

OWNER = "owner-restart"
POLL = 30.0  # seconds: far longer than the test may take, so only NOTIFY (LISTEN) wakes anyone
PROBE_DELAY = 0.05  # seconds per probe, so that jobs are in flight when the server goes away
T = TypeVar("T")


class Client:
    """The producer's calls, retried on StorageError (a database outage) as a well-behaved client would."""

    def __init__(self, engine: CredentialEngine) -> None:
        self.engine = engine
        self.outage_errors = 0
        self.foreign_errors: list[str] = []

    async def call(
        self, make: Callable[[], Awaitable[T]], *, retry_on: tuple[type[Exception], ...] = ()
    ) -> T:
        for _ in range(200):
            try:
                return await make()
            except errors.StorageError:
                self.outage_errors += 1
            except retry_on:
                raise
            except Exception as exc:  # anything else escaping the engine during an outage is a bug
                if not isinstance(exc, errors.CredentialEngineError):
                    self.foreign_errors.append(f"{type(exc).__module__}.{type(exc).__name__}")
                raise
            await asyncio.sleep(0.1)
        raise AssertionError("the database never came back")

    async def create(self, name: str) -> uuid.UUID:
        """Create the credential whose key is ``name``; if an attempt committed before its answer was lost,
        the retry finds it (409) and the credential is looked up by nickname."""
        try:
            cred = await self.call(
                lambda: self.engine.create_credential(
                    OWNER, venue=Venue.BYBIT, api_key=name, api_secret="s-" + name, nickname=name
                ),
                retry_on=(errors.DuplicateCredential,),
            )
            return cred.credential_id
        except errors.DuplicateCredential:
            page = await self.call(lambda: self.engine.list_credentials(OWNER, limit=1000))
            return next(c.credential_id for c in page.items if c.nickname == name)


@pytest.mark.slow
async def test_engines_survive_a_database_restart(
    restartable_pg: Any, master_keys: str, tmp_path: Path, size: Any, report: Any
) -> None:
    """Restarting PostgreSQL mid-run: pools and LISTEN connections reconnect, every credential and event arrives."""
    count, restarts = size((40, 1), (400, 3))
    admin = await asyncpg.connect(restartable_pg.admin_dsn)
    try:
        await admin.execute("CREATE DATABASE reliability")
    finally:
        await admin.close()
    dsn = restartable_pg.dsn("reliability")
    fake = FakeVenue()
    names = [f"restart-key-{i:04d}" for i in range(count)]
    for i, name in enumerate(names):
        if i % 8 == 5:
            fake.fail_key(name, Outcome.INVALID_SECRET, api_secret="s-" + name)
        else:
            fake.add_key(name, "s-" + name, account_id=f"uid-{i}", delay=PROBE_DELAY)
        fake.add_key(name + "-new", "s-" + name + "-new", account_id=f"uid-{i}", delay=PROBE_DELAY)

    def config(workers: int) -> EngineConfig:
        return EngineConfig(
            database_url=dsn,
            master_keys=master_keys,
            data_dir=tmp_path,
            workers=workers,
            poll_interval=POLL,
            lease_seconds=5.0,
            backoff_base=0.05,
            backoff_max=0.5,
        )

    worker = CredentialEngine(config(8), probes=fake.probes())
    producer = CredentialEngine(config(0), probes=fake.probes())
    log = EventLog()
    client = Client(producer)
    outages: list[float] = []
    async with worker, producer:
        producer.subscribe(log)
        # phase 1: creations; the server restarts while earlier ones are being verified and later ones created
        restart_at = {count * (n + 1) // (restarts + 1) for n in range(restarts)}
        restarting: asyncio.Task[float] | None = None
        ids: dict[str, uuid.UUID] = {}
        for i, name in enumerate(names):
            if i in restart_at:
                if restarting is not None:
                    outages.append(await restarting)
                restarting = asyncio.create_task(asyncio.to_thread(restartable_pg.restart))
                await asyncio.sleep(0.05)  # pg_ctl is on its way: the next calls meet the outage
            ids[name] = await client.create(name)
        if restarting is not None:
            outages.append(await restarting)

        # phase 2, after the last restart: rotations, whose jobs only a reconnected LISTEN can wake up, and
        # whose outcome events only a reconnected LISTEN of the producer's bus can bring to it in time
        to_rotate = [name for i, name in enumerate(names) if i % 8 != 5]
        outcomes = {}
        for name in to_rotate:
            await log.next_of(ids[name], {"credential.verified"}, timeout=30)
        rotated_from = time.monotonic()
        for name in to_rotate:
            new_key, new_secret = name + "-new", "s-" + name + "-new"
            await client.call(
                partial(producer.rotate_credential, OWNER, ids[name], api_key=new_key, api_secret=new_secret)
            )
        for name in to_rotate:
            outcomes[name] = (await log.next_of(ids[name], {"credential.rotated"}, after=2, timeout=20)).type
        rotation_seconds = time.monotonic() - rotated_from
        for name in set(names) - set(to_rotate):
            await log.next_of(ids[name], {"credential.verification_failed"}, timeout=30)
        await _wait_quiet(producer)
        assert worker.queue.listening, "the worker's LISTEN connection did not come back"
        reconnects = (producer.bus.stats.reconnects, worker.bus.stats.reconnects)

    assert len(outages) == restarts
    assert client.foreign_errors == []
    assert all(reconnect >= restarts for reconnect in reconnects), reconnects
    check = CredentialEngine(config(0), probes=fake.probes())
    async with check:
        assert await unfinished_jobs(check) == []
        assert await broken_invariants(check) == {}
    assert await fetch(dsn, "SELECT id, last_error FROM queue_jobs WHERE state = 'dead'") == []
    finals = {
        r["nickname"]: r["status"] for r in await fetch(dsn, "SELECT nickname, status FROM credentials")
    }
    assert finals == {name: "FAILED" if i % 8 == 5 else "VERIFIED" for i, name in enumerate(names)}
    stored = await stored_events(dsn)
    assert log.sequence_problems() == {}
    heard = {cid: [e.event_id for e in events] for cid, events in log.by_credential.items()}
    assert heard == {cid: [event_id for _, _, event_id in rows] for cid, rows in stored.items()}
    assert set(outcomes.values()) == {"credential.rotated"}
    report(
        "database restart",
        credentials=count,
        restarts=restarts,
        restart_seconds=max(outages),
        client_calls_retried=client.outage_errors,
        listen_reconnects=min(reconnects),
        rotations_after_restart_seconds=rotation_seconds,
        events=sum(len(v) for v in stored.values()),
    )


async def _wait_quiet(engine: CredentialEngine) -> None:
    deadline = time.monotonic() + 30
    while await unfinished_jobs(engine):
        assert time.monotonic() < deadline, await unfinished_jobs(engine)
        await asyncio.sleep(0.2)
    await engine.bus.drain()


def test_every_driver_error_becomes_a_storage_error() -> None:
    """An asyncpg InternalClientError raised while talking to the server leaves the engine as StorageError."""
    with pytest.raises(errors.StorageError), dbmod.translated():
        raise asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
