"""Lifecycle events: the transactional outbox and the in-process listeners fed from it.

Writing: :func:`record` inserts the outbox row in the caller's transaction (the same one as the change) and
queues a NOTIFY that PostgreSQL sends on commit. Per-credential sequence numbers come from the credential row
(``event_seq``), which every such transaction locks first, so they are gapless and ordered.

Reading: one :class:`EventBus` per engine tails the outbox with a ``(txid, position)`` cursor, taking only rows
of transactions older than every running one (``txid < pg_snapshot_xmin``): a row that commits late can never
be skipped, and the rows of one credential come in sequence order (their transactions serialize on the
credential's row lock, which is each one's first write, so their xids are ordered too). The outbox is the
truth; NOTIFY (and a local poke for this process's own commits) only says "look now", with polling as the
fallback, so nothing is lost across a lost connection. Every engine process sharing the database hears every
change, whichever process made it.

The LISTEN connection is checked with ``SELECT 1`` every ``listen_check_interval`` seconds
(:mod:`engine.liveness`): one that does not answer within ``listen_check_timeout`` (the peer stopped forwarding
without closing) is replaced, and every reconnect is followed at once by a read of the outbox.

The bus publishes its cursor (:class:`engine.bounds.retention.CursorBeacon`): the retention purge never deletes an
event this bus has not read yet.

Each subscription has its own queue and task: a slow or failing listener never blocks the workers or the
other listeners; its failures are logged and counted.

A bus without listeners (an API or worker process that nothing subscribed to) does not LISTEN (from
``UNLISTEN_AFTER`` seconds after its last listener left; its connection stays open and checked, and LISTENs again
when a listener subscribes) and reads no event data: it only moves its
cursor past the finished events (``events_passed_after``: one row), at most every ``IDLE_GATHER`` seconds.
A first listener then hears every event committed from its ``subscribe`` on, and possibly some of the last
``IDLE_GATHER`` seconds before it, as any listener may hear a few events read late.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from engine import db as dbmod
from engine import errors, liveness
from engine.bounds import retention
from engine.models import Event

log = structlog.get_logger("engine.events")

CHANNEL = "ce_events"
BATCH = 500
READ_GATHER = 0.005  # seconds: the shortest time between two reads of the outbox by one bus
IDLE_GATHER = 0.05  # ... by a bus without listeners, which only moves its cursor (no event data is read)
IDLE_BATCH = 10_000  # most events one such cursor move passes
UNLISTEN_AFTER = 5.0  # seconds without listeners before the bus stops LISTENing

Listener = Callable[[Event], Awaitable[None]]

EVENT_TYPES = (
    "credential.created",
    "credential.verified",
    "credential.verification_failed",
    "credential.rotation_started",
    "credential.rotated",
    "credential.rotation_failed",
    "credential.revoked",
    "credential.permissions_changed",
    "credential.expiring",
    "credential.minted",
    "credential.mint_failed",
    "trading_account.connected",
    "trading_account.disconnected",
    "webhook_endpoint.disabled",  # no credential: credential_id None, sequence per endpoint
)


async def record(
    conn: dbmod.Conn,
    *,
    type: str,
    owner_id: str,
    credential_id: uuid.UUID | None,
    sequence: int,
    data: Mapping[str, Any],
) -> Recorded:
    """Write one event to the outbox inside ``conn``'s transaction; NOTIFY fires when it commits.

    One statement: the row, the NOTIFY and whether a webhook endpoint of the owner wants this type (so that
    the fan-out, which locks endpoints and streams, runs only when there is something to fan out to).
    """
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    event_id = uuid.uuid4()
    row = await conn.fetchrow(
        "insert_event", event_id, type, owner_id, credential_id, sequence, dict(data), CHANNEL
    )
    assert row is not None
    event = Event(
        event_id=event_id,
        type=type,
        owner_id=owner_id,
        credential_id=credential_id,
        sequence=sequence,
        timestamp_ms=int(row["created_at"].timestamp() * 1000),
        data=dict(data),
    )
    return Recorded(event, bool(row["webhooks_wanted"]))


class Recorded(NamedTuple):
    """An event just written, and whether any webhook endpoint wants it."""

    event: Event
    webhooks_wanted: bool


def event_from_row(row: dbmod.Record) -> Event:
    return Event(
        event_id=row["id"],
        type=row["type"],
        owner_id=row["owner_id"],
        credential_id=row["credential_id"],
        sequence=int(row["sequence"]),
        timestamp_ms=int(row["created_at"].timestamp() * 1000),
        data=row["data"],
    )


@dataclass
class Subscription:
    listener: Listener
    types: frozenset[str] | None
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    delivered: int = 0
    failures: int = 0

    def wants(self, event: Event) -> bool:
        return self.types is None or event.type in self.types


@dataclass
class BusStats:
    read: int = 0
    delivered: int = 0
    listener_failures: int = 0
    reconnects: int = 0  # LISTEN connections lost (closed or silent) and replaced
    silent: int = 0  # ... of which found silent by a check (no answer within listen_check_timeout)
    read_failures: int = 0  # reads of the outbox that failed (the database away); the next read resumes
    failures_by_listener: Counter[str] = field(default_factory=Counter)  # listener name -> failures


class EventBus:
    """Tails the outbox and feeds subscribed listeners. ``subscribe`` works before ``start``."""

    def __init__(
        self,
        *,
        poll_interval: float = 1.0,
        listen_check_interval: float = liveness.DEFAULT_INTERVAL,
        listen_check_timeout: float = liveness.DEFAULT_TIMEOUT,
    ) -> None:
        liveness.check_bounds(listen_check_interval, listen_check_timeout)
        self.poll_interval = poll_interval
        self.listen_check_interval = listen_check_interval
        self.listen_check_timeout = listen_check_timeout
        self.beacon: retention.CursorBeacon | None = None
        self._beacon_task: asyncio.Task[None] | None = None
        self.stats = BusStats()
        self._subs: list[Subscription] = []
        self._db: dbmod.Database | None = None
        self._cursor: tuple[int, int] = (0, 0)
        self._wake = asyncio.Event()
        self._tail_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._closing = False
        self._read_lock = asyncio.Lock()
        self._subs_changed = asyncio.Event()  # the listen task LISTENs only while some listener is subscribed
        self._hearing = False

    # ---- subscriptions -----------------------------------------------------------------------------------

    def subscribe(self, listener: Listener, types: Collection[str] | None = None) -> Callable[[], None]:
        """Call ``listener(event)`` for every event (of ``types``) committed from now on, by any process."""
        if not callable(listener):
            raise errors.InvalidRequest("listener", "must be an async callable taking an Event")
        wanted = frozenset(types) if types is not None else None
        if wanted is not None:
            unknown = wanted - set(EVENT_TYPES)
            if unknown:
                raise errors.InvalidRequest("types", f"unknown event types: {sorted(unknown)}")
        sub = Subscription(listener=listener, types=wanted)
        self._subs.append(sub)
        self._subs_changed.set()
        if self._db is not None:
            self._start_sub(sub)

        def unsubscribe() -> None:
            if sub in self._subs:
                self._subs.remove(sub)
                self._subs_changed.set()
                if sub.task is not None:
                    sub.task.cancel()
                while not sub.queue.empty():  # a drain() waiting on this queue must not wait forever
                    sub.queue.get_nowait()
                    sub.queue.task_done()

        return unsubscribe

    def _start_sub(self, sub: Subscription) -> None:
        sub.task = asyncio.create_task(self._feed(sub), name=f"ce-listener-{id(sub):x}")

    async def _feed(self, sub: Subscription) -> None:
        while True:
            event = await sub.queue.get()
            try:
                await sub.listener(event)
                sub.delivered += 1
                self.stats.delivered += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a listener's bug must not stop the others: log and count it
                sub.failures += 1
                self.stats.listener_failures += 1
                name = getattr(sub.listener, "__qualname__", repr(sub.listener))
                self.stats.failures_by_listener[name] += 1
                log.warning(
                    "listener_failed",
                    listener=name,
                    event_type=event.type,
                    error=type(exc).__name__,
                )
            finally:
                sub.queue.task_done()

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, db: dbmod.Database) -> None:
        self._db = db
        self.beacon = retention.CursorBeacon(db)
        self._cursor = (
            await self.beacon.register()
        )  # the starting cursor, published before any purge sees past it
        for sub in self._subs:
            self._start_sub(sub)
        self._tail_task = asyncio.create_task(self._tail(), name="ce-events-tail")
        self._listen_task = asyncio.create_task(self._listen(), name="ce-events-listen")
        self._beacon_task = asyncio.create_task(self._publish_cursor(), name="ce-events-cursor")

    async def stop(self) -> None:
        self._closing = True
        tasks = [t for t in (self._listen_task, self._tail_task, self._beacon_task) if t is not None]
        tasks += [s.task for s in self._subs if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.beacon is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retention.CURSOR_PUBLISH_INTERVAL):
                    await self.beacon.remove()

    @property
    def cursor(self) -> tuple[int, int]:
        """The outbox cursor ``(txid, position)``: every event at or before it has been read."""
        return self._cursor

    def poke(self) -> None:
        """This process committed events: read them now instead of waiting for NOTIFY."""
        self._wake.set()

    async def drain(self) -> None:
        """Read every finished event and wait until each listener has handled what it was given."""
        await self._read_available()
        for sub in list(self._subs):
            await sub.queue.join()

    # ---- reading -----------------------------------------------------------------------------------------

    async def _read_available(self) -> int:
        assert self._db is not None
        total = 0
        async with self._read_lock:
            while not self._subs:  # nobody to hand events to: move the cursor past them, reading no data
                row = await self._db.fetchrow(
                    "events_passed_after", self._cursor[0], self._cursor[1], IDLE_BATCH
                )
                if self._subs:
                    # a listener subscribed while the statement was on its way: its snapshot may hold events
                    # committed after that listener read its state (a lease's revocation); read them instead
                    break
                passed = 0 if row is None else int(row["n"])
                if row is not None:
                    self._cursor = (int(row["txid"]), int(row["position"]))
                    self.stats.read += passed
                    total += passed
                if passed < IDLE_BATCH:
                    return total
            while True:
                rows = await self._db.fetch("events_after", self._cursor[0], self._cursor[1], BATCH)
                for row in rows:
                    event = event_from_row(row)
                    self._cursor = (int(row["txid"]), int(row["position"]))
                    self.stats.read += 1
                    for sub in self._subs:
                        if sub.wants(event):
                            sub.queue.put_nowait(event)
                total += len(rows)
                if len(rows) < BATCH:
                    return total

    async def _tail(self) -> None:
        loop = asyncio.get_running_loop()
        last_read = 0.0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
            # at most one read per READ_GATHER (IDLE_GATHER without listeners): under load one statement reads
            # the commits of several transactions instead of one each; an idle bus reads at once
            gather = last_read + (READ_GATHER if self._subs else IDLE_GATHER) - loop.time()
            if gather > 0:
                await asyncio.sleep(gather)
            last_read = loop.time()
            self._wake.clear()
            try:
                await self._read_available()
            except errors.StorageError as exc:  # the database is away: try again at the next tick
                self.stats.read_failures += 1
                log.warning("events_read_failed", error=str(exc))
                await asyncio.sleep(self.poll_interval)
            except Exception:  # a bug must not stop every listener for good: log it, try again later
                log.exception("events_read_crashed")
                await asyncio.sleep(self.poll_interval)

    async def _publish_cursor(self) -> None:
        """Publish the cursor every ``CURSOR_PUBLISH_INTERVAL`` seconds when it moved, and at least every
        ``CURSOR_KEEPALIVE`` seconds when it did not (the row stays fresh); the database may be away."""
        assert self.beacon is not None
        loop = asyncio.get_running_loop()
        published, at = self._cursor, loop.time()
        while True:
            await asyncio.sleep(retention.CURSOR_PUBLISH_INTERVAL)
            cursor = self._cursor
            if cursor == published and loop.time() - at < retention.CURSOR_KEEPALIVE:
                continue
            try:
                await self.beacon.publish(cursor)
            except errors.StorageError as exc:
                log.warning("events_cursor_publish_failed", error=str(exc))
                continue
            published, at = cursor, loop.time()

    @property
    def listening(self) -> bool:
        """Whether the bus LISTENs on the events channel now (only while some listener is subscribed)."""
        return self._hearing

    async def _listen(self) -> None:
        """Keep a LISTEN connection, checked on an interval; replace it when it closes or goes silent, with
        backoff while it cannot be opened (polling covers the gap), and read the outbox at once after each."""
        assert self._db is not None
        delay = 0.1
        while not self._closing:
            listener: dbmod.RawListener | None = None
            try:
                listener = await self._db.open_listener(application_name="ce-events-listen")
                await self._db.check_listener(listener)  # one warning when it hears nothing; polling goes on
                delay = 0.1
                self._wake.set()  # events may have committed while we were away
                how = await self._hear(listener)
                self.stats.reconnects += 1
                if how == "silent":
                    self.stats.silent += 1
                log.info("events_listener_lost", how=how)
            except errors.StorageError as exc:
                log.warning("events_listen_failed", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._hearing = False
                if listener is not None:
                    await listener.close()

    async def _hear(self, listener: dbmod.RawListener) -> str:
        """Until ``listener`` is lost (how, as :func:`liveness.until_lost` says): LISTEN on the events channel
        while some listener is subscribed, UNLISTEN once none has been for ``UNLISTEN_AFTER`` seconds (short
        waits such as ``wait_for_status`` come and go). A bus without listeners needs no NOTIFY (it only moves
        its cursor, at its own pace), and each one costs the server a wake-up of this connection's backend and
        this process a read."""
        lost = asyncio.create_task(
            liveness.until_lost(
                listener, interval=self.listen_check_interval, check_timeout=self.listen_check_timeout
            )
        )
        try:
            while True:
                self._subs_changed.clear()
                wanted = bool(self._subs)
                linger: float | None = None
                if wanted and not self._hearing:
                    await listener.add(CHANNEL, lambda _payload: self._wake.set())
                    self._hearing = True
                    self._wake.set()  # what committed before the LISTEN took effect
                elif not wanted and self._hearing:
                    linger = UNLISTEN_AFTER
                changed = asyncio.create_task(self._subs_changed.wait())
                done, _ = await asyncio.wait(
                    {lost, changed}, timeout=linger, return_when=asyncio.FIRST_COMPLETED
                )
                if lost in done:
                    changed.cancel()
                    return lost.result()
                if not done:  # no listener all along the linger
                    changed.cancel()
                    await listener.remove(CHANNEL)
                    self._hearing = False
        finally:
            if not lost.done():
                lost.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lost
