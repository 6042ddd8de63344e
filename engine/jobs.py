"""The jobs that drive the lifecycle: verify, rotation verify, revoke cascade, re-verification sweep, expiry warning.

Each handler probes outside any transaction (a venue call can take seconds), then applies the result in one
transaction that locks the credential, re-checks the fence (the secret version it probed is still the one in
use or staged; a verification first tries its guarded write directly, whose fences say the same, and reads
the row under the lock only when that write is refused), writes the change through the store (each write
returns the credential as it left it), records its events through the outbox, and marks the job done
(``queue.complete_in``) so that a late or duplicate attempt can never apply twice. A verification that
succeeds with something new to write, on a row nothing changed since the job read it, does all of that in one
statement instead (:mod:`engine.hotpath`: same fences, same event, same completion). What a verification reads
before its probe (the credential, the secret version) comes with its claim (:data:`CLAIM_QUERY`), else from a
coalesced read (:mod:`engine.readbatch`): no statement of its own. Transient venue outcomes
never change a status: they raise
``Retry`` (honouring the venue's Retry-After) and the credential stays as it is.

A credential is pinned to the venue account of its first successful verification
(``credentials.pinned_venue_account_id``, set once by ``mark_verified``/``mark_rotated``, never changed: a
trigger refuses it). Every later verification, whatever started it (a manual verify, the re-verification sweep,
an immediate rotation, a staged rotation), that reaches another account fails with ``ACCOUNT_MISMATCH``: the
credential never moves to another account, and so neither do its trading accounts.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from engine import hotpath, logs
from engine import queue as queuemod
from engine.config import DAY_MS, EngineConfig, VerificationPolicy
from engine.db import Conn, Database
from engine.donebatch import DoneBatch
from engine.models import Credential, CredentialStatus, CredentialType
from engine.outbox import Outbox
from engine.payloads import (
    EXPIRY_WARNING,
    PURGE_JOBS,
    REVERIFY_SWEEP,
    REVOKE_CASCADE,
    ROTATION_VERIFY,
    VERIFY,
    ExpiryWarning,
    RevokeCascade,
    RotationVerify,
    Verify,
    enqueue,
    rotation_key,
    verify_key,
)
from engine.store import SecretRow, Store
from venues.base import (
    MAX_SEQUENTIAL_REQUESTS,
    ApiKeys,
    Probe,
    ProbeFailure,
    ProbeResult,
    Venue,
    release_frames,
)
from venues.subaccounts import MAX_DISCOVERY_REQUESTS

log = structlog.get_logger("engine.jobs")

__all__ = [
    "ACCOUNT_MISMATCH",
    "CLAIM_QUERY",
    "EXPIRY_WARNING",
    "PURGE_JOBS",
    "REVERIFY_SWEEP",
    "REVOKE_CASCADE",
    "ROTATION_VERIFY",
    "VERIFY",
    "LifecycleJobs",
    "ProbeMetrics",
    "handler_timeouts",
    "rotation_key",
    "sweep_period",
    "verify_key",
]

# the queue's claim statement: claim_jobs, and each claimed verify and rotation_verify job's credential and the
# secret version it probes read with it (a job the claim read nothing for reads as before: Store.read_for_job)
CLAIM_QUERY = "claim_jobs_reading_credentials"
PURGE_PERIOD = 3600.0  # seconds between purges of old finished jobs and of expired webhook secrets
SWEEP_BATCH = 1000
# a verification (manual, sweep, staged or immediate rotation) reached another venue account than the one the
# credential was first verified on (credentials.pinned_venue_account_id); the trading accounts stay where they are
ACCOUNT_MISMATCH = "ACCOUNT_MISMATCH"
_MISMATCH_MESSAGE = (
    "the keys reach another venue account than the one this credential was first verified on; "
    "its trading accounts stay with that account"
)
# seconds a probing job gets on top of its requests' timeouts: client-side rate-limiter waits, the database work
PROBE_JOB_MARGIN = 30.0

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def handler_timeouts(config: EngineConfig) -> dict[str, float]:
    """The timeout of each lifecycle job kind: a probing job is bounded by its requests (the probe's at most
    ``MAX_SEQUENTIAL_REQUESTS``, then for a BROKER key the discovery's at most ``MAX_DISCOVERY_REQUESTS``, each
    bounded by ``probe_timeout``, one after another) plus ``PROBE_JOB_MARGIN``; the others get ``job_timeout``.
    ``config.job_timeouts`` overrides either."""
    probing = config.probe_timeout * (MAX_SEQUENTIAL_REQUESTS + MAX_DISCOVERY_REQUESTS) + PROBE_JOB_MARGIN
    timeouts = {VERIFY: probing, ROTATION_VERIFY: probing}
    for kind in (REVOKE_CASCADE, REVERIFY_SWEEP, PURGE_JOBS, EXPIRY_WARNING):
        timeouts[kind] = config.job_timeout
    return timeouts


def sweep_period(reverify_interval: float) -> float:
    """How often the sweep looks for credentials due for re-verification (1/24 of the interval, 1 min..1 h)."""
    return min(3600.0, max(60.0, reverify_interval / 24))


@dataclass
class ProbeMetrics:
    """Verification outcomes by (venue, outcome) and a probe-latency histogram, for /metrics."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latency_sum: Counter[str] = field(default_factory=Counter)
    latency_count: Counter[str] = field(default_factory=Counter)
    # (venue, index of the first bound >= the latency): one count per probe; the cumulative view is computed on read
    _latency_slots: Counter[tuple[str, int]] = field(default_factory=Counter)

    def observe(self, venue: Venue, outcome: str, seconds: float) -> None:
        name = venue.value
        self.outcomes[(name, outcome)] += 1
        self.latency_sum[name] += seconds  # type: ignore[assignment]
        self.latency_count[name] += 1
        self._latency_slots[(name, bisect.bisect_left(LATENCY_BUCKETS, seconds))] += 1

    @property
    def latency_buckets(self) -> Counter[tuple[str, float]]:
        """Probes that took at most each bound, by (venue, bound): a Prometheus histogram's cumulative buckets."""
        cumulative: Counter[tuple[str, float]] = Counter()
        # a copy first: /metrics may be scraped from another thread while the loop adds a (venue, slot)
        for (name, slot), count in list(self._latency_slots.items()):
            for bound in LATENCY_BUCKETS[slot:]:
                cumulative[(name, bound)] += count
        return cumulative


