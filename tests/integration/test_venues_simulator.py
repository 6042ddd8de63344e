"""Every venue's real probe, through the engine, against the exchange simulator over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import random
import string
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from garbage_support import left_for_the_collector

from engine import CredentialEngine, CredentialStatus, TradingAccountStatus, Venue
from engine.testing import settle
from venues.base import ApiKeys
from venues.kraken_auth import KrakenKeys
from venues.simulator import Faults, Simulator, TestKey

OWNER = "owner-sim"

# (venue, simulator key kind): every key kind the probes support
KINDS: list[tuple[Venue, str | None]] = [
    (Venue.BINANCE, None),
    (Venue.OKX, None),
    (Venue.BYBIT, None),
    (Venue.COINBASE, "cdp"),
    (Venue.COINBASE, "cdp_ed25519"),
    (Venue.COINBASE, "exchange"),
    (Venue.KRAKEN, "spot"),
    (Venue.KRAKEN, "futures"),
]
IDS = [f"{v.value.lower()}-{k or 'default'}" for v, k in KINDS]

# What each failure looks like through each probe. Where the venue cannot tell two causes apart, the probe
# reports what the venue says (venues/README.md, the probe <-> simulator contract).
WRONG_SECRET = {
    "binance-default": "INVALID_SECRET",
    "okx-default": "INVALID_SECRET",
    "bybit-default": "INVALID_SECRET",
    "coinbase-cdp": "INVALID_KEY",  # a CDP 401 cannot tell key from secret (docs/venues.md §4A.5)
    "coinbase-cdp_ed25519": "INVALID_KEY",
    "coinbase-exchange": "INVALID_SECRET",
    "kraken-spot": "INVALID_SECRET",
    "kraken-futures": "INVALID_KEY",  # authenticationError covers both (docs/venues.md §5B)
}
IP_NOT_ALLOWED = dict.fromkeys(IDS, "IP_NOT_ALLOWED") | {
    "binance-default": "INVALID_KEY",  # -2015: unknown key, IP or permission, indistinguishable (venues §1.5)
    "kraken-futures": "INVALID_KEY",  # authenticationError (contract)
}
EXPIRED = dict.fromkeys(IDS, "INVALID_KEY") | {"bybit-default": "KEY_EXPIRED"}


def other_char(c: str, rng: random.Random) -> str:
    for alphabet in (string.digits, string.ascii_uppercase, string.ascii_lowercase):
        if c in alphabet:
            return rng.choice(alphabet.replace(c, ""))
    return c


def wrong_secret(key: TestKey) -> str:
    """A secret of the same format as the real one, that is not it."""
    rng = random.Random(7)
    if "BEGIN" in key.api_secret:
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return pem.decode()
    try:
        raw = base64.b64decode(key.api_secret, validate=True)
    except ValueError:
        raw = b""
    if len(raw) in (32, 64):
        return base64.b64encode(bytes(rng.randrange(256) for _ in raw)).decode()
    return "".join(other_char(c, rng) for c in key.api_secret)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=11, enforce_rate_limits=False) as simulator:
        yield simulator


@pytest.fixture
async def real_engine(make_engine: Any, sim: Simulator) -> CredentialEngine:
    """An engine whose probes are the real venue modules, pointed at the simulator."""
    return await make_engine(probes={}, venue_urls=sim.urls, probe_timeout=2.0)


async def create(eng: CredentialEngine, key: TestKey, **override: Any) -> Any:
    fields = {"api_key": key.api_key, "api_secret": key.api_secret, "api_passphrase": key.api_passphrase}
    fields.update(override)
    return await eng.create_credential(OWNER, venue=key.venue, **fields)


async def final(eng: CredentialEngine, cred: Any) -> Any:
    await settle(eng)
    return await eng.get_credential(OWNER, cred.credential_id)


@pytest.mark.parametrize(("venue", "kind"), KINDS, ids=IDS)
async def test_good_key_verifies_with_identities_and_permissions(
    real_engine: CredentialEngine, sim: Simulator, venue: Venue, kind: str | None
) -> None:
    """A read+trade key becomes VERIFIED with the simulator account's uid, identities and permissions."""
    key = sim.add_key(venue, kind=kind, ip_allowlist=("127.0.0.1",))
    done = await final(real_engine, await create(real_engine, key))
    assert done.status is CredentialStatus.VERIFIED, done.failure_reason
    assert done.venue_account_id == key.uid
    assert set(done.identities) == set(key.identities)
    assert done.permissions is not None
    assert done.permissions.read
    assert not done.permissions.withdraw
    if not (venue is Venue.COINBASE and kind == "exchange"):  # Exchange keys expose no permissions (4B)
        assert done.permissions.trade


