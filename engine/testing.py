"""Test helpers users can reuse: ``FakeVenue``, a programmable in-memory probe for every venue.

    fake = FakeVenue()
    fake.add_key("key-1", "secret-1", account_id="uid-7", identities=("spot", "futures"))
    fake.fail_key("bad-key", Outcome.INVALID_SECRET)
    fake.flaky_key("key-2", "secret-2", transient=3)      # three RATE_LIMITED answers, then success
    async with CredentialEngine(config, probes=fake.probes()) as eng:
        ...

It checks secrets too: a known key with another secret (or passphrase) answers INVALID_SECRET
(INVALID_PASSPHRASE), as an exchange would. Unknown keys answer INVALID_KEY. It records every call.

``FakeSubAccounts`` is the in-memory sub-account key API of Binance, OKX and Bybit for BROKER credentials, on top
of a ``FakeVenue``: a key it mints probes OK there (on the sub-account as its venue account) until deleted:

    subs = FakeSubAccounts(fake)
    subs.add_master("master-1", "secret-1", venue=Venue.BYBIT, subs=("sub-7",))
    async with CredentialEngine(config, probes=fake.probes(), sub_accounts=subs.managers()) as eng:
        ...

``INVARIANT_SQL`` states the invariants of docs/design.md §4 as queries that return the rows breaking them;
``broken_invariants(engine)`` runs them all, and ``unfinished_jobs(engine)`` lists the jobs a quiet queue should
not have (running, or queued and due):

    assert await broken_invariants(eng) == {}
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from venues.base import (
    ApiKeys,
    KeyFormatProblem,
    Outcome,
    Permissions,
    Probe,
    ProbeFailure,
    ProbeResult,
    Venue,
)
from venues.subaccounts import KeyGrant, KeyLeftBehind, MintedKey, SubAccount, SubAccountKeys, SubKeyInfo

if TYPE_CHECKING:
    from engine.engine import CredentialEngine


@dataclass
class FakeKey:
    secret: str
    passphrase: str | None
    account_id: str
    identities: tuple[str, ...]
    permissions: Permissions
    failure: Outcome | None = None
    transient_left: int = 0
    transient_outcome: Outcome = Outcome.RATE_LIMITED
    retry_after: float | None = None
    delay: float = 0.0
    gate: asyncio.Event | None = None


@dataclass
class FakeVenue:
    """A probe for any venue, programmed per API key. ``calls`` lists the API keys probed, in order."""

    keys: dict[str, FakeKey] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def add_key(
        self,
        api_key: str,
        api_secret: str,
        *,
        passphrase: str | None = None,
        account_id: str = "uid-1",
        identities: tuple[str, ...] = ("spot",),
        read: bool = True,
        trade: bool = True,
        withdraw: bool = False,
        ip_allowlist: tuple[str, ...] = ("203.0.113.7",),
        expires_at_ms: int | None = None,
        delay: float = 0.0,
    ) -> FakeKey:
        key = FakeKey(
            secret=api_secret,
            passphrase=passphrase,
            account_id=account_id,
            identities=identities,
            permissions=Permissions(
                read=read,
                trade=trade,
                withdraw=withdraw,
                ip_restricted=bool(ip_allowlist),
                ip_allowlist=ip_allowlist,
                expires_at_ms=expires_at_ms,
            ),
            delay=delay,
        )
        self.keys[api_key] = key
        return key

    def fail_key(self, api_key: str, outcome: Outcome, api_secret: str = "") -> FakeKey:
        """A key the venue rejects for good (``outcome`` must be permanent) or always transiently."""
        key = self.add_key(api_key, api_secret)
        key.failure = outcome
        return key

    def flaky_key(
        self,
        api_key: str,
        api_secret: str,
        *,
        transient: int,
        outcome: Outcome = Outcome.RATE_LIMITED,
        retry_after: float | None = None,
        **kwargs: object,
    ) -> FakeKey:
        """A good key whose first ``transient`` probes fail with a transient ``outcome``."""
        key = self.add_key(api_key, api_secret, **kwargs)  # type: ignore[arg-type]
        key.transient_left = transient
        key.transient_outcome = outcome
        key.retry_after = retry_after
        return key

    def probes(self) -> Mapping[Venue, Probe]:
        """This fake as the probe of every venue."""
        return {venue: _Bound(self, venue) for venue in Venue}

    async def run(self, venue: Venue, keys: ApiKeys) -> ProbeResult:
        self.calls.append(keys.api_key)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            key = self.keys.get(keys.api_key)
            if key is None:
                raise ProbeFailure(Outcome.INVALID_KEY, "unknown API key")
            if key.gate is not None:
                await key.gate.wait()
            if key.delay:
                await asyncio.sleep(key.delay)
            if key.transient_left > 0:
                key.transient_left -= 1
                raise ProbeFailure(
                    key.transient_outcome, "simulated transient failure", retry_after=key.retry_after
                )
            if key.failure is not None:
                raise ProbeFailure(key.failure, f"simulated {key.failure.value}")
            if keys.api_secret != key.secret:
                raise ProbeFailure(Outcome.INVALID_SECRET, "signature does not match")
            if key.passphrase is not None and keys.api_passphrase != key.passphrase:
                raise ProbeFailure(Outcome.INVALID_PASSPHRASE, "passphrase does not match")
            return ProbeResult(
                venue=venue,
                venue_account_id=key.account_id,
                permissions=key.permissions,
                identities=tuple(sorted(key.identities)),
            )
        finally:
            self.in_flight -= 1


class _Bound:
    """The fake seen as one venue's probe."""

    def __init__(self, fake: FakeVenue, venue: Venue) -> None:
        self.fake = fake
        self.venue = venue

    def check_keys(self, keys: ApiKeys) -> None:
        if keys.api_key.startswith("malformed"):
            raise KeyFormatProblem("apiKey", "is not in this venue's key format")

    async def probe(self, keys: ApiKeys) -> ProbeResult:
        return await self.fake.run(self.venue, keys)


