"""Exchange faults: 30 % of requests to every venue fail transiently (every fault kind) for a while.

The engine probes the exchange simulator over loopback HTTP with its real venue modules, its client-side rate
limits ON, and the simulator enforcing every venue's documented limits. While the faults last no credential
may be marked FAILED (transient answers never change a status); once they stop every credential must be
VERIFIED with the identities and permissions its key really has; and no venue may have seen a request beyond
its documented limits (the simulator counts each one as a violation) or a burst from one key above the
venue's documented per-key limit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import pytest
from reliability_support import EventLog, fetch

from engine import CredentialEngine, Venue
from engine.testing import broken_invariants, settle, unfinished_jobs
from venues.simulator import Faults, Simulator, TestKey
from venues.simulator.faults import KINDS

OWNER = "owner-faults"
ERROR_RATE = 0.3

# (venue, key kind): every kind of key the probes support
KEY_KINDS: list[tuple[Venue, str | None]] = [
    (Venue.BINANCE, None),
    (Venue.OKX, None),
    (Venue.BYBIT, None),
    (Venue.COINBASE, "cdp"),
    (Venue.COINBASE, "cdp_ed25519"),
    (Venue.COINBASE, "exchange"),
    (Venue.KRAKEN, "spot"),
    (Venue.KRAKEN, "futures"),
]

# The most requests one key may send within any second, from the venues' documented limits (docs/venues.md §x.6).
# None: the venue counts per IP only ("the limits on the API are based on the IPs, not the API keys", 1.6);
# those budgets are checked by the simulator itself (rate_limit_violations).
PER_KEY_PER_SECOND: dict[tuple[Venue, str | None], int | None] = {
    (Venue.BINANCE, None): None,
    (Venue.OKX, None): 5 + 10 + 6,  # account/config 5 per 2 s, account/balance 10 per 2 s, asset/balances 6/s
    (Venue.BYBIT, None): 10 + 10 + 50 + 50,  # query-api, get-member-type, account/info, wallet-balance per s
    (Venue.COINBASE, "cdp"): 30,  # Advanced Trade: 30 requests/s per user
    (Venue.COINBASE, "cdp_ed25519"): 30,
    (Venue.COINBASE, "exchange"): 30 + 15,  # Exchange: 15 rps per profile, burst 30
    (Venue.KRAKEN, "spot"): 15 + 1,  # call counter: at most 15, decaying 0.33/s
    (Venue.KRAKEN, "futures"): 500 // 2,  # 500 cost per 10 s, accounts cost 2
}


# Verification storms: extra verifications of ONE key, asked for as fast as the queue takes them (a user
# hammering "verify"; up to ``workers`` probes of the key at once). Without the engine's per-key buckets each of
# these breaks the venue's documented per-key or per-account limit (docs/venues.md: OKX account/config 5 per 2 s,
# Bybit query-api 10/s per UID, Coinbase 30/s per user, Coinbase Exchange 15/s burst 30); with them it must not.
# Kraken Spot (0.33 calls/s once the burst is spent) and Binance (a per-IP weight budget) would take minutes.
STORMS: dict[tuple[Venue, str | None], int] = {
    (Venue.OKX, None): 6,
    (Venue.BYBIT, None): 12,
    (Venue.COINBASE, "cdp"): 20,
    (Venue.COINBASE, "exchange"): 20,
}


async def storm(eng: CredentialEngine, dsn: str, cid: uuid.UUID, probes: int) -> None:
    """Ask for ``probes`` more verifications of one credential as fast as the queue accepts them (while one is
    queued another request is a no-op; as soon as it is taken, the next one is queued)."""
    conn = await asyncpg.connect(dsn)
    try:
        count = "SELECT count(*) FROM queue_jobs WHERE kind = 'verify' AND payload->>'credentialId' = $1"
        while await conn.fetchval(count, str(cid)) < probes + 1:  # + the creation's own
            await eng.verify_credential(OWNER, cid)
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


@pytest.mark.slow
async def test_transient_exchange_faults_never_fail_a_credential(
    make_engine: Any, size: Any, report: Any
) -> None:
    """30 % transient faults of every kind: nothing FAILED, all VERIFIED after, documented rate limits honoured."""
    count, fault_seconds = size((40, 6.0), (400, 30.0))
    async with Simulator(seed=30, enforce_rate_limits=True) as sim:
        eng: CredentialEngine = await make_engine(
            probes={},
            venue_urls=sim.urls,
            venue_rate_limits=True,
            workers=16,
            probe_timeout=1.0,
            poll_interval=0.2,
            backoff_base=0.2,
            backoff_max=2.0,
            max_attempts=200,  # the faults last ~fault_seconds; the test is about outcomes, not giving up
        )
        log = EventLog()
        eng.subscribe(log)
        keys: dict[uuid.UUID, tuple[TestKey, tuple[Venue, str | None]]] = {}
        faults = Faults(error_rate=ERROR_RATE, kinds=KINDS, retry_after=0.5, hang=2.0)
        for venue in Venue:
            sim.set_faults(venue, faults)
        started = time.monotonic()
        dsn = eng.config.database_url or ""
        for i in range(count):  # creations spread over the first half of the fault window
            venue, kind = KEY_KINDS[i % len(KEY_KINDS)]
            key = sim.add_key(venue, kind=kind)
            cred = await eng.create_credential(
                OWNER,
                venue=venue,
                api_key=key.api_key,
                api_secret=key.api_secret,
                api_passphrase=key.api_passphrase,
            )
            keys[cred.credential_id] = (key, (venue, kind))
            await asyncio.sleep(fault_seconds / 2 / count)
        await asyncio.sleep(max(0.0, fault_seconds - (time.monotonic() - started)))
        during = await fetch(dsn, "SELECT status, count(*) AS n FROM credentials GROUP BY status")
        failed_during = [e for e in log.events if e.type == "credential.verification_failed"]
        sim.clear_faults()
        recovered_from = time.monotonic()
        deadline = recovered_from + 60
        while True:
            rows = await fetch(dsn, "SELECT id, status FROM credentials")
            if all(r["status"] == "VERIFIED" for r in rows) or any(r["status"] == "FAILED" for r in rows):
                break
            assert time.monotonic() < deadline, {r["status"] for r in rows}
            await asyncio.sleep(0.2)
        recovery = time.monotonic() - recovered_from
        await eng.run_until_idle()
        stats = {venue: sim.stats(venue) for venue in Venue}

    assert failed_during == []
    assert {r["status"] for r in during} <= {"PENDING", "VERIFIED"}
    assert [e for e in log.events if e.type == "credential.verification_failed"] == []
    wrong: dict[uuid.UUID, Any] = {}
    for cid, (key, _) in keys.items():
        cred = await eng.get_credential(OWNER, cid)
        seen = (cred.status.value, cred.venue_account_id, set(cred.identities))
        if seen != ("VERIFIED", key.uid, set(key.identities)) or cred.permissions is None:
            wrong[cid] = (seen, cred.failure_reason)
        elif (cred.permissions.read, cred.permissions.withdraw) != (key.read, key.withdraw):
            wrong[cid] = cred.permissions
    assert wrong == {}
    assert await unfinished_jobs(eng) == []
    assert await broken_invariants(eng) == {}
    assert {venue: s.rate_limit_violations for venue, s in stats.items()} == dict.fromkeys(Venue, 0)
    assert all(s.faults > 0 for s in stats.values()), (
        "some venue injected no fault: the test proved nothing there"
    )
    bursts = {}
    for key, key_kind in keys.values():
        limit = PER_KEY_PER_SECOND[key_kind]
        burst = stats[key.venue].max_per_second_by_key.get(key.api_key, 0)
        if limit is not None and burst > limit:
            bursts[(key_kind, key.api_key[:8])] = (burst, limit)
    assert bursts == {}
    outcomes = eng.probe_metrics.outcomes
    transient = {o for (_, o), n in outcomes.items() if n and o != "OK"}
    assert {"SERVER_ERROR", "RATE_LIMITED", "TIMEOUT", "MAINTENANCE"} <= transient, transient
    report(
        "exchange faults",
        credentials=count,
        fault_seconds=fault_seconds,
        requests=sum(s.requests for s in stats.values()),
        faults_injected=sum(s.faults for s in stats.values()),
        transient_answers=sum(n for (_, o), n in outcomes.items() if o != "OK"),
        wrongly_failed=0,
        rate_limit_violations=0,
        max_per_key_per_second=max(
            (stats[k.venue].max_per_second_by_key.get(k.api_key, 0) for k, _ in keys.values()), default=0
        ),
        seconds_to_all_verified_after_faults=recovery,
    )


@pytest.mark.slow
async def test_verification_storms_stay_within_documented_limits(
    make_engine: Any, size: Any, report: Any
) -> None:
    """Hammering "verify" on one key per venue: the engine's client-side limits keep every venue's budget."""
    rounds = size(1, 2)
    async with Simulator(seed=31, enforce_rate_limits=True) as sim:
        eng: CredentialEngine = await make_engine(
            probes={}, venue_urls=sim.urls, venue_rate_limits=True, workers=16, probe_timeout=2.0,
            backoff_base=0.2, backoff_max=1.0, max_attempts=200,
        )  # fmt: skip
        dsn = eng.config.database_url or ""
        stormed: dict[uuid.UUID, tuple[TestKey, tuple[Venue, str | None]]] = {}
        for venue, kind in STORMS:
            key = sim.add_key(venue, kind=kind)
            cred = await eng.create_credential(
                OWNER,
                venue=venue,
                api_key=key.api_key,
                api_secret=key.api_secret,
                api_passphrase=key.api_passphrase,
            )
            stormed[cred.credential_id] = (key, (venue, kind))
        started = time.monotonic()
        await asyncio.gather(
            *(storm(eng, dsn, cid, STORMS[kind] * rounds) for cid, (_, kind) in stormed.items())
        )
        await settle(eng, horizon=5.0)
        elapsed = time.monotonic() - started
        stats = {venue: sim.stats(venue) for venue in Venue}
    violations = {
        venue.value: s.rate_limit_violations for venue, s in stats.items() if s.rate_limit_violations
    }
    bursts = {
        f"{venue.value}/{kind}": stats[venue].max_per_second_by_key.get(key.api_key, 0)
        for key, (venue, kind) in stormed.values()
    }
    report("verification storms", probes=sum(STORMS.values()) * rounds, seconds=elapsed, **bursts)
    assert violations == {}
    over = {name: n for name, n in bursts.items() if n > (PER_KEY_PER_SECOND[_kind(name)] or n)}
    assert over == {}


def _kind(name: str) -> tuple[Venue, str | None]:
    venue, _, kind = name.partition("/")
    return Venue(venue), None if kind == "None" else kind
