"""The worker runtime against an in-memory backend: batching, supervision, listener reconnects, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
import structlog

from engine import errors
from engine.queue import worker as workermod

Outcome = tuple[str, int]


@dataclass(frozen=True)
class FakeJob:
    id: int
    attempt: int = 1


class FakeListener:
    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.closed = False

    async def ping(self) -> None:
        return None

    def terminate(self) -> None:
        self.closed = True

    async def close(self) -> None:
        self.closed = True


class FakeBackend:
    """Jobs in a deque; outcomes in a list. Failures are injected per method."""

    def __init__(self, jobs: int = 0) -> None:
        self.ready: deque[FakeJob] = deque(FakeJob(i) for i in range(jobs))
        self.claims: list[int] = []
        self.written: list[Outcome] = []
        self.writes: list[int] = []  # outcomes per finish() call
        self.rode: list[int] = []  # outcomes written by each claim()
        self.extended: list[int] = []  # jobs per extend() call
        self.extends = 0
        self.extend_errors: list[BaseException] = []
        self.always_fail_extend = False
        self.claim_errors: list[BaseException] = []
        self.finish_gate: asyncio.Event | None = None
        self.listen_errors: list[BaseException] = []
        self.listeners: list[FakeListener] = []
        self.run: Callable[[FakeJob], Awaitable[Outcome | None]] = self._done
        self.limit: float | None = None  # time_limit() of every job

    @staticmethod
    async def _done(job: FakeJob) -> Outcome:
        return ("done", job.id)

    @contextlib.asynccontextmanager
    async def claim_session(self, lane: int) -> AsyncIterator[str]:
        yield f"claim-conn-{lane}"

    @contextlib.asynccontextmanager
    async def write_session(self) -> AsyncIterator[str]:
        yield "write-conn"

    def rides_along(self, outcome: Outcome) -> bool:
        return outcome[0] == "done"

    async def claim(self, session: str, limit: int, done: Sequence[Outcome]) -> list[FakeJob]:
        if self.claim_errors:
            raise self.claim_errors.pop(0)
        self.claims.append(limit)
        self.written.extend(done)
        self.rode.append(len(done))
        taken = [self.ready.popleft() for _ in range(min(limit, len(self.ready)))]
        await asyncio.sleep(0)
        return taken

    async def execute(self, job: FakeJob) -> Outcome | None:
        return await self.run(job)

    def time_limit(self, job: FakeJob) -> float | None:
        return self.limit

    def timed_out(self, job: FakeJob, *, abandoned: bool) -> Outcome:
        return ("abandoned" if abandoned else "timed_out", job.id)

    def hand_back(self, job: FakeJob) -> Outcome:
        return ("handed_back", job.id)

    async def finish(self, session: str, outcomes: Sequence[Outcome]) -> bool:
        if self.finish_gate is not None:
            await self.finish_gate.wait()
        self.written.extend(outcomes)
        self.writes.append(len(outcomes))
        await asyncio.sleep(0.001)  # a round trip: outcomes pile up meanwhile
        return False

    async def extend(self, jobs: Sequence[FakeJob]) -> int:
        self.extends += 1
        self.extended.append(len(jobs))
        if self.always_fail_extend:
            raise RuntimeError("bug in extend")
        if self.extend_errors:
            raise self.extend_errors.pop(0)
        return len(jobs)

    async def next_due(self, session: str) -> float | None:
        return None

    async def has_ready(self) -> bool:
        return bool(self.ready)

    async def listen(self, on_notify: Callable[[], None]) -> FakeListener:
        if self.listen_errors:
            raise self.listen_errors.pop(0)
        listener = FakeListener()
        self.listeners.append(listener)
        return listener


def make_worker(
    backend: FakeBackend,
    *,
    concurrency: int = 4,
    batch_size: int = 10,
    heartbeat_interval: float = 0.01,
    shutdown_timeout: float = 1.0,
    listen: bool = False,
    hold_unstarted: float | None = None,
    cancel_grace: float = 5.0,
) -> workermod.Worker[FakeJob, Outcome, str]:
    return workermod.Worker(
        backend,
        name="w",
        concurrency=concurrency,
        batch_size=batch_size,
        heartbeat_interval=heartbeat_interval,
        poll_interval=0.05,
        shutdown_timeout=shutdown_timeout,
        listen=listen,
        hold_unstarted=hold_unstarted,
        cancel_grace=cancel_grace,
    )


async def eventually(check: Callable[[], bool], within: float = 3.0) -> None:
    """Poll ``check`` every 5 ms; fail the test after ``within`` seconds."""
    for _ in range(int(within / 0.005)):
        if check():
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"condition not met within {within} s")


async def test_drain_runs_everything_and_writes_each_outcome_once() -> None:
    """drain() runs every ready job, writes one outcome per job, and claims in batches of at most batch_size."""
    backend = FakeBackend(jobs=120)
    w = make_worker(backend)
    w.start()
    try:
        assert await w.drain(timeout=5) == 120
    finally:
        await w.stop()
    assert sorted(backend.written) == [("done", i) for i in range(120)]
    assert max(backend.claims) == 10
    assert len(backend.claims) < 30  # batches, not one claim per job
    assert len(backend.writes) + len(backend.claims) < 60  # outcomes written many per statement ...
    assert sum(backend.rode) > 0  # ... mostly riding along on the next claim


async def test_one_heartbeat_extends_every_running_job() -> None:
    """Each heartbeat is one call carrying every job whose handler runs; jobs still buffered (not started) are
    not extended: a job nobody started must not be held here for ever."""
    backend = FakeBackend(jobs=5)
    release = asyncio.Event()

    async def hold(job: FakeJob) -> Outcome:
        await release.wait()
        return ("done", job.id)

    backend.run = hold
    w = make_worker(backend, concurrency=3, batch_size=10)
    w.start()
    await eventually(lambda: len(backend.extended) >= 3)
    release.set()
    await w.stop()
    assert backend.extended[:3] == [3, 3, 3]  # the 3 running, in one statement each time; not the 2 buffered


async def test_tasks_are_named_and_owned() -> None:
    """Every background task carries a queue:<worker>:<role> name, and none is left after stop()."""
    w = make_worker(FakeBackend(), concurrency=2, listen=True)
    w.start()
    names = {t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("queue:")}
    assert names == {
        "queue:w:fetcher",
        "queue:w:fetcher-2",
        "queue:w:flusher",
        "queue:w:heartbeat",
        "queue:w:listener",
        "queue:w:runner-0",
        "queue:w:runner-1",
        "queue:w:runner-2",  # for a job aside (step_aside): concurrency + ASIDE_SHARE of it
        "queue:w:watchdog",
    }
    await w.stop()
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("queue:") and not t.done()]


async def test_crashed_side_task_is_logged_and_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat that raises a bug is logged with its traceback and restarted; the worker stays up."""
    monkeypatch.setattr(workermod, "RESTART_DELAY_MIN", 0.001)
    backend = FakeBackend(jobs=1)
    backend.extend_errors.append(RuntimeError("bug in extend"))
    release = asyncio.Event()

    async def hold(job: FakeJob) -> Outcome:
        await release.wait()
        return ("done", job.id)

    backend.run = hold
    w = make_worker(backend)
    with structlog.testing.capture_logs() as logs:
        w.start()
        await eventually(lambda: backend.extends >= 3)  # crashed once, then heartbeats again
        assert w.alive
        release.set()
        await w.stop()
    crashes = [e for e in logs if e["event"] == "queue_task_crashed"]
    assert [(e["task"], e["log_level"]) for e in crashes] == [("heartbeat", "error")]
    assert "exc_info" in crashes[0]


