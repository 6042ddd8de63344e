"""``JobQueue``: the queue's public API (produce, register handlers, run workers, operate).

What a job is, the outcome rules and every SQL statement live in :mod:`engine.queue.backend`; the asyncio
side (tasks, batching, supervision, shutdown order) in :mod:`engine.queue.worker`. The guarantees are listed
in :mod:`engine.queue.backend`'s docstring and in docs/design.md.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import structlog

from engine import db as dbmod
from engine import errors
from engine.queue import worker as workermod
from engine.queue.backend import (
    DEFAULT_SETTINGS,
    FAIR_KEY_MAX,
    LIST_LIMIT_MAX,
    STATES,
    Counters,
    Handler,
    Job,
    JobInfo,
    Outcome,
    Periodic,
    QueueSettings,
    SqlBackend,
)

log = structlog.get_logger("engine.queue")


def _check_fair_key(fair_key: str | None) -> None:
    if fair_key is not None and not 0 < len(fair_key) <= FAIR_KEY_MAX:
        raise errors.InvalidRequest("fair_key", f"must be 1 to {FAIR_KEY_MAX} characters")


class JobQueue:
    """Durable jobs in PostgreSQL, run by asyncio workers in this process. Construction does no I/O.

    Handlers come with the constructor or, later, through :meth:`register` (before :meth:`start`).
    ``start()`` once, ``stop()`` once (idempotent). ``run_until_idle()`` works started or not (burst mode).
    """

    def __init__(
        self,
        db: dbmod.Database,
        handlers: Mapping[str, Handler] | None = None,
        settings: QueueSettings = DEFAULT_SETTINGS,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self._db = db
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.counters = Counters()
        self._handlers: dict[str, Handler] = dict(handlers or {})
        self._timeouts: dict[str, float] = {}  # timeouts given to register(); settings.handler_timeouts win
        self._periodic: dict[str, Periodic] = {}
        self._worker: workermod.Worker[Job, Outcome, dbmod.Conn] | None = None
        self._phase = "new"  # new -> starting -> started -> stopped
        self._backend = SqlBackend(
            db, self._handlers, self._timeouts, settings, self.worker_id, self.counters, self._periodic
        )

    # ---------------------------------------------------------------- setup

    def register(self, kind: str, handler: Handler, *, timeout: float | None = None) -> None:
        """Run ``handler`` for jobs of ``kind``; ``timeout`` is its default time limit (seconds), which
        ``QueueSettings.handler_timeouts`` overrides. Register before :meth:`start` or :meth:`run_until_idle`
        runs a worker; registering a kind twice is refused."""
        if self._phase != "new" or self._worker is not None:
            raise errors.ConfigurationError("register job handlers before JobQueue.start()")
        if not kind or not isinstance(kind, str):
            raise errors.ConfigurationError("a job kind is a non-empty string")
        if kind in self._handlers:
            raise errors.ConfigurationError(f"job kind {kind!r} has a handler already")
        if timeout is not None and not 0 < timeout < float("inf"):
            raise errors.ConfigurationError(f"job kind {kind!r}: timeout must be positive and finite")
        self._handlers[kind] = handler
        if timeout is not None:
            self._timeouts[kind] = float(timeout)
        self._backend.refresh_kinds()

    def claim_with(self, query: str) -> None:
        """Claim through the named query ``query`` instead of queue.sql's ``claim_jobs``: a statement that takes
        ``claim_jobs``'s parameters, returns its columns and reads more beside them, in the same round trip, for
        the handlers of the claimed jobs (each finds the claim's row in :attr:`Job.attached`). Its extra
        columns must be cheap and must never fail the claim (a bad payload reads nothing). Before
        :meth:`start`."""
        if self._phase != "new" or self._worker is not None:
            raise errors.ConfigurationError("choose the claim statement before JobQueue.start()")
        if query not in self._db.queries:
            raise errors.ConfigurationError(f"claim_with: no named query {query!r}")
        self._backend.claim_query = query

    @property
    def kinds(self) -> frozenset[str]:
        """The job kinds this queue has handlers for (the kinds its workers claim)."""
        return frozenset(self._handlers)

    def timeout_for(self, kind: str) -> float:
        """Seconds a handler of ``kind`` may run before it is cancelled."""
        return self._backend.time_limit_of(kind)

    def every(self, kind: str, interval: float, payload: Mapping[str, Any] | None = None) -> None:
        """Run ``kind`` every ``interval`` seconds (first run at start). Register before :meth:`start`."""
        if self._phase != "new":
            raise errors.ConfigurationError("register periodic jobs before JobQueue.start()")
        if kind not in self._handlers:
            raise errors.ConfigurationError(f"periodic job {kind!r} has no handler")
        if interval <= 0:
            raise errors.ConfigurationError(f"periodic job {kind!r}: interval must be positive")
        self._periodic[kind] = Periodic(kind, float(interval), dict(payload or {}))

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """The workers are alive (for readiness checks)."""
        return self._worker is not None and self._worker.alive

    @property
    def listening(self) -> bool:
        """The LISTEN connection is up (when it is not, the queue still polls)."""
        return self._worker is not None and self._worker.listening

    async def start(self) -> None:
        """Seed the periodic jobs and start the workers (fetcher, runners, flusher, heartbeat, listener)."""
        if self._phase != "new":
            raise errors.EngineClosed("a JobQueue starts once")
        self._phase = "starting"
        try:
            await self._backend.seed_periodic()
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

    def _new_worker(self, *, listen: bool) -> workermod.Worker[Job, Outcome, dbmod.Conn]:
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
        (an owner): jobs due now that carry one are claimed fairly across keys (see "Fair claims" in
        :mod:`engine.queue.backend`).
        """
        _check_fair_key(fair_key)
        if run_at is not None and run_at.utcoffset() is None:
            raise errors.InvalidRequest("run_at", "must be timezone-aware")
        if delay < 0:
            raise errors.InvalidRequest("delay", "must be 0 or more")
        if max_attempts is not None and max_attempts < 1:
            raise errors.InvalidRequest("max_attempts", "must be at least 1")
        job_id = await self._backend.enqueue(
            conn,
            kind,
            dict(payload or {}),
            dedupe_key=dedupe_key,
            max_attempts=max_attempts or self.settings.max_attempts,
            run_at=run_at,
            delay=float(delay),
            fair_key=fair_key,
        )
        if conn is None and job_id is not None and run_at is None and not delay:
            self._wake()
        return job_id

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
        count = await self._backend.enqueue_many(conn, kind, payloads, fair_key)
        if conn is None:
            self._wake()
        return count

    # ---------------------------------------------------------------- inside handlers

    async def complete_in(self, conn: dbmod.Conn, job: Job) -> None:
        """Mark this attempt done inside the caller's transaction (fenced on id and attempt).

        Raises :class:`engine.queue.StaleAttempt` when the attempt no longer owns the job; let it propagate so
        the transaction rolls back. For a periodic job the next occurrence is queued in the same transaction.
        """
        await self._backend.complete_in(conn, job)

    def note_completed(self, job: Job) -> None:
        """The caller's own statement marked this attempt done, with the fence of :meth:`complete_in` (id,
        attempt, running), and it committed: the worker writes nothing more for it. Not for periodic jobs
        (their next occurrence is queued by :meth:`complete_in`)."""
        self._backend.note_completed(job)

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
        return await self._backend.list_jobs(state, kind, limit, offset)

    async def list_dead(self, *, kind: str | None = None, limit: int = 100, offset: int = 0) -> list[JobInfo]:
        """Dead jobs, newest first."""
        return await self.list_jobs(state="dead", kind=kind, limit=limit, offset=offset)

    async def retry_dead(self, job_id: int) -> bool:
        """Send a dead job back to the queue to run now, its tries reset. False when it is not dead."""
        if not await self._backend.retry_dead(job_id):
            return False
        log.info("queue_job_revived", job_id=job_id)
        self._wake()
        return True

    async def counts(self) -> dict[str, int]:
        """How many jobs are in each state (every state present)."""
        return await self._backend.counts()

    async def cancel_queued(
        self, *, kind: str | None = None, payload_contains: Mapping[str, Any] | None = None
    ) -> int:
        """Cancel queued (not started) jobs of ``kind`` and/or whose payload contains ``payload_contains``
        (JSON containment, e.g. ``{"credentialId": "..."}``); returns how many. Running jobs are not touched.
        Cancelling a periodic job's occurrence stops it until the next :meth:`start`."""
        if kind is None and payload_contains is None:
            raise errors.InvalidRequest("kind", "cancel_queued needs kind or payload_contains")
        payload = None if payload_contains is None else dict(payload_contains)
        return await self._backend.cancel_queued(kind, payload)

    async def cancel_keys(self, dedupe_keys: Sequence[str], *, conn: dbmod.Conn | None = None) -> int:
        """Cancel the queued jobs holding these dedupe keys (index lookups, unlike ``cancel_queued``'s
        payload filter, which scans every queued job); returns how many."""
        return await self._backend.cancel_keys(conn, list(dedupe_keys))

    async def purge(self, older_than: float) -> int:
        """Delete done and cancelled jobs finished more than ``older_than`` seconds ago; returns how many."""
        return await self._backend.purge(float(older_than))
