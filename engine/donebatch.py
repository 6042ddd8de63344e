"""Successful verifications written in batches: concurrent calls of the verification's hot path
(:func:`engine.hotpath.verified_and_done`) go through one :class:`engine.coalesce.Coalescer` and are written by one
statement per batch (``verified_and_done_batch`` in queries.sql), with exactly the single statement's outcome for
each of them.

Each verification of a batch ends as the single statement would end it:

* **written**: the credential, its event and its job's completion, as ``verified_and_done`` writes them (True);
* **refused**: nothing written for it (False: the caller takes the transaction path), when a fence of
  ``verified_and_done`` refuses it or a webhook endpoint of the owner wants its event type;
* **attempt lost**: nothing written for it, :class:`engine.queue.StaleAttempt` raised to its caller alone (where
  the single statement's SQLSTATE CE409 undoes the statement, the batch answers per row).

Another transaction holding the credential's row (a revoke, a rotation, an operator's session) or the job's row
(the queue's heartbeat) at that instant makes the batch skip the verification rather than wait (False: the
transaction path waits for the row, alone, and decides). One batch is in flight per process, so a batch that
waited for one held row would hold up every other owner's verifications behind it.

The order of the events (engine/events.py: one credential's events are ordered by the transaction ids of their
writers, which lock the credential row first) holds for every credential of a batch: the batch's items are sorted
by credential id and locked in that order, the first lock being the transaction's first write, and each later
lock is fenced on the event sequence the job read before its probe, so another transaction that reported on the
credential meanwhile makes the batch refuse it instead of writing after it with an older transaction id. A
credential that appears twice in one batch (two attempts of its jobs at once) goes in the batch once; the other
items of that credential are written one by one after it, as the single statements would have been.

Deadlocks: a batch waits for no row lock at all (credential and job rows held elsewhere are skipped), and its
writes touch rows it holds, so no cycle can include a batch. Should PostgreSQL report one all the same (SQLSTATE
40P01), or should the batch's statement fail for any other reason (a table lock, a timeout, a lost connection),
every verification of the batch is written again one statement each (:func:`engine.hotpath.verified_and_done`),
which handles every case as the single path does; a pool with no connection to give is the answer of the items
left too, rather than having each wait for its own acquire bound in turn (any other error is that item's own). A
batch of one is that single statement.

A task that holds a pool connection is refused at once (:class:`engine.errors.PoolReentry`): its batch needs a
connection of its own. Every wait is bounded: the statement by the pool's ``command_timeout``, a caller by its
job's timeout; :meth:`DoneBatch.close` waits at most its ``timeout`` for the batches in flight.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from engine import db as dbmod
from engine import errors, events, hotpath, lifecycle
from engine import queue as queuemod
from engine.coalesce import Coalescer, CoalescerStats
from engine.models import Credential
from venues.base import ProbeResult

log = structlog.get_logger("engine.donebatch")

MAX_BATCH = 100  # verifications written by one statement at most
MAX_IN_FLIGHT = 1  # batch statements sent side by side: one (measured: bigger batches, less CPU than two)
# Under load the sender waits this long for more verifications before taking a batch (engine/coalesce.py: only
# when two or more wait and their arrival rate says more will come; never for a verification alone). The wait
# costs no run permit (the jobs have stepped aside: engine/queue/worker.py). Measured with bench/lifecycle.py's
# create phase: batches of ~7 -> ~11, PostgreSQL CPU per 1,000 credentials 0.34 -> 0.30 s.
LINGER = 0.005
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the batches in flight


@dataclass(frozen=True)
class Verified:
    """One successful verification to write: what :func:`engine.hotpath.verified_and_done` takes."""

    job: queuemod.Job
    cred: Credential
    version: int
    result: ProbeResult
    warnings: tuple[str, ...]
    sequence: int


@dataclass
class Outcomes:
    """How the batched verifications ended, for tests, benchmarks and metrics."""

    written: int = 0
    refused: int = 0
    busy: int = 0
    lost: int = 0
    repeated: int = 0  # a credential's second item in one batch, written alone after it
    fallbacks: int = 0  # batches whose statement failed, written one statement per item

    def add(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)


def item_of(v: Verified) -> dict[str, Any]:
    """``v`` as one element of ``verified_and_done_batch``'s JSON array (the single statement's arguments)."""
    event_type, data = hotpath.event_of(v.cred, v.result, v.warnings)
    return {
        "id": str(v.cred.credential_id),
        "version": v.version,
        "identities": sorted(v.result.identities),
        "permissions": v.result.permissions.as_dict(),
        "account": v.result.venue_account_id,
        "environment": v.result.environment,
        "warnings": list(v.warnings),
        "seq": v.sequence,
        "owner": v.cred.owner_id,
        "event": str(uuid.uuid4()),
        "type": event_type,
        "data": data,
        "job": v.job.id,
        "attempt": v.job.attempt,
    }


class DoneBatch:
    """Writes the successful verifications submitted concurrently through :meth:`write`, one statement per
    batch (at most ``max_batch`` each, at most ``max_in_flight`` batches at a time)."""

    def __init__(
        self,
        db: dbmod.Database,
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
        linger: float = LINGER,
    ) -> None:
        self._db = db
        self._sources = lifecycle.sources("verify_succeeded")
        self._coalescer: Coalescer[Verified, bool] = Coalescer(
            self._send,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            linger=linger,
            name="verified_and_done",
        )
        self.outcomes = Outcomes()

    @property
    def stats(self) -> CoalescerStats:
        """The coalescer's counters (batches, items, batch sizes)."""
        return self._coalescer.stats

    async def write(
        self,
        job: queuemod.Job,
        cred: Credential,
        version: int,
        result: ProbeResult,
        warnings: tuple[str, ...],
        sequence: int,
    ) -> bool:
        """What :func:`engine.hotpath.verified_and_done` answers for these arguments (True: written; False:
        refused, nothing written; :class:`engine.queue.StaleAttempt`: the attempt lost its job, nothing
        written), written together with the verifications submitted meanwhile."""
        if dbmod.holds_pool_connection():
            raise errors.PoolReentry(
                "this task holds a pool connection (an open transaction) and submitted a verification whose "
                "batch needs another one"
            )
        return await self._coalescer.submit(Verified(job, cred, version, result, warnings, sequence))

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:  # noqa: ASYNC109 - a bound, not a deadline
        """Refuse new verifications and wait at most ``timeout`` s for the batches in flight (their callers get
        :class:`engine.coalesce.CoalescerClosed` past it)."""
        await self._coalescer.close(timeout)

    async def _send(self, batch: list[Verified]) -> Sequence[bool | BaseException]:
        outcomes: list[bool | BaseException | None] = [None] * len(batch)
        order = sorted(range(len(batch)), key=lambda k: batch[k].cred.credential_id.int)
        first: list[int] = []
        again: list[int] = []
        seen: set[uuid.UUID] = set()
        for k in order:
            cid = batch[k].cred.credential_id
            (again if cid in seen else first).append(k)
            seen.add(cid)
        if len(first) == 1:
            outcomes[first[0]] = await self._one(batch[first[0]])
        else:
            await self._many(batch, first, outcomes)
        for k in again:  # after the batch, as the single statements would have waited for it
            self.outcomes.repeated += 1
            outcomes[k] = await self._one(batch[k])
        return [o if o is not None else RuntimeError("no outcome") for o in outcomes]

    async def _many(
        self, batch: list[Verified], first: list[int], outcomes: list[bool | BaseException | None]
    ) -> None:
        """Write the items ``first`` (distinct credentials, in id order) in one statement; when it fails, one
        statement each."""
        try:
            rows = await self._db.fetch(
                "verified_and_done_batch", [item_of(batch[k]) for k in first], self._sources, events.CHANNEL
            )
        except errors.StorageError as exc:  # a deadlock reported, a timeout, a lost connection: one by one
            self.outcomes.fallbacks += 1
            log.warning("verified_batch_fallback", size=len(first), error=str(exc))
            failed: BaseException | None = None
            for k in first:
                # a pool that has no connection to give is every item's answer (rather than each waiting for its
                # own acquire bound in turn); any other error is that item's own (its row, its data)
                outcome = failed if failed is not None else await self._one(batch[k])
                outcomes[k] = outcome
                if isinstance(outcome, dbmod.PoolExhausted):
                    failed = outcome
            return
        if len(rows) != len(first):
            raise RuntimeError(f"verified_and_done_batch: {len(rows)} rows for {len(first)} items")
        for row in rows:
            k = first[row["i"] - 1]
            outcome = row["outcome"]
            self.outcomes.add(outcome)
            if outcome == "written":
                outcomes[k] = True
            elif outcome == "lost":
                outcomes[k] = queuemod.StaleAttempt(batch[k].job.id, batch[k].job.attempt)
            else:  # refused, busy
                outcomes[k] = False

    async def _one(self, v: Verified) -> bool | BaseException:
        """The single statement's outcome for ``v`` (an exception as a value: it is that caller's alone)."""
        try:
            written = await hotpath.verified_and_done(
                self._db, v.job, v.cred, v.version, v.result, v.warnings, v.sequence
            )
        except queuemod.StaleAttempt as exc:
            self.outcomes.add("lost")
            return exc
        except Exception as exc:
            return exc
        self.outcomes.add("written" if written else "refused")
        return written
