"""Concurrent creations written in batches: one statement for every ``create_credential`` that arrives while
another batch is being written (group commit, :mod:`engine.coalesce`).

Each creation alone is one statement, ``created_and_enqueued`` (:func:`engine.hotpath.create_one`). Under load
most of its cost is fixed per statement; :class:`BatchedCreates` hands the creations made concurrently to a
:class:`engine.coalesce.Coalescer`, which sends them as one ``created_in_batch`` (queries.sql), and gives every
caller exactly what the single statement would have answered had the batch's items run one after another in
the order the batch takes them: each owner's in the order they were submitted, the owners in turns (so one
owner's flood of creations puts no batch ahead of another owner's; ``fair_key`` in engine/coalesce.py):

* **created**: the credential as written (its public row, with the statement's timestamps), its
  ``credential.created`` and its verification job, whose start tag follows the owner's jobs queued before it,
  the earlier ones of the batch included (queue.sql's ``enqueue_job`` applied once per job, in order);
* **QuotaExceeded**: the owner's quota counts its credentials committed before the batch took the owner's lock
  and the items of that owner earlier in the batch that are stored (the first submitted win);
* **DuplicateCredential**: the owner holds these keys already, or an earlier item of the batch carries them;
* **None** (a webhook endpoint of the owner wants ``credential.created``): nothing written; the caller takes the
  transaction path, whose fan-out writes the deliveries.

The batch never waits for an owner's quota lock (``ce_credential_rooms``, schema.sql, tries them): an owner
whose lock is held elsewhere (another process's creation, a mint, the transaction path) is **busy**, nothing
of its items is written, and their callers send them alone, each waiting for that lock at most
``lock_timeout`` like any single create. So one owner's held lock never holds up another owner's creations
(a tenant cannot slow the others down through its own lock), and batches cannot deadlock over locks they wait
for. One NOTIFY per channel and batch. Items of one owner that come back busy race, alone, with that owner's
items in the next batch (the turns can split an owner's items over batches): the quota is never exceeded, but
which of them takes an owner's last place is then not the first submitted.

**Fallback.** The statement is all or nothing. When it fails as a whole (:class:`errors.StorageError`: keys that
another transaction stores meanwhile, a lock not granted in time, a deadlock with another transaction's inserts
of the same keys, a statement timeout, a dropped connection), nothing of it was written, and every item is sent
again alone (:func:`engine.hotpath.create_one`) by its caller's own task, bounded like any single create (the
next batch does not wait for them), which answers each case as without batches: the racing key becomes that
caller's ``DuplicateCredential``, the others are created. A batch that a dropped connection committed after
all makes its items' second statements fail on the credential ids they already hold: a ``StorageError`` for
those callers, nothing stored twice. A pool that had no connection to give (:class:`engine.db.PoolExhausted`)
is every caller's answer, not retried.

Callers that hold a pool connection are refused before they submit (:class:`errors.PoolReentry`): the batch's
statement needs a connection of its own. :meth:`BatchedCreates.close` (the engine's close) refuses new
creations and waits a bounded time for the batch in flight; a caller whose batch was cut off gets
:class:`errors.EngineClosed` (its credential may or may not be stored, as with a dropped connection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine import db as dbmod
from engine import errors, events, hotpath
from engine import queue as queuemod
from engine.bounds import quotas
from engine.coalesce import Coalescer, CoalescerClosed, CoalescerStats
from engine.models import Credential
from engine.payloads import Verify
from engine.store import Store, credential_from_row

MAX_BATCH = 100  # creations per statement: a batch's arrays stay small (~1 KiB per item), its locks few
# created_in_batch's outcomes
CREATED, QUOTA, WANTED, DUPLICATE, BUSY = "created", "quota", "wanted", "duplicate", "busy"


def duplicate(new: hotpath.Creation) -> errors.DuplicateCredential:
    """The error of a creation whose keys the owner holds: what ``refused_keys`` (engine/store.py) makes of the
    single statement's unique violation."""
    return errors.DuplicateCredential(
        f"a credential with this API key already exists for this owner on {new.venue.value}", field="apiKey"
    )


class _Alone:
    """A batch's answer for an item that its caller sends again alone (the batch failed as a whole)."""


