"""Issue 9 at the engine's level: a hung verification is cut off by its job timeout (derived from the probe's
request timeouts), and one owner's backlog of verifications does not delay another owner's."""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import structlog

from engine import errors, jobs
from engine.broker.discovery import Discovery
from engine.broker.managers import Managers
from engine.config import EngineConfig
from engine.engine import CredentialEngine
from engine.models import CredentialStatus
from engine.testing import FakeVenue
from venues import build_probe, okx_subaccounts
from venues.base import MAX_SEQUENTIAL_REQUESTS, ProbeFailure, Venue
from venues.simulator import Faults, Simulator
from venues.subaccounts import MAX_DISCOVERY_REQUESTS, build_sub_account_keys

EngineFactory = Callable[..., Awaitable[CredentialEngine]]
SECRET = "canary-secret-5d1c0b"
KINDS = [(Venue.BINANCE, None), (Venue.OKX, None), (Venue.BYBIT, None), (Venue.COINBASE, "cdp")]
KINDS += [(Venue.COINBASE, "exchange"), (Venue.KRAKEN, "spot"), (Venue.KRAKEN, "futures")]


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within} s")
        await asyncio.sleep(0.05)


async def test_a_hung_probe_is_cut_off_retried_then_dead(make_engine: EngineFactory, fake: FakeVenue) -> None:
    """A probe that never answers holds its verification job only up to the job timeout: the try counts,
    the job is retried, then dead; the credential stays PENDING; the keys never reach the log."""
    fake.add_key("hung-key-1234", SECRET, delay=3600)
    eng = await make_engine(workers=1, max_attempts=2, lease_seconds=2.0, job_timeouts={"verify": 0.3})
    with structlog.testing.capture_logs() as logs:
        cred = await eng.create_credential(
            "owner-1", venue=Venue.BINANCE, api_key="hung-key-1234", api_secret=SECRET
        )

        async def dead() -> bool:
            return bool(await eng.list_dead_jobs())

        await eventually(dead, within=30)
    [job] = await eng.list_dead_jobs()
    assert (job.kind, job.tries) == (jobs.VERIFY, 2)
    assert job.last_error is not None and job.last_error.startswith("HandlerTimeout")
    assert (await eng.get_credential("owner-1", cred.credential_id)).status is CredentialStatus.PENDING
    assert [e["event"] for e in logs].count("queue_handler_timeout") == 2
    assert SECRET not in repr(logs) and "hung-key-1234" not in repr(logs)


async def test_job_timeouts_follow_the_request_timeouts(make_engine: EngineFactory) -> None:
    """A verification may take its probe's longest chain of requests plus a margin; a webhook delivery its
    HTTP timeout plus a margin; the rest job_timeout; job_timeouts overrides any of them."""
    eng = await make_engine(
        probe_timeout=2.0, webhook_timeout=7.0, job_timeout=50.0, job_timeouts={"purge_jobs": 900}
    )
    queue = eng.queue  # each kind registered with its own timeout; job_timeouts (the settings) win
    # a BROKER key's verification also discovers its sub-accounts and permission after the probe
    probing = 2.0 * (MAX_SEQUENTIAL_REQUESTS + MAX_DISCOVERY_REQUESTS) + jobs.PROBE_JOB_MARGIN
    assert queue.timeout_for(jobs.VERIFY) == queue.timeout_for(jobs.ROTATION_VERIFY) == probing
    assert queue.timeout_for("webhook_delivery") == 7.0 + 30.0
    assert queue.timeout_for(jobs.REVOKE_CASCADE) == 50.0
    assert queue.timeout_for(jobs.PURGE_JOBS) == 900.0


async def test_a_timeout_for_an_unknown_job_kind_is_refused(make_engine: EngineFactory) -> None:
    """A typo in job_timeouts is a configuration error naming the kind, not a silently ignored setting."""
    with pytest.raises(errors.ConfigurationError, match="verfiy"):
        await make_engine(job_timeouts={"verfiy": 10})


async def test_every_probe_fits_its_request_budget() -> None:
    """The verification job's timeout assumes a probe waits for at most MAX_SEQUENTIAL_REQUESTS request
    timeouts one after another. Against the simulator with a latency per request and a skewed clock (each
    signed call is refused, the clock resynced and the call retried), every key kind's probe takes less than
    that many latencies."""
    latency = 0.25
    async with Simulator(seed=11, enforce_rate_limits=False) as sim, aiohttp.ClientSession() as session:
        for venue, kind in KINDS:
            sim.set_faults(venue, Faults(latency=latency))
            sim.set_clock_offset(venue, 120_000)  # two minutes ahead: outside every venue's window
            key = sim.add_key(venue, kind=kind)
            probe = build_probe(venue, session, base_url=sim.urls[venue], rate_limited=False)
            started = time.monotonic()
            await probe.probe(key.api_keys)
            elapsed = time.monotonic() - started
            assert elapsed < MAX_SEQUENTIAL_REQUESTS * latency, (venue, kind, elapsed)