@dataclass
class FakeMaster:
    venue: Venue
    subs: tuple[str, ...]
    can_manage: bool


@dataclass
class FakeSubAccounts:
    """In-memory sub-account key managers (Binance, OKX, Bybit) behind ``venue``'s probes.

    ``keys[(venue, sub)]`` is the venue's truth: every key of each sub-account, as ``list_keys`` answers.
    Faults: ``fail_next`` (the next calls fail with these outcomes, one each), ``failure_rate`` (that share of
    calls fails with SERVER_ERROR; a failing ``create_key`` has created the key half of the time: its answer was
    lost), ``lose_answers`` (the next creations happen but answer TIMEOUT) and ``leave_behind`` (the next
    creations make a key, then fail halfway and raise ``KeyLeftBehind``). A master added with
    ``can_manage=False`` lists its sub-accounts but may not manage their keys (PERMISSION_DENIED), as a venue
    refuses a master key without that permission. ``calls`` records (method, sub-account).
    """

    venue: FakeVenue
    masters: dict[str, FakeMaster] = field(default_factory=dict)
    keys: dict[tuple[Venue, str], dict[str, SubKeyInfo]] = field(default_factory=dict)
    failures: list[Outcome] = field(default_factory=list)
    failure_rate: float = 0.0
    lose_answers: int = 0
    leave_behind: int = 0  # the next creations make the key, fail a follow-up step and raise KeyLeftBehind
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    calls: list[tuple[str, str]] = field(default_factory=list)
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    VENUES: ClassVar[tuple[Venue, ...]] = (Venue.BINANCE, Venue.OKX, Venue.BYBIT)

    def add_master(
        self,
        api_key: str,
        api_secret: str,
        *,
        venue: Venue = Venue.BYBIT,
        subs: tuple[str, ...] = ("sub-1",),
        can_manage: bool = True,
        account_id: str = "master-1",
        passphrase: str | None = None,
    ) -> None:
        """A master key (also a key ``venue`` probes OK) of an account with sub-accounts ``subs``."""
        self.venue.add_key(api_key, api_secret, passphrase=passphrase, account_id=account_id)
        self.masters[api_key] = FakeMaster(venue, tuple(subs), can_manage)

    def fail_next(self, *outcomes: Outcome) -> None:
        self.failures.extend(outcomes)

    def managers(self) -> Mapping[Venue, SubAccountKeys]:
        """This fake as the sub-account key manager of Binance, OKX and Bybit."""
        return {venue: _FakeManager(self, venue) for venue in self.VENUES}

    def live_keys(self, venue: Venue, sub: str) -> list[SubKeyInfo]:
        """The keys ``sub`` has at the fake venue now."""
        return list(self.keys.get((venue, sub), {}).values())

    def plant(self, venue: Venue, sub: str, label: str) -> SubKeyInfo:
        """A key created at the venue that nobody recorded (a crash between the venue's answer and the commit)."""
        return self._create(venue, sub, KeyGrant(label=label)).info

    def _create(self, venue: Venue, sub: str, grant: KeyGrant) -> MintedKey:
        key_id = f"{venue.value.lower()}-sub-{next(self._serial):06d}-{secrets.token_hex(6)}"
        secret = secrets.token_hex(16)
        passphrase = secrets.token_hex(6) if venue is Venue.OKX else None
        allowlist = grant.ip_allowlist
        self.venue.add_key(
            key_id, secret, passphrase=passphrase, account_id=sub, read=grant.read, trade=grant.trade,
            ip_allowlist=allowlist,
        )  # fmt: skip
        info = SubKeyInfo(
            key_id=key_id, label=grant.label, read=grant.read, trade=grant.trade, ip_allowlist=allowlist,
            created_at_ms=int(time.time() * 1000),
        )  # fmt: skip
        self.keys.setdefault((venue, sub), {})[key_id] = info
        return MintedKey(sub, info, ApiKeys(key_id, secret, passphrase))

    def _fault(self) -> Outcome | None:
        if self.failures:
            return self.failures.pop(0)
        if self.failure_rate and self.rng.random() < self.failure_rate:
            return Outcome.SERVER_ERROR
        return None