ALONE = _Alone()
Outcome = Credential | _Alone | BaseException | None  # a batch's answer for one item


def _owner_of(new: hotpath.Creation) -> str:
    return new.owner_id


class BatchedCreates:
    """``create_one`` for concurrent callers, written ``max_batch`` at a time in one statement."""

    def __init__(
        self,
        store: Store,
        queue: queuemod.JobQueue,
        *,
        quota: int | None,
        lock_timeout: str,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._store = store
        self._queue = queue
        self._quota = quota
        self._lock_timeout = lock_timeout
        self._coalescer: Coalescer[hotpath.Creation, Credential | _Alone | None] = Coalescer(
            self._send, max_batch=max_batch, fair_key=_owner_of, name="creates"
        )  # owners take turns in each batch: one owner's flood puts no batches ahead of another's creation
        self.fallbacks = 0  # batches that failed as a whole, whose items were sent again one at a time

    @property
    def stats(self) -> CoalescerStats:
        """How many batches, of which sizes (tests, benchmarks)."""
        return self._coalescer.stats

    async def create(self, new: hotpath.Creation) -> Credential | None:
        """Store ``new`` with the creations submitted meanwhile: :func:`engine.hotpath.create_one`'s answer."""
        if dbmod.holds_pool_connection():
            raise errors.PoolReentry(
                "this task holds a pool connection (an open transaction) and asked to create a credential, "
                "whose statement needs a connection of its own"
            )
        try:
            outcome = await self._coalescer.submit(new)
        except CoalescerClosed:
            raise errors.EngineClosed(
                "the engine closed before the credential's creation was confirmed; it may or may not be stored"
            ) from None
        if isinstance(outcome, _Alone):  # in the caller's task: the next batch need not wait for it
            return await self._alone(new)
        return outcome

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a deadline for the caller
        """Refuse new creations; wait at most ``timeout`` s for the batch being written, then cut it off."""
        await self._coalescer.close(timeout=timeout)

    async def _alone(self, new: hotpath.Creation) -> Credential | None:
        return await hotpath.create_one(
            self._store, self._queue, new, quota=self._quota, lock_timeout=self._lock_timeout
        )

    async def _send(self, batch: list[hotpath.Creation]) -> Sequence[Outcome]:
        if len(batch) == 1:  # the single statement is the batch of one, and cheaper to plan
            try:
                return [await self._alone(batch[0])]
            except errors.CredentialEngineError as exc:
                return [exc]
        try:
            rows = await self._store.db.fetch("created_in_batch", *self._arguments(batch))
        except dbmod.PoolExhausted:
            raise
        except errors.StorageError:  # the whole statement failed, nothing written: each item alone
            self.fallbacks += 1
            return [ALONE] * len(batch)
        return [self._outcome(new, row) for new, row in zip(batch, rows, strict=True)]

    def _arguments(self, batch: list[hotpath.Creation]) -> tuple[Any, ...]:
        settings = self._queue.settings
        return (
            [n.credential_id for n in batch], [n.owner_id for n in batch], [n.venue.value for n in batch],
            [n.credential_type.value for n in batch], [n.nickname for n in batch],
            [n.masked_api_key for n in batch], [n.kek_version for n in batch], [n.wrapped_dek for n in batch],
            [n.nonce for n in batch], [n.ciphertext for n in batch], [n.fingerprint for n in batch],
            self._quota, self._lock_timeout, [n.event_id for n in batch], [n.data for n in batch],
            events.CHANNEL, Verify.KIND, [n.payload for n in batch], [n.dedupe_key for n in batch],
            settings.max_attempts, settings.channel,
        )  # fmt: skip

    def _outcome(self, new: hotpath.Creation, row: dbmod.Record) -> Outcome:
        outcome = row["outcome"]
        if outcome == CREATED:
            return credential_from_row(row)
        if outcome == WANTED:
            return None
        if outcome == DUPLICATE:
            return duplicate(new)
        if outcome == BUSY:  # the owner's quota lock is held elsewhere: its caller waits for it alone
            return ALONE
        assert outcome == QUOTA and self._quota is not None  # only a quota refuses for room
        return quotas.credentials_full(self._quota)
