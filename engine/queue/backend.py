"""The durable job queue, in PostgreSQL: what a job is, how its outcome is decided, and every SQL statement.

:class:`engine.queue.JobQueue` (:mod:`engine.queue.jobqueue`) is the API; :class:`SqlBackend` here runs the
named queries of ``engine/queue/queue.sql`` for it and for the worker runtime. A job row (table ``queue_jobs``)
moves::

    queued --claim--> running --done-----------------> done
      ^                  |  --Retry / error, tries left--> queued (run_at = now + delay)
      |                  |  --Abort / no tries left-----> dead --retry_dead()--> queued
      +---hand-back------+  (shutdown: claimed but unfinished; the claim does not count)

Guarantees and how they are kept:

- **Batches.** One statement claims up to ``batch_size`` ready jobs (``FOR UPDATE SKIP LOCKED``) and marks
  the previous batch done in the same round trip: a call of ``queue_claim`` (schema.sql), with no transaction
  around it. Other outcomes (retries, dead, hand-backs) are written many per statement; one statement extends
  every held lease. Round trips per job decide throughput; in a backlog of quick jobs two claims are in flight
  at once (:mod:`engine.queue.worker`, ``fetcher-2``), so the runners do not wait for a claim's round trip.
- **Leases and fencing.** A claim sets ``lease_expires_at`` and increments ``attempt``; a heartbeat extends
  the lease of the jobs whose handler runs. A job whose lease expired (its worker died) is claimed again by the
  normal claim query. Every outcome write matches ``id AND attempt AND state = 'running'``, so a late finisher
  of an old attempt changes nothing. ``attempt`` therefore never goes down; ``tries`` is what ``max_attempts``
  limits (hand-backs and attempts before an operator's :meth:`JobQueue.retry_dead` do not count).
- **Handler timeouts.** Each kind has one (:attr:`QueueSettings.handler_timeouts`, else ``handler_timeout``).
  Past it the handler is cancelled and the attempt fails with :class:`HandlerTimeout` (backoff, then dead
  like any failure); a handler that ignores the cancellation is abandoned after a grace period and its runner
  replaced (:mod:`engine.queue.worker`; its late writes are fenced out). The claim also records ``lease_cap`` =
  claim time + the kind's timeout + ``LEASE_CAP_LEASES`` leases: heartbeats never extend a lease past it, so
  even a worker whose timeout cannot fire (a blocked event loop) lets go of the job, and another worker
  takes it back.
- **Prefetch.** Claimed jobs wait locally for a free runner; their leases are not extended while they wait.
  One that waited ``(lease_seconds - heartbeat_interval) / 2`` is handed back (uncounted) for another worker,
  and the worker then claims no more than its free runners can start (:mod:`engine.queue.worker`).
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
  :meth:`JobQueue.stop`), the second claim lane on one more (opened at the first backlog of quick jobs),
  LISTEN on another: requests that exhaust the pool cannot starve leases or claims. Handlers use the pool like
  any other code. An engine process with workers holds ``pool_max_size + 6`` connections at most: these five
  and the event bus's LISTEN.

The asyncio side (tasks, batching, supervision, shutdown order) lives in :mod:`engine.queue.worker`.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from engine import db as dbmod
from engine import errors, liveness
from engine.queue import worker as workermod

__all__ = [
    "DEFAULT_SETTINGS",
    "STATES",
    "Abort",
    "Counters",
    "Handler",
    "HandlerTimeout",
    "Job",
    "JobInfo",
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
CLAIM_QUERY = (
    "claim_jobs"  # the claim statement (queue.sql); JobQueue.claim_with names another that reads more
)
# application_name of the queue's own connections (pg_stat_activity), none of them from the pool
CLAIMS_CONNECTION = "ce-queue-claims"
CLAIMS_BESIDE_CONNECTION = (
    "ce-queue-claims-2"  # the second claim lane (worker.CLAIM_LANES), opened in a backlog
)
OUTCOMES_CONNECTION = "ce-queue-outcomes"
HEARTBEAT_CONNECTION = "ce-queue-heartbeat"
LISTEN_CONNECTION = "ce-queue-listen"
_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, kw_only=True)
class QueueSettings:
    """How a :class:`JobQueue` works. Times are in seconds."""

    concurrency: int = 10  # handlers running at once in this process
    batch_size: int = 50  # most jobs one claim takes; quick jobs may wait locally up to twice that
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
    ``tries >= max_attempts`` means this is the last try. ``attached``: what the claim read with the job, when
    the queue claims through a statement that reads more (:meth:`JobQueue.claim_with`): the claim's row, its
    extra columns included; None otherwise.
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
    attached: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

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
class Outcome:
    """The write the flusher makes for one attempt."""

    job_id: int
    attempt: int
    state: str  # done | queued | dead
    delay: float = 0.0
    error: str | None = None
    uncount: int = 0  # 1 for a hand-back: the claim does not count as a try
    periodic: str | None = None  # kind, when finishing this occurrence schedules the next


@dataclass(frozen=True, slots=True)
class Periodic:
    kind: str
    interval: float
    payload: dict[str, Any]

    @property
    def key(self) -> str:
        return PERIODIC_KEY_PREFIX + self.kind


def _newest_attempts(done: Sequence[Outcome]) -> tuple[list[int], list[int]]:
    """The ids and attempts of "done" outcomes, each job once at its newest attempt (``complete_jobs`` and
    ``queue_claim`` look an id's attempt up by position). An older attempt of the same job cannot hold the row
    any more (its lease ran out and this worker claimed the job again), so its "done" would change nothing."""
    newest: dict[int, int] = {}
    for o in done:
        if newest.get(o.job_id, -1) < o.attempt:
            newest[o.job_id] = o.attempt
    return list(newest), list(newest.values())


class SqlBackend:
    """What the worker runtime calls (:class:`workermod.Backend`): the queue's SQL and its outcome rules."""

    def __init__(
        self,
        db: dbmod.Database,
        handlers: Mapping[str, Handler],
        timeouts: Mapping[str, float],
        settings: QueueSettings,
        worker_id: str,
        counters: Counters,
        periodic: Mapping[str, Periodic],
    ) -> None:
        self._db = db
        self._handlers = handlers  # filled by JobQueue (constructor, register()) before a worker runs
        self._timeouts = timeouts  # default time limits given to JobQueue.register()
        self._settings = settings
        self.claim_query = CLAIM_QUERY  # JobQueue.claim_with: a claim that reads more for the handlers
        self._kinds: list[str] = []  # claims only take kinds this process can run (refresh_kinds)
        self._caps: list[float] = []  # lease_cap per kind, in seconds
        self.refresh_kinds()
        self._worker_id = worker_id
        self._counters = counters
        self._periodic = periodic  # filled by JobQueue.every() before start
        # attempts a handler marked done inside its own transaction (JobQueue.complete_in): no second write
        self.completed_in: set[tuple[int, int]] = set()
        self._rng = random.Random()
        # Dedicated connections, not pool ones, so that API load starving the pool cannot starve job leases:
        # the fetcher claims on one (one call of schema.sql's queue_claim per batch, which sets enable_sort off
        # for itself only: claims must walk the ready indexes in order, and nothing may stay on a pooler's
        # server connection), the flusher writes outcomes on one, the heartbeat extends leases on one.
        self._claims = dbmod.DedicatedConnection(db, CLAIMS_CONNECTION)
        # the second claim lane's (a backlog of quick jobs: two claims in flight at once), opened on first use
        self._claims_beside = dbmod.DedicatedConnection(db, CLAIMS_BESIDE_CONNECTION)
        self._writes = dbmod.DedicatedConnection(db, OUTCOMES_CONNECTION)
        self._beats = dbmod.DedicatedConnection(db, HEARTBEAT_CONNECTION)

    def time_limit_of(self, kind: str) -> float:
        """Seconds a handler of ``kind`` may run: ``settings.handler_timeouts``, else the timeout it was
        registered with, else ``settings.handler_timeout``."""
        s = self._settings
        if kind in s.handler_timeouts:
            return s.handler_timeouts[kind]
        return self._timeouts.get(kind, s.handler_timeout)

    def refresh_kinds(self) -> None:
        """Claim the kinds that have handlers now, with their lease caps (a handler was registered)."""
        self._kinds = sorted(self._handlers)
        self._caps = [
            self.time_limit_of(k) + LEASE_CAP_LEASES * self._settings.lease_seconds for k in self._kinds
        ]

    # ---- producing and operating (JobQueue's statements) ------------------------------------------------

    async def seed_periodic(self) -> None:
        """Make sure each periodic job has one queued occurrence (the queue starts)."""
        s = self._settings
        for spec in self._periodic.values():
            await self._db.fetchrow(
                "ensure_periodic", spec.kind, spec.payload, spec.key, s.max_attempts, s.channel
            )

    async def enqueue(
        self,
        conn: dbmod.Conn | None,
        kind: str,
        payload: dict[str, Any],
        *,
        dedupe_key: str | None,
        max_attempts: int,
        run_at: datetime | None,
        delay: float,
        fair_key: str | None,
    ) -> int | None:
        args = (kind, payload, dedupe_key, max_attempts, run_at, delay, self._settings.channel, fair_key)
        runner: dbmod.Conn | dbmod.Database = conn if conn is not None else self._db
        row = await runner.fetchrow("enqueue_job", *args)
        return None if row is None else int(row["id"])

    async def enqueue_many(
        self,
        conn: dbmod.Conn | None,
        kind: str,
        payloads: Sequence[Mapping[str, Any]],
        fair_key: str | None,
    ) -> int:
        if conn is None:
            async with self._db.transaction() as tx:
                return await self._insert_many(tx, kind, payloads, fair_key)
        return await self._insert_many(conn, kind, payloads, fair_key)

    async def _insert_many(
        self, conn: dbmod.Conn, kind: str, payloads: Sequence[Mapping[str, Any]], fair_key: str | None
    ) -> int:
        s = self._settings
        count = 0
        for start in range(0, len(payloads), ENQUEUE_CHUNK):
            chunk = [dict(p) for p in payloads[start : start + ENQUEUE_CHUNK]]
            row = await conn.fetchrow("enqueue_many", kind, chunk, s.max_attempts, s.channel, fair_key)
            count += int(row["n"]) if row is not None else 0
        return count

    async def complete_in(self, conn: dbmod.Conn, job: Job) -> None:
        """Mark this attempt done in the caller's transaction; :class:`StaleAttempt` if it is not ours."""
        row = await conn.fetchrow("complete_job", job.id, job.attempt)
        if row is None:
            raise StaleAttempt(job.id, job.attempt)
        # the handler's transaction will hold "done": unless it raises after all, the worker writes nothing more
        self.completed_in.add((job.id, job.attempt))
        spec = self.periodic_of(job)
        if spec is not None:
            await self.schedule_next(conn, spec)

    def note_completed(self, job: Job) -> None:
        """The attempt was marked done by a statement of the caller's (:meth:`JobQueue.note_completed`)."""
        if self.periodic_of(job) is not None:
            raise ValueError(f"job {job.id} is a periodic occurrence: complete it with complete_in")
        self.completed_in.add((job.id, job.attempt))

    async def list_jobs(self, state: str | None, kind: str | None, limit: int, offset: int) -> list[JobInfo]:
        rows = await self._db.fetch("list_jobs", state, kind, limit, offset)
        return [JobInfo(**dict(row)) for row in rows]

    async def retry_dead(self, job_id: int) -> bool:
        channel = self._settings.channel
        try:
            row = await self._db.fetchrow("retry_dead", job_id, False, channel)
        except dbmod.UniqueViolation as exc:
            if exc.constraint != DEDUPE_INDEX:
                raise
            row = await self._db.fetchrow("retry_dead", job_id, True, channel)  # a twin got queued meanwhile
        return row is not None

    async def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for row in await self._db.fetch("count_jobs"):
            counts[row["state"]] = int(row["n"])
        return counts

    async def cancel_queued(self, kind: str | None, payload: dict[str, Any] | None) -> int:
        return int(await self._db.fetchval("cancel_queued", kind, payload))

    async def cancel_keys(self, conn: dbmod.Conn | None, dedupe_keys: list[str]) -> int:
        runner: dbmod.Conn | dbmod.Database = conn if conn is not None else self._db
        return int(await runner.fetchval("cancel_queued_keys", dedupe_keys))

    async def purge(self, older_than: float) -> int:
        return int(await self._db.fetchval("purge_finished", older_than))

    # ---- what the worker runtime calls ----------------------------------------------------------------------

    def periodic_of(self, job: Job) -> Periodic | None:
        spec = self._periodic.get(job.kind)
        return spec if spec is not None and job.dedupe_key == spec.key else None

    async def schedule_next(self, conn: dbmod.Conn, spec: Periodic) -> None:
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

    def claim_session(self, lane: int) -> AbstractAsyncContextManager[dbmod.Conn]:
        return (self._claims if lane == 0 else self._claims_beside).session()

    def write_session(self) -> AbstractAsyncContextManager[dbmod.Conn]:
        return self._writes.session()

    async def close(self) -> None:
        """Close the dedicated connections (the queue is stopped)."""
        for dedicated in (self._claims, self._claims_beside, self._writes, self._beats):
            await dedicated.close()

    def rides_along(self, outcome: Outcome) -> bool:
        return outcome.state == "done" and outcome.periodic is None

    async def claim(self, session: dbmod.Conn, limit: int, done: Sequence[Outcome]) -> list[Job]:
        lease = self._settings.lease_seconds
        done_ids, done_attempts = _newest_attempts(done)
        # one round trip: the statement is its own transaction (schema.sql, queue_claim)
        query = self.claim_query
        rows = await session.fetch(
            query, limit, self._worker_id, lease, self._kinds, done_ids, done_attempts, self._caps
        )
        attach = query != CLAIM_QUERY
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
                attached=row if attach else None,
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

    async def execute(self, job: Job) -> Outcome | None:
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
        return self.time_limit_of(job.kind)

    def timed_out(self, job: Job, *, abandoned: bool) -> Outcome:
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

    def _final(self, job: Job, state: str, error: str | None) -> Outcome:
        spec = self.periodic_of(job)
        return Outcome(job.id, job.attempt, state, error=error, periodic=None if spec is None else spec.kind)

    def _again(self, job: Job, after: float | None, error: str, *, failed: bool) -> Outcome:
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
        return Outcome(job.id, job.attempt, "queued", delay=after, error=error)

    def hand_back(self, job: Job) -> Outcome:
        self._counters.handed_back += 1
        log.info("queue_job_handed_back", job_id=job.id, kind=job.kind, attempt=job.attempt)
        return Outcome(job.id, job.attempt, "queued", uncount=1)

    async def finish(self, session: dbmod.Conn, outcomes: Sequence[Outcome]) -> bool:
        plain = [o for o in outcomes if o.state == "done" and o.periodic is None]
        other = [o for o in outcomes if o.state != "done" or o.periodic is not None]
        if plain:  # the common case gets the lean statement
            await session.execute("complete_jobs", *_newest_attempts(plain))
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

    async def _write(self, conn: dbmod.Conn, outcomes: Sequence[Outcome], *, drop_keys: bool) -> None:
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
            await self._db.check_listener(listener)  # one warning when it hears nothing; polling goes on
            await listener.add(self._settings.channel, lambda _payload: on_notify())
        except BaseException:
            await listener.close()
            raise
        return listener