class _FakeManager:
    """The fake seen as one venue's :class:`venues.subaccounts.SubAccountKeys`."""

    def __init__(self, fake: FakeSubAccounts, venue: Venue) -> None:
        self.fake = fake
        self.venue = venue

    def _master(self, keys: ApiKeys, method: str, sub: str = "") -> FakeMaster:
        self.fake.calls.append((method, sub))
        master = self.fake.masters.get(keys.api_key)
        known = self.fake.venue.keys.get(keys.api_key)
        if (
            master is None
            or known is None
            or master.venue is not self.venue
            or known.secret != keys.api_secret
        ):
            raise ProbeFailure(Outcome.INVALID_KEY, "unknown master key")
        return master

    def _check(self, master: FakeMaster, sub: str) -> None:
        if not master.can_manage:
            raise ProbeFailure(
                Outcome.PERMISSION_DENIED, "the master key may not manage sub-account API keys"
            )
        if sub not in master.subs:
            raise ProbeFailure(Outcome.PERMISSION_DENIED, "not a sub-account of this master account")

    async def list_sub_accounts(self, master: ApiKeys) -> tuple[SubAccount, ...]:
        found = self._master(master, "list_sub_accounts")
        fault = self.fake._fault()
        if fault is not None:
            raise ProbeFailure(fault, "simulated failure")
        return tuple(SubAccount(sub) for sub in found.subs)

    async def can_manage_keys(self, master: ApiKeys) -> bool:
        return self._master(master, "can_manage_keys").can_manage

    async def create_key(self, master: ApiKeys, sub_id: str, grant: KeyGrant) -> MintedKey:
        found = self._master(master, "create_key", sub_id)
        self._check(found, sub_id)
        fault = self.fake._fault()
        if fault is not None:
            if fault.transient and self.fake.rng.random() < 0.5:
                self.fake._create(self.venue, sub_id, grant)  # made, but the answer is lost
            raise ProbeFailure(fault, "simulated failure")
        minted = self.fake._create(self.venue, sub_id, grant)
        if self.fake.leave_behind > 0:
            self.fake.leave_behind -= 1
            raise KeyLeftBehind(
                Outcome.SERVER_ERROR, "simulated follow-up failure", sub_id=sub_id, key_id=minted.info.key_id
            )
        if self.fake.lose_answers > 0:
            self.fake.lose_answers -= 1
            raise ProbeFailure(Outcome.TIMEOUT, "simulated lost answer")
        return minted

    async def list_keys(self, master: ApiKeys, sub_id: str) -> tuple[SubKeyInfo, ...]:
        found = self._master(master, "list_keys", sub_id)
        self._check(found, sub_id)
        fault = self.fake._fault()
        if fault is not None:
            raise ProbeFailure(fault, "simulated failure")
        return tuple(self.fake.live_keys(self.venue, sub_id))

    async def delete_key(self, master: ApiKeys, sub_id: str, key_id: str) -> bool:
        found = self._master(master, "delete_key", sub_id)
        self._check(found, sub_id)
        fault = self.fake._fault()
        if fault is not None:
            raise ProbeFailure(fault, "simulated failure")
        gone = self.fake.keys.get((self.venue, sub_id), {}).pop(key_id, None)
        self.fake.venue.keys.pop(key_id, None)
        return gone is not None


