"""The job queue's worker runtime: the asyncio side of :class:`engine.queue.JobQueue`.

It knows nothing about SQL or handlers. The queue hands it a :class:`Backend` (claim, execute, hand back,
write outcomes, extend leases, ...) and it does the concurrency: claims in batches, runs jobs on a fixed set
of runner tasks, writes outcomes in batches, keeps leases alive, wakes on NOTIFY, and shuts down in a fixed
order.

Tasks, all named ``queue:<worker id>:<role>``, owned by the :class:`Worker` and supervised by it:

    fetcher     claims up to ``batch_size`` jobs whenever the runners are short of work, then sleeps until a
                NOTIFY, the next job comes due, or ``poll_interval`` (the polling fallback). It claims ahead
                only what the runners should start soon: one job per free runner, plus what they finish within
                PREFETCH_HORIZON at the mean run time seen so far (up to two batches for quick jobs, next
                to nothing for slow ones, one batch while no run time is known), so that claimed jobs do
                not queue here behind busy runners while other workers (and other owners' jobs) wait.
                Claimed jobs are counted as held from the moment their claim is sent (``_inflight``), so no
                two claims ask for the same room.
    fetcher-2   the second claim lane, for backlogs of quick jobs: while the fetcher's claim is in flight and
                the last claim came back full, it sends the next claim beside it on a connection of its own,
                so that one claim's round trip and statement overlap the next one's and the runners never
                wait for a claim (one lane would leave them idle for a round trip per batch). It never claims
                while the queue is drained (one job at a time, woken by NOTIFY: the fetcher alone) nor before
                the jobs' run time is known; it does not poll.
    runner-N    ``concurrency`` + ``aside`` tasks; each runs one job at a time, taken from the local buffer,
                within the backend's ``time_limit`` for it. At most ``concurrency`` of them hold a *run
                permit* (taken once a job is in hand, given back after it): a handler that has nothing left to do
                but wait for a write the queue batches (the verification's batched completion) calls
                :func:`step_aside` and gives its permit to the next job, so that the jobs doing the work
                (calling the exchanges) stay ``concurrency`` at a time; :func:`step_in` takes a permit again
                before it does more (the write was refused: the transaction path, which takes a pool
                connection). Up to ``aside`` jobs at once may wait aside; past that the runners are all busy
                and the queue runs as if no job stepped aside.
    watchdog    cancels the runner of a job past its time limit (looking every WATCH_TICK, or a quarter of
                the shortest limit seen; no timer per job) and the backend's ``timed_out`` outcome is written;
                a handler still running ``cancel_grace`` later (it swallowed the cancellation) is abandoned
                and its slot gets a fresh runner
    flusher     writes finished outcomes, many per statement: whatever piled up during the previous write.
                While claims keep coming, plain "done" outcomes ride along on the next claim statement
                instead (one statement per batch, not two); the flusher writes them after RIDE_WINDOW.
    heartbeat   extends, in one statement, the lease of every job held except those still waiting in the
                buffer (running, or outcome unwritten); and hands back buffered jobs that waited longer than
                ``hold_unstarted`` (their runners are stuck): the database gives them to whoever is free.
                Until a runner finishes a job, the fetcher then claims only for free runners.
    listener    LISTEN on a dedicated connection, checked with SELECT 1 every ``listen_check_interval`` seconds
                (:mod:`engine.liveness`); reconnects with backoff when it is lost or silent, then claims at once

The fetchers and the flusher keep one connection (a backend *session*) across back-to-back statements and
give it back when they go idle. The queue's backend makes each session, and the heartbeat's statement, use a
dedicated connection outside the pool (:mod:`engine.queue`): requests exhausting the pool cannot starve claims,
outcome writes or lease extensions.

Supervision: a side task that raises :class:`errors.StorageError` (the database is away) is logged and
restarted with capped exponential backoff, forever; any other exception is logged with its traceback and
restarted, and after ``MAX_CRASHES`` consecutive crashes of one task the worker *fails*: it stops claiming,
``alive`` turns False and :meth:`Worker.drain` raises :class:`WorkerFailed`. Nothing dies silently.

Shutdown order (:meth:`Worker.stop`, in a shielded task of its own): fetchers (no new claims) -> listener ->
buffered jobs handed back -> runners get ``shutdown_timeout`` to finish, then are cancelled and their jobs
handed back -> flusher writes everything left -> heartbeat (last, so leases hold until the final write).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Protocol, TypeVar

import structlog

from engine import errors, liveness

__all__ = ["Backend", "Claimed", "Listener", "Worker", "WorkerFailed", "step_aside", "step_in"]

log = structlog.get_logger("engine.queue")

RESTART_DELAY_MIN = 0.05  # seconds before restarting a crashed side task; doubles per consecutive crash
RESTART_DELAY_MAX = 5.0  # ... up to this; also the cap of the LISTEN reconnect backoff
MAX_CRASHES = 5  # consecutive unexpected crashes of one task before the worker fails loudly
HEALTHY_AFTER = 30.0  # a task that ran this long before crashing starts its crash count afresh
LISTENER_PING_INTERVAL = 5.0  # the LISTEN connection is pinged this often: a dead peer sends nothing
LISTENER_PING_TIMEOUT = 5.0  # ... and replaced when the ping takes longer (engine.liveness)
SESSION_LINGER = 0.05  # how long the fetcher/flusher keep an idle connection before giving it back
RIDE_WINDOW = 0.005  # how long an outcome waits for the next claim to carry it before the flusher writes it
FLUSH_CHUNK = 1000  # most outcomes written by one statement; also how many may wait before claims pause
FINAL_FLUSH_TIMEOUT = 15.0  # how long stop() keeps trying to write the last outcomes
PREFETCH_HORIZON = 0.02  # seconds of work (at the mean run time) the fetcher claims ahead of the free runners
RUN_TIME_WEIGHT = 0.2  # weight of the newest run in the mean run time (an exponential moving average)
WATCH_TICK = 1.0  # seconds between the watchdog's looks at running jobs (less for shorter time limits)
WATCH_TICK_MIN = 0.01
CLAIM_LANES = 2  # claims in flight at once (the second lane only during a backlog of quick jobs)
# runners beyond ``concurrency``, as a share of it, for jobs that stepped aside (step_aside)
ASIDE_SHARE = 0.5


# the runner a handler runs in: (its worker, slot, generation); set in each runner task's own context
_RUNNER: contextvars.ContextVar[tuple[Worker[Any, Any, Any], int, int] | None] = contextvars.ContextVar(
    "queue_runner", default=None
)


def step_aside() -> None:
    """Give the current job's run permit to the next job: what this handler still does is wait for a write that
    needs no permit (a batched write whose connection is not the handler's). The job stays held (its lease, its
    time limit) until the handler returns. Outside a runner, or when already aside: nothing."""
    runner = _RUNNER.get()
    if runner is not None:
        worker, slot, generation = runner
        worker._step_aside(slot, generation)


async def step_in() -> None:
    """Take a run permit again after :func:`step_aside`, before doing more than waiting (e.g. taking a pool
    connection): waits for a permit like a job starting does. Outside a runner, or when holding one: nothing."""
    runner = _RUNNER.get()
    if runner is not None:
        worker, slot, generation = runner
        await worker._step_in(slot, generation)


class _Permits:
    """``count`` run permits. Those who wait in line get them in order, but ``urgent`` waiters (jobs stepping
    back in after :func:`step_aside`: their exchange calls are done) before any runner starting a new job."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._lines: tuple[collections.deque[asyncio.Future[None]], ...] = (
            collections.deque(),  # urgent
            collections.deque(),  # runners
        )

    async def take(self, *, urgent: bool = False) -> None:
        if self._free > 0 and not any(self._lines):
            self._free -= 1
            return
        line = self._lines[0 if urgent else 1]
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(granted)
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.give()  # granted as we were cancelled: pass it on
            elif granted in line:  # (a give() in the same turn as the cancel already dropped it)
                line.remove(granted)
            raise

    def give(self) -> None:
        for line in self._lines:
            while line:
                waiter = line.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._free += 1