async def test_a_task_that_keeps_crashing_fails_the_worker_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """After MAX_CRASHES consecutive crashes the worker fails: alive turns False and drain() raises."""
    monkeypatch.setattr(workermod, "RESTART_DELAY_MIN", 0.001)
    backend = FakeBackend(jobs=1)
    backend.always_fail_extend = True
    release = asyncio.Event()

    async def hold(job: FakeJob) -> Outcome:
        await release.wait()
        return ("done", job.id)

    backend.run = hold
    w = make_worker(backend)
    with structlog.testing.capture_logs() as logs:
        w.start()
        await eventually(lambda: not w.alive)
        with pytest.raises(workermod.WorkerFailed):
            await w.drain(timeout=1)
        release.set()
        await w.stop()
    assert backend.extends == workermod.MAX_CRASHES
    assert any(e["event"] == "queue_worker_failed" and e["log_level"] == "critical" for e in logs)


async def test_storage_errors_are_retried_without_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A database outage (StorageError) is logged and retried with backoff, however long it lasts."""
    monkeypatch.setattr(workermod, "RESTART_DELAY_MIN", 0.001)
    backend = FakeBackend(jobs=5)
    backend.claim_errors = [
        errors.StorageError("database unreachable") for _ in range(workermod.MAX_CRASHES + 2)
    ]
    w = make_worker(backend)
    with structlog.testing.capture_logs() as logs:
        w.start()
        assert await w.drain(timeout=5) == 5
        assert w.alive
        await w.stop()
    warnings = [e for e in logs if e["event"] == "queue_task_storage_error"]
    assert len(warnings) == workermod.MAX_CRASHES + 2
    assert {e["task"] for e in warnings} == {"fetcher"}


async def test_stop_hands_back_buffered_and_running_jobs() -> None:
    """Jobs still running after shutdown_timeout are cancelled and handed back, like the ones never started."""
    backend = FakeBackend(jobs=6)
    started: list[int] = []
    cancelled: list[int] = []

    async def forever(job: FakeJob) -> Outcome:
        started.append(job.id)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(job.id)
            raise
        raise AssertionError("unreachable")

    backend.run = forever
    w = make_worker(backend, concurrency=2, batch_size=4, shutdown_timeout=0.05)
    w.start()
    await eventually(lambda: len(started) == 2)
    await asyncio.sleep(0.02)
    assert len(backend.ready) == 2  # 4 claimed: 2 running, 2 waiting in the buffer
    await w.stop()
    assert sorted(cancelled) == sorted(started)
    assert sorted(backend.written) == [("handed_back", i) for i in range(4)]
    assert not w.alive


async def test_heartbeat_runs_until_the_last_write() -> None:
    """During shutdown the heartbeat keeps extending leases while a job finishes; its outcome is then written."""
    backend = FakeBackend(jobs=1)
    entered = asyncio.Event()

    async def slow(job: FakeJob) -> Outcome:
        entered.set()
        await asyncio.sleep(0.3)
        return ("done", job.id)

    backend.run = slow
    w = make_worker(backend, heartbeat_interval=0.02, shutdown_timeout=5)
    w.start()
    await entered.wait()
    before = backend.extends
    await w.stop()
    assert backend.extends > before + 3
    assert backend.written == [("done", 0)]


async def test_final_write_survives_a_cancelled_stop() -> None:
    """If whoever awaits stop() is cancelled, the last outcomes are still written (the write is shielded)."""
    backend = FakeBackend(jobs=1)
    backend.finish_gate = asyncio.Event()
    w = make_worker(backend)
    w.start()
    await eventually(lambda: w.runs == 1)
    stopping = asyncio.create_task(w.stop())
    await asyncio.sleep(0.01)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    backend.finish_gate.set()
    await eventually(lambda: backend.written == [("done", 0)])
    await eventually(lambda: not [t for t in asyncio.all_tasks() if t.get_name().startswith("queue:w:")])


async def test_listener_reconnects_with_backoff() -> None:
    """A LISTEN connection that fails to open is retried, and a lost one is replaced (and closed)."""
    backend = FakeBackend()
    backend.listen_errors = [errors.StorageError("database unreachable")] * 2
    w = make_worker(backend, listen=True)
    with structlog.testing.capture_logs() as logs:
        w.start()
        await eventually(lambda: w.listening)
        first = backend.listeners[0]
        first.lost.set()
        await eventually(lambda: len(backend.listeners) == 2 and w.listening)
        await w.stop()
    assert first.closed and backend.listeners[1].closed
    events = [e["event"] for e in logs]
    assert events.count("queue_listen_failed") == 2
    assert events.count("queue_listener_lost") == 1


async def test_an_attempt_that_is_not_ours_is_released_without_a_write() -> None:
    """When execute() reports nothing to write (stale attempt), the job is released and nothing is written."""
    backend = FakeBackend(jobs=3)

    async def stale(job: FakeJob) -> Outcome | None:
        return None

    backend.run = stale
    w = make_worker(backend)
    w.start()
    try:
        assert await w.drain(timeout=5) == 3
    finally:
        await w.stop()
    assert backend.written == []


# ---------------------------------------------------------------------- hung handlers and prefetch


async def test_a_job_past_its_time_limit_is_cancelled_and_the_runner_goes_on() -> None:
    """A handler still running at its time limit is cancelled; its outcome is the backend's timed_out one,
    and the same runner takes the next job (its task is not left cancelled)."""
    backend = FakeBackend(jobs=3)
    backend.limit = 0.1
    cancelled: list[int] = []

    async def hang_first(job: FakeJob) -> Outcome:
        if job.id == 0:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(job.id)
                raise
        return ("done", job.id)

    backend.run = hang_first
    w = make_worker(backend, concurrency=1)
    w.start()
    try:
        assert await w.drain(timeout=5) == 3
    finally:
        await w.stop()
    assert cancelled == [0]
    assert sorted(backend.written) == [("done", 1), ("done", 2), ("timed_out", 0)]


async def test_a_handler_that_ignores_cancellation_is_abandoned_and_its_slot_refilled() -> None:
    """A handler that swallows its cancellation is left behind after cancel_grace: its attempt gets the
    abandoned outcome, a new runner takes the slot, and the old one writes nothing when it finally returns."""
    backend = FakeBackend(jobs=3)
    backend.limit = 0.1
    release = asyncio.Event()

    async def stubborn_first(job: FakeJob) -> Outcome:
        if job.id == 0:
            while not release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
        return ("done", job.id)

    backend.run = stubborn_first
    w = make_worker(backend, concurrency=1, cancel_grace=0.1)
    with structlog.testing.capture_logs() as logs:
        w.start()
        try:
            assert await w.drain(timeout=5) == 2  # the abandoned attempt is not counted as run
            release.set()  # the abandoned handler returns at last ...
            await asyncio.sleep(0.05)
        finally:
            await w.stop()
    assert sorted(backend.written) == [("abandoned", 0), ("done", 1), ("done", 2)]  # ... and writes nothing
    events = [e["event"] for e in logs]
    assert "queue_runner_abandoned" in events and "queue_abandoned_handler_returned" in events
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("queue:w:") and not t.done()]


async def test_jobs_waiting_behind_a_stuck_runner_are_handed_back_once() -> None:
    """Buffered jobs no runner started within hold_unstarted are handed back, their leases no longer extended;
    the worker does not claim them again while its only runner is stuck, and resumes when it is free."""
    backend = FakeBackend(jobs=4)
    release = asyncio.Event()

    async def stuck_first(job: FakeJob) -> Outcome:
        if job.id == 0:
            await release.wait()
        return ("done", job.id)

    backend.run = stuck_first
    w = make_worker(backend, concurrency=1, batch_size=4, heartbeat_interval=0.02, hold_unstarted=0.05)
    w.start()
    try:
        await eventually(
            lambda: sorted(backend.written) == [("handed_back", 1), ("handed_back", 2), ("handed_back", 3)]
        )
        claims = len(backend.claims)
        await asyncio.sleep(0.2)  # stalled: no claim while the runner is stuck (the jobs would wait again)
        assert len(backend.claims) == claims
        assert backend.extended and set(backend.extended[-3:]) == {1}  # only the running job is extended
        backend.ready.extend(FakeJob(i, attempt=2) for i in (1, 2, 3))  # back in the database
        release.set()
        assert await w.drain(timeout=5) >= 3
    finally:
        await w.stop()
    assert ("done", 0) in backend.written and backend.written.count(("done", 1)) == 1


async def test_slow_jobs_are_not_claimed_far_ahead_of_the_runners() -> None:
    """With jobs that take long compared with PREFETCH_HORIZON, the worker claims about one job per free
    runner instead of whole batches that would wait here while other workers could run them."""
    backend = FakeBackend(jobs=40)

    async def slow(job: FakeJob) -> Outcome:
        await asyncio.sleep(0.05)  # longer than PREFETCH_HORIZON: nothing ahead of the free runners
        return ("done", job.id)

    backend.run = slow
    w = make_worker(backend, concurrency=2, batch_size=20)
    w.start()
    try:
        assert await w.drain(timeout=10) == 40
    finally:
        await w.stop()
    assert backend.claims[0] == 20  # nothing known yet: a whole batch
    assert max(backend.claims[2:]) <= 4  # then free runners plus what they finish within the horizon


class ClaimTracker:
    """Wraps FakeBackend.claim with a round trip's wait; records the sessions used and the most claims in flight."""

    def __init__(self, backend: FakeBackend, round_trip: float = 0.005) -> None:
        self.original = backend.claim
        self.round_trip = round_trip
        self.in_flight = 0
        self.peak = 0
        self.sessions: set[str] = set()
        self.started_beside: list[bool] = []  # per claim: another claim was in flight when it was sent
        backend.claim = self.claim  # type: ignore[method-assign]

    async def claim(self, session: str, limit: int, done: Sequence[Outcome]) -> list[FakeJob]:
        self.started_beside.append(self.in_flight > 0)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.sessions.add(session)
        try:
            await asyncio.sleep(self.round_trip)
            return await self.original(session, limit, done)
        finally:
            self.in_flight -= 1


