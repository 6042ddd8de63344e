"""The lease registry: one per engine, one event-bus subscription for every key lease of the process.

It keeps a :class:`~engine.live.leases.HeldKeys` per leased credential and updates it from the events every
engine process on the database writes (:mod:`engine.events`: the outbox is the truth, read with a cursor, so an
event is never skipped, even across a lost connection):

- a credential's revocation (``credential.revoked``, or any event showing it REVOKED) drops its keys at once,
  without I/O, marks its leases revoked, wakes ``wait_revoked`` and calls the ``on_change`` callbacks;
- a new secret version (``credential.rotated`` after a promoted staged rotation, ``credential.rotation_started``
  of an immediate one) makes one refresh task fetch and decrypt the new keys once for all the credential's leases,
  audit the swap (one ``lease_swap`` row per lease) and swap them in place; after an immediate rotation the lease
  is unverified (status PENDING) until the ``credential.verified`` event of the new version;
- any other event of the credential's current version updates its status (a re-verification that failed, ...).

Events carry the credential's per-credential ``sequence``: one at or below the last applied is old news.

On top of the bus, a watch task re-checks every leased credential's status and version in one query
(``lease_states``) whenever the bus reports a lost LISTEN connection or a failed read of the outbox, and every
``recheck_interval`` seconds anyway; a re-check that fails (the database is away) is retried with backoff.

Every wait is bounded: database work by the pool's acquire and statement timeouts, the per-credential lock by
``lock_timeout``, each callback by ``callback_timeout`` (a slow or failing callback is logged and counted,
never stops the registry). Nothing here logs key material or a callback's exception text (only its type).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from engine import errors, jobs
from engine import events as eventsmod
from engine.db import Database, Record
from engine.live.leases import ChangeCallback, ChangeKind, HeldKeys, KeyLease, LeaseChange
from engine.models import CredentialStatus, Event
from engine.store import Store
from venues.base import ApiKeys, Venue

log = structlog.get_logger("engine.live")

GAP_POLL = 0.05  # seconds between two looks at the bus's reconnect and read-failure counters
IDLE_POLL = 0.5  # ... while this process holds no lease
RECHECK_BACKOFF_MAX = 2.0  # seconds between attempts of a re-check while the database is away
REFRESH_ATTEMPTS = 50  # a swap retried this often (database away, or the version changed under the read)
SETTLE_TIMEOUT = 5.0  # seconds run_until_idle waits for the leases to take new keys
CLOSE_TIMEOUT = 5.0  # seconds close() waits for the registry's tasks to end once cancelled


class _State(NamedTuple):
    """A credential's state as an event or a row shows it."""

    status: CredentialStatus
    version: int
    venue_account_id: str | None
    failure_reason: str | None
    sequence: int

    @property
    def mismatched(self) -> bool:
        """The keys reach another venue account than the credential's pinned one."""
        return self.status is CredentialStatus.FAILED and self.failure_reason == jobs.ACCOUNT_MISMATCH


def _state_of(row: Record) -> _State:
    return _State(
        CredentialStatus(row["status"]),
        int(row["secret_version"]),
        row["venue_account_id"],
        row["failure_reason"],
        int(row["event_seq"]),
    )


@dataclass
class LeaseStats:
    """What this process's registry did (counters since the engine opened)."""

    opened: int = 0  # leases opened
    swaps: int = 0  # key swaps after a rotation (per credential, not per lease)
    revocations: int = 0  # credentials seen revoked while leased
    rechecks: int = 0  # re-checks of every leased credential (after a bus gap, or periodic)
    recheck_failures: int = 0
    refresh_failures: int = 0  # swaps that gave up (logged; the next event or re-check tries again)
    withheld: int = 0  # credentials whose keys were withheld (they reach another venue account)
    callback_failures: int = 0  # callbacks that raised or ran past callback_timeout