class WorkerFailed(errors.CredentialEngineError):
    """A task of the worker kept crashing; the worker stopped claiming (the log has the tracebacks)."""

    http_status = 503
    errno = -140001  # the queue's own range, clear of errors.py's -1000xx and the webhooks' -1300xx


class Claimed(Protocol):
    """What the runtime needs to know about a claimed job: its id and the attempt (the fencing token)."""

    @property
    def id(self) -> int: ...

    @property
    def attempt(self) -> int: ...


class Listener(Protocol):
    """A LISTEN connection: ``lost`` is set when it dies."""

    lost: asyncio.Event

    async def ping(self) -> None: ...

    def terminate(self) -> None: ...

    async def close(self) -> None: ...


J = TypeVar("J", bound=Claimed)
R = TypeVar("R")
S = TypeVar("S")


class Backend(Protocol[J, R, S]):
    """Storage and job semantics, supplied by the queue. ``R``: an outcome record the runtime only carries;
    ``S``: a session (one connection) that claim/finish/next_due run on."""

    def claim_session(self, lane: int) -> AbstractAsyncContextManager[S]:
        """A connection for a streak of claims (and next_due) of claim lane ``lane`` (0 or 1, CLAIM_LANES):
        each lane its own, so that two claims can be in flight at once."""

    def write_session(self) -> AbstractAsyncContextManager[S]:
        """A connection for a streak of outcome writes."""

    async def claim(self, session: S, limit: int, done: Sequence[R]) -> Sequence[J]:
        """Claim up to ``limit`` jobs; the same statement writes ``done`` (outcomes that ride along)."""

    def rides_along(self, outcome: R) -> bool:
        """Whether the claim statement can write this outcome (the common "done" case)."""

    async def execute(self, job: J) -> R | None:
        """Run the job's handler and classify what happened; None: nothing to write (attempt not ours)."""

    def time_limit(self, job: J) -> float | None:
        """Seconds the job's handler may run (None: no limit)."""

    def timed_out(self, job: J, *, abandoned: bool) -> R:
        """The outcome for a job whose handler ran past its time limit (and was cancelled or abandoned)."""

    def hand_back(self, job: J) -> R:
        """The outcome for a job claimed but not finished at shutdown: queued again, the claim uncounted."""

    async def finish(self, session: S, outcomes: Sequence[R]) -> bool:
        """Write outcomes; True when some job went back to the queue (the fetcher should look again)."""

    async def extend(self, jobs: Sequence[J]) -> int:
        """Extend the leases of these attempts; returns how many were still ours."""

    async def next_due(self, session: S) -> float | None:
        """Seconds until the next job comes due (None: nothing scheduled)."""

    async def has_ready(self) -> bool: ...

    async def listen(self, on_notify: Callable[[], None]) -> Listener: ...


