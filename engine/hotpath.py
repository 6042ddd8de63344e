"""The lifecycle's hot path: the two writes every credential makes, each in one statement that is its own
transaction, where the transaction path takes six and five round trips.

**Creation** (``created_and_enqueued`` in queries.sql, :func:`create_one`): the quota check under the
owner's lock, the credential and its secret, its ``credential.created`` and its verification job; the
transaction path (:meth:`engine.engine.CredentialEngine.create_credential`) sends BEGIN, ``lock_owner``,
``insert_credential``, the outbox row, ``enqueue_job``, COMMIT. The lock and the count are taken in that order
by ``ce_credential_room()`` (schema.sql), whose count runs on a snapshot taken after the lock, so the quota
holds across processes exactly as before. The new row's public fields are known before the insert but for its
two timestamps, which the statement sets in the event's data (``createdAt``, ``updatedAt``). The job is queued
by the rules of queue.sql's ``enqueue_job`` for a job of an owner due now (start tag, dedupe key, NOTIFY).
The statement writes nothing when the quota is reached (:func:`engine.bounds.quotas.credentials_full`) or when a
webhook endpoint of the owner wants ``credential.created`` (the caller takes the transaction path, whose
fan-out writes the deliveries). Concurrent creations share one statement (engine/creates.py), which answers each
as :func:`create_one` would, and falls back to it.

**Verification** (``verified_and_done``, :func:`verified_and_done`): a successful verification written,
reported and its job marked done; the transaction path (:meth:`engine.jobs.LifecycleJobs.verify`) sends BEGIN,
``mark_verified``, the outbox row, ``complete_job``, COMMIT. Concurrent verifications share one statement
(engine/donebatch.py, ``verified_and_done_batch``), which answers each as :func:`verified_and_done` would, and
falls back to it.

The event must carry the credential as the write leaves it, which the transaction path reads back from the
write. Here it is known before the write instead: the statement is fenced on the event sequence the job read
before probing (``credentials.event_seq``, moved by every change that reports an event, so by every change of
a public field but the re-verification's ``touch_verified``, whose ``verified_at`` this write sets anyway), so
the row it changes is the row the job read, and the credential after it is that row with the findings
(:func:`credential_after`). The two timestamps the write sets (``updatedAt``, ``verifiedAt``: the statement's
``now()``) are set in the event's data by the statement itself, in the same milliseconds as
:func:`engine.store.ms`.

Everything else the transaction path guarantees holds: the credential's UPDATE is the statement's first write
(the job's UPDATE waits for it: ``engine/events.py``'s ordering of one credential's events), the fences of
``mark_verified`` (status, secret version, pinned venue account) apply, the job's completion is fenced like
``complete_job`` (id, attempt, running), and an attempt that lost its job makes the statement raise
(:class:`engine.db.AttemptLost`, turned into the queue's ``StaleAttempt`` here): nothing of it commits.

The statement refuses (returns False, wrote nothing) when the row changed since it was read, when a
webhook endpoint of the owner wants the event type (its deliveries are written by the fan-out, in a
transaction), or when the credential carries a rotation failure reason (the public ``failureReason`` shows it
after a verification; the row read does not hold it apart): then the caller takes the transaction path. A
verification whose permissions have an expiry (its warning job is enqueued with it) or that finds nothing new
never comes here (:func:`eligible`).
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from engine import db as dbmod
from engine import events, lifecycle
from engine import queue as queuemod
from engine.bounds import quotas
from engine.models import Credential, CredentialStatus, CredentialType
from engine.payloads import Verify
from engine.store import Store, credential_from_row, refused_keys
from venues.base import ApiKeys, ProbeResult, Venue

VERIFIED = "credential.verified"
PERMISSIONS_CHANGED = "credential.permissions_changed"


def created_credential(
    credential_id: uuid.UUID,
    owner_id: str,
    venue: Venue,
    credential_type: CredentialType,
    nickname: str | None,
    masked_api_key: str,
) -> Credential:
    """A new credential as ``created_and_enqueued`` writes it; its ``createdAt``/``updatedAt`` are the
    statement's to set (0 here)."""
    return Credential(
        credential_id=credential_id,
        owner_id=owner_id,
        venue=venue,
        credential_type=credential_type,
        nickname=nickname,
        masked_api_key=masked_api_key,
        status=CredentialStatus.PENDING,
        identities=(),
        permissions=None,
        venue_account_id=None,
        failure_reason=None,
        secret_version=1,
        created_at_ms=0,
        updated_at_ms=0,
        verified_at_ms=None,
        revoked_at_ms=None,
        pending_rotation=None,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Creation:
    """One creation as the statements write it: the new row's public fields, its sealed secret version 1 (the
    material and the key's fingerprint never in a repr), its event's id and data, its verification job."""

    credential_id: uuid.UUID
    owner_id: str
    venue: Venue
    credential_type: CredentialType
    nickname: str | None
    masked_api_key: str
    kek_version: int
    wrapped_dek: bytes = dataclasses.field(repr=False)
    nonce: bytes = dataclasses.field(repr=False)
    ciphertext: bytes = dataclasses.field(repr=False)
    fingerprint: bytes = dataclasses.field(repr=False)
    event_id: uuid.UUID
    data: dict[str, Any]
    payload: dict[str, Any]
    dedupe_key: str | None


def creation(
    store: Store,
    *,
    credential_id: uuid.UUID,
    owner_id: str,
    venue: Venue,
    credential_type: CredentialType,
    nickname: str | None,
    keys: ApiKeys,
) -> Creation:
    """``keys`` sealed as secret version 1 of a new credential, with what its event and job carry."""
    kek_version, wrapped_dek, nonce, ciphertext, fingerprint, masked = store.sealed_columns(
        credential_id, venue, keys, 1
    )
    data = {
        "credential": created_credential(
            credential_id, owner_id, venue, credential_type, nickname, masked
        ).public_dict()
    }
    work = Verify(credential_id, 1)
    return Creation(
        credential_id, owner_id, venue, credential_type, nickname, masked, kek_version, wrapped_dek, nonce,
        ciphertext, fingerprint, uuid.uuid4(), data, work.to_payload(), work.dedupe_key,
    )  # fmt: skip


async def create_one(
    store: Store, queue: queuemod.JobQueue, new: Creation, *, quota: int | None, lock_timeout: str
) -> Credential | None:
    """Store ``new`` (a PENDING credential, its ``credential.created`` and its verification job) in one
    statement. None: a webhook endpoint of the owner wants the event, nothing written (take the transaction
    path). :class:`errors.QuotaExceeded` when the owner holds ``quota`` credentials;
    :class:`errors.DuplicateCredential` when it holds these keys already."""
    with refused_keys(new.venue):
        row = await store.db.fetchrow(
            "created_and_enqueued", new.credential_id, new.owner_id, new.venue.value, new.credential_type.value,
            new.nickname, new.masked_api_key, new.kek_version, new.wrapped_dek, new.nonce, new.ciphertext,
            new.fingerprint, quota, lock_timeout, new.event_id, new.data, events.CHANNEL, Verify.KIND,
            new.payload, new.dedupe_key, queue.settings.max_attempts, queue.settings.channel,
        )  # fmt: skip
    assert row is not None  # one row always: the room
    if not row["room"]:
        assert quota is not None  # only a quota refuses the insert
        raise quotas.credentials_full(quota)
    if row["wanted"]:
        return None
    return credential_from_row(row)


def eligible(result: ProbeResult) -> bool:
    """Whether a successful verification with these findings may take the hot path (no expiry to plan)."""
    return result.permissions.expires_at_ms is None


def credential_after(cred: Credential, result: ProbeResult, warnings: tuple[str, ...]) -> Credential:
    """``cred`` (the row as read, unchanged since: the statement's fence) as ``verified_and_done`` leaves it;
    its ``updatedAt``/``verifiedAt`` are the statement's to set (0 here)."""
    return dataclasses.replace(
        cred,
        status=CredentialStatus.VERIFIED,
        identities=tuple(sorted(result.identities)),
        permissions=result.permissions,
        venue_account_id=result.venue_account_id,
        pinned_venue_account_id=cred.pinned_venue_account_id or result.venue_account_id,
        warnings=warnings,
        failure_reason=None,
        updated_at_ms=0,
        verified_at_ms=0,
    )


def event_of(cred: Credential, result: ProbeResult, warnings: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The event type and data the transaction path (``LifecycleJobs._succeed``) would record."""
    event_type = PERMISSIONS_CHANGED if cred.status is CredentialStatus.VERIFIED else VERIFIED
    data = {
        "credential": credential_after(cred, result, warnings).public_dict(),
        "previousStatus": cred.status.value,
        "previousPermissions": cred.permissions.as_dict() if cred.permissions is not None else None,
    }
    return event_type, data


async def verified_and_done(
    db: dbmod.Database,
    job: queuemod.Job,
    cred: Credential,
    version: int,
    result: ProbeResult,
    warnings: tuple[str, ...],
    sequence: int,
) -> bool:
    """Write the verification of secret ``version`` of ``cred`` (read with event sequence ``sequence``), its
    event and ``job``'s completion in one statement. False: refused, nothing written (the caller takes the
    transaction path). :class:`engine.queue.StaleAttempt` when the attempt no longer owns the job (nothing
    written either)."""
    event_type, data = event_of(cred, result, warnings)
    try:
        row = await db.fetchrow(
            "verified_and_done", cred.credential_id, lifecycle.sources("verify_succeeded"), version,
            sorted(result.identities), result.permissions.as_dict(), result.venue_account_id, result.environment,
            list(warnings), sequence, cred.owner_id, uuid.uuid4(), event_type, data, events.CHANNEL, job.id,
            job.attempt,
        )  # fmt: skip
    except dbmod.AttemptLost:
        raise queuemod.StaleAttempt(job.id, job.attempt) from None
    return row is not None
