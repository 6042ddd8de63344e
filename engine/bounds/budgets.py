"""Per-IP venue budgets shared by every engine process of one egress IP, through PostgreSQL.

Binance counts request weight per IP (6,000 a minute on ``/api``, docs/venues.md §1.6) and Bybit counts 600
requests per 5 s per IP (§3.6). Each process keeps its own token buckets (``venues.limits``), exact for that
process; four worker processes behind one egress IP would still spend four times as much at the venue. The
processes of one *egress group* (``EngineConfig.egress_group``, ``ENGINE_EGRESS_GROUP``: the processes that
leave through the same public IP) therefore draw on one budget row per (group, budget) in PostgreSQL
(``venue_budgets``, the function ``venue_budget_take`` in schema.sql). :class:`SharedBudgets` is what the engine
hands its probes as their :class:`venues.limits.IpBudgets`.

**The counter.** A venue's window of W seconds is watched as ``SLOTS`` + 1 slots of W x (1 + ``MARGIN``) /
``SLOTS`` seconds each, cut by the *database* clock. A grant is made only while the slots of the last window
hold at most the budget's allowance (its documented limit x its share, half by default). Any W seconds at the
venue, widened by the margin for the time a request takes to arrive, overlap at most ``SLOTS`` + 1 slots, and
each grant is spent before its slot ends: so the venue never sees more than the allowance in any window,
whether it counts in sliding windows (as the simulator does) or in calendar minutes (Binance).

**Why PostgreSQL and not "budget / N live processes".** Dividing by N costs nothing per request, but a busy
process gets only 1/N while the others sit idle, and while N changes (a process starts or dies) the shares add
up to more than the budget until everyone has counted again. The counter gives the whole allowance to whoever
needs it and stays exact when processes come and go, for one short statement (one row lock) per chunk of
tokens: a process asks for what it will spend until the slot ends at the pace of the last slot, at most 1/20
of the allowance, so Bybit's 300-request allowance costs a few statements a second per busy process,
Binance's fewer.

**What can go wrong, and what happens then.**

* A process dies holding tokens: they are counted and lost for the rest of their slot (a fraction of a
  second for Bybit, 6.6 s for Binance), never more than one chunk per budget. Nothing to reclaim.
* Clock skew between processes does not matter: slots are cut by the database's clock, and a grant expires on
  the process's monotonic clock ``ends_in`` seconds (as the database said) after the request for it was sent,
  so before the slot really ends. A database clock that steps back keeps counting in its newest slot (stricter).
* The database is out of reach (a statement fails or takes longer than ``take_timeout``): the process falls
  back to spending at most allowance / N on its own, N being the live processes of its group counted last
  (``venue_budget_processes``, refreshed every ``beat_interval``), and its own spending of the whole window
  counts against that. It never falls back to unlimited. It asks the database again after
  ``RETRY_DATABASE`` seconds and charges the budget with what it spent on its own meanwhile. If only some
  processes lose the database, the others may still spend the whole allowance: at worst twice the allowance,
  which the default share (half) keeps within the venue's limit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import structlog

from engine import db as dbmod
from engine import errors
from venues.limits import IpBudget

log = structlog.get_logger("engine.budgets")

SLOTS = 10  # slots per venue window (the database keeps SLOTS + 1: a window overlaps that many)
MARGIN = 0.10  # the window is widened by this much: requests reach the venue a little after they leave
CHUNK = 1 / (2 * SLOTS)  # the largest grant asked for at once, as a fraction of the allowance
BEAT_INTERVAL = 5.0  # seconds between refreshes of this process's row (the live count of its group)
LIVE_BEATS = 2  # a process seen within this many beat intervals is live
TAKE_TIMEOUT = 2.0  # seconds one database take may last before the process falls back on its own share
RETRY_DATABASE = 1.0  # seconds spent on the fallback before the database is asked again

_UNREACHABLE = (errors.StorageError, errors.EngineClosed, errors.PoolReentry, TimeoutError)


def slot_seconds(budget: IpBudget) -> float:
    """The length of one slot of ``budget``'s window."""
    return budget.seconds * (1 + MARGIN) / SLOTS


@dataclass
class _Lane:
    """One budget in this process: the tokens granted and not spent yet, and what this process spent lately."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: callers are served in arrival order
    tokens: float = 0.0
    slot: int = -1  # the database slot the tokens were granted in
    expires: float = 0.0  # monotonic: the granted tokens are void from then on
    spent: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    spent_total: float = 0.0  # the sum of ``spent``
    unreported: float = 0.0  # spent on the fallback, not charged to the database yet
    retry_at: float = 0.0  # monotonic: before it, the database is not asked (fallback)

    def forget(self, before: float) -> None:
        while self.spent and self.spent[0][0] <= before:
            self.spent_total -= self.spent.popleft()[1]

    def spend(self, now: float, cost: float) -> None:
        self.spent.append((now, cost))
        self.spent_total += cost

    def spent_since(self, since: float) -> float:
        return sum(cost for at, cost in reversed(self.spent) if at > since)

    def local_wait(self, now: float, cost: float, allowance: float, window: float) -> float:
        """Seconds until ``cost`` fits within ``allowance`` of this process's spending in any ``window``."""
        if self.spent_total + cost <= allowance:
            return 0.0
        left = self.spent_total
        for at, spent in self.spent:  # oldest first: when enough has left the window
            left -= spent
            if left + cost <= allowance:
                return max(0.001, at + window - now)
        return window


