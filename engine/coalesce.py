"""Group commit: calls that arrive while a batch is being sent wait and go together in the next one.

The hot path writes one statement per credential and per job (engine/hotpath.py). Under load most of the
database's and the engine's work per statement is fixed (a round trip, a wake-up of the server's backend, the
executor's start, a commit), not per row; a :class:`Coalescer` turns N concurrent calls into one call of
``send`` with N items, so that fixed work is paid once per batch.

How items are grouped, and what a caller waits for:

* An item submitted while fewer than ``max_in_flight`` batches are being sent starts a batch at once (after one
  turn of the event loop, so the items submitted in the same turn join it): with no load, an item waits for
  its own statement only, never for a timer.
* Items submitted while ``max_in_flight`` batches are in flight wait in line; when a batch ends, its sender
  takes everything waiting (up to ``max_batch``) as the next batch. The busier the database, the bigger the
  batches: the classic group commit.
* ``linger`` (seconds, default 0: never): under load, the sender waits that long before taking the next batch,
  so that it carries more items (fewer statements for the same work: PostgreSQL's ``commit_delay``). It waits
  only when the items that arrived since it took the last batch, at the rate they arrived, say at least one more
  will come meanwhile, and at least two items wait (as ``commit_siblings`` applies ``commit_delay`` only when
  other transactions are active). The first batch of a sender (the line was empty) never waits, nor a single
  waiting item, nor a batch after a quiet spell, so an item sent alone is not held back.
* ``fair_key`` (optional): items of different keys (owners) share each batch in turns, one item of each key that
  waits, round after round, the keys served longest ago first. Without it the line is first come, first served:
  one owner's thousand waiting items would put ten batches of 100 ahead of another owner's one; with it, that one
  goes in the next batch taken.
* ``send`` answers one result per item, in order: a value, or an exception for that item alone (the caller of
  that item gets it raised). When ``send`` itself raises, every item of the batch gets that exception.
* A caller cancelled while its item waits in line takes the item out; once its batch is being sent, the
  cancellation reaches the caller only (the batch goes on for the others), exactly as a statement that was
  sent may have been committed when its caller gave up.
* :meth:`close` refuses new items, fails the waiting ones with :class:`CoalescerClosed` and waits (bounded by
  ``timeout``) for the batches in flight; batches still running after that are cancelled and their callers
  get :class:`CoalescerClosed`.

Senders run in a fresh :mod:`contextvars` context, so a sender never counts as the caller's task (engine/db.py
marks a task that holds a pool connection in a context variable). Callers that may hold a pool connection
must refuse before submitting (``engine.db.refuse_second_connection``): waiting on a batch that needs another
connection could starve the pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

MAX_LINGER = 1.0  # seconds: a longer wait is a timer, not group commit

T = TypeVar("T")
R = TypeVar("R")


class CoalescerClosed(RuntimeError):
    """The coalescer was closed before the item's batch was written (nothing of it was sent, or the send was
    cut off by the close: the caller cannot know whether it was committed, as with a dropped connection)."""


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


@dataclass
class CoalescerStats:
    """Counters for tests, benchmarks and metrics."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it
    lingers: int = 0  # batches whose sender waited ``linger`` before taking them

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1


