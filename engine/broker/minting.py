"""Minted credentials: a key created for one sub-account through a BROKER credential's master key.

``mint`` (``CredentialEngine.mint_credential``) checks the request and the BROKER credential, then writes in
one transaction the new credential (PENDING, no key material yet), its link to the parent and sub-account, and
its MINT intent, and enqueues the ``broker_mint`` job: the intent exists before the venue is called. The job
creates the key at the venue (labelled with the credential id, least privilege: read and trade by default,
never withdraw, the configured IP allow-list), stores it encrypted as the credential's secret version 1 and
enqueues its verification, which pins the credential to the venue account the key reaches (the sub-account)
like any other. A transient venue failure retries with backoff; a permanent one marks the credential FAILED
with ``credential.mint_failed``. A key the venue created but the engine could not record (a crash, a lost
answer) is labelled with the credential id and held by nothing: reconciliation deletes it after the orphan
grace (:mod:`engine.broker.reconcile`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import structlog

from engine import errors, logs, validation
from engine import queue as queuemod
from engine.bounds import quotas
from engine.broker.context import Context, master_of, parent_failure, reason_of, venue_call
from engine.broker.discovery import sub_identity
from engine.broker.labels import label_for
from engine.broker.payloads import BrokerMint
from engine.broker.retirement import left_behind
from engine.broker.settings import parse_ip_allowlist
from engine.config import Quotas
from engine.models import Credential, CredentialStatus, CredentialType
from engine.payloads import Verify, enqueue
from engine.store import credential_from_row
from venues.base import ProbeFailure, Venue, mask_api_key, release_frames
from venues.subaccounts import KeyGrant, KeyLeftBehind, MintedKey

log = structlog.get_logger("engine.broker")

MAX_SUB_ACCOUNT = 128
SUB_ACCOUNT_PATTERN = (
    r"[A-Za-z0-9._@+:-]{1,128}"  # uids, sub-account names, emails (the OpenAPI document's too)
)
SUB_ACCOUNT = re.compile(SUB_ACCOUNT_PATTERN)
GRANTS = ("read", "trade", "withdraw")


def grant_of(permissions: Mapping[str, Any] | None) -> tuple[bool, bool]:
    """(read, trade) of a mint request's ``permissions``: read and trade by default; withdraw refused."""
    if permissions is None:
        return True, True
    if not isinstance(permissions, Mapping):
        raise errors.InvalidRequest("permissions", "must be an object of read, trade and withdraw flags")
    for name, value in permissions.items():
        if name not in GRANTS:
            raise errors.InvalidRequest("permissions", f"{name} is not one of read, trade, withdraw")
        if not isinstance(value, bool):
            raise errors.InvalidRequest(f"permissions.{name}", "must be a boolean")
    if permissions.get("withdraw", False):
        raise errors.WithdrawNotAllowed(
            "permissions.withdraw", "a minted key reads and trades, never withdraws"
        )
    return bool(permissions.get("read", True)), bool(permissions.get("trade", True))


def sub_account_of(value: Any) -> str:
    """A venue's sub-account id as given (a uid, a sub-account name or an email): :data:`SUB_ACCOUNT`."""
    if value is None or value == "":
        raise errors.InvalidRequest("subAccount", "is required")
    if not isinstance(value, str):
        raise errors.InvalidRequest("subAccount", "must be a string")
    if not SUB_ACCOUNT.fullmatch(value):
        raise errors.InvalidRequest(
            "subAccount",
            f"must be 1 to {MAX_SUB_ACCOUNT} letters, digits and ._@+:- (the venue's sub-account id)",
        )
    return value