@pytest.mark.parametrize(("venue", "kind"), KINDS, ids=IDS)
async def test_identities_follow_what_the_key_reaches(
    real_engine: CredentialEngine, sim: Simulator, venue: Venue, kind: str | None
) -> None:
    """A key reaching fewer account types is VERIFIED with exactly those identities."""
    key = sim.add_key(venue, kind=kind)
    # realistic subsets: every Binance account has spot; a classic Bybit account has spot and contract wallets
    reduced = {Venue.BINANCE: ("spot",), Venue.BYBIT: ("unified",)}.get(venue, key.identities[:1])
    sim.update_key(key.api_key, identities=reduced)
    done = await final(real_engine, await create(real_engine, key))
    assert done.status is CredentialStatus.VERIFIED, done.failure_reason
    assert done.identities == tuple(sorted(reduced))


@pytest.mark.parametrize(("venue", "kind"), KINDS, ids=IDS)
async def test_failures_are_classified(
    real_engine: CredentialEngine, sim: Simulator, venue: Venue, kind: str | None, request: Any
) -> None:
    """Wrong secret, unknown key, IP not allowed and expired key each become FAILED with the venue's reason."""
    name = request.node.callspec.id
    good = sim.add_key(venue, kind=kind)
    unknown = replace(
        good, api_key=good.api_key[:-4] + "ZZZ9" if venue is not Venue.COINBASE else good.api_key
    )
    if venue is Venue.COINBASE:
        sim.remove_key(good.api_key)
        unknown = good
        good = sim.add_key(venue, kind=kind)
    fenced = sim.add_key(venue, kind=kind, ip_allowlist=("10.1.2.3",))
    expired = sim.add_key(venue, kind=kind, expires_at_ms=int(time.time() * 1000) - 60_000)
    cases = {
        "wrong secret": (await create(real_engine, good, api_secret=wrong_secret(good)), WRONG_SECRET[name]),
        "unknown key": (await create(real_engine, unknown), "INVALID_KEY"),
        "ip": (await create(real_engine, fenced), IP_NOT_ALLOWED[name]),
        "expired": (await create(real_engine, expired), EXPIRED[name]),
    }
    await settle(real_engine)
    got = {}
    for case, (cred, _) in cases.items():
        done = await real_engine.get_credential(OWNER, cred.credential_id)
        got[case] = (done.status.value, done.failure_reason)
    assert got == {case: ("FAILED", want) for case, (_, want) in cases.items()}


@pytest.mark.parametrize(
    ("venue", "kind"), [(Venue.OKX, None), (Venue.COINBASE, "exchange")], ids=["okx", "coinbase-exchange"]
)
async def test_wrong_passphrase_fails_with_invalid_passphrase(
    real_engine: CredentialEngine, sim: Simulator, venue: Venue, kind: str | None
) -> None:
    """OKX and Coinbase Exchange keys with the wrong passphrase become FAILED: INVALID_PASSPHRASE."""
    key = sim.add_key(venue, kind=kind)
    done = await final(real_engine, await create(real_engine, key, api_passphrase="Wrong-Passphrase-1"))
    assert (done.status, done.failure_reason) == (CredentialStatus.FAILED, "INVALID_PASSPHRASE")


@pytest.mark.parametrize(("venue", "kind"), KINDS, ids=IDS)
async def test_withdraw_keys_fail_the_default_policy(
    real_engine: CredentialEngine, sim: Simulator, venue: Venue, kind: str | None
) -> None:
    """A key that can withdraw is FAILED by the default policy, naming the rule (where the venue tells)."""
    if venue is Venue.COINBASE and kind == "exchange":
        pytest.skip("Coinbase Exchange exposes no permissions (docs/venues.md §4B): withdraw cannot be seen")
    key = sim.add_key(venue, kind=kind, withdraw=True, ip_allowlist=("127.0.0.1",))
    done = await final(real_engine, await create(real_engine, key))
    assert (done.status, done.failure_reason) == (CredentialStatus.FAILED, "POLICY_WITHDRAW_ENABLED")


async def test_fault_storm_never_fails_a_credential(make_engine: Any, sim: Simulator) -> None:
    """30 % 5xx/429/timeouts/malformed answers on every venue: all PENDING during the storm, VERIFIED after."""
    eng = await make_engine(probes={}, venue_urls=sim.urls, probe_timeout=0.5)
    keys = [sim.add_key(venue, kind=kind) for venue, kind in KINDS for _ in range(2)]
    for venue in Venue:
        sim.set_faults(
            venue,
            Faults(
                error_rate=0.3,
                kinds=("server_error", "rate_limited", "timeout", "malformed", "maintenance"),
                retry_after=0.05,
                hang=1.0,
            ),
        )
    creds = [await create(eng, key) for key in keys]
    for _ in range(4):  # several rounds of attempts inside the storm
        await eng.run_until_idle()
        await asyncio.sleep(0.06)
    during = [(await eng.get_credential(OWNER, c.credential_id)).status for c in creds]
    assert CredentialStatus.FAILED not in during
    injected = sum(sim.stats(v).faults for v in Venue)
    assert injected > 0, "the storm injected nothing: the test would prove nothing"
    sim.clear_faults()
    await settle(eng)
    after = [(await eng.get_credential(OWNER, c.credential_id)) for c in creds]
    assert [(c.status.value, c.failure_reason) for c in after] == [("VERIFIED", None)] * len(creds)