class LeaseRegistry:
    """Every key lease of one engine process. Made with the engine (its ``stats`` are readable at any time);
    :meth:`start` once the database and the store are open, before the bus starts."""

    def __init__(
        self,
        *,
        bus: eventsmod.EventBus,
        callback_timeout: float,
        recheck_interval: float,
        lock_timeout: float,
    ) -> None:
        self._db_store: tuple[Database, Store] | None = None
        self._bus = bus
        self._callback_timeout = callback_timeout
        self._recheck_interval = recheck_interval
        self._lock_timeout = lock_timeout
        self._held: dict[tuple[str, uuid.UUID], HeldKeys] = {}  # (owner, credential) -> the keys held here
        self._refresh_wanted: set[uuid.UUID] = set()
        self._callback_tail: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        self._closed = False
        self.stats = LeaseStats()

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self, db: Database, store: Store) -> None:
        """Start the watch task. The bus subscription (every event type: trading-account events carry the
        credential too) is taken by the first lease and given up with the last one, so that a process holding
        no lease leaves the bus idle (it then neither LISTENs nor reads event data: engine/events.py)."""
        self._db_store = (db, store)
        self._watch_task = asyncio.create_task(self._watch(), name="ce-leases-watch")

    async def close(self) -> None:
        """Close every lease (``keys`` raises LeaseClosed), drop every key, stop listening. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        for held in list(self._held.values()):
            held.closed = True
            held.keys = None
            held.wake_all()
        self._held.clear()
        tasks = [t for t in (self._watch_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)

    async def settle(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - bounded wait
        """Wait (at most ``timeout`` seconds, default :data:`SETTLE_TIMEOUT`) until no key refresh or callback of
        this process is running, so that every change the bus delivered has reached the leases
        (``CredentialEngine.run_until_idle``). False when time ran out first (a slow callback of the backend's
        is its own business: it is bounded by the callback timeout, and never an error of the caller's)."""
        deadline = time.monotonic() + (SETTLE_TIMEOUT if timeout is None else timeout)
        while pending := [t for t in self._tasks if not t.done()]:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.wait(pending, timeout=left)  # a refresh may spawn callbacks: look again
        return True

    @property
    def _db(self) -> Database:
        assert self._db_store is not None, "start() first"
        return self._db_store[0]

    @property
    def _store(self) -> Store:
        assert self._db_store is not None, "start() first"
        return self._db_store[1]

    @property
    def open_leases(self) -> int:
        return sum(len(h.leases) for h in self._held.values())

    # ---- opening and releasing -----------------------------------------------------------------------------

    async def open(
        self, owner_id: str, cid: uuid.UUID, *, purpose: str | None, allow_pending: bool
    ) -> KeyLease:
        """A lease of ``cid``: VERIFIED (or PENDING with ``allow_pending``), audited once as ``lease_open``.

        The lease is registered before the credential is read, so an event committed after the read is applied
        to it; the read locks the credential row, so it sees every change committed before it.
        """
        if self._closed or self._db_store is None:
            raise errors.EngineClosed("the engine is not open (use `async with CredentialEngine(...)`)")
        if self._unsubscribe is None:  # subscribed before the credential is read: no event falls in between
            self._unsubscribe = self._bus.subscribe(self._on_event)
        held = self._held.get((owner_id, cid))
        if held is None or held.closed:
            held = HeldKeys(cid, owner_id)
            self._held[(owner_id, cid)] = held
        lease = KeyLease(held, self, purpose)
        held.leases.add(lease)
        try:
            async with self._locked(held):
                await self._load(held, lease, allow_pending)
        except BaseException:
            lease.close()
            raise
        self.stats.opened += 1
        log.info("key_lease_opened", credential_id=str(cid), secret_version=held.secret_version)
        return lease

    @contextlib.asynccontextmanager
    async def _locked(self, held: HeldKeys) -> Any:
        """``held.lock``, waited for at most ``lock_timeout`` seconds."""
        try:
            async with asyncio.timeout(self._lock_timeout):
                await held.lock.acquire()
        except TimeoutError:
            raise errors.WaitTimeout(
                f"the keys of credential {held.credential_id} are being swapped; try again",
                field="credentialId",
            ) from None
        try:
            yield
        finally:
            held.lock.release()

    async def _load(self, held: HeldKeys, lease: KeyLease, allow_pending: bool) -> None:
        cid, owner_id = held.credential_id, held.owner_id
        if held.revoked:
            raise errors.CredentialRevoked(f"credential {cid} is revoked", field="credentialId")
        store = self._store
        async with self._db.transaction() as conn:
            row = await store.lock(conn, owner_id, cid)
            status = CredentialStatus(row["status"])
            if status is CredentialStatus.REVOKED:
                raise errors.CredentialRevoked(f"credential {cid} is revoked", field="credentialId")
            if status is not CredentialStatus.VERIFIED and not (
                allow_pending and status is CredentialStatus.PENDING
            ):
                raise errors.InvalidTransition("lease keys of", status.value)
            version = int(row["secret_version"])
            keys = held.keys if held.keys is not None and held.secret_version == version else None
            if keys is None:  # the first lease of this credential (or of this version) here: decrypt once
                secret = await store.get_secret(cid, version, conn=conn)
                if secret is None:
                    raise errors.Conflict("the credential holds no key material", field="credentialId")
                keys = store.open_secret(secret)
            await store.audit_access(conn, cid, owner_id, version, [lease.purpose], "lease_open")
            others = [other.purpose for other in held.leases if other is not lease]
            if held.keys is not None and held.secret_version != version and others:
                # the bus has not told this process of the new version yet: the other leases swap now too
                await store.audit_access(conn, cid, owner_id, version, others, "lease_swap")
        if held.revoked:  # revoked (any process) between the commit and now
            raise errors.CredentialRevoked(f"credential {cid} is revoked", field="credentialId")
        held.venue = Venue(row["venue"])
        self._apply_state(held, _state_of(row), keys)

    def release(self, lease: KeyLease) -> None:
        """A lease closed: forget it; the credential's keys go with its last lease."""
        held = lease._held
        held.leases.discard(lease)
        key = (held.owner_id, held.credential_id)
        if not held.leases and self._held.get(key) is held:
            del self._held[key]
            held.keys = None
        if not self._held and self._unsubscribe is not None:  # the last lease: leave the bus idle
            self._unsubscribe()
            self._unsubscribe = None

    # ---- events ------------------------------------------------------------------------------------------

    async def _on_event(self, event: Event) -> None:
        """The bus's listener: no I/O here (a revocation takes effect at once); swaps run in refresh tasks."""
        cid = event.credential_id
        held = self._held.get((event.owner_id, cid)) if cid is not None else None
        if held is None or held.revoked or held.closed:
            return
        cred = event.data.get("credential")
        if not isinstance(cred, Mapping):
            return
        status = str(cred.get("status"))
        if event.type == "credential.revoked" or status == CredentialStatus.REVOKED:
            self._revoke(held)
            return
        if event.sequence <= held.sequence:
            return  # already applied (read at opening, or by a refresh)
        version = int(cred.get("secretVersion") or 0)
        if version > held.secret_version:
            self._schedule_refresh(held)
        elif version == held.secret_version and status in CredentialStatus.__members__:
            state = _State(
                CredentialStatus(status),
                version,
                cred.get("venueAccountId"),
                cred.get("failureReason"),
                event.sequence,
            )
            if held.withheld and not state.mismatched:
                self._schedule_refresh(held)  # the keys were dropped: fetch them again
            else:
                self._apply_state(held, state, None)

    def _apply_state(self, held: HeldKeys, state: _State, keys: ApiKeys | None) -> None:
        """Take the credential's ``state`` (with new ``keys`` when the version changed, or when withheld keys
        come back) and tell the leases' callbacks what changed. Keys that reach another venue account than the
        credential's pinned one (FAILED, ``ACCOUNT_MISMATCH``) are withheld, as ``reveal_keys`` refuses them."""
        if held.revoked or held.closed or state.sequence < held.sequence:
            return
        old_version, was_verified, loaded = (
            held.secret_version,
            held.status is CredentialStatus.VERIFIED,
            held.keys is not None or held.withheld,
        )
        version, status = state.version, state.status
        if keys is not None:
            held.keys = keys
            held.secret_version = version
            held.withheld = False
        held.status = status
        held.venue_account_id = state.venue_account_id
        held.sequence = state.sequence
        if not loaded:
            return  # the first load: nothing changed for anyone yet
        if version != old_version:
            self.stats.swaps += 1
            log.info(
                "key_lease_swapped",
                credential_id=str(held.credential_id),
                secret_version=version,
                leases=len(held.leases),
            )
            self._notify(held, LeaseChange(ChangeKind.ROTATED, held.credential_id, old_version, version))
        elif not was_verified and status is CredentialStatus.VERIFIED:
            self._notify(held, LeaseChange(ChangeKind.VERIFIED, held.credential_id, version, version))
        if state.mismatched and held.keys is not None:
            held.keys = None  # dropped like a revoked credential's; a later rotation brings keys back
            held.withheld = True
            self.stats.withheld += 1
            log.warning("key_lease_withheld", credential_id=str(held.credential_id), secret_version=version)
            self._notify(held, LeaseChange(ChangeKind.WITHHELD, held.credential_id, version, version))

    def _revoke(self, held: HeldKeys) -> None:
        if held.revoked:
            return
        old_version = held.secret_version
        held.revoked = True
        held.keys = None  # drop the material (best effort: every reference the engine holds)
        held.status = CredentialStatus.REVOKED
        held.secret_version = 0
        held.wake_all()
        self.stats.revocations += 1
        log.info("key_lease_revoked", credential_id=str(held.credential_id), leases=len(held.leases))
        self._notify(held, LeaseChange(ChangeKind.REVOKED, held.credential_id, old_version, 0))

    # ---- swapping ------------------------------------------------------------------------------------------

    def _schedule_refresh(self, held: HeldKeys) -> None:
        if held.credential_id in self._refresh_wanted or self._closed:
            return  # one already waits to run: it reads the state as of when it runs
        self._refresh_wanted.add(held.credential_id)
        self._spawn(self._refresh(held), name=f"ce-lease-refresh-{held.credential_id}")

    async def _refresh(self, held: HeldKeys) -> None:
        """Read the credential's state and, for a new version, its keys (once for every lease), with retries."""
        delay = 0.05
        for _ in range(REFRESH_ATTEMPTS):
            try:
                async with self._locked(held):
                    self._refresh_wanted.discard(held.credential_id)
                    if held.revoked or held.closed or (held.keys is None and not held.withheld):
                        return  # revoked, closed, or not loaded yet (the load reads the latest version)
                    if await self._refresh_once(held):
                        return
            except (errors.StorageError, errors.WaitTimeout) as exc:
                log.warning(
                    "key_lease_refresh_failed",
                    credential_id=str(held.credential_id),
                    error=type(exc).__name__,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECHECK_BACKOFF_MAX)
        self.stats.refresh_failures += 1
        log.error("key_lease_refresh_gave_up", credential_id=str(held.credential_id))

    async def _refresh_once(self, held: HeldKeys) -> bool:
        """One attempt; False when the version changed between the two reads (try again)."""
        cid = held.credential_id
        keys: ApiKeys | None = None
        async with self._db.transaction() as conn:
            row = await conn.fetchrow("lease_states", [cid])
            if row is None or row["status"] == CredentialStatus.REVOKED:
                revoked = True
            else:
                revoked = False
                version = int(row["secret_version"])
                state = _state_of(row)
                if version > held.secret_version or (held.withheld and not state.mismatched):
                    secret = await self._store.get_secret(cid, version, conn=conn)
                    if secret is None:
                        return False  # rotated again or revoked since the first read
                    keys = self._store.open_secret(secret)
                    purposes = [lease.purpose for lease in held.leases]
                    await self._store.audit_access(conn, cid, held.owner_id, version, purposes, "lease_swap")
        if revoked:
            self._revoke(held)
        else:
            self._apply_state(held, state, keys)
        return True

    # ---- re-checks -----------------------------------------------------------------------------------------

    def _bus_signal(self) -> tuple[int, int]:
        stats = self._bus.stats
        return stats.reconnects, stats.read_failures

    async def _watch(self) -> None:
        """Re-check every leased credential after each bus gap (lost LISTEN, failed read) and periodically."""
        seen = self._bus_signal()
        due = time.monotonic() + self._recheck_interval
        dirty = False
        delay = GAP_POLL
        while True:
            await asyncio.sleep(delay)
            signal = self._bus_signal()
            if signal != seen:
                seen, dirty = signal, True
            if not self._held:  # no lease here: nothing to re-check (a lease opening reads the latest state)
                dirty, delay = False, IDLE_POLL
                continue
            if not dirty and time.monotonic() < due:
                delay = GAP_POLL
                continue
            try:
                await self.recheck()
            except errors.StorageError as exc:
                self.stats.recheck_failures += 1
                log.warning("key_lease_recheck_failed", error=type(exc).__name__)
                dirty = True
                delay = min(max(delay * 2, 0.1), RECHECK_BACKOFF_MAX)
                continue
            dirty = False
            delay = GAP_POLL
            due = time.monotonic() + self._recheck_interval

    async def recheck(self) -> None:
        """Read the status and version of every leased credential in one query; revoke what is REVOKED (or gone),
        refresh what changed."""
        held_now = [
            h
            for h in self._held.values()
            if not h.revoked and not h.closed and (h.keys is not None or h.withheld)
        ]
        self.stats.rechecks += 1
        if not held_now:
            return
        rows: dict[uuid.UUID, Record] = {
            row["id"]: row
            for row in await self._db.fetch("lease_states", [h.credential_id for h in held_now])
        }
        for held in held_now:
            row = rows.get(held.credential_id)
            if row is None or row["status"] == CredentialStatus.REVOKED:
                self._revoke(held)
            elif int(row["secret_version"]) != held.secret_version or int(row["event_seq"]) > held.sequence:
                self._schedule_refresh(held)

    # ---- callbacks -----------------------------------------------------------------------------------------

    def _notify(self, held: HeldKeys, change: LeaseChange) -> None:
        """Run the callbacks of every lease of ``held`` for ``change``: after those of the previous change of
        the same credential, concurrently with each other."""
        targets = [(lease, cb) for lease in list(held.leases) for cb in lease.callbacks]
        if not targets or self._closed:
            return
        cid = held.credential_id
        previous = self._callback_tail.get(cid)
        task = self._spawn(self._run_callbacks(previous, targets, change), name=f"ce-lease-change-{cid}")
        self._callback_tail[cid] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._callback_tail.get(cid) is done:
                del self._callback_tail[cid]

        task.add_done_callback(forget)

    async def _run_callbacks(
        self,
        previous: asyncio.Task[None] | None,
        targets: list[tuple[KeyLease, ChangeCallback]],
        change: LeaseChange,
    ) -> None:
        if previous is not None:
            await asyncio.wait({previous})  # its outcome is its own (each callback's errors are logged)
        await asyncio.gather(*(self._call(lease, cb, change) for lease, cb in targets))

    async def _call(self, lease: KeyLease, callback: ChangeCallback, change: LeaseChange) -> None:
        name = getattr(callback, "__qualname__", type(callback).__name__)
        try:
            async with asyncio.timeout(self._callback_timeout):
                await callback(lease, change)
        except TimeoutError:
            self.stats.callback_failures += 1
            log.warning("key_lease_callback_timeout", callback=name, change=change.kind.value)
        except (
            Exception
        ) as exc:  # the backend's bug must not stop the registry: logged (type only) and counted
            self.stats.callback_failures += 1
            log.warning(
                "key_lease_callback_failed", callback=name, change=change.kind.value, error=type(exc).__name__
            )

    def _spawn(self, coro: Any, *, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