class Minting:
    """The mint request and its ``broker_mint`` job."""

    def __init__(self, ctx: Context, quotas: Quotas) -> None:
        self._ctx = ctx
        self._quotas = quotas

    async def mint(
        self,
        owner_id: str,
        broker_credential_id: uuid.UUID | str,
        *,
        sub_account: str,
        permissions: Mapping[str, Any] | None = None,
        ip_allowlist: list[str] | tuple[str, ...] | None = None,
        nickname: str | None = None,
    ) -> Credential:
        """Record a minted credential (PENDING) and enqueue the creation of its key; see the module docstring."""
        ctx = self._ctx
        owner = validation.owner(owner_id)
        parent_id = validation.uuid_value(broker_credential_id, "brokerCredentialId")
        sub = sub_account_of(sub_account)
        read, trade = grant_of(permissions)
        ips = (
            parse_ip_allowlist(ip_allowlist, "ipAllowlist")
            if ip_allowlist is not None
            else ctx.settings.ip_allowlist
        )
        name = validation.nickname(nickname)
        credential_id, intent_id = uuid.uuid4(), uuid.uuid4()
        async with ctx.db.transaction() as conn:
            quota = await quotas.lock_for_credential(conn, owner, self._quotas)  # first: the owner's lock
            parent = await ctx.store.lock_get(conn, owner, parent_id)
            check_parent(ctx, parent, sub)
            row = await conn.fetchrow(
                "broker_insert_minted", credential_id, owner, parent.venue.value, name, quota, parent_id, sub,
                read, trade, list(ips), intent_id,
            )  # fmt: skip
            if row is None:
                assert quota is not None  # only a quota refuses the insert
                raise quotas.credentials_full(quota)
            cred = credential_from_row(row)
            await ctx.outbox.credential_event(
                conn,
                cred,
                "credential.created",
                sequence=1,
                extra={"mintedFrom": {"parentCredentialId": str(parent_id), "subAccount": sub}},
            )
            await enqueue(ctx.queue, BrokerMint(credential_id, intent_id), conn=conn, fair_key=owner)
        ctx.outbox.committed()
        log.info("broker_mint_requested", credential_id=str(credential_id), parent_id=str(parent_id))
        return cred

    async def run(self, job: queuemod.Job) -> None:
        """``broker_mint``: create the key at the venue, then store it and enqueue its verification."""
        ctx = self._ctx
        work = BrokerMint.from_payload(job.payload)
        cid = work.credential_id
        link = await ctx.db.fetchrow("broker_get_link", cid)
        if link is None or link["status"] != CredentialStatus.PENDING:
            return  # revoked meanwhile (the revoke settled the intent)
        if not await ctx.db.fetchval("broker_touch_intent", work.intent_id):
            return  # settled by an earlier attempt
        master = await master_of(ctx, link["parent_id"])
        if master is None:
            await self._fail(job, link, work.intent_id, parent_failure())
            return
        manager = ctx.managers.get(master.venue)
        grant = KeyGrant(
            read=bool(link["grant_read"]),
            trade=bool(link["grant_trade"]),
            ip_allowlist=tuple(link["ip_allowlist"] or ()),
            label=label_for(cid),
        )
        sub = str(link["sub_account"])

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
        with logs.secret_scope(minted.keys):
            stored = await self._store(job, link, work.intent_id, minted)
        if not stored:  # revoked or settled while the venue answered: the new key must not live on
            with logs.secret_scope(master.keys, minted.keys):
                try:
                    await manager.delete_key(master.keys, sub, minted.info.key_id)
                except ProbeFailure as failure:  # reconciliation deletes it (its label names the credential)
                    release_frames(failure)  # dropped: its frames hold both key pairs
                    log.info("broker_discard_failed", credential_id=str(cid), outcome=failure.outcome.value)

    async def _store(self, job: queuemod.Job, link: Any, intent_id: uuid.UUID, minted: MintedKey) -> bool:
        ctx = self._ctx
        cid: uuid.UUID = link["credential_id"]
        owner = str(link["owner_id"])
        sealed = ctx.store.vault.seal(minted.keys, credential_id=cid, version=1)
        the_venue = Venue(link["venue"])
        fingerprint = ctx.store.fingerprint(the_venue, minted.keys.api_key)
        async with ctx.db.transaction() as conn:
            row = await conn.fetchrow(
                "broker_store_minted_key", cid, owner, the_venue.value, sealed.kek_version, sealed.wrapped_dek,
                sealed.nonce, sealed.ciphertext, fingerprint,
                mask_api_key(minted.keys.api_key), intent_id,
            )  # fmt: skip
            if row is None:
                await ctx.queue.complete_in(conn, job)
                return False
            cred = credential_from_row(row)
            await ctx.outbox.credential_event(
                conn,
                cred,
                "credential.minted",
                sequence=int(row["event_seq"]),
                extra={
                    "parentCredentialId": str(link["parent_id"]),
                    "subAccount": str(link["sub_account"]),
                },
            )
            await enqueue(ctx.queue, Verify(cid, 1), conn=conn, fair_key=owner)
            await ctx.queue.complete_in(conn, job)
        ctx.outbox.committed()
        log.info("broker_minted", credential_id=str(cid), api_key=cred.masked_api_key)
        return True

    async def _fail(self, job: queuemod.Job, link: Any, intent_id: uuid.UUID, failure: ProbeFailure) -> None:
        """A permanent failure: the intent FAILED, the credential FAILED with ``credential.mint_failed``."""
        ctx = self._ctx
        reason = reason_of(failure)
        message = failure.message or f"the venue refused to create the key ({failure.outcome.value})"
        cid: uuid.UUID = link["credential_id"]
        async with ctx.db.transaction() as conn:
            await ctx.store.lock(conn, str(link["owner_id"]), cid)  # first: the credential's lock
            if await conn.fetchrow("broker_fail_intent", intent_id, reason) is not None:
                change = await ctx.store.mark_failed(conn, cid, 1, reason, message)
                if change is not None:
                    await ctx.outbox.credential_event(
                        conn,
                        change.credential,
                        "credential.mint_failed",
                        sequence=change.sequence,
                        extra={
                            "previousStatus": change.previous_status,
                            "reason": reason,
                            "message": message,
                        },
                    )
            await ctx.queue.complete_in(conn, job)
        ctx.outbox.committed()
        log.info("broker_mint_failed", credential_id=str(cid), reason=reason)


def check_parent(ctx: Context, parent: Credential, sub: str) -> None:
    """Refuse a mint the BROKER credential ``parent`` (read under its lock) cannot do."""
    if parent.credential_type is not CredentialType.BROKER:
        raise errors.BrokerNotPermitted(
            "the credential is not a BROKER credential (a master key)", field="brokerCredentialId"
        )
    if not ctx.managers.supports(parent.venue):
        ctx.managers.get(parent.venue)  # raises BrokerUnsupported naming the venue
    if parent.status is not CredentialStatus.VERIFIED:
        raise errors.BrokerNotPermitted(
            f"the BROKER credential is {parent.status.value}; it mints only once VERIFIED",
            field="brokerCredentialId",
        )
    if parent.permissions is None or not parent.permissions.sub_account_keys:
        raise errors.BrokerNotPermitted(
            "the BROKER credential's master key may not manage sub-account API keys at the venue "
            "(permissions.subAccountKeys is false); give it that permission and verify it again",
            field="brokerCredentialId",
        )
    if sub_identity(sub) not in parent.identities:
        raise errors.BrokerNotPermitted(
            "the sub-account is not one of the BROKER credential's identities (sub:<id>); verify it again "
            "after creating the sub-account",
            field="subAccount",
        )