def test_the_discovery_budget_is_the_largest_venue_count() -> None:
    """MAX_DISCOVERY_REQUESTS (what the verification job's timeout counts for a BROKER key) is the largest
    sequential request count the venue modules with a sub-account key API state."""
    counts = {
        name: importlib.import_module(f"venues.{name}_subaccounts").DISCOVERY_REQUESTS
        for name in ("binance", "okx", "bybit")
    }
    assert max(counts.values()) == MAX_DISCOVERY_REQUESTS, counts


async def test_every_broker_verification_fits_its_request_budget(make_engine: EngineFactory) -> None:
    """A BROKER key's verification is its probe, then the discovery of its sub-accounts (two pages of them
    where Binance pages) and of its permission. Against the simulator with a latency per request and a skewed
    clock, each venue's takes less than the request timeouts the engine's verification job is given (the probe's
    MAX_SEQUENTIAL_REQUESTS alone was not enough for Binance)."""
    eng = await make_engine(probe_timeout=1.0)
    budget = eng.queue.timeout_for(jobs.VERIFY) - jobs.PROBE_JOB_MARGIN  # request timeouts of 1 s
    latency = 0.1
    subs = {
        Venue.BINANCE: 501,
        Venue.OKX: 2,
        Venue.BYBIT: 2,
    }  # Binance pages by 500 (the simulator's OKX: 1 page)
    async with Simulator(seed=12, enforce_rate_limits=False) as sim, aiohttp.ClientSession() as session:
        for venue, count in subs.items():
            master = sim.add_master_account(venue, sub_accounts=count)
            sim.set_faults(venue, Faults(latency=latency))
            sim.set_clock_offset(venue, 120_000)  # two minutes ahead: outside every venue's window
            probe = build_probe(venue, session, base_url=sim.urls[venue], rate_limited=False)
            managers = Managers(
                lambda v: build_sub_account_keys(v, session, base_url=sim.urls[v], rate_limited=False)
            )
            started = time.monotonic()
            result = await probe.probe(master.key.api_keys)
            result = await Discovery(managers)(venue, master.key.api_keys, result)
            requests = (time.monotonic() - started) / latency
            assert result.permissions.sub_account_keys, venue
            assert sum(i.startswith("sub:") for i in result.identities) == count, venue
            assert requests < budget, (venue, requests, budget)


async def test_an_okx_listing_of_sub_accounts_is_bounded() -> None:
    """OKX pages its sub-accounts 100 at a time: the listing stops after MAX_PAGES pages with a permanent
    failure (the verification's requests stay bounded) instead of paging on without end (the simulator answers
    every page with every sub-account, which made the old loop endless)."""
    async with Simulator(seed=13, enforce_rate_limits=False) as sim, aiohttp.ClientSession() as session:
        limit = okx_subaccounts.PAGE_SIZE * okx_subaccounts.MAX_PAGES
        master = sim.add_master_account(Venue.OKX, sub_accounts=okx_subaccounts.PAGE_SIZE)
        manager = build_sub_account_keys(Venue.OKX, session, base_url=sim.urls[Venue.OKX], rate_limited=False)
        with pytest.raises(ProbeFailure) as refused:
            async with asyncio.timeout(60):
                await manager.list_sub_accounts(master.key.api_keys)
        assert not refused.value.transient and str(limit) in str(refused.value)


async def test_another_owners_verification_is_not_queued_behind_a_backlog(
    make_engine: EngineFactory, fake: FakeVenue
) -> None:
    """Owner A creates 300 credentials, then owner B one: B's is among the first claimed batch of
    verifications (a FIFO queue would verify it last)."""
    eng = await make_engine()
    for n in range(300):
        fake.add_key(f"a-key-{n:04d}", "secret-a")
        await eng.create_credential(
            "owner-A", venue=Venue.BINANCE, api_key=f"a-key-{n:04d}", api_secret="secret-a"
        )
    fake.add_key("b-key-0001", "secret-b")
    cred = await eng.create_credential(
        "owner-B", venue=Venue.BINANCE, api_key="b-key-0001", api_secret="secret-b"
    )
    await eng.run_until_idle(timeout=120)
    assert (await eng.get_credential("owner-B", cred.credential_id)).status is CredentialStatus.VERIFIED
    assert fake.calls.index("b-key-0001") < EngineConfig().claim_batch_size
