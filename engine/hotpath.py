"""The verification's hot path: a successful verification written, reported and its job marked done in one
statement (``verified_and_done`` in queries.sql), its own transaction: one round trip where the transaction
path (:meth:`engine.jobs.LifecycleJobs.verify`) takes five (BEGIN, ``mark_verified``, the outbox row,
``complete_job``, COMMIT).

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
from engine.models import Credential, CredentialStatus
from venues.base import ProbeResult

VERIFIED = "credential.verified"
PERMISSIONS_CHANGED = "credential.permissions_changed"


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