async def test_a_backlog_of_quick_jobs_has_two_claims_in_flight() -> None:
    """Quick jobs in a backlog: the second lane sends a claim while the fetcher's is in flight, each on its own
    session, so the runners do not wait a round trip per batch; every job runs once, every outcome written once
    (issue 14: one claim in flight at a time left the worker idle while PostgreSQL answered)."""
    backend = FakeBackend(jobs=400)
    tracker = ClaimTracker(backend)
    w = make_worker(backend, concurrency=4, batch_size=10)
    w.start()
    try:
        assert await w.drain(timeout=10) == 400
    finally:
        await w.stop()
    assert tracker.peak == 2 and tracker.sessions == {"claim-conn-0", "claim-conn-1"}
    assert sorted(backend.written) == [("done", i) for i in range(400)]
    assert max(backend.claims) == 10


async def test_jobs_arriving_one_at_a_time_use_one_claim_lane() -> None:
    """No backlog (each claim comes back short): the fetcher alone claims, one claim at a time, and the second
    lane's connection is never asked for."""
    backend = FakeBackend(jobs=0)
    tracker = ClaimTracker(backend)
    w = make_worker(backend, concurrency=4, batch_size=10)
    w.start()
    try:
        for i in range(5):
            backend.ready.append(FakeJob(i))
            w.wake()
            await eventually(lambda i=i: ("done", i) in backend.written)  # type: ignore[misc]
    finally:
        await w.stop()
    assert tracker.peak == 1 and tracker.sessions == {"claim-conn-0"}


