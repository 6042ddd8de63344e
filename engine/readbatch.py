"""The verification jobs' credential reads, many in one statement (group commit through engine/coalesce.py).

Every verification job (``verify``, ``rotation_verify``) reads its credential and the secret version it probes
before it probes. Most read nothing here: the engine's queue claims them with ``claim_jobs_reading_credentials``,
which reads each one's credential in the claim statement itself (:meth:`engine.store.Store.read_with_claim`).
The others (a job claimed by a queue without that statement, a claim row that read nothing) come here:
:class:`CredentialReads` hands each read to a :class:`engine.coalesce.Coalescer`, which sends the reads of one
turn of the event loop together and gathers those that arrive while batches are in flight into the next one. A
batch is one statement (``get_credentials_with_secrets``: a credential with the columns of one secret version,
for many ``(credential id, secret version)`` pairs) instead of one statement, one pool acquire and one round trip
per read. With no load a read still waits for its own statement only, never for a timer.

Guarantees kept from the single read:

* **Bounds**: the batch's statement runs under the pool's acquire bound and the statement timeout
  (engine/db.py); a read waits for at most ``max_in_flight`` batches before its own, each so bounded.
* **No second connection**: a task that holds a pool connection (an open transaction) is refused at once
  (:class:`engine.errors.PoolReentry`), as by :meth:`engine.db.Database.fetch`: it must not wait on a batch
  that needs another pool connection.
* **Errors**: a failed statement fails every read of its batch with the same typed storage error; the next
  reads form a new batch.
* **Cancellation**: a read cancelled while it waits in line leaves the batch; cancelled while its batch is sent,
  the batch goes on for the others. Closing (:meth:`close`) fails the reads waiting in line and cuts off the
  batches still running after its bound with :class:`engine.coalesce.CoalescerClosed`, so no read waits forever.
"""

from __future__ import annotations

import uuid

from engine import db as dbmod
from engine.coalesce import Coalescer, CoalescerStats
from engine.db import Database, Record

MAX_BATCH = 100  # pairs per statement
# batches sent at once: a backlog's reads gather while these are in flight; more than one, so that the reads of
# one claim do not wait in line behind the statement of the claim before it (each batch takes a pool connection)
MAX_IN_FLIGHT = 2

Pair = tuple[uuid.UUID, int]


class CredentialReads:
    """Reads of a credential with one of its secret versions, coalesced: one statement per batch."""

    def __init__(
        self, db: Database, *, max_batch: int = MAX_BATCH, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self._db = db
        self._coalescer: Coalescer[Pair, Record | None] = Coalescer(
            self._send, max_batch=max_batch, max_in_flight=max_in_flight, name="credential-reads"
        )

    @property
    def stats(self) -> CoalescerStats:
        """Batches sent, reads carried, batch sizes (tests, benchmarks)."""
        return self._coalescer.stats

    @property
    def in_flight(self) -> int:
        """Batches being sent now."""
        return self._coalescer.in_flight

    async def read(self, credential_id: uuid.UUID, version: int) -> Record | None:
        """The credential's row with the columns of secret ``version`` (null when that version is gone), and
        its position in its batch as ``wanted``; None when no such credential."""
        dbmod.refuse_second_connection()  # as a pool statement would: waiting on another connection could starve it
        return await self._coalescer.submit((credential_id, version))

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bound, not a deadline for the caller
        """Refuse new reads, fail those waiting, wait at most ``timeout`` s for the batches in flight."""
        await self._coalescer.close(timeout)

    async def _send(self, pairs: list[Pair]) -> list[Record | None]:
        """One statement for the batch; the rows in the order of ``pairs`` (None where no credential)."""
        rows = await self._db.fetch(
            "get_credentials_with_secrets", [[str(cid), version] for cid, version in pairs]
        )
        found: list[Record | None] = [None] * len(pairs)
        for row in rows:
            found[row["wanted"] - 1] = row
        return found