def _same_findings(cred: Credential, result: ProbeResult, warnings: tuple[str, ...]) -> bool:
    return (
        cred.status is CredentialStatus.VERIFIED
        and cred.permissions == result.permissions
        and cred.identities == tuple(result.identities)
        and cred.venue_account_id == result.venue_account_id
        and cred.warnings == warnings
    )


def _account_of(cred: Credential) -> str | None:
    """The venue account ``cred`` must reach: the pinned one; for a row verified before the pin existed and not
    verified since (a process of an older version during an upgrade), the one it was verified on; None before
    the first successful verification."""
    return cred.pinned_venue_account_id or cred.venue_account_id


# a BROKER credential's verification: the probe's result with what the master key may do (engine/broker/discovery.py)
Discover = Callable[[Venue, ApiKeys, ProbeResult], Awaitable[ProbeResult]]


class RotationHooks(Protocol):
    """Called in the transaction that promotes or rejects a staged rotation, before the material changes; each
    returns fields added to the event (engine/broker/rotation.py: ``automatic``, the old minted key retired)."""

    async def promoting(self, conn: Conn, cred: Credential, version: int) -> Mapping[str, Any]: ...

    async def rejecting(
        self, conn: Conn, cred: Credential, version: int, reason: str
    ) -> Mapping[str, Any]: ...


JobRead = tuple[Credential, SecretRow | None, int]  # what Store.read_for_job answers