@pytest.mark.parametrize(("venue", "kind"), KINDS, ids=IDS)
async def test_rotation_checks_the_venue_account(
    real_engine: CredentialEngine, sim: Simulator, venue: Venue, kind: str | None
) -> None:
    """Rotation to a key of the same account is promoted; to a key of another account it is rejected."""
    first = sim.add_key(venue, kind=kind, uid=None)
    cred = await create(real_engine, first)
    assert (await final(real_engine, cred)).status is CredentialStatus.VERIFIED
    stranger = sim.add_key(venue, kind=kind)
    await real_engine.rotate_credential(
        OWNER, cred.credential_id, api_key=stranger.api_key, api_secret=stranger.api_secret,
        api_passphrase=stranger.api_passphrase,
    )  # fmt: skip
    rejected = await final(real_engine, cred)
    assert (rejected.status, rejected.failure_reason) == (CredentialStatus.VERIFIED, "ACCOUNT_MISMATCH")
    sibling = sim.add_key(venue, kind=kind, uid=first.uid)
    await real_engine.rotate_credential(
        OWNER, cred.credential_id, api_key=sibling.api_key, api_secret=sibling.api_secret,
        api_passphrase=sibling.api_passphrase,
    )  # fmt: skip
    rotated = await final(real_engine, cred)
    assert rotated.status is CredentialStatus.VERIFIED
    assert rotated.secret_version == 3
    assert (await real_engine.reveal_keys(OWNER, cred.credential_id)).api_key == sibling.api_key


@pytest.mark.parametrize("venue", [Venue.BINANCE, Venue.OKX, Venue.BYBIT, Venue.COINBASE, Venue.KRAKEN])
async def test_clock_skew_is_recovered(real_engine: CredentialEngine, sim: Simulator, venue: Venue) -> None:
    """A venue clock 70 s ahead: the probe resyncs from the venue's time endpoint and the key verifies."""
    key = sim.add_key(venue)
    sim.set_clock_offset(venue, 70_000)
    done = await final(real_engine, await create(real_engine, key))
    assert done.status is CredentialStatus.VERIFIED, done.failure_reason


@pytest.mark.parametrize(("venue", "kind"), KINDS, ids=IDS)
async def test_keys_that_move_to_another_account_fail_and_the_credential_stays(
    real_engine: CredentialEngine, sim: Simulator, venue: Venue, kind: str | None
) -> None:
    """The venue now reports another account for the same keys: a re-verification fails with ACCOUNT_MISMATCH,
    the credential keeps its first account and its trading account stays ACTIVE on it."""
    key = sim.add_key(venue, kind=kind)
    cred = await create(real_engine, key)
    first = await final(real_engine, cred)
    assert (first.status, first.venue_account_id) == (CredentialStatus.VERIFIED, key.uid), (
        first.failure_reason
    )
    account = await real_engine.connect_trading_account(OWNER, credential_id=cred.credential_id)
    sim.update_key(key.api_key, uid=key.uid + "-elsewhere")
    await real_engine.verify_credential(OWNER, cred.credential_id)
    moved = await final(real_engine, cred)
    assert (moved.status, moved.failure_reason) == (CredentialStatus.FAILED, "ACCOUNT_MISMATCH")
    assert (moved.venue_account_id, moved.pinned_venue_account_id) == (key.uid, key.uid)
    still = await real_engine.get_trading_account(OWNER, account.trading_account_id)
    assert (still.status, still.credential_id) == (TradingAccountStatus.ACTIVE, cred.credential_id)


async def test_probes_leave_no_key_material_for_the_garbage_collector(
    real_engine: CredentialEngine, sim: Simulator
) -> None:
    """Every venue's probes, good keys reaching one account type (the other calls refused) and bad ones: no
    frame of the probe code and no key object is left in a reference cycle, waiting for a collection with the
    secret in it (a refused call's frame used to hold the key pair that way; the simulator's refusals too)."""
    cases = []
    for venue, kind in KINDS:
        reduced = sim.add_key(venue, kind=kind)
        sim.update_key(reduced.api_key, identities=reduced.identities[:1])
        good = sim.add_key(venue, kind=kind)
        cases += [(reduced, {}), (good, {"api_secret": wrong_secret(good)})]

    async def run() -> None:
        for key, override in cases:
            await create(real_engine, key, **override)
        await settle(real_engine)

    frames, key_objects = await left_for_the_collector(run, (ApiKeys, KrakenKeys, TestKey))
    assert (frames, key_objects) == (set(), set())