class Worker(Generic[J, R, S]):
    """One worker runtime. ``start`` once, ``stop`` once (idempotent); ``drain`` for burst mode."""

    def __init__(
        self,
        backend: Backend[J, R, S],
        *,
        name: str,
        concurrency: int,
        batch_size: int,
        heartbeat_interval: float,
        poll_interval: float,
        shutdown_timeout: float,
        listen: bool,
        hold_unstarted: float | None = None,
        cancel_grace: float = 5.0,
        listen_check_interval: float = LISTENER_PING_INTERVAL,
        listen_check_timeout: float = LISTENER_PING_TIMEOUT,
    ) -> None:
        """``hold_unstarted``: seconds a claimed job may wait for a runner before it is handed back (None: no
        limit); it must leave a heartbeat's time before the claim's lease runs out. ``cancel_grace``: seconds
        a handler cancelled at its time limit gets to unwind before its runner is abandoned."""
        self._backend = backend
        self._name = name
        self._concurrency = concurrency
        self._batch_size = batch_size
        # most jobs claimed and not finished (running + buffered): room for one batch to be claimed while the
        # runners work through the one before it, so that quick jobs never wait for a claim's round trip
        self._capacity = concurrency + 2 * batch_size
        self._heartbeat_interval = heartbeat_interval
        self._poll_interval = poll_interval
        self._shutdown_timeout = shutdown_timeout
        self._listen = listen
        self._listen_check = (listen_check_interval, listen_check_timeout)

        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._buffer: asyncio.Queue[J] = asyncio.Queue()
        self._held: dict[tuple[int, int], J] = {}  # claimed and not yet written back, by (id, attempt)
        self._waiting: dict[tuple[int, int], float] = {}  # in the buffer: loop time of the claim
        self._hold_unstarted = hold_unstarted
        self._stalled = (
            False  # buffered jobs were handed back (no runner took them): claim only for free runners
        )
        self._mean_run = 0.0  # seconds, moving average of execute() (0: none seen yet, claim whole batches)
        self._cancel_grace = cancel_grace
        self._generations: dict[int, int] = {}  # runner slot -> generation of the runner that owns it
        self._expired: dict[int, J] = {}  # runner slot -> its job, cancelled at its time limit
        self._orphans: set[asyncio.Task[None]] = set()  # abandoned runners whose handler ignores cancellation
        self._deadlines: dict[int, float] = {}  # runner slot -> loop time its job's time limit runs out
        self._runner_tasks: dict[int, asyncio.Task[None]] = {}  # runner slot -> the task running its job
        self._watch_tick = WATCH_TICK
        self._watch_wakeup = asyncio.Event()
        self._running: dict[int, J] = {}  # runner slot -> its job
        self._runners = concurrency + max(1, int(concurrency * ASIDE_SHARE))
        self._permits = _Permits(concurrency)  # held by the jobs running and not aside
        self._permitted: set[int] = set()  # runner slots holding a permit (each running a job, not aside)
        self._starting = 0  # jobs taken from the buffer by runners waiting for a permit
        self._pending: list[tuple[J, R]] = []  # outcomes not written yet (flusher, or a claim carries them)

        self._wakeup = asyncio.Event()  # fetcher: claim now (NOTIFY, drain, a retry was written)
        self._room = asyncio.Event()  # fetcher: runners took work or outcomes were written
        self._flush_wanted = asyncio.Event()
        self._runners_idle = asyncio.Event()
        self._runners_idle.set()
        self._idle = asyncio.Event()  # last claim came back short and nothing is held
        self._drained = False
        self._claiming = 0  # claims in flight
        self._inflight = 0  # jobs the claims in flight asked for (room they may fill)
        self._lane_wanted = asyncio.Event()  # fetcher-2: the fetcher sent a claim (a backlog may be on)
        self._last_claim = -1.0  # loop time the last claim returned
        self._epoch = 0  # counts claims and writes, so drain() can tell that nothing moved while it looked

        self._started = False
        self._stopping = False
        self._flusher_closing = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._failed: str | None = None
        self._listening = False
        self.runs = 0  # attempts executed to an outcome (not counting hand-backs)

    # ---------------------------------------------------------------- lifecycle

    @property
    def alive(self) -> bool:
        """Started, not stopping, not failed."""
        return self._started and not self._stopping and self._failed is None

    @property
    def listening(self) -> bool:
        """The LISTEN connection is up (when it is not, polling carries on alone)."""
        return self._listening

    def start(self) -> None:
        if self._started:
            raise RuntimeError("a Worker starts once")
        self._started = True
        self._spawn("flusher", self._flusher)
        self._spawn("heartbeat", self._heartbeat)
        self._spawn("watchdog", self._watchdog)
        for slot in range(self._runners):
            self._spawn(f"runner-{slot}", self._runner_body(slot))
        if self._listen:
            self._spawn("listener", self._listener)
        self._spawn("fetcher", self._fetcher)
        self._spawn("fetcher-2", self._fetcher_beside)
        log.info(
            "queue_worker_started", worker=self._name, concurrency=self._concurrency, listen=self._listen
        )

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish (up to shutdown_timeout), hand back the rest, write all.

        The shutdown runs in a task of its own, shielded: if whoever awaits stop() is cancelled, it still
        completes (bounded by shutdown_timeout and FINAL_FLUSH_TIMEOUT), so no outcome is dropped.
        """
        if not self._started:
            return
        if self._shutdown_task is None:
            self._stopping = True
            self._shutdown_task = asyncio.create_task(self._shutdown(), name=f"queue:{self._name}:shutdown")
            self._shutdown_task.add_done_callback(self._shutdown_done)
        await asyncio.shield(self._shutdown_task)

    def _shutdown_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("queue_shutdown_failed", worker=self._name, exc_info=task.exception())
        else:
            log.info("queue_worker_stopped", worker=self._name, runs=self.runs)

    async def _shutdown(self) -> None:
        self._wakeup.set()
        self._room.set()
        self._lane_wanted.set()
        self._idle.set()  # a drain() in progress wakes up and raises EngineClosed
        await self._join("fetcher", self._shutdown_timeout)
        await self._join("fetcher-2", self._shutdown_timeout)
        await self._cancel("listener")
        while not self._buffer.empty():  # claimed, never started
            job = self._buffer.get_nowait()
            self._waiting.pop((job.id, job.attempt), None)
            self._record(job, self._backend.hand_back(job))
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._shutdown_timeout):
                    await self._runners_idle.wait()
        if self._running:
            log.warning("queue_cancelling_jobs", worker=self._name, jobs=len(self._running))
        for role in [role for role in self._tasks if role.startswith("runner-")]:
            await self._cancel(role)  # a runner still in a job hands it back as it unwinds
        await self._cancel("watchdog")
        for orphan in self._orphans:
            orphan.cancel()  # once more; not waited for: they ignored it before
        self._flusher_closing = True
        self._flush_wanted.set()
        await self._join("flusher", FINAL_FLUSH_TIMEOUT)  # writes what is left, then ends by itself
        if self._pending:
            log.error("queue_outcomes_unwritten", worker=self._name, jobs=len(self._pending))
        await self._cancel("heartbeat")  # last: leases hold until the final write

    async def _join(self, role: str, within: float) -> None:
        """Let a task end by itself (it saw ``_stopping``); cancel it after ``within`` seconds."""
        task = self._tasks.get(role)
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=within)
        if not done:
            await self._cancel(role)

    async def _cancel(self, role: str) -> None:
        task = self._tasks.pop(role, None)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # ---------------------------------------------------------------- burst mode

    def wake(self) -> None:
        """Ask the fetcher to claim now (e.g. a job was enqueued from this process)."""
        self._wakeup.set()

    async def drain(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - run_until_idle's timeout
        """Run until nothing is ready in the database and nothing is held here; returns the attempts run."""
        before = self.runs
        async with asyncio.timeout(timeout):
            while True:
                self._raise_if_failed()
                self._idle.clear()
                self._wakeup.set()
                await self._idle.wait()
                self._raise_if_failed()
                epoch = self._epoch
                if await self._backend.has_ready():
                    continue
                # nothing claimed or written while we looked (has_ready may have seen a job of ours that
                # went back to the queue meanwhile)
                if self._idle.is_set() and self._epoch == epoch:
                    return self.runs - before

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise WorkerFailed(f"queue worker {self._name} failed: its {self._failed} task kept crashing")
        if self._stopping:
            raise errors.EngineClosed("the queue worker is stopping")

    def _check_idle(self) -> None:
        if self._drained and not self._claiming and not self._held:
            self._idle.set()

    # ---------------------------------------------------------------- supervision

    def _spawn(self, role: str, body: Callable[[], Awaitable[None]]) -> None:
        name = f"queue:{self._name}:{role}"
        self._tasks[role] = asyncio.create_task(self._supervise(role, body), name=name)

    async def _supervise(self, role: str, body: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY_MIN
        crashes = 0
        while True:
            started = loop.time()
            try:
                await body()
                return
            except errors.StorageError as exc:
                log.warning("queue_task_storage_error", task=role, error=str(exc), retry_in=round(delay, 3))
            except Exception:
                crashes = 1 if loop.time() - started > HEALTHY_AFTER else crashes + 1
                log.exception("queue_task_crashed", task=role, crashes=crashes, worker=self._name)
                if crashes >= MAX_CRASHES:
                    self._fail(role)
                    return
            if loop.time() - started > HEALTHY_AFTER:
                delay = RESTART_DELAY_MIN  # it had been healthy: restart promptly
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def _fail(self, role: str) -> None:
        self._failed = role
        log.critical("queue_worker_failed", task=role, worker=self._name)
        self._idle.set()  # wake drain() so it raises
        self._wakeup.set()
        self._room.set()
        self._lane_wanted.set()

    # ---------------------------------------------------------------- fetcher

    def _want(self) -> int:
        """How many jobs to claim now (0: wait for room)."""
        # waiting here (in the buffer, or taken by a runner waiting for a permit), or asked for by a claim in flight
        held = self._buffer.qsize() + self._starting + self._inflight
        room = self._capacity - held - len(self._running)
        if room <= 0 or len(self._pending) >= FLUSH_CHUNK:
            return 0
        if held >= self._concurrency and self._mean_run <= 0:
            return 0  # how long jobs take is not known yet: no claim behind a full round of the runners
        if held and room < self._batch_size // 2:
            return 0  # runners still have work: wait until a worthwhile batch fits
        ahead = self._ahead()
        want = min(room, self._batch_size, ahead - held)
        if held and want < max(1, min(ahead, self._batch_size) // 2):
            return 0  # ... and not one job at a time either: until half of what is worth holding is gone
        return max(0, want)

    def _ahead(self) -> int:
        """How many jobs it is worth holding here: one per free runner, plus what the runners should finish
        within PREFETCH_HORIZON (none while runners are stuck)."""
        # permits free, but no more than the runners free to use them (jobs aside keep theirs busy)
        free = min(
            self._concurrency - len(self._permitted),
            self._runners - len(self._running) - self._starting,
        )
        if self._stalled:
            return free
        if self._mean_run <= 0:
            # nothing known yet: one batch, none claimed behind it
            return self._concurrency + self._batch_size
        return free + min(self._capacity, int(self._concurrency * PREFETCH_HORIZON / self._mean_run))

    def _claiming_allowed(self) -> bool:
        return not self._stopping and self._failed is None

    def _backlog(self) -> bool:
        """Whether the second lane may claim: a claim is in flight and the last one came back full."""
        return self._claiming > 0 and not self._drained

    async def _fetcher(self) -> None:
        while self._claiming_allowed():
            if self._want() == 0:
                self._room.clear()
                await self._room.wait()
                continue
            async with self._backend.claim_session(0) as session:
                dry, due = await self._claim_streak(session)
            if not dry or not self._claiming_allowed():
                continue
            timeout = self._poll_interval if due is None else min(self._poll_interval, max(due, 0.0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def _fetcher_beside(self) -> None:
        """The second claim lane: claims beside the fetcher's claim in flight while there is a backlog."""
        while self._claiming_allowed():
            if not self._backlog() or self._want() == 0:
                self._lane_wanted.clear()
                await self._lane_wanted.wait()
                continue
            async with self._backend.claim_session(1) as session:
                await self._claim_streak(session, beside=True)

    async def _claim_streak(self, session: S, *, beside: bool = False) -> tuple[bool, float | None]:
        """Claim on one connection while there is work and room. Returns (ran dry, seconds to next due job).
        ``beside``: the second lane, which claims only beside a claim in flight (:meth:`_backlog`)."""
        while self._claiming_allowed():
            if beside and not self._backlog():
                return False, None
            want = self._want()
            if want == 0:
                self._room.clear()
                try:
                    async with asyncio.timeout(SESSION_LINGER):
                        await self._room.wait()
                except TimeoutError:
                    return False, None  # runners are busy: give the connection back while they work
                continue
            self._wakeup.clear()  # before the claim: a NOTIFY arriving during it triggers another one
            self._epoch += 1
            self._claiming += 1
            self._inflight += want
            self._idle.clear()
            if not beside:
                self._lane_wanted.set()  # the second lane may claim beside this one
            riders = self._take(riders=True)
            try:
                jobs = await self._backend.claim(session, want, [outcome for _, outcome in riders])
            except BaseException:
                self._pending[:0] = riders  # not written: the flusher (or the next claim) tries again
                raise
            finally:
                self._claiming -= 1
                self._inflight -= want
                self._last_claim = asyncio.get_running_loop().time()
            claimed_at = asyncio.get_running_loop().time()
            for job in jobs:
                self._held[(job.id, job.attempt)] = job
                self._waiting[(job.id, job.attempt)] = claimed_at
                self._buffer.put_nowait(job)
            self._drained = len(jobs) < want
            self._written(riders)  # after the new jobs are held: idle must not be seen in between
            if self._drained:
                self._check_idle()
                if beside:
                    return True, None  # the fetcher looks for the next due job and sleeps
                return True, await self._backend.next_due(session)
        return False, None

    # ---------------------------------------------------------------- runners

    def _runner_body(self, slot: int) -> Callable[[], Awaitable[None]]:
        generation = self._generations[slot] = self._generations.get(slot, 0) + 1

        async def body() -> None:
            await self._runner(slot, generation)

        return body

    async def _runner(self, slot: int, generation: int) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._runner_tasks[slot] = task
        _RUNNER.set((self, slot, generation))  # this task's own context: step_aside() finds its runner
        while True:
            job = await self._buffer.get()
            # then a permit (an idle runner holds none: a job stepping back in never waits for one that idles),
            # for no longer than the job may wait unstarted
            claimed_at = self._waiting.get((job.id, job.attempt))
            hold = self._hold_unstarted
            self._starting += 1
            try:
                async with asyncio.timeout_at(
                    None if hold is None or claimed_at is None else claimed_at + hold
                ):
                    await self._permits.take()
            except TimeoutError:  # the runners doing work are stuck: let the database hand it out again
                self._waiting.pop((job.id, job.attempt), None)
                self._stalled = True
                self._record(job, self._backend.hand_back(job))
                log.warning(
                    "queue_prefetch_handed_back", worker=self._name, jobs=1, running=len(self._running)
                )
                continue
            except BaseException:
                # cancelled (stop()) before its job started: the attempt goes back, uncounted
                self._waiting.pop((job.id, job.attempt), None)
                self._record(job, self._backend.hand_back(job))
                raise
            finally:
                self._starting -= 1
            self._permitted.add(slot)
            claimed_at = self._waiting.pop((job.id, job.attempt), None)
            if self._stopping:  # stop() began while it waited: back to the queue, not started
                self._give_back_permit(slot)
                self._record(job, self._backend.hand_back(job))
                continue
            started = loop.time()
            if self._too_old(claimed_at, started):
                # its lease may run out before the next heartbeat: let the database hand it out again
                self._give_back_permit(slot)
                self._record(job, self._backend.hand_back(job))
                continue
            self._running[slot] = job
            self._runners_idle.clear()
            self._room.set()
            limit = self._backend.time_limit(job)
            if limit is not None:
                self._deadlines[slot] = started + limit
                if limit < 4 * self._watch_tick:
                    self._watch_tick = max(WATCH_TICK_MIN, limit / 4)
                    self._watch_wakeup.set()
            try:
                outcome = await self._backend.execute(job)
            except asyncio.CancelledError:
                if self._generations.get(slot) != generation or self._expired.get(slot) is not job:
                    if self._generations.get(slot) == generation:
                        # stop() cancelled us mid-job: the attempt goes back to the queue, uncounted
                        self._record(job, self._backend.hand_back(job))
                    raise
                outcome = self._backend.timed_out(job, abandoned=False)
            except Exception:
                # execute() classifies handler errors itself; getting here is a bug in it. The attempt stays
                # running in the database and is taken back when its lease expires.
                if self._generations.get(slot) == generation:
                    self._release(job)
                raise
            finally:
                if self._generations.get(slot) == generation:
                    self._deadlines.pop(slot, None)
                    if self._expired.pop(slot, None) is job:
                        task.uncancel()  # our own cancel, consumed: it must not hit the runner's next await
                    del self._running[slot]
                    if not self._running:
                        self._runners_idle.set()
                    self._give_back_permit(slot)
            if self._generations.get(slot) != generation:
                log.warning("queue_abandoned_handler_returned", worker=self._name, job_id=job.id)
                return  # abandoned while its handler ran: the slot has a new runner, the outcome is written
            elapsed = loop.time() - started
            self._mean_run = (
                elapsed
                if self._mean_run <= 0
                else ((1 - RUN_TIME_WEIGHT) * self._mean_run + RUN_TIME_WEIGHT * elapsed)
            )
            self._stalled = False  # a runner is free again
            self.runs += 1
            if outcome is None:
                self._release(job)
            else:
                self._record(job, outcome)

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._watch_tick):
                    await self._watch_wakeup.wait()
            self._watch_wakeup.clear()
            now = loop.time()
            for slot, deadline in list(self._deadlines.items()):
                job, task = self._running.get(slot), self._runner_tasks.get(slot)
                if deadline <= now and job is not None and task is not None:
                    del self._deadlines[slot]
                    self._expire(slot, job, task)

    def _expire(self, slot: int, job: J, task: asyncio.Task[None]) -> None:
        """The job in ``slot`` ran past its time limit. Cancel it; abandon it if it does not let go."""
        if self._running.get(slot) is not job or slot in self._expired:
            return
        self._expired[slot] = job
        task.cancel()
        asyncio.get_running_loop().call_later(self._cancel_grace, self._abandon, slot, job, task)

    def _abandon(self, slot: int, job: J, task: asyncio.Task[None]) -> None:
        """Timer: the handler cancelled at its time limit still runs (it swallowed the cancellation). Leave it
        to itself (its late writes are fenced out), write the attempt's outcome, give the slot a new runner."""
        if self._running.get(slot) is not job or self._expired.get(slot) is not job:
            return  # it let go in time
        del self._running[slot]
        del self._expired[slot]
        self._deadlines.pop(slot, None)
        if not self._running:
            self._runners_idle.set()
        self._give_back_permit(slot)  # the slot's next runner takes one of its own
        role = f"runner-{slot}"
        if self._tasks.get(role) is task:
            del self._tasks[role]
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)
        if not self._stopping:
            self._spawn(role, self._runner_body(slot))  # a new generation: the old runner ends when it can
        else:
            self._generations[slot] = self._generations.get(slot, 0) + 1
        log.error("queue_runner_abandoned", worker=self._name, slot=slot, job_id=job.id)
        self._stalled = False
        self._record(job, self._backend.timed_out(job, abandoned=True))

    def _give_back_permit(self, slot: int) -> None:
        if slot in self._permitted:
            self._permitted.discard(slot)
            self._permits.give()

    def _is_runner(self, slot: int, generation: int) -> bool:
        """The calling task is that slot's current runner (not an abandoned one, nor a task its handler made)."""
        return self._generations.get(slot) == generation and asyncio.current_task() is self._runner_tasks.get(
            slot
        )

    def _step_aside(self, slot: int, generation: int) -> None:
        if not self._is_runner(slot, generation) or slot not in self._running:
            return  # an abandoned handler (its slot has a new runner), a task of a handler, or not in a job
        if slot in self._permitted:  # (jobs aside: those in _running without a permit)
            self._give_back_permit(slot)
            self._room.set()  # a runner is free for the next job: the fetcher may claim for it

    async def _step_in(self, slot: int, generation: int) -> None:
        if not self._is_runner(slot, generation) or slot in self._permitted:
            return
        await self._permits.take(urgent=True)  # before any runner starting a new job
        if self._generations.get(slot) != generation or slot not in self._running:
            self._permits.give()  # abandoned while it waited: the permit is not its to hold
            return
        self._permitted.add(slot)

    def _record(self, job: J, outcome: R) -> None:
        self._pending.append((job, outcome))
        self._flush_wanted.set()

    def _release(self, job: J) -> None:
        self._held.pop((job.id, job.attempt), None)
        self._room.set()
        self._check_idle()

    # ---------------------------------------------------------------- flusher

    def _take(self, *, riders: bool | None) -> list[tuple[J, R]]:
        """Remove up to FLUSH_CHUNK pending outcomes to write: only riders (True), none of them (False), any."""
        if riders is None:
            taken = self._pending[:FLUSH_CHUNK]
            del self._pending[: len(taken)]
            return taken
        taken, kept = [], []
        for item in self._pending:
            if len(taken) < FLUSH_CHUNK and self._backend.rides_along(item[1]) == riders:
                taken.append(item)
            else:
                kept.append(item)
        self._pending = kept
        return taken

    def _written(self, batch: list[tuple[J, R]]) -> None:
        if not batch:
            return
        self._epoch += 1
        for job, _ in batch:
            self._held.pop((job.id, job.attempt), None)
        self._room.set()
        self._check_idle()

    def _ride_wait(self) -> float:
        """Seconds a rider may still wait for the next claim (0: write it now)."""
        if self._claiming:
            return RIDE_WINDOW
        return max(0.0, self._last_claim + RIDE_WINDOW - asyncio.get_running_loop().time())

    async def _flusher(self) -> None:
        while True:
            if not self._pending:
                if self._flusher_closing:
                    return
                self._flush_wanted.clear()
                await self._flush_wanted.wait()
                continue
            async with self._backend.write_session() as session:
                await self._flush_streak(session)

    async def _flush_streak(self, session: S) -> None:
        """Write outcomes on one connection while they keep coming."""
        while True:
            wait = 0.0 if self._flusher_closing else self._ride_wait()
            batch = self._take(riders=False if wait else None)
            if batch:
                await self._flush_batch(session, batch)
                continue
            if self._flusher_closing and not self._pending:
                return
            self._flush_wanted.clear()
            try:
                # riders left: give the next claim a moment to carry them; otherwise linger for more
                async with asyncio.timeout(wait if self._pending else SESSION_LINGER):
                    await self._flush_wanted.wait()
            except TimeoutError:
                if not self._pending:
                    return

    async def _flush_batch(self, session: S, batch: list[tuple[J, R]]) -> None:
        try:
            requeued = await self._backend.finish(session, [outcome for _, outcome in batch])
        except BaseException:
            self._pending[:0] = batch  # kept for the next try (the supervisor restarts us on errors)
            raise
        if requeued:
            self._wakeup.set()  # it may be due already, and it changes when the next job is due
        self._written(batch)

    # ---------------------------------------------------------------- heartbeat

    def _too_old(self, claimed_at: float | None, now: float) -> bool:
        limit = self._hold_unstarted
        return limit is not None and claimed_at is not None and now - claimed_at > limit

    def _hand_back_waiting(self) -> None:
        """Hand back the buffered jobs that waited longer than ``hold_unstarted``: no runner got to them."""
        now = asyncio.get_running_loop().time()
        if not any(self._too_old(at, now) for at in self._waiting.values()):
            return
        kept: list[J] = []
        old = 0
        while not self._buffer.empty():
            job = self._buffer.get_nowait()
            key = (job.id, job.attempt)
            if self._too_old(self._waiting.get(key), now):
                self._waiting.pop(key, None)
                self._record(job, self._backend.hand_back(job))
                old += 1
            else:
                kept.append(job)
        for job in kept:
            self._buffer.put_nowait(job)
        if old:
            self._stalled = True
            log.warning("queue_prefetch_handed_back", worker=self._name, jobs=old, running=len(self._running))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            self._hand_back_waiting()
            # not the buffered ones: a job nobody started must not be held here for ever
            jobs = [job for key, job in self._held.items() if key not in self._waiting]
            if not jobs:
                continue
            extended = await self._backend.extend(jobs)
            if extended < len(jobs):
                # normal for outcomes written meanwhile; otherwise another worker took a lease that expired
                log.debug("queue_leases_not_extended", worker=self._name, held=len(jobs), extended=extended)

    # ---------------------------------------------------------------- listener

    async def _listener(self) -> None:
        delay = RESTART_DELAY_MIN
        while True:
            try:
                listener = await self._backend.listen(self.wake)
            except errors.StorageError as exc:
                log.warning("queue_listen_failed", error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX) * random.uniform(0.8, 1.2)
                continue
            delay = RESTART_DELAY_MIN
            self._listening = True
            self._wakeup.set()  # catch up with anything enqueued while nobody listened
            try:
                await self._watch(listener)
            finally:
                self._listening = False
                await listener.close()
            log.warning("queue_listener_lost", worker=self._name)
            self._wakeup.set()

    async def _watch(self, listener: Listener) -> None:
        """Return when the LISTEN connection is lost (closed, or silent and not answering a ping)."""
        interval, timeout = self._listen_check
        how = await liveness.until_lost(listener, interval=interval, check_timeout=timeout)
        log.info("queue_listener_check", worker=self._name, how=how)
