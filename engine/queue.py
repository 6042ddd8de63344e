"""The durable job queue, in PostgreSQL: what a job is, how its outcome is decided, and the queue's API.

A job row (table ``queue_jobs``, SQL in ``engine/queue.sql``) moves::

    queued --claim--> running --done-----------------> done
      ^                  |  --Retry / error, tries left--> queued (run_at = now + delay)
      |                  |  --Abort / no tries left-----> dead --retry_dead()--> queued
      +---hand-back------+  (shutdown: claimed but unfinished; the claim does not count)

Guarantees and how they are kept:

- **Batches.** One statement claims up to ``batch_size`` ready jobs (``FOR UPDATE SKIP LOCKED``) and marks
  the previous batch done in the same round trip; other outcomes (retries, dead, hand-backs) are written many
  per statement; one statement extends every held lease. Round trips per job decide throughput.
- **Leases and fencing.** A claim sets ``lease_expires_at`` and increments ``attempt``; a heartbeat extends
  the lease of the jobs whose handler runs. A job whose lease expired (its worker died) is claimed again by the
  normal claim query. Every outcome write matches ``id AND attempt AND state = 'running'``, so a late finisher
  of an old attempt changes nothing. ``attempt`` therefore never goes down; ``tries`` is what ``max_attempts``
  limits (hand-backs and attempts before an operator's :meth:`JobQueue.retry_dead` do not count).
- **Handler timeouts.** Each kind has one (:attr:`QueueSettings.handler_timeouts`, else ``handler_timeout``).
  Past it the handler is cancelled and the attempt fails with :class:`HandlerTimeout` (backoff, then dead
  like any failure); a handler that ignores the cancellation is abandoned after a grace period and its runner
  replaced (:mod:`engine.worker`; its late writes are fenced out). The claim also records ``lease_cap`` =
  claim time + the kind's timeout + ``LEASE_CAP_LEASES`` leases: heartbeats never extend a lease past it, so
  even a worker whose timeout cannot fire (a blocked event loop) lets go of the job, and another worker
  takes it back.
- **Prefetch.** Claimed jobs wait locally for a free runner; their leases are not extended while they wait.
  One that waited ``(lease_seconds - heartbeat_interval) / 2`` is handed back (uncounted) for another worker,
  and the worker then claims no more than its free runners can start (:mod:`engine.worker`).
- **Fair claims.** A job may name its owner (``fair_key``). Due jobs of owners get a start tag (start-time
  fair queueing): one after the owner's last queued job, and never before the smallest queued tag, so an
  owner with an empty queue goes next and an owner's backlog takes turns with everyone else's. Each claim
  takes up to half its batch from the jobs without a tag (no owner, scheduled, retried) in ``run_at``
  order, the rest in tag order, and fills up from either when the other runs short.
- **Exactly one outcome per attempt.** A handler that changes domain state calls :meth:`JobQueue.complete_in`
  inside its own transaction, so "state change + job done" commit together. If the attempt is no longer ours,
  :class:`StaleAttempt` rolls that transaction back and the worker writes nothing for the attempt.
- **Retries.** :class:`Retry` reschedules after its delay (a venue's Retry-After) or after exponential backoff
  with jitter; any other exception backs off the same way; :class:`Abort` and the last try go to ``dead`` with
  the error's type and message (never the payload).
- **Dedupe.** A unique partial index keeps at most one *queued* job per ``dedupe_key``; enqueueing another is
  a no-op that returns None. A running job does not block a new queued one. When a running job goes back to
  the queue (retry, hand-back) while another queued job holds its key, it loses the key and both run.
- **Periodic jobs** (:meth:`JobQueue.every`) keep one queued occurrence (key ``periodic:<kind>``); finishing
  an occurrence (done or dead) enqueues the next in the same transaction, so processes sharing the database
  never multiply them.
- **Wake-ups.** Enqueueing sends NOTIFY from the enqueuing statement (it fires at commit); the worker LISTENs
  on a dedicated connection and also polls every ``poll_interval``, sleeping no later than the next due job.
- **Cancellation.** :meth:`JobQueue.cancel_queued` moves queued jobs to the terminal ``cancelled`` state.
- **Connections.** Claims, outcome writes and lease extensions each run on a dedicated connection of their
  own (:class:`engine.db.DedicatedConnection`, opened on first use, reopened when lost, closed by
  :meth:`JobQueue.stop`), LISTEN on a fourth: requests that exhaust the pool cannot starve leases or claims.
  Handlers use the pool like any other code. An engine process with workers holds ``pool_max_size + 5``
  connections at most (the event bus LISTENs on one more).

The asyncio side (tasks, batching, supervision, shutdown order) lives in :mod:`engine.worker`.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from engine import db as dbmod
from engine import errors, liveness
from engine import worker as workermod

__all__ = [
    "DEFAULT_SETTINGS",
    "STATES",
    "Abort",
    "Counters",
    "Handler",
    "HandlerTimeout",
    "Job",
    "JobInfo",
    "JobQueue",
    "QueueSettings",
    "Retry",
    "StaleAttempt",
    "backoff",
    "error_text",
]

log = structlog.get_logger("engine.queue")

STATES = ("queued", "running", "done", "dead", "cancelled")
PERIODIC_KEY_PREFIX = "periodic:"
ERROR_TEXT_MAX = 2000  # characters of "ExceptionType: message" kept in last_error
ENQUEUE_CHUNK = 5000  # payloads per INSERT in enqueue_many
LIST_LIMIT_MAX = 1000
FAIR_KEY_MAX = 256  # characters of a fair_key (an owner id)
LEASE_CAP_LEASES = 2.0  # a lease is never extended past claim + handler timeout + this many lease_seconds
CANCEL_GRACE_MAX = 5.0  # seconds a cancelled handler gets to unwind (at most lease/4) before it is abandoned
DEDUPE_INDEX = "queue_jobs_dedupe_queued"
# application_name of the queue's own connections (pg_stat_activity), none of them from the pool
CLAIMS_CONNECTION = "ce-queue-claims"
OUTCOMES_CONNECTION = "ce-queue-outcomes"
HEARTBEAT_CONNECTION = "ce-queue-heartbeat"
LISTEN_CONNECTION = "ce-queue-listen"
_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, kw_only=True)
class QueueSettings:
    """How a :class:`JobQueue` works. Times are in seconds."""

    concurrency: int = 10  # handlers running at once in this process
    batch_size: int = 50  # most jobs one claim takes; also how many claimed jobs may wait locally
    lease_seconds: float = 30.0  # a claimed job is taken back this long after its last heartbeat
    heartbeat_interval: float = 10.0  # how often the leases of held jobs are extended
    poll_interval: float = 1.0  # longest sleep between claims when no NOTIFY arrives
    max_attempts: int = 20  # default tries per job before it goes dead
    backoff_base: float = 1.0  # first retry delay (before jitter)
    backoff_max: float = 600.0  # longest retry delay
    shutdown_timeout: float = 10.0  # how long stop() waits for running jobs before handing them back
    channel: str = "ce_jobs"  # the LISTEN/NOTIFY channel
    listen_check_interval: float = liveness.DEFAULT_INTERVAL  # the LISTEN connection is checked this often
    listen_check_timeout: float = liveness.DEFAULT_TIMEOUT  # ... and replaced when the check takes longer
    handler_timeout: float = 300.0  # longest run of a handler whose kind has no timeout of its own
    handler_timeouts: Mapping[str, float] = field(default_factory=dict)  # kind -> longest run of its handler

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> errors.ConfigurationError:
            return errors.ConfigurationError(f"QueueSettings.{name} must be {rule}")

        if self.concurrency < 1:
            raise bad("concurrency", "at least 1")
        if self.batch_size < 1:
            raise bad("batch_size", "at least 1")
        if self.lease_seconds <= 0:
            raise bad("lease_seconds", "positive")
        if not 0 < self.heartbeat_interval < self.lease_seconds:
            raise bad("heartbeat_interval", "positive and shorter than lease_seconds")
        if self.poll_interval <= 0:
            raise bad("poll_interval", "positive")
        if self.max_attempts < 1:
            raise bad("max_attempts", "at least 1")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise bad("backoff_base/backoff_max", "0 <= backoff_base <= backoff_max")
        if self.shutdown_timeout < 0:
            raise bad("shutdown_timeout", "0 or more")
        if not _CHANNEL.match(self.channel):
            raise bad("channel", "a lower-case identifier (letters, digits, _; at most 63)")
        if not (0 < self.handler_timeout < math.inf):
            raise bad("handler_timeout", "positive and finite")
        liveness.check_bounds(self.listen_check_interval, self.listen_check_timeout)
        for kind, seconds in self.handler_timeouts.items():
            if not (0 < seconds < math.inf):
                raise bad(f"handler_timeouts[{kind!r}]", "positive and finite")

    def timeout_for(self, kind: str) -> float:
        """Seconds a handler of ``kind`` may run before it is cancelled."""
        return self.handler_timeouts.get(kind, self.handler_timeout)

    def lease_cap_for(self, kind: str) -> float:
        """Seconds after its claim past which a job of ``kind`` is never leased (the heartbeat's cap)."""
        return self.timeout_for(kind) + LEASE_CAP_LEASES * self.lease_seconds

    @property
    def hold_unstarted(self) -> float:
        """Seconds a claimed job may wait for a free runner before it is handed back. A job taken at this age
        is extended by the next heartbeat (``heartbeat_interval`` later) well before its lease runs out."""
        return (self.lease_seconds - self.heartbeat_interval) / 2

    @property
    def cancel_grace(self) -> float:
        """Seconds a handler cancelled at its timeout gets to unwind before the worker stops waiting for it."""
        return min(CANCEL_GRACE_MAX, self.lease_seconds / 4)


DEFAULT_SETTINGS = QueueSettings()


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed attempt of a job, as its handler sees it.

    ``attempt`` counts every claim of the job and is the fencing token (:meth:`JobQueue.complete_in` uses
    it). ``tries`` is how many tries count against ``max_attempts``, this one included: it equals
    ``attempt`` unless the job was handed back at a shutdown or retried by an operator.
    ``tries >= max_attempts`` means this is the last try.
    """

    id: int
    kind: str
    payload: dict[str, Any] = field(repr=False)
    attempt: int
    max_attempts: int
    dedupe_key: str | None
    run_at: datetime
    created_at: datetime
    tries: int = 0  # 0: same as attempt (handy when building a Job by hand in a test)

    def __post_init__(self) -> None:
        if self.tries == 0:
            object.__setattr__(self, "tries", self.attempt)


Handler = Callable[[Job], Awaitable[None]]


class Retry(Exception):
    """Raised by a handler: try again in ``after`` seconds (None: the queue's backoff). It counts as a try."""

    def __init__(self, after: float | None = None, reason: str = "") -> None:
        if after is not None and after < 0:
            raise ValueError("Retry(after=...) must be 0 or more")
        super().__init__(reason or "retry requested")
        self.after = after
        self.reason = reason


class HandlerTimeout(Exception):
    """The handler ran past its kind's timeout and was cancelled; the attempt counts as a failed try."""

    def __init__(self, seconds: float, *, abandoned: bool = False) -> None:
        how = "ignored its cancellation and was abandoned" if abandoned else "was cancelled"
        super().__init__(f"the handler ran longer than {seconds:g} s and {how}")
        self.seconds = seconds
        self.abandoned = abandoned


class Abort(Exception):
    """Raised by a handler: give up now; the job goes to ``dead`` with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StaleAttempt(errors.Conflict):
    """:meth:`JobQueue.complete_in` found that this attempt no longer owns the job (its lease expired and the
    job was taken back, or it was already finished). Let it propagate: the caller's transaction rolls back
    and the worker records nothing for the attempt. A :class:`errors.Conflict`, so it stays inside the
    engine's exception tree.
    """

    def __init__(self, job_id: int, attempt: int) -> None:
        super().__init__(f"job {job_id} attempt {attempt} no longer owns the job")
        self.job_id = job_id
        self.attempt = attempt


@dataclass
class Counters:
    """Totals since the queue was made, for metrics. Counted when the outcome is decided."""

    processed: int = 0  # attempts that completed (job done)
    retried: int = 0  # attempts rescheduled (Retry, or an error with tries left)
    failed: int = 0  # attempts whose handler raised something other than Retry/Abort
    dead: int = 0  # jobs sent to dead (Abort, no tries left, lease expired on the last try)
    handed_back: int = 0  # claimed attempts returned unfinished (shutdown, or no runner got to them in time)
    timed_out: int = 0  # attempts whose handler ran past its kind's timeout (also counted in failed)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job as operators see it (:meth:`JobQueue.list_jobs`)."""

    id: int
    kind: str
    state: str
    payload: dict[str, Any] = field(repr=False)
    attempt: int
    tries: int
    max_attempts: int
    dedupe_key: str | None
    run_at: datetime
    created_at: datetime
    finished_at: datetime | None
    lease_expires_at: datetime | None
    worker_id: str | None
    last_error: str | None


def backoff(tries: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay after failed try number ``tries`` (1-based): ``base * 2 ** (tries - 1)`` capped at ``cap``, with
    "equal jitter" (half fixed, half random): delays grow, never exceed the cap, and spread retry storms."""
    ceiling = min(cap, base * 2.0 ** min(max(tries, 1) - 1, 60))
    return ceiling / 2 + (rng or random).uniform(0.0, ceiling / 2)


def error_text(exc: BaseException) -> str:
    """What ``last_error`` keeps: the exception type and message (the handler controls the message)."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The write the flusher makes for one attempt."""

    job_id: int
    attempt: int
    state: str  # done | queued | dead
    delay: float = 0.0
    error: str | None = None
    uncount: int = 0  # 1 for a hand-back: the claim does not count as a try
    periodic: str | None = None  # kind, when finishing this occurrence schedules the next


@dataclass(frozen=True, slots=True)
class _Periodic:
    kind: str
    interval: float
    payload: dict[str, Any]

    @property
    def key(self) -> str:
        return PERIODIC_KEY_PREFIX + self.kind


class JobQueue:
    """Durable jobs in PostgreSQL, run by asyncio workers in this process. Construction does no I/O.

    ``start()`` once, ``stop()`` once (idempotent). ``run_until_idle()`` works started or not (burst mode).
    """

    def __init__(
        self,
        db: dbmod.Database,
        handlers: Mapping[str, Handler],
        settings: QueueSettings = DEFAULT_SETTINGS,
        *,
        worker_id: str | None = None,
    ) -> None:
        self._db = db
        self._handlers: dict[str, Handler] = dict(handlers)
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.counters = Counters()
        self._periodic: dict[str, _Periodic] = {}
        self._worker: workermod.Worker[Job, _Outcome, dbmod.Conn] | None = None
        self._phase = "new"  # new -> starting -> started -> stopped
        self._backend = _Backend(db, self._handlers, settings, self.worker_id, self.counters, self._periodic)

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """The workers are alive (for readiness checks)."""
        return self._worker is not None and self._worker.alive

    @property
    def listening(self) -> bool:
        """The LISTEN connection is up (when it is not, the queue still polls)."""
        return self._worker is not None and self._worker.listening

    def every(self, kind: str, interval: float, payload: Mapping[str, Any] | None = None) -> None:
        """Run ``kind`` every ``interval`` seconds (first run at start). Register before :meth:`start`."""
        if self._phase != "new":
            raise errors.ConfigurationError("register periodic jobs before JobQueue.start()")
        if kind not in self._handlers:
            raise errors.ConfigurationError(f"periodic job {kind!r} has no handler")
        if interval <= 0:
            raise errors.ConfigurationError(f"periodic job {kind!r}: interval must be positive")
        self._periodic[kind] = _Periodic(kind, float(interval), dict(payload or {}))

    async def start(self) -> None:
        """Seed the periodic jobs and start the workers (fetcher, runners, flusher, heartbeat, listener)."""
        if self._phase != "new":
            raise errors.EngineClosed("a JobQueue starts once")
        self._phase = "starting"
        try:
            for spec in self._periodic.values():
                await self._db.fetchrow(
                    "ensure_periodic",
                    spec.kind,
                    spec.payload,
                    spec.key,
                    self.settings.max_attempts,
                    self.settings.channel,
                )
        except BaseException:
            self._phase = "new"  # nothing started: the caller may try again
            raise
        self._phase = "started"
        self._worker = self._new_worker(listen=True)
        self._worker.start()

    async def stop(self) -> None:
        """Stop claiming; wait up to ``shutdown_timeout`` for running jobs; hand back the rest. Idempotent."""
        self._phase = "stopped"
        if self._worker is not None:
            await self._worker.stop()
        await self._backend.close()

    async def run_until_idle(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - arq-style API
        """Claim and run jobs until none is ready and none runs here; returns the attempts run.

        Started: waits for the background workers to drain. Not started: runs a temporary worker (no LISTEN,
        periodic jobs not seeded) and stops it. Jobs scheduled in the future are not waited for.
        Raises TimeoutError after ``timeout`` seconds.
        """
        if self._phase == "stopped":
            raise errors.EngineClosed("the JobQueue is stopped")
        if self._worker is not None:
            return await self._worker.drain(timeout)
        burst = self._new_worker(listen=False)
        burst.start()
        try:
            return await burst.drain(timeout)
        finally:
            await burst.stop()

    def _new_worker(self, *, listen: bool) -> workermod.Worker[Job, _Outcome, dbmod.Conn]:
        s = self.settings
        return workermod.Worker(
            self._backend,
            name=self.worker_id,
            concurrency=s.concurrency,
            batch_size=s.batch_size,
            heartbeat_interval=s.heartbeat_interval,
            poll_interval=s.poll_interval,
            shutdown_timeout=s.shutdown_timeout,
            listen=listen,
            hold_unstarted=s.hold_unstarted,
            cancel_grace=s.cancel_grace,
            listen_check_interval=s.listen_check_interval,
            listen_check_timeout=s.listen_check_timeout,
        )

    def _wake(self) -> None:
        if self._worker is not None:
            self._worker.wake()

    # ---------------------------------------------------------------- producing

    async def enqueue(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        conn: dbmod.Conn | None = None,
        run_at: datetime | None = None,
        delay: float = 0.0,
        dedupe_key: str | None = None,
        max_attempts: int | None = None,
        fair_key: str | None = None,
    ) -> int | None:
        """Add a job; returns its id, or None when a queued job already holds ``dedupe_key``.

        With ``conn`` it joins the caller's transaction (the NOTIFY fires at its commit). It runs at
        ``run_at`` (timezone-aware; default now) plus ``delay`` seconds. ``fair_key`` names whose work it is
        (an owner): jobs due now that carry one are claimed fairly across keys (see "Fair claims" above).
        """
        _check_fair_key(fair_key)
        if run_at is not None and run_at.utcoffset() is None:
            raise errors.InvalidRequest("run_at", "must be timezone-aware")
        if delay < 0:
            raise errors.InvalidRequest("delay", "must be 0 or more")
        if max_attempts is not None and max_attempts < 1:
            raise errors.InvalidRequest("max_attempts", "must be at least 1")
        args = (
            kind,
            dict(payload or {}),
            dedupe_key,
            max_attempts or self.settings.max_attempts,
            run_at,
            float(delay),
            self.settings.channel,
            fair_key,
        )
        if conn is not None:
            row = await conn.fetchrow("enqueue_job", *args)
        else:
            row = await self._db.fetchrow("enqueue_job", *args)
            if row is not None and run_at is None and not delay:
                self._wake()
        return None if row is None else int(row["id"])

    async def enqueue_many(
        self,
        kind: str,
        payloads: Sequence[Mapping[str, Any]],
        *,
        conn: dbmod.Conn | None = None,
        fair_key: str | None = None,
    ) -> int:
        """Add one job per payload in as few statements as possible (all or none); returns how many.
        With ``fair_key``, the jobs are that owner's, in this order (see :meth:`enqueue`)."""
        _check_fair_key(fair_key)
        if conn is None:
            async with self._db.transaction() as tx:
                count = await self._insert_many(tx, kind, payloads, fair_key)
            self._wake()
            return count
        return await self._insert_many(conn, kind, payloads, fair_key)

    async def _insert_many(
        self, conn: dbmod.Conn, kind: str, payloads: Sequence[Mapping[str, Any]], fair_key: str | None
    ) -> int:
        count = 0
        for start in range(0, len(payloads), ENQUEUE_CHUNK):
            chunk = [dict(p) for p in payloads[start : start + ENQUEUE_CHUNK]]
            row = await conn.fetchrow(
                "enqueue_many", kind, chunk, self.settings.max_attempts, self.settings.channel, fair_key
            )
            count += int(row["n"]) if row is not None else 0
        return count

    # ---------------------------------------------------------------- inside handlers

    async def complete_in(self, conn: dbmod.Conn, job: Job) -> None:
        """Mark this attempt done inside the caller's transaction (fenced on id and attempt).

        Raises :class:`StaleAttempt` when the attempt no longer owns the job; let it propagate so the
        transaction rolls back. For a periodic job the next occurrence is queued in the same transaction.
        """
        row = await conn.fetchrow("complete_job", job.id, job.attempt)
        if row is None:
            raise StaleAttempt(job.id, job.attempt)
        # the handler's transaction will hold "done": unless it raises after all, the worker writes nothing more
        self._backend.completed_in.add((job.id, job.attempt))
        spec = self._backend.periodic_of(job)
        if spec is not None:
            await self._backend.schedule_next(conn, spec)

    # ---------------------------------------------------------------- operators

    async def list_jobs(
        self, *, state: str | None = None, kind: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[JobInfo]:
        """Jobs, newest first, optionally of one state and kind."""
        if state is not None and state not in STATES:
            raise errors.InvalidRequest("state", f"must be one of {', '.join(STATES)}")
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise errors.InvalidRequest("limit", f"must be between 1 and {LIST_LIMIT_MAX}")
        if offset < 0:
            raise errors.InvalidRequest("offset", "must be 0 or more")
        rows = await self._db.fetch("list_jobs", state, kind, limit, offset)
        return [JobInfo(**dict(row)) for row in rows]

    async def list_dead(self, *, kind: str | None = None, limit: int = 100, offset: int = 0) -> list[JobInfo]:
        """Dead jobs, newest first."""
        return await self.list_jobs(state="dead", kind=kind, limit=limit, offset=offset)

    async def retry_dead(self, job_id: int) -> bool:
        """Send a dead job back to the queue to run now, its tries reset. False when it is not dead."""
        channel = self.settings.channel
        try:
            row = await self._db.fetchrow("retry_dead", job_id, False, channel)
        except dbmod.UniqueViolation as exc:
            if exc.constraint != DEDUPE_INDEX:
                raise
            row = await self._db.fetchrow("retry_dead", job_id, True, channel)  # a twin got queued meanwhile
        if row is None:
            return False
        log.info("queue_job_revived", job_id=job_id)
        self._wake()
        return True

    async def counts(self) -> dict[str, int]:
        """How many jobs are in each state (every state present)."""
        counts = dict.fromkeys(STATES, 0)
        for row in await self._db.fetch("count_jobs"):
            counts[row["state"]] = int(row["n"])
        return counts

    async def cancel_queued(
        self, *, kind: str | None = None, payload_contains: Mapping[str, Any] | None = None
    ) -> int:
        """Cancel queued (not started) jobs of ``kind`` and/or whose payload contains ``payload_contains``
        (JSON containment, e.g. ``{"credentialId": "..."}``); returns how many. Running jobs are not touched.
        Cancelling a periodic job's occurrence stops it until the next :meth:`start`."""
        if kind is None and payload_contains is None:
            raise errors.InvalidRequest("kind", "cancel_queued needs kind or payload_contains")
        payload = None if payload_contains is None else dict(payload_contains)
        return int(await self._db.fetchval("cancel_queued", kind, payload))

    async def cancel_keys(self, dedupe_keys: Sequence[str], *, conn: dbmod.Conn | None = None) -> int:
        """Cancel the queued jobs holding these dedupe keys (index lookups, unlike ``cancel_queued``'s
        payload filter, which scans every queued job); returns how many."""
        runner: dbmod.Conn | dbmod.Database = conn or self._db
        return int(await runner.fetchval("cancel_queued_keys", list(dedupe_keys)))

    async def purge(self, older_than: float) -> int:
        """Delete done and cancelled jobs finished more than ``older_than`` seconds ago; returns how many."""
        return int(await self._db.fetchval("purge_finished", float(older_than)))


def _check_fair_key(fair_key: str | None) -> None:
    if fair_key is not None and not 0 < len(fair_key) <= FAIR_KEY_MAX:
        raise errors.InvalidRequest("fair_key", f"must be 1 to {FAIR_KEY_MAX} characters")


class _Backend:
    """What the worker runtime calls (:class:`workermod.Backend`): the queue's SQL and its outcome rules."""

    def __init__(
        self,
        db: dbmod.Database,
        handlers: Mapping[str, Handler],
        settings: QueueSettings,
        worker_id: str,
        counters: Counters,
        periodic: Mapping[str, _Periodic],
    ) -> None:
        self._db = db
        self._handlers = handlers
        self._kinds = sorted(handlers)  # claims only take kinds this process can run
        self._caps = [settings.lease_cap_for(kind) for kind in self._kinds]  # lease_cap per kind, in seconds
        self._settings = settings
        self._worker_id = worker_id
        self._counters = counters
        self._periodic = periodic  # filled by JobQueue.every() before start
        # attempts a handler marked done inside its own transaction (JobQueue.complete_in): no second write
        self.completed_in: set[tuple[int, int]] = set()
        self._rng = random.Random()
        # Dedicated connections, not pool ones, so that API load starving the pool cannot starve job leases:
        # the fetcher claims on one (claims must walk the ready index in order and stop after `limit` rows;
        # with stale statistics, right after a bulk enqueue, the planner would rather sort the whole backlog,
        # hence enable_sort off on it), the flusher writes outcomes on one, the heartbeat extends leases on one.
        self._claims = dbmod.DedicatedConnection(db, CLAIMS_CONNECTION, setup=("claim_connection_setup",))
        self._writes = dbmod.DedicatedConnection(db, OUTCOMES_CONNECTION)
        self._beats = dbmod.DedicatedConnection(db, HEARTBEAT_CONNECTION)

    def periodic_of(self, job: Job) -> _Periodic | None:
        spec = self._periodic.get(job.kind)
        return spec if spec is not None and job.dedupe_key == spec.key else None

    async def schedule_next(self, conn: dbmod.Conn, spec: _Periodic) -> None:
        """Queue the next occurrence of a periodic job (a no-op when one is queued already)."""
        s = self._settings
        await conn.fetchrow(
            "enqueue_job",
            spec.kind,
            spec.payload,
            spec.key,
            s.max_attempts,
            None,
            spec.interval,
            s.channel,
            None,  # a periodic job is the engine's own, no owner's
        )

    def claim_session(self) -> AbstractAsyncContextManager[dbmod.Conn]:
        return self._claims.session()

    def write_session(self) -> AbstractAsyncContextManager[dbmod.Conn]:
        return self._writes.session()

    async def close(self) -> None:
        """Close the dedicated connections (the queue is stopped)."""
        for dedicated in (self._claims, self._writes, self._beats):
            await dedicated.close()

    def rides_along(self, outcome: _Outcome) -> bool:
        return outcome.state == "done" and outcome.periodic is None

    async def claim(self, session: dbmod.Conn, limit: int, done: Sequence[_Outcome]) -> list[Job]:
        lease = self._settings.lease_seconds
        done_ids = [o.job_id for o in done]
        done_attempts = [o.attempt for o in done]
        rows = await session.fetch(
            "claim_jobs", limit, self._worker_id, lease, self._kinds, done_ids, done_attempts, self._caps
        )
        jobs: list[Job] = []
        for row in rows:
            job = Job(
                id=row["id"],
                kind=row["kind"],
                payload=row["payload"],
                attempt=row["attempt"],
                max_attempts=row["max_attempts"],
                dedupe_key=row["dedupe_key"],
                run_at=row["run_at"],
                created_at=row["created_at"],
                tries=row["tries"],
            )
            if row["state"] == "dead":  # its lease expired on the last try: the claim buried it
                self._counters.dead += 1
                log.warning(
                    "queue_job_dead", job_id=job.id, kind=job.kind, reason="lease expired on last try"
                )
                spec = self.periodic_of(job)
                if spec is not None:
                    await self.schedule_next(session, spec)
                continue
            jobs.append(job)
        return jobs

    async def execute(self, job: Job) -> _Outcome | None:
        handler = self._handlers[job.kind]
        # bound in the runner task's own context, so handler logs carry the job; restored afterwards
        tokens = structlog.contextvars.bind_contextvars(job_id=job.id, job_kind=job.kind, attempt=job.attempt)
        key = (job.id, job.attempt)
        try:
            try:
                await handler(job)
            except BaseException:
                self.completed_in.discard(key)  # a handler that raises did not commit its complete_in
                raise
        except Retry as exc:
            return self._again(job, exc.after, f"Retry: {exc.reason}"[:ERROR_TEXT_MAX], failed=False)
        except Abort as exc:
            self._counters.dead += 1
            log.warning("queue_job_dead", job_id=job.id, kind=job.kind, tries=job.tries, reason="aborted")
            return self._final(job, "dead", f"Abort: {exc.reason}"[:ERROR_TEXT_MAX])
        except StaleAttempt:
            log.info("queue_attempt_stale", job_id=job.id, kind=job.kind, attempt=job.attempt)
            return None
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker is cancelling us (shutdown): it hands the job back
            return self._again(job, None, error_text(exc), failed=True)  # the handler's own CancelledError
        except Exception as exc:
            return self._again(job, None, error_text(exc), failed=True)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
        self._counters.processed += 1
        if key in self.completed_in:  # done in the handler's own transaction (complete_in): nothing to write
            self.completed_in.discard(key)  # (complete_in also queued a periodic job's next occurrence)
            return None
        return self._final(job, "done", None)

    def time_limit(self, job: Job) -> float:
        return self._settings.timeout_for(job.kind)

    def timed_out(self, job: Job, *, abandoned: bool) -> _Outcome:
        """The outcome of an attempt whose handler ran past its kind's timeout: a failed try."""
        self.completed_in.discard((job.id, job.attempt))
        self._counters.timed_out += 1
        exc = HandlerTimeout(self.time_limit(job), abandoned=abandoned)
        log.warning(
            "queue_handler_timeout",
            job_id=job.id,
            kind=job.kind,
            attempt=job.attempt,
            timeout=exc.seconds,
            abandoned=abandoned,
        )
        return self._again(job, None, error_text(exc), failed=True)

    def _final(self, job: Job, state: str, error: str | None) -> _Outcome:
        spec = self.periodic_of(job)
        return _Outcome(job.id, job.attempt, state, error=error, periodic=None if spec is None else spec.kind)

    def _again(self, job: Job, after: float | None, error: str, *, failed: bool) -> _Outcome:
        """Another try after ``after`` seconds (None: backoff), or dead when this was the last."""
        if failed:
            self._counters.failed += 1
        if job.tries >= job.max_attempts:
            self._counters.dead += 1
            log.warning("queue_job_dead", job_id=job.id, kind=job.kind, tries=job.tries, error=error)
            return self._final(job, "dead", error)
        if after is None:
            s = self._settings
            after = backoff(job.tries, base=s.backoff_base, cap=s.backoff_max, rng=self._rng)
        self._counters.retried += 1
        log.info(
            "queue_job_retry",
            job_id=job.id,
            kind=job.kind,
            tries=job.tries,
            delay=round(after, 3),
            error=error,
        )
        return _Outcome(job.id, job.attempt, "queued", delay=after, error=error)

    def hand_back(self, job: Job) -> _Outcome:
        self._counters.handed_back += 1
        log.info("queue_job_handed_back", job_id=job.id, kind=job.kind, attempt=job.attempt)
        return _Outcome(job.id, job.attempt, "queued", uncount=1)

    async def finish(self, session: dbmod.Conn, outcomes: Sequence[_Outcome]) -> bool:
        plain = [o for o in outcomes if o.state == "done" and o.periodic is None]
        other = [o for o in outcomes if o.state != "done" or o.periodic is not None]
        if plain:  # the common case gets the lean statement
            await session.execute("complete_jobs", [o.job_id for o in plain], [o.attempt for o in plain])
        if not other:
            return False
        try:
            await self._write(session, other, drop_keys=False)
        except dbmod.UniqueViolation as exc:
            if exc.constraint != DEDUPE_INDEX:
                raise
            # a job going back to the queue met a queued twin our check did not see (enqueued concurrently,
            # or in this same batch): write one by one, dropping the key only where it clashes
            for outcome in other:
                try:
                    await self._write(session, [outcome], drop_keys=False)
                except dbmod.UniqueViolation:
                    await self._write(session, [outcome], drop_keys=True)
        return any(o.state == "queued" for o in other)

    async def _write(self, conn: dbmod.Conn, outcomes: Sequence[_Outcome], *, drop_keys: bool) -> None:
        args = (
            [o.job_id for o in outcomes],
            [o.attempt for o in outcomes],
            [o.state for o in outcomes],
            [o.delay for o in outcomes],
            [o.error for o in outcomes],
            [o.uncount for o in outcomes],
            drop_keys,
        )
        if not any(o.periodic is not None and o.state != "queued" for o in outcomes):
            await conn.fetch("finish_jobs", *args)
            return
        async with conn.savepoint():  # a transaction: the occurrence finishes and the next one is queued
            written = {row["id"] for row in await conn.fetch("finish_jobs", *args)}
            for outcome in outcomes:
                if outcome.periodic is not None and outcome.state != "queued" and outcome.job_id in written:
                    await self.schedule_next(conn, self._periodic[outcome.periodic])

    async def extend(self, jobs: Sequence[Job]) -> int:
        async with self._beats.session() as conn:
            status = await conn.execute(
                "extend_leases", [j.id for j in jobs], [j.attempt for j in jobs], self._settings.lease_seconds
            )
        return int(status.rsplit(" ", 1)[-1])

    async def next_due(self, session: dbmod.Conn) -> float | None:
        due: float | None = await session.fetchval("next_due", self._kinds)
        return due

    async def has_ready(self) -> bool:
        return bool(await self._db.fetchval("has_ready", self._kinds))

    async def listen(self, on_notify: Callable[[], None]) -> workermod.Listener:
        listener = await self._db.open_listener(application_name=LISTEN_CONNECTION)
        try:
            await listener.add(self._settings.channel, lambda _payload: on_notify())
        except BaseException:
            await listener.close()
            raise
        return listener