async def test_the_second_lane_waits_for_the_run_time_of_the_first_jobs() -> None:
    """Slow jobs: nothing is claimed beside the first claim before a run time is known, and afterwards the two
    lanes together still claim no more than the free runners and the horizon allow."""
    backend = FakeBackend(jobs=40)
    tracker = ClaimTracker(backend, round_trip=0.01)

    async def slow(job: FakeJob) -> Outcome:
        await asyncio.sleep(0.05)
        return ("done", job.id)

    backend.run = slow
    w = make_worker(backend, concurrency=2, batch_size=20)
    w.start()
    try:
        assert await w.drain(timeout=10) == 40
    finally:
        await w.stop()
    assert backend.claims[0] == 20
    assert not tracker.started_beside[1]  # the first batch's run time was not known: no claim beside it
    assert max(backend.claims[1:]) <= 4


async def test_a_job_that_steps_aside_lets_the_next_one_start_and_the_limit_holds() -> None:
    """step_aside() gives the job's run permit to the next job while it waits (a batched write): with
    concurrency 2, jobs doing work stay at most 2 at a time, while jobs aside wait beside them (up to the
    runners there are: concurrency + ASIDE_SHARE of it)."""
    backend = FakeBackend(jobs=12)
    writes = asyncio.Event()
    working = 0
    most_working = 0
    aside = 0
    most_aside = 0

    async def work_then_wait(job: FakeJob) -> Outcome:
        nonlocal working, most_working, aside, most_aside
        working += 1
        most_working = max(most_working, working)
        await asyncio.sleep(0.005)  # the exchange's answer
        working -= 1
        workermod.step_aside()
        workermod.step_aside()  # a second call changes nothing
        aside += 1
        most_aside = max(most_aside, aside)
        await writes.wait()  # the batch's write, which needs no permit
        aside -= 1
        return ("done", job.id)

    backend.run = work_then_wait
    w = make_worker(backend, concurrency=2)
    w.start()
    try:
        spare = max(1, int(2 * workermod.ASIDE_SHARE))
        await eventually(lambda: aside == 2 + spare)  # every runner's job is aside: no runner left
        await asyncio.sleep(0.05)
        assert aside == 2 + spare and working == 0  # no more jobs started: all runners wait
        writes.set()
        assert await w.drain(timeout=5) >= 12 - (2 + spare)
    finally:
        await w.stop()
    assert most_working <= 2
    assert most_aside == 2 + spare
    assert sorted(backend.written) == [("done", i) for i in range(12)]