class SharedBudgets:
    """The engine's :class:`venues.limits.IpBudgets`: per-IP budgets shared through PostgreSQL by the processes
    of egress group ``group`` (see the module docstring). ``start`` before use, ``stop`` when done."""

    def __init__(
        self,
        db: dbmod.Database,
        *,
        group: str,
        beat_interval: float = BEAT_INTERVAL,
        take_timeout: float = TAKE_TIMEOUT,
    ) -> None:
        self.db = db
        self.group = group
        self.beat_interval = beat_interval
        self.take_timeout = take_timeout
        self.process_id = f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.processes = 1  # live processes of the group, this one included (1 until counted)
        # counters for tests and /metrics-like reading: database takes, tokens granted, fallback spending, waits
        self.stats: collections.Counter[str] = collections.Counter()
        self._lanes: dict[str, _Lane] = {}
        self._task: asyncio.Task[None] | None = None
        self._unreachable = False

    # ---- the live count of the group --------------------------------------------------------------------

    async def beat(self) -> int:
        """Refresh this process's row and count the group's live processes (kept as is when it fails)."""
        try:
            async with asyncio.timeout(self.take_timeout):
                others = await self.db.fetchval(
                    "budget_process_beat", self.process_id, self.group, self.beat_interval * LIVE_BEATS
                )
        except _UNREACHABLE as exc:
            self._report_unreachable(exc)
            return self.processes
        self.processes = 1 + int(others)
        return self.processes

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._beats(), name="venue-budget-heartbeat")

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(self.beat_interval)
            await self.beat()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*_UNREACHABLE):
            async with asyncio.timeout(self.take_timeout):
                await self.db.execute("budget_process_gone", self.process_id)

    # ---- taking ---------------------------------------------------------------------------------------------

    async def take(self, budget: IpBudget, cost: float) -> None:
        """Wait until ``cost`` of ``budget`` is this process's to spend, and spend it (send at once)."""
        lane = self._lanes.get(budget.name)
        if lane is None:
            lane = self._lanes[budget.name] = _Lane()
        window = budget.seconds * (1 + MARGIN)
        need = min(cost, budget.allowance)  # a call dearer than the whole allowance goes alone
        async with lane.lock:
            while True:
                now = time.monotonic()
                lane.forget(now - window)
                if lane.tokens >= need and now < lane.expires:
                    lane.tokens -= need
                    lane.spend(now, cost)
                    return
                if now >= lane.retry_at:
                    answer = await self._ask(lane, budget, need, now)
                    if answer is not None:
                        granted, slot, valid_until = answer
                        # what is left of an earlier grant stays good within its own slot only
                        lane.tokens = granted + (lane.tokens if slot == lane.slot else 0.0)
                        lane.slot, lane.expires = slot, valid_until
                        if granted == 0:  # the window is full: ask again when this slot is over
                            self.stats["waits"] += 1
                            await asyncio.sleep(max(0.001, valid_until - time.monotonic()) + 0.001)
                        continue
                # the database is out of reach: this process's share, 1/N of the allowance, counted locally
                share = budget.allowance / max(1, self.processes)
                need_local = min(need, share)
                wait = lane.local_wait(now, need_local, share, window)
                if wait <= 0:
                    lane.spend(now, cost)
                    lane.unreported += cost
                    self.stats["fallback_spent"] += int(cost)
                    return
                self.stats["waits"] += 1
                await asyncio.sleep(max(0.001, min(wait, lane.retry_at - now)))

    async def _ask(
        self, lane: _Lane, budget: IpBudget, need: float, now: float
    ) -> tuple[float, int, float] | None:
        """One database take: (tokens granted, their slot, monotonic time they lapse), or None when it failed."""
        seconds = slot_seconds(budget)
        # what this process will spend before the slot ends, at the pace of the last slot: a grant left over
        # when its slot ends is lost, so ask for the rest of this slot only (its end: from the last grant's)
        rest = (lane.expires - now) % seconds if lane.expires > 0 else seconds
        pace = lane.spent_since(now - seconds) / seconds
        want = max(need, min(pace * (rest or seconds), budget.allowance * CHUNK))
        charge = lane.unreported
        sent = time.monotonic()
        try:
            async with asyncio.timeout(self.take_timeout):
                row = await self.db.fetchrow(
                    "budget_take",
                    self.group,
                    budget.name,
                    seconds,
                    SLOTS + 1,
                    budget.allowance,
                    want,
                    need,
                    lane.tokens if now < lane.expires else 0.0,
                    lane.slot,
                    charge,
                )
        except _UNREACHABLE as exc:
            lane.retry_at = time.monotonic() + RETRY_DATABASE
            self._report_unreachable(exc)
            return None
        assert row is not None
        if self._unreachable:
            self._unreachable = False
            log.info("venue_budgets_reachable", group=self.group)
        lane.unreported -= charge
        self.stats["database_takes"] += 1
        granted = float(row["granted"])
        self.stats["granted"] += int(granted)
        # the slot ends ends_in seconds after the database read its clock, which was after ``sent``
        return granted, int(row["slot_index"]), sent + float(row["ends_in"])

    def _report_unreachable(self, exc: BaseException) -> None:
        if not self._unreachable:  # once per outage
            log.warning(
                "venue_budgets_unreachable",
                group=self.group,
                error=type(exc).__name__,
                processes=self.processes,
                fallback="each process spends 1/processes of every per-IP budget on its own",
            )
        self._unreachable = True
