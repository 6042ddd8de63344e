"""Zero-touch rotation of minted credentials: the policy, its sweep, the ``broker_rotate`` job and the hooks the
staged rotation calls when it promotes or rejects.

The policy (:class:`engine.broker.settings.BrokerSettings`): a minted key is rotated once it is older than
``rotation_max_age`` or its venue expiry (``permissions.expiresAt``) is less than ``rotation_before_expiry``
away; an automatic rotation that failed is tried again after ``rotation_retry_after``. The periodic
``broker_sweep`` finds such credentials and records a ROTATE intent for each (``request`` does the
same on demand: ``rotate_credential(..., automatic=True)``), then ``broker_rotate`` creates a new key for the
same sub-account and stages it as the credential's rotation (``credential.rotation_started`` with
``automatic: true``). From there it is the ordinary staged rotation (``engine.jobs``): the new key verifies on
the pinned venue account and is promoted (``credential.rotated`` with ``automatic: true``: leases swap), or is
rejected (``credential.rotation_failed``) while the old key keeps working. On promotion the old key is retired:
it keeps working at the venue for ``rotation_grace`` seconds, then a ``broker_cleanup`` job deletes it there.
A permanent venue refusal before staging settles the intent FAILED with ``credential.rotation_failed``; the
old key keeps working.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import structlog

from engine import errors, lifecycle, logs, validation
from engine import queue as queuemod
from engine.broker.context import Context, master_of, parent_failure, reason_of, venue_call
from engine.broker.labels import label_for
from engine.broker.payloads import BrokerCleanup, BrokerRotate
from engine.broker.retirement import left_behind, retire
from engine.db import Conn
from engine.models import Credential, CredentialStatus
from engine.payloads import RotationVerify, enqueue
from engine.store import credential_from_row
from venues.base import ProbeFailure, Venue, release_frames
from venues.subaccounts import KeyGrant, KeyLeftBehind, MintedKey

log = structlog.get_logger("engine.broker")

SWEEP_BATCH = 500
CLEANUP_MARGIN = 1.0  # seconds after a retired key's grace ends before its cleanup runs


class Rotation:
    """Automatic rotation: ``request`` (on demand), ``sweep`` and ``run`` (jobs), ``promoting``/``rejecting``
    (the staged rotation's hooks, :class:`engine.jobs.RotationHooks`)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def request(self, owner_id: str, credential_id: uuid.UUID | str) -> Credential:
        """Record an automatic rotation of a minted credential and enqueue it; the credential as it is now."""
        ctx = self._ctx
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        async with ctx.db.transaction() as conn:
            row = await ctx.store.lock(conn, owner, cid)
            lifecycle.target("rotate", row["status"])  # InvalidTransition for REVOKED
            link = await conn.fetchrow("broker_get_link", cid)
            if link is None:
                raise errors.BrokerUnsupported(
                    "automatic rotation needs a credential minted through a BROKER credential "
                    "(mint_credential); rotate this one with new keys",
                    field="automatic",
                )
            ctx.managers.get(Venue(row["venue"]))  # BrokerUnsupported for a venue without the API
            if row["pending_version"] is not None:
                raise errors.RotationPending(
                    "a rotation is already waiting for verification", field="credentialId"
                )
            intent_id = await conn.fetchval("broker_insert_intent", uuid.uuid4(), cid, True)
            if intent_id is None:
                raise errors.RotationPending(
                    "the engine is already minting or rotating this credential's key", field="credentialId"
                )
            await enqueue(ctx.queue, BrokerRotate(cid, intent_id), conn=conn, fair_key=owner)
            return credential_from_row(row)

    async def sweep(self, job: queuemod.Job) -> None:
        """The rotation policy's part of ``broker_sweep``: an automatic rotation of each minted credential due."""
        ctx = self._ctx
        s = ctx.settings
        rows = await ctx.db.fetch(
            "broker_due_rotations",
            s.rotation_max_age,
            s.rotation_before_expiry,
            s.rotation_retry_after,
            SWEEP_BATCH,
        )
        if not rows:
            return
        enqueued = 0
        async with ctx.db.transaction() as conn:
            for row in rows:
                intent_id = await conn.fetchval("broker_insert_intent", uuid.uuid4(), row["id"], True)
                if intent_id is not None:
                    await enqueue(
                        ctx.queue, BrokerRotate(row["id"], intent_id), conn=conn, fair_key=row["owner_id"]
                    )
                    enqueued += 1
        log.info("broker_rotation_policy", due=len(rows), enqueued=enqueued)

    async def run(self, job: queuemod.Job) -> None:
        """``broker_rotate``: mint a new key for the credential's sub-account and stage it."""
        ctx = self._ctx
        work = BrokerRotate.from_payload(job.payload)
        cid = work.credential_id
        intent = await ctx.db.fetchrow("broker_get_intent", work.intent_id)
        link = await ctx.db.fetchrow("broker_get_link", cid)
        if intent is None or link is None or intent["state"] != "OPEN":
            return
        if link["status"] == CredentialStatus.REVOKED or not await ctx.db.fetchval(
            "broker_touch_intent", work.intent_id
        ):
            return  # the revoke settled it
        master = await master_of(ctx, link["parent_id"])
        if master is None:
            await self._fail(job, link, work.intent_id, parent_failure())
            return
        manager = ctx.managers.get(master.venue)
        sub = str(link["sub_account"])
        grant = KeyGrant(
            read=bool(link["grant_read"]),
            trade=bool(link["grant_trade"]),
            ip_allowlist=tuple(link["ip_allowlist"] or ()),
            label=label_for(cid),
        )

        async def create() -> MintedKey:
            try:
                return await manager.create_key(master.keys, sub, grant)
            except KeyLeftBehind as left:  # made at the venue, then a follow-up failed: delete it later
                await left_behind(ctx, cid, master.venue, left.key_id)
                raise

        minted = await venue_call(job, create, master.keys)
        if isinstance(minted, ProbeFailure):
            await self._fail(job, link, work.intent_id, minted)
            return
        staged = False
        with logs.secret_scope(minted.keys):
            async with ctx.db.transaction() as conn:
                row = await ctx.store.lock(conn, str(link["owner_id"]), cid)  # first: the credential's lock
                current = await conn.fetchrow("broker_get_intent", work.intent_id)
                if (
                    row["status"] != CredentialStatus.REVOKED
                    and row["pending_version"] is None
                    and current is not None
                    and current["state"] == "OPEN"
                ):
                    change = await ctx.store.stage_rotation(conn, row, minted.keys)
                    pending = change.credential.pending_rotation
                    assert pending is not None  # the statement returns the version it staged
                    await conn.fetchval("broker_stage_intent", work.intent_id, pending.secret_version)
                    await ctx.outbox.credential_event(
                        conn,
                        change.credential,
                        "credential.rotation_started",
                        sequence=change.sequence,
                        extra={"immediate": False, "automatic": True},
                    )
                    await enqueue(
                        ctx.queue,
                        RotationVerify(cid, pending.secret_version),
                        conn=conn,
                        fair_key=str(link["owner_id"]),
                    )
                    staged = True
                await ctx.queue.complete_in(conn, job)
        ctx.outbox.committed()
        if staged:
            log.info("broker_rotation_staged", credential_id=str(cid))
            return
        with logs.secret_scope(master.keys, minted.keys):  # settled meanwhile: the new key must not live on
            try:
                await manager.delete_key(master.keys, sub, minted.info.key_id)
            except ProbeFailure as failure:  # reconciliation deletes it (its label names the credential)
                release_frames(failure)  # dropped: its frames hold both key pairs
                log.info("broker_discard_failed", credential_id=str(cid), outcome=failure.outcome.value)

    async def _fail(self, job: queuemod.Job, link: Any, intent_id: uuid.UUID, failure: ProbeFailure) -> None:
        """A permanent failure before staging: the intent FAILED, ``credential.rotation_failed``, old key kept."""
        ctx = self._ctx
        cid: uuid.UUID = link["credential_id"]
        reason = reason_of(failure)
        message = (failure.message or f"the venue refused to create the key ({failure.outcome.value})") + (
            "; the current key stays in use"
        )
        async with ctx.db.transaction() as conn:
            row = await ctx.store.lock(conn, str(link["owner_id"]), cid)  # first: the credential's lock
            automatic = await conn.fetchval("broker_fail_intent", intent_id, reason)
            if automatic is not None and row["status"] != CredentialStatus.REVOKED:
                change = await ctx.store.next_event(conn, cid)
                await ctx.outbox.credential_event(
                    conn,
                    change.credential,
                    "credential.rotation_failed",
                    sequence=change.sequence,
                    extra={"reason": reason, "message": message, "automatic": bool(automatic)},
                )
            await ctx.queue.complete_in(conn, job)
        ctx.outbox.committed()
        log.info("broker_rotation_failed", credential_id=str(cid), reason=reason)

    # ---- hooks of the staged rotation (engine.jobs) ------------------------------------------------------------

    async def promoting(self, conn: Conn, cred: Credential, version: int) -> Mapping[str, Any]:
        """Staged ``version`` of ``cred`` is about to replace its current key (in the promoting transaction):
        settle the intent; a minted credential's old key is retired for the grace, its deletion scheduled."""
        ctx = self._ctx
        row = await conn.fetchrow("broker_settle_staged", cred.credential_id, version, "DONE", None)
        assert row is not None  # the statement always answers one row
        if row["minted"]:
            grace = ctx.settings.rotation_grace
            at = await retire(ctx, conn, cred.credential_id, cred.venue, [cred.secret_version], grace)
            if at is not None:
                run_at = at + timedelta(seconds=CLEANUP_MARGIN)
                await enqueue(ctx.queue, BrokerCleanup(cred.credential_id), conn=conn, run_at=run_at)
        return {"automatic": bool(row["automatic"])}

    async def rejecting(self, conn: Conn, cred: Credential, version: int, reason: str) -> Mapping[str, Any]:
        """Staged ``version`` of ``cred`` was rejected: settle the intent; a minted key is deleted now."""
        ctx = self._ctx
        row = await conn.fetchrow("broker_settle_staged", cred.credential_id, version, "FAILED", reason)
        assert row is not None  # the statement always answers one row
        if row["minted"]:
            await retire(ctx, conn, cred.credential_id, cred.venue, [version], 0.0)
            await enqueue(ctx.queue, BrokerCleanup(cred.credential_id), conn=conn)
        return {"automatic": bool(row["automatic"])}