async def test_a_job_stepping_back_in_gets_the_next_permit_before_a_new_job() -> None:
    """step_in() after step_aside() waits for a permit, and gets the first one given back before a runner that
    has waited longer to start a new job (FIFO would give it to that runner); outside a runner both are
    no-ops."""
    workermod.step_aside()
    await workermod.step_in()  # no runner: nothing to do
    backend = FakeBackend(jobs=8)
    write_refused = asyncio.Event()
    release = {i: asyncio.Event() for i in range(8)}
    order: list[str] = []

    async def job_body(job: FakeJob) -> Outcome:
        order.append(f"{job.id} started")
        if job.id == 0:
            workermod.step_aside()  # job 4 starts meanwhile
            await write_refused.wait()
            await workermod.step_in()  # back in line: ahead of job 5, whose runner waits already
            order.append("0 back in")
            return ("done", job.id)
        await release[job.id].wait()
        order.append(f"{job.id} done")
        return ("done", job.id)

    backend.run = job_body
    w = make_worker(backend, concurrency=4)  # 4 permits, 6 runners
    w.start()
    try:
        await eventually(lambda: "4 started" in order)
        await eventually(lambda: w._starting == 1)  # job 5's runner waits for a permit
        write_refused.set()
        await asyncio.sleep(0.02)
        assert "0 back in" not in order  # every permit is held: job 0 waits
        release[1].set()
        await eventually(lambda: "0 back in" in order)
        for event in release.values():
            event.set()
        assert await w.drain(timeout=5) >= 1
    finally:
        await w.stop()
    assert order.index("1 done") < order.index("0 back in") < order.index("5 started")
    assert sorted(backend.written) == [("done", i) for i in range(8)]