class Coalescer(Generic[T, R]):
    """Sends the items submitted concurrently in batches of at most ``max_batch``, at most ``max_in_flight``
    batches at a time, through ``send`` (which answers one outcome per item, in order)."""

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 100,
        max_in_flight: int = 1,
        linger: float = 0.0,
        fair_key: Callable[[T], Hashable] | None = None,
        name: str = "coalescer",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not 0.0 <= linger <= MAX_LINGER:
            raise ValueError(f"linger must be 0 to {MAX_LINGER} seconds")
        self._send = send
        self._linger = linger
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._name = name
        self._fair_key = fair_key
        # the line: one queue per key (one, under None, without fair_key), in the order the keys are served
        self._lines: dict[Hashable, deque[_Waiting[T, R]]] = {}
        self._waiting = 0
        self._senders: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats = CoalescerStats()

    @property
    def in_flight(self) -> int:
        """Batches being sent now."""
        return len(self._senders)

    @property
    def waiting(self) -> int:
        """Items waiting in line for a batch."""
        return self._waiting

    async def submit(self, item: T) -> R:
        """Send ``item`` with the others submitted meanwhile; its outcome (raised when an exception)."""
        if self._closed:
            raise CoalescerClosed(f"{self._name} is closed")
        loop = asyncio.get_running_loop()
        waiting: _Waiting[T, R] = _Waiting(item, loop.create_future())
        key = None if self._fair_key is None else self._fair_key(item)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
        line.append(waiting)
        self._waiting += 1
        if len(self._senders) < self._max_in_flight:
            sender = loop.create_task(self._run(), name=f"{self._name}-sender", context=contextvars.Context())
            self._senders.add(sender)  # _run takes itself out, in the same step as it sees the line empty
            # and this takes it out should it be cancelled before it ran at all
            sender.add_done_callback(self._sender_done)
        try:
            return await waiting.future
        except asyncio.CancelledError:
            if not waiting.future.done():
                waiting.future.cancel()  # still in line: the sender skips it
            raise

    async def _run(self) -> None:
        """Send batches until the line is empty."""
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0)  # the items of this turn of the loop join the first batch
            taken = -math.inf  # when this sender took its last batch: its first one never lingers
            while self._lines:
                if self._lingers(loop.time() - taken):
                    self.stats.lingers += 1
                    await asyncio.sleep(self._linger)
                taken = loop.time()
                batch = self._take()
                if batch:
                    await self._send_batch(batch)
        finally:
            # no await between seeing the line empty and leaving the set: a submit in between would otherwise
            # find every sender slot taken by a sender that is about to end, and wait forever
            if me is not None:
                self._senders.discard(me)
            # cancelled while items wait (the loop closing) and nobody left to send them
            if not self._senders:
                self._fail_line(CoalescerClosed(f"{self._name}: its sender was cancelled"))

    def _sender_done(self, sender: asyncio.Task[None]) -> None:
        """A sender cancelled before its first step never runs ``_run``'s ``finally``: without this its slot
        stays taken and every later item waits for ever."""
        if sender in self._senders:
            self._senders.discard(sender)
            if not self._senders:
                self._fail_line(CoalescerClosed(f"{self._name}: its sender was cancelled"))

    def _take(self) -> list[_Waiting[T, R]]:
        """The next batch: with one key waiting, its items in order; with several, one item of each in turn
        (a key that keeps items goes to the back of the turn order). Items whose caller left are dropped."""
        batch: list[_Waiting[T, R]] = []
        lines = self._lines
        room = self._max_batch
        while lines and len(batch) < room:
            if len(lines) == 1:
                key, line = next(iter(lines.items()))
                while line and len(batch) < room:
                    self._add(batch, line.popleft())
                if not line:
                    del lines[key]
                continue
            # one round, over no more keys than the batch has room for (a long line of owners is not copied)
            for key in list(itertools.islice(lines, room - len(batch))):
                line = lines.pop(key)
                self._add(batch, line.popleft())
                if line:
                    lines[key] = line  # to the back of the turn order
                if len(batch) == room:
                    break
        return batch

    def _add(self, batch: list[_Waiting[T, R]], waiting: _Waiting[T, R]) -> None:
        self._waiting -= 1
        if not waiting.future.done():  # else its caller left (cancelled)
            batch.append(waiting)

    def _lingers(self, since: float) -> bool:
        """Whether to wait ``linger`` before taking the next batch: it is not full, at least two items wait (one item
        is no sign of load, whatever its timing: ``commit_siblings``), and at the rate items arrived during the
        ``since`` seconds since this sender took its last batch, at least one more arrives meanwhile (rate x
        linger >= 1)."""
        waiting = self._waiting
        return self._linger > 0 and 1 < waiting < self._max_batch and waiting * self._linger >= since

    def _fail_line(self, error: BaseException) -> None:
        lines, self._lines, self._waiting = self._lines, {}, 0
        for line in lines.values():
            for waiting in line:
                if not waiting.future.done():
                    waiting.future.set_exception(error)

    async def _send_batch(self, batch: list[_Waiting[T, R]]) -> None:
        self.stats.record(len(batch))
        try:
            outcomes = await self._send([w.item for w in batch])
        except asyncio.CancelledError:
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(CoalescerClosed(f"{self._name} closed while the batch was sent"))
            raise
        except Exception as exc:  # the whole batch failed: every caller gets the error
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        if len(outcomes) != len(batch):
            error = RuntimeError(f"{self._name}: {len(outcomes)} outcomes for {len(batch)} items")
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(error)
            return
        for w, outcome in zip(batch, outcomes, strict=True):
            if w.future.done():
                continue  # its caller was cancelled while the batch was sent
            if isinstance(outcome, BaseException):
                w.future.set_exception(outcome)
            else:
                w.future.set_result(outcome)

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bound, not a deadline for the caller
        """Refuse new items, fail those waiting in line, wait at most ``timeout`` s for the batches in flight."""
        self._closed = True
        self._fail_line(CoalescerClosed(f"{self._name} is closed"))
        senders = set(self._senders)
        if not senders:
            return
        _done, pending = await asyncio.wait(senders, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