async def settle(
    engine: CredentialEngine, *, horizon: float = 2.0, rounds: int = 500, pause: float = 0.02
) -> None:
    """Run jobs until none is running or due within ``horizon`` seconds (retries scheduled a few ms ahead).

    ``run_until_idle`` does not wait for jobs scheduled in the future; tests of retry paths use this with
    a small ``backoff_base`` so that retries come due quickly. Jobs due later (the periodic re-verification
    sweep, expiry warnings) are left alone.
    """
    for _ in range(rounds):
        await engine.run_until_idle()
        soon = datetime.now(UTC) + timedelta(seconds=horizon)
        pending = [
            job
            for state in ("queued", "running")
            for job in await engine.queue.list_jobs(state=state, limit=1000)
            if state == "running" or job.run_at <= soon
        ]
        if not pending:
            return
        await asyncio.sleep(pause)
    raise AssertionError("jobs still due after settle(): a retry loop that never ends?")


# the invariants of docs/design.md §4, each as a query returning the rows that break it (none: it holds).
INVARIANT_SQL: Mapping[str, str] = {
    "revoked credentials hold no key material": """
        SELECT c.id FROM credentials c JOIN credential_secrets s ON s.credential_id = c.id
        WHERE c.status = 'REVOKED'""",
    "revoked credentials have secret version 0, others a positive one": """
        SELECT id FROM credentials WHERE (status = 'REVOKED') <> (secret_version = 0)""",
    "a live credential has exactly one CURRENT secret, at its secret version (a minted credential: once minted)": """
        SELECT c.id FROM credentials c
        WHERE c.status <> 'REVOKED' AND 1 <> (
            SELECT count(*) FROM credential_secrets s
            WHERE s.credential_id = c.id AND s.state = 'CURRENT' AND s.version = c.secret_version)
          AND NOT (c.status IN ('PENDING', 'FAILED') AND c.secret_version = 1
                   AND EXISTS (SELECT 1 FROM broker_intents i WHERE i.credential_id = c.id AND i.purpose = 'MINT'
                               AND i.state IN ('OPEN', 'FAILED'))
                   AND NOT EXISTS (SELECT 1 FROM credential_secrets s WHERE s.credential_id = c.id))""",
    "at most one staged rotation, newer than the current version": """
        SELECT s.credential_id FROM credential_secrets s JOIN credentials c ON c.id = s.credential_id
        WHERE s.state = 'PENDING' GROUP BY s.credential_id, c.secret_version
        HAVING count(*) > 1 OR min(s.version) <= c.secret_version""",
    "the quota's counters hold each owner's count of credentials that are not REVOKED": """
        SELECT coalesce(k.owner_id, live.owner_id) FROM (
            SELECT c.owner_id, count(*) AS n FROM credentials c WHERE c.status <> 'REVOKED' GROUP BY c.owner_id
        ) live
        FULL JOIN (
            SELECT o.owner_id, ce_credentials_held(o.owner_id) AS n
            FROM (SELECT owner_id FROM credential_counts_created
                  UNION SELECT owner_id FROM credential_counts_gone) o
        ) k ON k.owner_id = live.owner_id
        WHERE coalesce(k.n, 0) <> coalesce(live.n, 0)""",
    "an ACTIVE trading account points at a non-revoked credential": """
        SELECT a.id FROM trading_accounts a JOIN credentials c ON c.id = a.credential_id
        WHERE a.status = 'ACTIVE' AND c.status = 'REVOKED'""",
    "event sequences are gapless and match the credential's counter": """
        SELECT c.id FROM credentials c LEFT JOIN events e ON e.credential_id = c.id
        GROUP BY c.id, c.event_seq
        HAVING count(e.id) <> c.event_seq OR coalesce(max(e.sequence), 0) <> c.event_seq
            OR count(DISTINCT e.sequence) <> count(e.id)""",
    "a credential that has verified stays on the venue account it is pinned to": """
        SELECT id FROM credentials
        WHERE venue_account_id IS NOT NULL AND pinned_venue_account_id IS DISTINCT FROM venue_account_id""",
    "VERIFIED means verified with permissions; FAILED names a reason": """
        SELECT id FROM credentials
        WHERE (status = 'VERIFIED' AND (verified_at IS NULL OR permissions IS NULL))
           OR (status = 'FAILED' AND failure_reason IS NULL)""",
}