async def test_a_permit_wait_cancelled_as_a_permit_is_given_back_is_a_clean_cancel() -> None:
    """A waiter cancelled in the same loop turn as a give() that skips it: it raises CancelledError (not an
    error of the line), and the permit goes to the next waiter."""
    permits = workermod._Permits(0)
    first = asyncio.ensure_future(permits.take())
    second = asyncio.ensure_future(permits.take())
    await asyncio.sleep(0)
    first.cancel()
    permits.give()  # skips the cancelled waiter, grants the second
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and results[1] is None
    permits.give()
    await asyncio.wait_for(permits.take(), 1)  # the permit given back is free


async def test_stop_hands_back_a_job_whose_runner_got_its_permit_during_the_shutdown() -> None:
    """A runner holding a job while it waits for a permit does not start it once stop() began: the job goes
    back to the queue."""
    backend = FakeBackend(jobs=2)
    release = asyncio.Event()
    started: list[int] = []

    async def held_first(job: FakeJob) -> Outcome:
        started.append(job.id)
        if job.id == 0:
            await release.wait()
        return ("done", job.id)

    backend.run = held_first
    w = make_worker(backend, concurrency=1, shutdown_timeout=5.0)  # 1 permit, 2 runners
    w.start()
    await eventually(lambda: started == [0] and w._starting == 1)
    stopping = asyncio.ensure_future(w.stop())
    await asyncio.sleep(0.02)
    release.set()  # job 0 ends: its permit goes to the runner holding job 1
    await asyncio.wait_for(stopping, 10)
    assert started == [0]
    assert sorted(backend.written) == [("done", 0), ("handed_back", 1)]