def _verify_is_stale(read: JobRead, version: int) -> bool:
    """Whether a verification of secret ``version`` has nothing to do: revoked, or rotated since it was queued."""
    cred, secret, _ = read
    return cred.status is CredentialStatus.REVOKED or cred.secret_version != version or secret is None


def _rotation_is_stale(read: JobRead) -> bool:
    """Whether a staged version's verification has nothing to do: discarded (immediate rotation, revoke) or
    already promoted."""
    cred, secret, _ = read
    return cred.status is CredentialStatus.REVOKED or secret is None or secret.state != "PENDING"


class LifecycleJobs:
    """The lifecycle's job handlers, built from the parts they use: the store, the database (transactions),
    the queue, the outbox, the probes (``probe(venue)``), the verification policy, the engine's settings and the
    webhook secrets' purge (run by the hourly purge job)."""

    def __init__(
        self,
        *,
        store: Store,
        db: Database,
        queue: queuemod.JobQueue,
        outbox: Outbox,
        probe: Callable[[Venue], Probe],
        policy: VerificationPolicy,
        reverify_interval: float,
        job_retention: float,
        purge_webhook_secrets: Callable[[], Awaitable[int]],
        discover: Discover | None = None,
        rotation_hooks: RotationHooks | None = None,
        done_batch: DoneBatch | None = None,
    ) -> None:
        self._store = store
        self._db = db
        self._queue = queue
        self._outbox = outbox
        self._probe_of = probe
        self._policy = policy
        self._reverify_interval = reverify_interval
        self._job_retention = job_retention
        self._purge_webhook_secrets = purge_webhook_secrets
        self._discover = discover
        self._hooks = rotation_hooks
        self.metrics = ProbeMetrics()
        # the hot path's writes, in batches of the verifications that succeed at the same time
        self.done_batch = done_batch if done_batch is not None else DoneBatch(db)

    async def close(self) -> None:
        """Stop writing verifications in batches: waits (bounded) for the batches in flight. After the queue
        stopped: its handlers may still be waiting for their batch until then."""
        await self.done_batch.close()

    def handlers(self) -> dict[str, queuemod.Handler]:
        return {
            VERIFY: self.verify,
            ROTATION_VERIFY: self.rotation_verify,
            REVOKE_CASCADE: self.revoke_cascade,
            REVERIFY_SWEEP: self.reverify_sweep,
            PURGE_JOBS: self.purge_jobs,
            EXPIRY_WARNING: self.expiry_warning,
        }

    async def _probe(
        self, venue: Venue, keys: ApiKeys, kind: CredentialType = CredentialType.EXCHANGE
    ) -> ProbeResult | ProbeFailure:
        """Probe (a BROKER key: and discover its sub-accounts); a permanent failure is returned, a transient one
        becomes ``Retry`` (status untouched)."""
        started = time.monotonic()
        try:
            with logs.secret_scope(keys):  # anything that logs during the probe is scrubbed of these values
                result = await self._probe_of(venue).probe(keys)
                if kind is CredentialType.BROKER and self._discover is not None:
                    result = await self._discover(venue, keys, result)
        except ProbeFailure as failure:
            # the probe's frames (the keys in their locals) go now, not at a garbage collection
            release_frames(failure)
            self.metrics.observe(venue, failure.outcome.value, time.monotonic() - started)
            if failure.transient:
                log.info("probe_transient", venue=venue.value, outcome=failure.outcome.value)
                raise queuemod.Retry(after=failure.retry_after, reason=failure.outcome.value) from None
            return failure
        self.metrics.observe(venue, "OK", time.monotonic() - started)
        return result

    # ---- verify ----------------------------------------------------------------------------------------------

    async def verify(self, job: queuemod.Job) -> None:
        store = self._store
        work = Verify.from_payload(job.payload)
        cid, version = work.credential_id, work.version
        # read by the claim (claim_jobs_reading_credentials): no statement of its own; else a coalesced read.
        # The claim's row may predate the job's own transaction (queue_claim() finds the job with a newer
        # snapshot than the statement's join): a row that would drop the job as stale is read again first.
        read = store.read_with_claim(job.attached, cid, version)
        if read is None or _verify_is_stale(read, version):
            read = await store.read_for_job(cid, version)
        cred, secret, sequence = read
        if _verify_is_stale(read, version) or secret is None:  # (secret: for the type checker)
            return  # stale: revoked or rotated since it was enqueued
        outcome = await self._probe(cred.venue, store.open_secret(secret), cred.credential_type)
        if await self._verified_in_one(job, cred, version, outcome, sequence):
            return
        async with self._db.transaction() as conn:
            # First the guarded write decided on the row read before the probe: it is the transaction's first
            # write (it locks the row) and its fences (status, secret version, pinned account) refuse it when
            # the row changed in a way that matters. Refused, or with nothing new to write: decide again on the
            # row read under its lock.
            if not await self._apply(conn, cred, version, outcome, locked=False):
                current = await store.lock_get(conn, cred.owner_id, cid)
                if current.status is CredentialStatus.REVOKED or current.secret_version != version:
                    await self._done(conn, job)
                    return
                await self._apply(conn, current, version, outcome, locked=True)
            await self._done(conn, job)
        self._outbox.committed()

    async def _verified_in_one(
        self,
        job: queuemod.Job,
        cred: Credential,
        version: int,
        outcome: ProbeResult | ProbeFailure,
        sequence: int,
    ) -> bool:
        """The hot path (engine/hotpath.py): a success with something new to write, judged on the row read
        before the probe (event sequence ``sequence``), written with its event and the job's completion in one
        statement, together with the others that succeed meanwhile (engine/donebatch.py). False: not such a
        success, or the statement refused (nothing written)."""
        if isinstance(outcome, ProbeFailure) or not hotpath.eligible(outcome):
            return False
        expected = _account_of(cred)
        if expected is not None and outcome.venue_account_id != expected:
            return False
        reason, warnings = self._policy.evaluate(outcome)
        if reason is not None or _same_findings(cred, outcome, warnings):
            return False
        # what is left is waiting for the batch's write: the next job may call the exchange meanwhile
        queuemod.step_aside()
        if not await self.done_batch.write(job, cred, version, outcome, warnings, sequence):
            await queuemod.step_in()  # the transaction path takes a pool connection: back in line first
            return False
        self._queue.note_completed(job)
        self._outbox.committed()
        return True

    async def _apply(
        self, conn: Conn, cred: Credential, version: int, outcome: ProbeResult | ProbeFailure, *, locked: bool
    ) -> bool:
        """Write what the probe of secret ``version`` found, judged against ``cred``. Unless ``locked`` (``cred``
        read under the row lock), returns False, having written nothing, when a fence refused the write or
        the findings equal the row's (the no-event touch is decided under the lock only)."""
        expected = _account_of(cred)
        if isinstance(outcome, ProbeFailure):
            return await self._fail(conn, cred, version, outcome.outcome.value, outcome.message) or locked
        if expected is not None and outcome.venue_account_id != expected:
            return await self._fail(conn, cred, version, ACCOUNT_MISMATCH, _MISMATCH_MESSAGE) or locked
        reason, warnings = self._policy.evaluate(outcome)
        if reason is not None:
            return await self._fail(conn, cred, version, reason, _policy_message(reason)) or locked
        if _same_findings(cred, outcome, warnings):
            if not locked:
                return False
            await self._store.touch_verified(conn, cred.credential_id, version)
            return True
        return await self._succeed(conn, cred, version, outcome, warnings) or locked

    async def _fail(self, conn: Conn, cred: Credential, version: int, reason: str, message: str) -> bool:
        change = await self._store.mark_failed(conn, cred.credential_id, version, reason, message)
        if change is None:
            return False
        await self._outbox.credential_event(
            conn,
            change.credential,
            "credential.verification_failed",
            sequence=change.sequence,
            extra={"previousStatus": change.previous_status, "reason": reason, "message": message},
        )
        log.info("credential_failed", credential_id=str(cred.credential_id), reason=reason)
        return True

    async def _succeed(
        self, conn: Conn, cred: Credential, version: int, result: ProbeResult, warnings: tuple[str, ...]
    ) -> bool:
        change = await self._store.mark_verified(conn, cred.credential_id, version, result, warnings)
        if change is None:
            return False
        previous = change.previous_status
        event_type = "credential.verified"
        if previous == CredentialStatus.VERIFIED:
            event_type = "credential.permissions_changed"
        await self._outbox.credential_event(
            conn,
            change.credential,
            event_type,
            sequence=change.sequence,
            extra={"previousStatus": previous, "previousPermissions": change.previous_permissions},
        )
        await self._plan_expiry_warning(conn, cred, result)
        return True

    async def _plan_expiry_warning(self, conn: Conn, cred: Credential, result: ProbeResult) -> None:
        expires = result.permissions.expires_at_ms
        if expires is None:
            return
        warn_at = expires - self._policy.expiry_warning_days * DAY_MS
        await enqueue(
            self._queue,
            ExpiryWarning(cred.credential_id, expires),
            conn=conn,
            run_at=datetime.fromtimestamp(max(warn_at, int(time.time() * 1000)) / 1000, tz=UTC),
        )

    # ---- rotation ----------------------------------------------------------------------------------------------

    async def rotation_verify(self, job: queuemod.Job) -> None:
        store = self._store
        work = RotationVerify.from_payload(job.payload)
        cid, version = work.credential_id, work.version
        read = store.read_with_claim(job.attached, cid, version)
        if read is None or _rotation_is_stale(read):  # as in verify: the claim's row may predate the job
            read = await store.read_for_job(cid, version)
        cred, secret, _ = read
        if _rotation_is_stale(read) or secret is None:  # (secret: for the type checker)
            return  # discarded (immediate rotation, revoke) or already promoted
        outcome = await self._probe(cred.venue, store.open_secret(secret), cred.credential_type)
        async with self._db.transaction() as conn:
            current = await store.lock_get(conn, cred.owner_id, cid)
            staged = current.pending_rotation  # read under the lock, with the row
            if (
                current.status is CredentialStatus.REVOKED
                or staged is None
                or staged.secret_version != version
            ):
                await self._done(conn, job)
                return
            expected = _account_of(current)
            if isinstance(outcome, ProbeFailure):
                await self._reject_rotation(conn, current, version, outcome.outcome.value, outcome.message)
            elif expected is not None and outcome.venue_account_id != expected:
                await self._reject_rotation(
                    conn,
                    current,
                    version,
                    ACCOUNT_MISMATCH,
                    "the new keys belong to another venue account than the credential's; the old keys stay in use",
                )
            else:
                reason, warnings = self._policy.evaluate(outcome)
                if reason is not None:
                    await self._reject_rotation(conn, current, version, reason, _policy_message(reason))
                else:
                    await self._promote(conn, current, version, staged.masked_api_key, outcome, warnings)
            await self._done(conn, job)
        self._outbox.committed()

    async def _promote(
        self,
        conn: Conn,
        cred: Credential,
        version: int,
        masked: str,
        result: ProbeResult,
        warnings: tuple[str, ...],
    ) -> None:
        hooked = await self._hooks.promoting(conn, cred, version) if self._hooks is not None else {}
        change = await self._store.promote(conn, cred, version, masked, result, warnings)
        await self._outbox.credential_event(
            conn,
            change.credential,
            "credential.rotated",
            sequence=change.sequence,
            extra={
                "previousStatus": change.previous_status,
                "previousApiKey": cred.masked_api_key,
                "automatic": False,
                **hooked,
            },
        )
        await self._plan_expiry_warning(conn, cred, result)
        log.info("credential_rotated", credential_id=str(cred.credential_id), version=version)

    async def _reject_rotation(
        self, conn: Conn, cred: Credential, version: int, reason: str, message: str
    ) -> None:
        hooked = await self._hooks.rejecting(conn, cred, version, reason) if self._hooks is not None else {}
        change = await self._store.reject_rotation(conn, cred.credential_id, version, reason)
        await self._outbox.credential_event(
            conn,
            change.credential,
            "credential.rotation_failed",
            sequence=change.sequence,
            extra={
                "reason": reason,
                "message": message,
                "rejectedVersion": version,
                "automatic": False,
                **hooked,
            },
        )
        log.info("rotation_rejected", credential_id=str(cred.credential_id), reason=reason)

    # ---- revoke, sweep, expiry ---------------------------------------------------------------------------------

    async def revoke_cascade(self, job: queuemod.Job) -> None:
        """After a revoke: cancel the credential's queued verification and rotation check (the revoke transaction
        names their dedupe keys; an index lookup each). Expiry warnings left queued find it revoked and no-op."""
        work = RevokeCascade.from_payload(job.payload)
        cancelled = await self._queue.cancel_keys(list(work.cancel_keys))
        log.info("revoke_cascade", credential_id=str(work.credential_id), cancelled_jobs=cancelled)

    async def reverify_sweep(self, job: queuemod.Job) -> None:
        """Enqueue a re-verification for VERIFIED credentials not verified for ``reverify_interval`` (a
        verification that finds the credential changed meanwhile is stale and does nothing)."""
        rows = await self._store.due_for_reverify(self._reverify_interval, SWEEP_BATCH)
        if not rows:
            return
        async with self._db.transaction() as conn:
            for row in rows:
                work = Verify(row["id"], int(row["secret_version"]))
                await enqueue(self._queue, work, conn=conn, fair_key=row["owner_id"])
        log.info("reverify_sweep", enqueued=len(rows))

    async def purge_jobs(self, job: queuemod.Job) -> None:
        """Delete done and cancelled jobs finished longer than ``job_retention`` ago (dead ones stay for operators),
        and destroy webhook secrets past their grace period."""
        purged = await self._queue.purge(self._job_retention)
        log.info("jobs_purged", purged=purged)
        await self._purge_webhook_secrets()

    async def expiry_warning(self, job: queuemod.Job) -> None:
        """Announce once that a key's known expiry is near (``credential.expiring``)."""
        work = ExpiryWarning.from_payload(job.payload)
        cid, expires = work.credential_id, work.expires_at_ms
        cred = await self._store.get_by_id(cid)
        if cred is None or cred.permissions is None or cred.permissions.expires_at_ms != expires:
            return
        async with self._db.transaction() as conn:  # the guarded UPDATE is the first write: it locks the row
            change = await self._store.mark_expiry_warned(conn, cid, expires)
            if change is None:
                await self._done(conn, job)
                return
            days = max(0, (expires - int(time.time() * 1000)) // DAY_MS)
            await self._outbox.credential_event(
                conn,
                change.credential,
                "credential.expiring",
                sequence=change.sequence,
                extra={"expiresAt": expires, "daysLeft": days},
            )
            await self._done(conn, job)
        self._outbox.committed()

    async def _done(self, conn: Conn, job: queuemod.Job) -> None:
        await self._queue.complete_in(conn, job)


def _policy_message(reason: str) -> str:
    messages: dict[str, Any] = {
        "POLICY_WITHDRAW_ENABLED": "the key can withdraw funds; the policy rejects such keys (disable withdrawals)",
        "POLICY_TRADE_REQUIRED": "the key cannot trade; the policy requires trade permission",
        "POLICY_IP_ALLOWLIST_REQUIRED": "the key has no IP allow-list; the policy requires one",
        "KEY_EXPIRED": "the key has expired",
    }
    return str(messages.get(reason, reason))
