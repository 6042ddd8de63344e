"""The jobs that drive the lifecycle: verify, rotation verify, revoke cascade, re-verification sweep, expiry warning.

Each handler probes outside any transaction (a venue call can take seconds), then applies the result in one
transaction that locks the credential, re-checks the fence (the secret version it probed is still the one in
use or staged), writes the change and its events, and marks the job done (``queue.complete_in``) so that a
late or duplicate attempt can never apply twice. Transient venue outcomes never change a status: they raise
``Retry`` (honouring the venue's Retry-After) and the credential stays as it is.

A credential is pinned to the venue account of its first successful verification
(``credentials.pinned_venue_account_id``, set once by ``mark_verified``/``mark_rotated``, never changed: a
trigger refuses it). Every later verification, whatever started it (a manual verify, the re-verification sweep,
an immediate rotation, a staged rotation), that reaches another account fails with ``ACCOUNT_MISMATCH``: the
credential never moves to another account, and so neither do its trading accounts.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from engine import lifecycle, logs
from engine import queue as queuemod
from engine.config import DAY_MS, EngineConfig
from engine.models import Credential, CredentialStatus
from venues.base import MAX_SEQUENTIAL_REQUESTS, ApiKeys, ProbeFailure, ProbeResult, Venue

if TYPE_CHECKING:
    from engine.db import Conn
    from engine.engine import CredentialEngine

log = structlog.get_logger("engine.jobs")

VERIFY = "verify"
ROTATION_VERIFY = "rotation_verify"
REVOKE_CASCADE = "revoke_cascade"
REVERIFY_SWEEP = "reverify_sweep"
PURGE_JOBS = "purge_jobs"
PURGE_PERIOD = 3600.0  # seconds between purges of old finished jobs and of expired webhook secrets
EXPIRY_WARNING = "expiry_warning"
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


def verify_key(credential_id: uuid.UUID) -> str:
    """Dedupe key: at most one queued verification per credential."""
    return f"verify:{credential_id}"


def rotation_key(credential_id: uuid.UUID, version: int) -> str:
    """Dedupe key of the verification of staged version ``version`` (per version: a check left queued by an
    immediate rotation must never swallow the check of a later staging)."""
    return f"rotate:{credential_id}:{version}"


def handler_timeouts(config: EngineConfig) -> dict[str, float]:
    """The timeout of each lifecycle job kind: a probing job is bounded by its requests (at most
    ``MAX_SEQUENTIAL_REQUESTS`` of ``probe_timeout`` one after another) plus ``PROBE_JOB_MARGIN``; the others
    get ``job_timeout``. ``config.job_timeouts`` overrides either."""
    probing = config.probe_timeout * MAX_SEQUENTIAL_REQUESTS + PROBE_JOB_MARGIN
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
    latency_buckets: Counter[tuple[str, float]] = field(default_factory=Counter)
    latency_sum: Counter[str] = field(default_factory=Counter)
    latency_count: Counter[str] = field(default_factory=Counter)

    def observe(self, venue: Venue, outcome: str, seconds: float) -> None:
        self.outcomes[(venue.value, outcome)] += 1
        self.latency_sum[venue.value] += seconds  # type: ignore[assignment]
        self.latency_count[venue.value] += 1
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                self.latency_buckets[(venue.value, bound)] += 1


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


class LifecycleJobs:
    """The handlers, bound to one engine."""

    def __init__(self, engine: CredentialEngine) -> None:
        self.engine = engine
        self.metrics = ProbeMetrics()

    def handlers(self) -> dict[str, queuemod.Handler]:
        return {
            VERIFY: self.verify,
            ROTATION_VERIFY: self.rotation_verify,
            REVOKE_CASCADE: self.revoke_cascade,
            REVERIFY_SWEEP: self.reverify_sweep,
            PURGE_JOBS: self.purge_jobs,
            EXPIRY_WARNING: self.expiry_warning,
        }

    async def _probe(self, venue: Venue, keys: ApiKeys) -> ProbeResult | ProbeFailure:
        """Probe; a permanent failure is returned, a transient one becomes ``Retry`` (status untouched)."""
        started = time.monotonic()
        try:
            with logs.secret_scope(keys):  # anything that logs during the probe is scrubbed of these values
                result = await self.engine.probe(venue).probe(keys)
        except ProbeFailure as failure:
            self.metrics.observe(venue, failure.outcome.value, time.monotonic() - started)
            if failure.transient:
                log.info("probe_transient", venue=venue.value, outcome=failure.outcome.value)
                raise queuemod.Retry(after=failure.retry_after, reason=failure.outcome.value) from None
            return failure
        self.metrics.observe(venue, "OK", time.monotonic() - started)
        return result

    # ---- verify ----------------------------------------------------------------------------------------------

    async def verify(self, job: queuemod.Job) -> None:
        store = self.engine.store
        cid = uuid.UUID(job.payload["credentialId"])
        version = int(job.payload["version"])
        cred, secret = await store.get_with_secret(cid, version)
        if cred.status is CredentialStatus.REVOKED or cred.secret_version != version or secret is None:
            return  # stale: revoked or rotated since it was enqueued
        outcome = await self._probe(cred.venue, store.open_secret(secret))
        async with self.engine.db.transaction() as conn:
            current = await store.lock_get(conn, cred.owner_id, cid)
            if current.status is CredentialStatus.REVOKED or current.secret_version != version:
                await self._done(conn, job)
                return
            expected = _account_of(current)  # read under the lock
            if isinstance(outcome, ProbeFailure):
                await self._fail(conn, current, version, outcome.outcome.value, outcome.message)
            elif expected is not None and outcome.venue_account_id != expected:
                await self._fail(conn, current, version, ACCOUNT_MISMATCH, _MISMATCH_MESSAGE)
            else:
                reason, warnings = self.engine.config.policy.evaluate(outcome)
                if reason is not None:
                    await self._fail(conn, current, version, reason, _policy_message(reason))
                else:
                    await self._succeed(conn, current, version, outcome, warnings)
            await self._done(conn, job)
        self.engine.bus.poke()

    async def _fail(self, conn: Conn, cred: Credential, version: int, reason: str, message: str) -> None:
        row = await conn.fetchrow(
            "mark_failed", cred.credential_id, lifecycle.sources("verify_rejected"), version, reason, message
        )
        if row is None:
            return
        await self.engine._emit(
            conn,
            cred.owner_id,
            cred.credential_id,
            "credential.verification_failed",
            sequence=int(row["event_seq"]),
            extra={"previousStatus": row["previous_status"], "reason": reason, "message": message},
        )
        log.info("credential_failed", credential_id=str(cred.credential_id), reason=reason)

    async def _succeed(
        self, conn: Conn, cred: Credential, version: int, result: ProbeResult, warnings: tuple[str, ...]
    ) -> None:
        if _same_findings(cred, result, warnings):
            await conn.execute("touch_verified", cred.credential_id, version)
            return
        row = await conn.fetchrow(
            "mark_verified",
            cred.credential_id,
            lifecycle.sources("verify_succeeded"),
            version,
            sorted(result.identities),
            result.permissions.as_dict(),
            result.venue_account_id,
            result.environment,
            list(warnings),
        )
        if row is None:
            return
        previous = row["previous_status"]
        event_type = "credential.verified"
        if previous == CredentialStatus.VERIFIED:
            event_type = "credential.permissions_changed"
        await self.engine._emit(
            conn,
            cred.owner_id,
            cred.credential_id,
            event_type,
            sequence=int(row["event_seq"]),
            extra={"previousStatus": previous, "previousPermissions": row["previous_permissions"]},
        )
        await self._plan_expiry_warning(conn, cred, result)

    async def _plan_expiry_warning(self, conn: Conn, cred: Credential, result: ProbeResult) -> None:
        expires = result.permissions.expires_at_ms
        if expires is None:
            return
        warn_at = expires - self.engine.config.policy.expiry_warning_days * DAY_MS
        await self.engine.queue.enqueue(
            EXPIRY_WARNING,
            {"credentialId": str(cred.credential_id), "expiresAt": expires},
            conn=conn,
            run_at=datetime.fromtimestamp(max(warn_at, int(time.time() * 1000)) / 1000, tz=UTC),
            dedupe_key=f"expiry:{cred.credential_id}:{expires}",
        )

    # ---- rotation ----------------------------------------------------------------------------------------------

    async def rotation_verify(self, job: queuemod.Job) -> None:
        store = self.engine.store
        cid = uuid.UUID(job.payload["credentialId"])
        version = int(job.payload["version"])
        cred, secret = await store.get_with_secret(cid, version)
        if cred.status is CredentialStatus.REVOKED or secret is None or secret.state != "PENDING":
            return  # discarded (immediate rotation, revoke) or already promoted
        outcome = await self._probe(cred.venue, store.open_secret(secret))
        async with self.engine.db.transaction() as conn:
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
                reason, warnings = self.engine.config.policy.evaluate(outcome)
                if reason is not None:
                    await self._reject_rotation(conn, current, version, reason, _policy_message(reason))
                else:
                    await self._promote(conn, current, version, staged.masked_api_key, outcome, warnings)
            await self._done(conn, job)
        self.engine.bus.poke()

    async def _promote(
        self,
        conn: Conn,
        cred: Credential,
        version: int,
        masked: str,
        result: ProbeResult,
        warnings: tuple[str, ...],
    ) -> None:
        old_version = cred.secret_version
        await conn.execute("delete_secret", cred.credential_id, old_version)  # old material destroyed
        await conn.execute("promote_secret", cred.credential_id, version)
        row = await conn.fetchrow(
            "mark_rotated",
            cred.credential_id,
            lifecycle.sources("rotation_succeeded"),
            old_version,
            version,
            masked,
            sorted(result.identities),
            result.permissions.as_dict(),
            result.venue_account_id,
            result.environment,
            list(warnings),
        )
        assert row is not None  # locked, live, fenced on the version read under the lock
        await self.engine._emit(
            conn,
            cred.owner_id,
            cred.credential_id,
            "credential.rotated",
            sequence=int(row["event_seq"]),
            extra={"previousStatus": row["previous_status"], "previousApiKey": cred.masked_api_key},
        )
        await self._plan_expiry_warning(conn, cred, result)
        log.info("credential_rotated", credential_id=str(cred.credential_id), version=version)

    async def _reject_rotation(
        self, conn: Conn, cred: Credential, version: int, reason: str, message: str
    ) -> None:
        await conn.execute("delete_secret", cred.credential_id, version)  # staged material destroyed
        row = await conn.fetchrow(
            "mark_rotation_rejected", cred.credential_id, lifecycle.sources("rotation_rejected"), reason
        )
        assert row is not None
        await self.engine._emit(
            conn,
            cred.owner_id,
            cred.credential_id,
            "credential.rotation_failed",
            sequence=int(row["event_seq"]),
            extra={"reason": reason, "message": message, "rejectedVersion": version},
        )
        log.info("rotation_rejected", credential_id=str(cred.credential_id), reason=reason)

    # ---- revoke, sweep, expiry ---------------------------------------------------------------------------------

    async def revoke_cascade(self, job: queuemod.Job) -> None:
        """After a revoke: cancel the credential's queued verification and rotation check (the revoke transaction
        names their dedupe keys; an index lookup each). Expiry warnings left queued find it revoked and no-op."""
        cid = job.payload["credentialId"]
        cancelled = await self.engine.queue.cancel_keys(list(job.payload.get("cancelKeys", ())))
        log.info("revoke_cascade", credential_id=cid, cancelled_jobs=cancelled)

    async def reverify_sweep(self, job: queuemod.Job) -> None:
        """Enqueue a re-verification for VERIFIED credentials not verified for ``reverify_interval``."""
        rows = await self.engine.db.fetch(
            "due_for_reverify", self.engine.config.reverify_interval, SWEEP_BATCH
        )
        if not rows:
            return
        async with self.engine.db.transaction() as conn:
            for row in rows:
                cred = await self.engine.store.get_by_id(row["id"], conn=conn)
                if cred is None or cred.status is not CredentialStatus.VERIFIED:
                    continue
                await self.engine.queue.enqueue(
                    VERIFY,
                    {"credentialId": str(cred.credential_id), "version": cred.secret_version},
                    conn=conn,
                    dedupe_key=verify_key(cred.credential_id),
                    fair_key=cred.owner_id,
                )
        log.info("reverify_sweep", enqueued=len(rows))

    async def purge_jobs(self, job: queuemod.Job) -> None:
        """Delete done and cancelled jobs finished longer than ``job_retention`` ago (dead ones stay for operators),
        and destroy webhook secrets past their grace period."""
        purged = await self.engine.queue.purge(self.engine.config.job_retention)
        log.info("jobs_purged", purged=purged)
        await self.engine.webhooks.purge_expired_secrets()

    async def expiry_warning(self, job: queuemod.Job) -> None:
        """Announce once that a key's known expiry is near (``credential.expiring``)."""
        cid = uuid.UUID(job.payload["credentialId"])
        expires = int(job.payload["expiresAt"])
        cred = await self.engine.store.get_by_id(cid)
        if cred is None or cred.permissions is None or cred.permissions.expires_at_ms != expires:
            return
        async with self.engine.db.transaction() as conn:
            await self.engine.store.lock(conn, cred.owner_id, cid)
            if await conn.fetchrow("mark_expiry_warned", cid, expires) is None:
                await self._done(conn, job)
                return
            days = max(0, (expires - int(time.time() * 1000)) // DAY_MS)
            await self.engine._emit(
                conn,
                cred.owner_id,
                cid,
                "credential.expiring",
                extra={"expiresAt": expires, "daysLeft": days},
            )
            await self._done(conn, job)
        self.engine.bus.poke()

    async def _done(self, conn: Conn, job: queuemod.Job) -> None:
        await self.engine.queue.complete_in(conn, job)


def _policy_message(reason: str) -> str:
    messages: dict[str, Any] = {
        "POLICY_WITHDRAW_ENABLED": "the key can withdraw funds; the policy rejects such keys (disable withdrawals)",
        "POLICY_TRADE_REQUIRED": "the key cannot trade; the policy requires trade permission",
        "POLICY_IP_ALLOWLIST_REQUIRED": "the key has no IP allow-list; the policy requires one",
        "KEY_EXPIRED": "the key has expired",
    }
    return str(messages.get(reason, reason))
