"""Bounded tables: the retention purge, and the outbox cursors that keep it from deleting unread events.

What grows with use and how long it stays (``EngineConfig``; 0 keeps a table's rows for ever):

* webhook deliveries delivered more than ``delivery_retention`` ago (30 days), with their attempts;
* webhook deliveries dead for more than ``dead_delivery_retention`` (90 days: an operator may still retry them),
  with their attempts; a **pending or waiting delivery is never purged**, whatever its age;
* outbox events older than ``event_retention`` (30 days) that **every live event bus has read** and that have
  **no webhook delivery left** (deliveries reference their event; a delivery, pending or kept, keeps it);
* key-access audit rows older than ``key_access_retention`` (400 days);
* the per-owner verify-request log past the quota's window (an hour: ``engine.bounds.quotas``), API process rows silent
  for an hour, and the cursor rows of buses silent for ``CURSOR_STALE_AFTER``.

**Listener cursors.** Each :class:`engine.events.EventBus` reads the outbox with a ``(txid, position)`` cursor
from its own start. It publishes that cursor in ``event_cursors`` (:class:`CursorBeacon`): registered at start
together with the starting cursor, published every ``CURSOR_PUBLISH_INTERVAL`` seconds when it moved (at least
every ``CURSOR_KEEPALIVE`` seconds when it did not), removed at stop. The
purge deletes only events at or before the smallest cursor refreshed within ``CURSOR_STALE_AFTER`` seconds
(so a bus that lags, its database reads failing or slow, keeps every event it has not read, however old). A
killed process stops holding events back once its row is stale; a bus that was silent that long and comes back
says so (``events_cursor_expired`` in the log, ``CursorBeacon.expired``): events older than the retention that
it had not read may be gone. The registration and the purge serialize on an advisory lock, so a purge never
runs between a bus reading its starting cursor and that cursor becoming visible.

**Batches.** One periodic queue job (``retention_purge``, every ``retention_interval`` seconds) deletes at most
``BATCH_SIZE`` rows per statement, each statement its own short transaction found through an index in age
order, at most ``MAX_BATCHES`` statements per table per run and none started after ``RUN_BUDGET`` seconds: a
backlog (the first run on an old database) is worked off over several runs without long locks or statements.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from engine import errors

if TYPE_CHECKING:
    from engine.db import Database


class EngineConfig(Protocol):
    """The retention settings of :class:`engine.config.EngineConfig` (a protocol: config imports this module)."""

    @property
    def event_retention(self) -> float: ...
    @property
    def delivery_retention(self) -> float: ...
    @property
    def dead_delivery_retention(self) -> float: ...
    @property
    def key_access_retention(self) -> float: ...
    @property
    def retention_interval(self) -> float: ...


log = structlog.get_logger("engine.retention")

RETENTION_PURGE = "retention_purge"  # the periodic queue job
BATCH_SIZE = 5_000  # most rows one purge statement deletes
MAX_BATCHES = 20  # most purge statements per table per run
RUN_BUDGET = 120.0  # seconds after which a run starts no more statements (the rest waits for the next run)
CURSOR_PUBLISH_INTERVAL = 5.0  # seconds between publications of a bus's cursor, when it moved
CURSOR_KEEPALIVE = 60.0  # ... and at least this often when it did not (the row stays fresh)
CURSOR_STALE_AFTER = 300.0  # a cursor not refreshed this long is a dead process's: it holds nothing back
API_INSTANCE_STALE_AFTER = 3600.0  # API process rows silent this long are purged (live ones beat every 5 s)

DAY = 86_400.0
DEFAULT_EVENT_RETENTION = 30 * DAY
DEFAULT_DELIVERY_RETENTION = 30 * DAY
DEFAULT_DEAD_DELIVERY_RETENTION = 90 * DAY
DEFAULT_KEY_ACCESS_RETENTION = 400 * DAY
DEFAULT_INTERVAL = 300.0

# (EngineConfig field, environment variable) of each retention setting, in seconds
SETTINGS = (
    ("event_retention", "ENGINE_EVENT_RETENTION"),
    ("delivery_retention", "ENGINE_DELIVERY_RETENTION"),
    ("dead_delivery_retention", "ENGINE_DEAD_DELIVERY_RETENTION"),
    ("key_access_retention", "ENGINE_KEY_ACCESS_RETENTION"),
)


def check_settings(config: EngineConfig) -> None:
    """Refuse a retention that is not a finite number of seconds >= 0, or an interval that is not positive."""
    for name, _ in SETTINGS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise errors.ConfigurationError(
                f"{name} must be a number of seconds >= 0 (0: keep for ever)", field=name
            )
    interval = config.retention_interval
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0 < interval < math.inf:
        raise errors.ConfigurationError(
            "retention_interval must be a positive number of seconds", field="retention_interval"
        )


@dataclass(frozen=True, kw_only=True)
class RetentionSettings:
    """How long each table keeps its rows (seconds; 0: for ever) and how one run is bounded."""

    events: float = DEFAULT_EVENT_RETENTION
    deliveries: float = DEFAULT_DELIVERY_RETENTION
    dead_deliveries: float = DEFAULT_DEAD_DELIVERY_RETENTION
    key_access: float = DEFAULT_KEY_ACCESS_RETENTION
    batch_size: int = BATCH_SIZE
    max_batches: int = MAX_BATCHES
    run_budget: float = RUN_BUDGET
    cursor_stale_after: float = CURSOR_STALE_AFTER
    verify_window: float = (
        3600.0  # the hourly verify quota's window (engine.bounds.quotas.VERIFY_WINDOW_SECONDS)
    )

    @classmethod
    def of(cls, config: EngineConfig, *, verify_window: float) -> RetentionSettings:
        return cls(
            events=config.event_retention,
            deliveries=config.delivery_retention,
            dead_deliveries=config.dead_delivery_retention,
            key_access=config.key_access_retention,
            verify_window=verify_window,
        )


@dataclass
class PurgeReport:
    """What one run deleted, per table, and which tables still had rows due when it stopped (the cap)."""

    deleted: Counter[str] = field(default_factory=Counter)
    statements: int = 0
    capped: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Retention:
    """The purge, bound to a database and its settings; ``handlers()`` gives the queue its job."""

    def __init__(self, db: Database, settings: RetentionSettings) -> None:
        self._db = db
        self.settings = settings

    def handlers(self) -> dict[str, Callable[[Any], Awaitable[None]]]:
        return {RETENTION_PURGE: self.purge_job}

    async def purge_job(self, job: Any) -> None:
        """The periodic job: one bounded run, logged."""
        report = await self.run()
        log.info(
            "retention_purged",
            statements=report.statements,
            seconds=round(report.seconds, 3),
            capped=report.capped,
            **dict(report.deleted),
        )

    async def run(self) -> PurgeReport:
        """Delete what is due, table by table, in bounded batches. Deliveries go before events, so that an
        event whose last delivery is purged can go in the same run."""
        s = self.settings
        report = PurgeReport()
        started = time.monotonic()

        async def delivered() -> tuple[int, int]:
            row = await self._db.fetchrow("purge_delivered_webhook_deliveries", s.deliveries, s.batch_size)
            assert row is not None
            return int(row["deliveries"]), int(row["attempts"])

        async def dead() -> tuple[int, int]:
            row = await self._db.fetchrow("purge_dead_webhook_deliveries", s.dead_deliveries, s.batch_size)
            assert row is not None
            return int(row["deliveries"]), int(row["attempts"])

        async def events() -> tuple[int, int]:
            async with self._db.transaction() as conn:
                await conn.execute("retention_lock")
                n = int(await conn.fetchval("purge_events", s.events, s.cursor_stale_after, s.batch_size))
            return n, 0

        def simple(query: str, seconds: float) -> Callable[[], Awaitable[tuple[int, int]]]:
            async def step() -> tuple[int, int]:
                return int(await self._db.fetchval(query, seconds, s.batch_size)), 0

            return step

        steps: list[tuple[str, float, Callable[[], Awaitable[tuple[int, int]]]]] = [
            ("webhook_deliveries_delivered", s.deliveries, delivered),
            ("webhook_deliveries_dead", s.dead_deliveries, dead),
            ("events", s.events, events),
            ("key_access_audit", s.key_access, simple("purge_key_access_audit", s.key_access)),
            (
                "owner_verify_requests",
                s.verify_window,
                simple("purge_verify_requests", s.verify_window),
            ),
            (
                "api_instances",
                API_INSTANCE_STALE_AFTER,
                simple("purge_api_instances", API_INSTANCE_STALE_AFTER),
            ),
            ("event_cursors", s.cursor_stale_after, simple("purge_event_cursors", s.cursor_stale_after)),
        ]
        for table, keep, step in steps:
            if keep <= 0:
                continue  # kept for ever
            for batch in range(s.max_batches):
                if time.monotonic() - started > s.run_budget:
                    report.capped.append(table)
                    break
                rows, attempts = await step()
                report.statements += 1
                report.deleted[table] += rows
                if attempts:
                    report.deleted["webhook_attempts"] += attempts
                if rows < s.batch_size:
                    break
                if batch == s.max_batches - 1:
                    report.capped.append(table)
        report.seconds = time.monotonic() - started
        return report


class CursorBeacon:
    """One event bus's published outbox cursor (the ``event_cursors`` row the purge respects)."""

    def __init__(self, db: Database, *, stale_after: float = CURSOR_STALE_AFTER) -> None:
        self._db = db
        self.stale_after = stale_after
        self.id = f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.expired = 0  # times the row had gone stale: events this bus had not read may have been purged

    async def register(self) -> tuple[int, int]:
        """Publish and return the starting cursor: just past every finished event, read under the lock that
        keeps a purge from running between the read and the publication."""
        async with self._db.transaction() as conn:
            await conn.execute("retention_lock_shared")
            row = await conn.fetchrow("event_cursor_register", self.id)
        assert row is not None
        return int(row["txid"]), int(row["position"])

    async def publish(self, cursor: tuple[int, int]) -> None:
        """Every event up to ``cursor`` has been read: the purge may go that far (moving forward is always safe)."""
        was_live = await self._db.fetchval(
            "event_cursor_publish", self.id, cursor[0], cursor[1], self.stale_after
        )
        if not was_live:
            self.expired += 1
            log.warning(
                "events_cursor_expired",
                cursor=self.id,
                stale_after=self.stale_after,
                hint="this bus did not publish its cursor for longer than the stale bound; events older than "
                "ENGINE_EVENT_RETENTION that it had not read may have been purged",
            )

    async def remove(self) -> None:
        """The bus stops: it holds nothing back any more. Best effort (a dead process's row goes stale)."""
        with contextlib.suppress(errors.StorageError):
            await self._db.execute("event_cursor_remove", self.id)
