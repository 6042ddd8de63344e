"""What the BROKER jobs share: the engine's parts, the settings, and the two steps every job takes first (the
master key of a parent, a venue call whose transient failures become a retry)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from engine import logs
from engine import queue as queuemod
from engine.broker.managers import Managers
from engine.broker.settings import BrokerSettings
from engine.db import Database
from engine.models import CredentialStatus
from engine.outbox import Outbox
from engine.store import Store
from venues.base import ApiKeys, Outcome, ProbeFailure, Venue, release_frames
from venues.subaccounts import GrantProblem

log = structlog.get_logger("engine.broker")

T = TypeVar("T")

PARENT_UNUSABLE = "PARENT_NOT_VERIFIED"
GRANT_REFUSED = "GRANT_REFUSED"  # the venue cannot take the grant (Binance Link: no IP list at creation)


@dataclass(frozen=True, slots=True)
class Context:
    store: Store
    db: Database
    queue: queuemod.JobQueue
    outbox: Outbox
    settings: BrokerSettings
    managers: Managers


@dataclass(frozen=True, slots=True)
class Master:
    """A BROKER parent's master key, opened for one job."""

    venue: Venue
    keys: ApiKeys


async def master_of(ctx: Context, parent_id: uuid.UUID) -> Master | None:
    """The parent's current master key; None when the parent is revoked, gone or holds no material."""
    parent = await ctx.store.get_by_id(parent_id)
    if parent is None or parent.status is CredentialStatus.REVOKED:
        return None
    secret = await ctx.store.get_secret(parent_id, parent.secret_version)
    if secret is None:
        return None
    return Master(parent.venue, ctx.store.open_secret(secret))


async def venue_call(
    job: queuemod.Job, call: Callable[[], Awaitable[T]], *secrets: ApiKeys
) -> T | ProbeFailure:
    """Run one venue call with ``secrets`` scrubbed from logs. A permanent failure is returned; a transient
    one raises :class:`engine.queue.Retry` (honouring the venue's Retry-After), except on the job's last try,
    where it is returned too: the caller settles the operation instead of leaving it to a dead job."""
    try:
        with logs.secret_scope(*secrets):
            return await call()
    except GrantProblem as problem:
        return ProbeFailure(
            Outcome.PERMISSION_DENIED,
            f"the venue cannot take this key grant: {problem}",
            venue_code=GRANT_REFUSED,
        )
    except ProbeFailure as failure:
        # the venue module's frames (the keys in their locals) go now, not at a garbage collection
        release_frames(failure)
        if failure.transient and job.tries < job.max_attempts:
            log.info("broker_venue_transient", kind=job.kind, outcome=failure.outcome.value)
            raise queuemod.Retry(after=failure.retry_after, reason=failure.outcome.value) from None
        return failure


def parent_failure() -> ProbeFailure:
    """The failure of an operation whose BROKER parent can no longer manage keys."""
    return ProbeFailure(
        Outcome.PERMISSION_DENIED,
        "the BROKER credential that minted this key is revoked or holds no key material",
        venue_code=PARENT_UNUSABLE,
    )


def reason_of(failure: ProbeFailure) -> str:
    """The stable reason an operation failed with."""
    if failure.venue_code in (PARENT_UNUSABLE, GRANT_REFUSED):
        return failure.venue_code
    return failure.outcome.value