# Jobs a queue that has finished its work must not hold: running (a lease, live or expired) or queued and due.
UNFINISHED_JOBS_SQL = """
    SELECT id, kind, state, attempt, worker_id, lease_expires_at, run_at, last_error FROM queue_jobs
    WHERE state = 'running' OR (state = 'queued' AND run_at <= now() + make_interval(secs => $1))
    ORDER BY id"""


async def _rows(engine: CredentialEngine, sql: str, *args: Any) -> list[dict[str, Any]]:
    async with engine.db.connection() as conn:
        # literal test SQL on the driver connection: these checks are not part of the engine's named queries
        return [dict(row) for row in await conn._conn.fetch(sql, *args)]


async def broken_invariants(engine: CredentialEngine) -> dict[str, list[dict[str, Any]]]:
    """Each invariant of :data:`INVARIANT_SQL` that does not hold, with the rows breaking it ({} when all hold)."""
    broken: dict[str, list[dict[str, Any]]] = {}
    for name, sql in INVARIANT_SQL.items():
        rows = await _rows(engine, sql)
        if rows:
            broken[name] = rows
    return broken


async def unfinished_jobs(engine: CredentialEngine, *, horizon: float = 0.0) -> list[dict[str, Any]]:
    """Jobs still running, or queued and due within ``horizon`` seconds (:data:`UNFINISHED_JOBS_SQL`); [] once
    the queue has done its work. A horizon longer than the retry delays in play also waits for retries that
    are scheduled but not due yet (a webhook's next attempt after a 503, say)."""
    return await _rows(engine, UNFINISHED_JOBS_SQL, float(horizon))
