"""Test helpers users can reuse: ``FakeVenue``, a programmable in-memory probe for every venue.

    fake = FakeVenue()
    fake.add_key("key-1", "secret-1", account_id="uid-7", identities=("spot", "futures"))
    fake.fail_key("bad-key", Outcome.INVALID_SECRET)
    fake.flaky_key("key-2", "secret-2", transient=3)      # three RATE_LIMITED answers, then success
    async with CredentialEngine(config, probes=fake.probes()) as eng:
        ...

It checks secrets too: a known key with another secret (or passphrase) answers INVALID_SECRET
(INVALID_PASSPHRASE), as an exchange would. Unknown keys answer INVALID_KEY. It records every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

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
