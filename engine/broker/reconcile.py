"""Reconciliation: the venue's list of a sub-account's keys is the truth; a key the engine made that no live
credential holds is deleted there.

For each (BROKER parent, sub-account) pair the engine minted into, ``broker_reconcile_sub`` first deletes the
retired keys that are due (:mod:`engine.broker.retirement`: a promoted rotation's old key once its
``rotation_grace`` is over, a rejected staged key, every key of a revoked or immediately rotated credential;
the venue deletes by the full key, which the row keeps sealed). Then it lists the sub-account's keys with the
master key and looks only at keys whose label names a credential of this database (:mod:`engine.broker.labels`;
other keys, and keys a venue lists masked and unlabelled (Binance Link), are never touched). Such a key is kept
while

* its credential holds it (current or staged secret version: compared by fingerprint, never by the key), or
* it is one of the credential's retired keys (deleted through its own row when due), or
* a venue operation of its credential is under way (an intent touched less than ``orphan_grace`` ago), or the
  venue says it was created less than ``orphan_grace`` ago;

otherwise it is deleted, and at once, grace or not, when its credential is REVOKED. So a key the venue created
but the engine never recorded (a crash between the two, a lost answer) lives at most ``orphan_grace`` plus one
sweep interval, and a minted credential never has two live keys beyond the graces. ``broker_cleanup`` does the
same for one credential's keys (after a rotation's grace, a rejected rotation, a revoke, an immediate rotation).
``broker_sweep`` (periodic) and ``CredentialEngine.reconcile_broker_keys`` enqueue one ``broker_reconcile_sub``
per pair.
"""

from __future__ import annotations

import time
import uuid

import structlog

from engine import queue as queuemod
from engine.broker.context import Context, Master, master_of, venue_call
from engine.broker.labels import credential_of
from engine.broker.payloads import BrokerCleanup, BrokerReconcileSub
from engine.broker.retirement import open_retired, retire
from engine.db import Conn
from engine.models import CredentialStatus
from engine.payloads import enqueue
from venues.base import ProbeFailure, Venue, mask_api_key
from venues.subaccounts import SubAccountKeys

log = structlog.get_logger("engine.broker")


class Reconciler:
    """The reconciliation jobs and the hooks that ask for a cleanup."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def sweep(self, job: queuemod.Job | None = None) -> int:
        """One ``broker_reconcile_sub`` per (parent, sub-account) pair (``broker_sweep``, or on demand); how many."""
        ctx = self._ctx
        pairs = await ctx.db.fetch("broker_sub_accounts")
        if not pairs:
            return 0
        async with ctx.db.transaction() as conn:
            for pair in pairs:
                await enqueue(
                    ctx.queue,
                    BrokerReconcileSub(pair["parent_id"], str(pair["sub_account"])),
                    conn=conn,
                    fair_key=str(pair["owner_id"]),
                )
        log.info("broker_reconcile_sweep", sub_accounts=len(pairs))
        return len(pairs)

    async def reconcile_sub(self, job: queuemod.Job) -> None:
        work = BrokerReconcileSub.from_payload(job.payload)
        await self._reconcile(job, work.parent_id, work.sub_account, only=None)

    async def cleanup(self, job: queuemod.Job) -> None:
        work = BrokerCleanup.from_payload(job.payload)
        link = await self._ctx.db.fetchrow("broker_get_link", work.credential_id)
        if link is not None:
            await self._reconcile(job, link["parent_id"], str(link["sub_account"]), only=work.credential_id)

    async def _reconcile(
        self, job: queuemod.Job, parent_id: uuid.UUID, sub: str, *, only: uuid.UUID | None
    ) -> int:
        """Delete the keys of sub-account ``sub`` (of ``only``'s credential, when given) that nothing holds."""
        ctx = self._ctx
        master = await master_of(ctx, parent_id)
        if master is None:
            log.warning("broker_reconcile_no_master", parent_id=str(parent_id), sub_account=sub)
            return 0
        manager = ctx.managers.get(master.venue)
        listed = await venue_call(job, lambda: manager.list_keys(master.keys, sub), master.keys)
        deleted = 0
        for row in await ctx.db.fetch("broker_due_retired", parent_id, sub, only):
            key_id = open_retired(ctx, row)
            if await self._delete(job, manager, master, sub, row["credential_id"], key_id, "retired"):
                await ctx.db.execute("broker_forget_retired", row["credential_id"], row["key_fingerprint"])
                deleted += 1
        if isinstance(listed, ProbeFailure):
            log.warning("broker_reconcile_refused", parent_id=str(parent_id), outcome=listed.outcome.value)
            return deleted
        grace = ctx.settings.orphan_grace
        states = {
            r["credential_id"]: r for r in await ctx.db.fetch("broker_key_states", parent_id, sub, grace)
        }
        now_ms = int(time.time() * 1000)
        for key in listed:
            cid = credential_of(key.label)
            if key.masked or cid is None or (only is not None and cid != only):
                continue  # not labelled by the engine, or listed masked (Binance): never judged from a listing
            state = states.get(cid)
            if state is None:
                continue  # not a credential of this database minted on this sub-account: not ours to judge
            fingerprint = ctx.store.fingerprint(master.venue, key.key_id)
            if fingerprint in set(state["retired"]):
                continue  # deleted through its own row when due
            if state["status"] != CredentialStatus.REVOKED:
                young = key.created_at_ms is not None and now_ms - key.created_at_ms < grace * 1000
                if fingerprint in set(state["live"]) or state["in_flight"] or young:
                    continue
            if await self._delete(job, manager, master, sub, cid, key.key_id, "orphan"):
                deleted += 1
        return deleted

    async def _delete(
        self,
        job: queuemod.Job,
        manager: SubAccountKeys,
        master: Master,
        sub: str,
        cid: uuid.UUID,
        key_id: str,
        why: str,
    ) -> bool:
        """Delete one key at the venue (gone already counts as deleted); False when the venue refused."""

        async def delete() -> bool:
            return await manager.delete_key(master.keys, sub, key_id)

        gone = await venue_call(job, delete, master.keys)
        if isinstance(gone, ProbeFailure):
            log.warning("broker_key_delete_refused", credential_id=str(cid), outcome=gone.outcome.value)
            return False
        log.info("broker_key_deleted", credential_id=str(cid), api_key=mask_api_key(key_id), why=why)
        return True

    async def settle(self, conn: Conn, credential_id: uuid.UUID, venue: Venue, reason: str) -> None:
        """In a revoke's or an immediate rotation's transaction, before the credential's material is destroyed:
        settle its venue operations and, for a minted credential, retire every key it holds for deletion now."""
        if await conn.fetchval("broker_settle_all", credential_id, reason):
            versions = [int(r["version"]) for r in await conn.fetch("broker_live_versions", credential_id)]
            await retire(self._ctx, conn, credential_id, venue, versions, 0.0)
            await enqueue(self._ctx.queue, BrokerCleanup(credential_id), conn=conn)
