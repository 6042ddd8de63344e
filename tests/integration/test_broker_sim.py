"""BROKER credentials against the simulator over loopback HTTP, per venue (issue 15): the venue modules'
sub-account key managers and probes, the engine's jobs, and the simulator's registry as the truth.

Per venue: a master key verifies with its sub-accounts and the permission flag; a minted key verifies on its
sub-account; an automatic rotation leaves the old key working at the simulator only until the grace ends; a
revoke deletes the key there; a master key without the permission the venue requires cannot mint; a key made
at the venue but never recorded (OKX, Bybit: listed with its label) is deleted by reconciliation. Coinbase and
Kraken BROKER keys verify but mint nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from garbage_support import left_for_the_collector

from engine import CredentialEngine, CredentialStatus, errors
from engine.broker.labels import label_for
from engine.broker.settings import BrokerSettings
from engine.testing import broken_invariants, settle
from venues import build_probe
from venues.base import ApiKeys, ProbeFailure, Venue
from venues.simulator import Simulator
from venues.simulator.masters import MasterAccount
from venues.subaccounts import KeyGrant, build_sub_account_keys

OWNER = "desk-9"
VENUES = [Venue.BINANCE, Venue.OKX, Venue.BYBIT]
IDS = [v.value.lower() for v in VENUES]
GRACE = 2.0
Factory = Callable[..., Awaitable[CredentialEngine]]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=1515) as simulator:
        yield simulator


async def open_engine(make_engine: Factory, sim: Simulator, **broker: Any) -> CredentialEngine:
    settings = BrokerSettings(**{"rotation_grace": GRACE, "orphan_grace": 0.0, **broker})
    return await make_engine(probes={}, venue_urls=sim.urls, broker=settings, probe_timeout=5.0)


def allowlist(venue: Venue) -> list[str]:
    return ["127.0.0.1"]  # Binance Link binds it in a second call (docs/venues.md §1.10)


async def works(sim: Simulator, venue: Venue, keys: ApiKeys) -> bool:
    async with aiohttp.ClientSession() as session:
        try:
            await build_probe(venue, session, base_url=sim.urls[venue], rate_limited=False).probe(keys)
        except ProbeFailure as failure:
            if failure.transient:
                raise
            return False
    return True


async def broker(eng: CredentialEngine, master: MasterAccount) -> Any:
    keys = master.key.api_keys
    cred = await eng.create_credential(
        OWNER, venue=master.key.venue, api_key=keys.api_key, api_secret=keys.api_secret,
        api_passphrase=keys.api_passphrase, credential_type="BROKER",
    )  # fmt: skip
    await settle(eng)
    return await eng.get_credential(OWNER, cred.credential_id)


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_mint_rotate_with_grace_and_revoke_at_the_simulator(
    make_engine: Factory, sim: Simulator, venue: Venue
) -> None:
    eng = await open_engine(make_engine, sim)
    master = sim.add_master_account(venue, sub_accounts=2)
    target = master.sub_accounts[1]
    parent = await broker(eng, master)
    assert parent.status is CredentialStatus.VERIFIED, parent.failure_reason
    assert parent.permissions is not None and parent.permissions.sub_account_keys
    assert {f"sub:{s.sub_id}" for s in master.sub_accounts} <= set(parent.identities)

    minted = await eng.mint_credential(
        OWNER, parent.credential_id, sub_account=target.sub_id, ip_allowlist=allowlist(venue)
    )
    await settle(eng)
    cred = await eng.get_credential(OWNER, minted.credential_id)
    assert cred.status is CredentialStatus.VERIFIED, (cred.failure_reason, cred)
    assert cred.venue_account_id == target.uid  # the key reaches the sub-account, and is pinned to it
    old = await eng.reveal_keys(OWNER, cred.credential_id)
    live = sim.sub_account_keys(venue, master.key.uid, target.sub_id)
    assert [k.api_key for k in live] == [old.api_key]
    assert live[0].trade and not live[0].withdraw

    await eng.rotate_credential(OWNER, cred.credential_id, automatic=True)
    await settle(eng)
    rotated = await eng.get_credential(OWNER, cred.credential_id)
    new = await eng.reveal_keys(OWNER, cred.credential_id)
    assert rotated.secret_version == 2 and new.api_key != old.api_key
    assert {k.api_key for k in sim.sub_account_keys(venue, master.key.uid, target.sub_id)} == {
        old.api_key,
        new.api_key,
    }
    assert await works(sim, venue, old)  # within the grace the old key still signs
    await asyncio.sleep(GRACE + 1.5)
    await settle(eng)
    assert [k.api_key for k in sim.sub_account_keys(venue, master.key.uid, target.sub_id)] == [new.api_key]
    assert not await works(sim, venue, old)  # after it, the simulator refuses the old key
    assert await works(sim, venue, new)

    await eng.revoke_credential(OWNER, cred.credential_id)
    await settle(eng)
    assert sim.sub_account_keys(venue, master.key.uid, target.sub_id) == []
    assert not await works(sim, venue, new)
    assert await broken_invariants(eng) == {}


# what each venue requires of a master key to manage sub-account keys (docs/venues.md §0.1), turned off
WITHOUT_PERMISSION: dict[Venue, dict[str, Any]] = {
    Venue.BINANCE: {"trade": False},
    Venue.OKX: {"trade": False},
    Venue.BYBIT: {"transfer": False},
}


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_a_master_key_without_the_permission_cannot_mint(
    make_engine: Factory, sim: Simulator, venue: Venue
) -> None:
    eng = await open_engine(make_engine, sim)
    master = sim.add_master_account(venue, sub_accounts=1, **WITHOUT_PERMISSION[venue])
    parent = await broker(eng, master)
    assert parent.status is CredentialStatus.VERIFIED  # still a valid key
    assert parent.permissions is not None and not parent.permissions.sub_account_keys
    with pytest.raises(errors.BrokerNotPermitted) as refused:
        await eng.mint_credential(OWNER, parent.credential_id, sub_account=master.sub_accounts[0].sub_id)
    assert refused.value.errno == -100022
    assert sim.sub_account_keys(venue, master.key.uid) == []


@pytest.mark.parametrize("venue", [Venue.OKX, Venue.BYBIT], ids=["okx", "bybit"])
async def test_a_key_created_at_the_venue_but_never_recorded_is_deleted_by_reconciliation(
    make_engine: Factory, sim: Simulator, venue: Venue
) -> None:
    """A process killed between the venue's create and its commit leaves a key labelled with the credential
    that the credential does not hold; the venue's listing shows it (label, full key), reconciliation deletes it."""
    eng = await open_engine(make_engine, sim)
    master = sim.add_master_account(venue, sub_accounts=1)
    sub = master.sub_accounts[0]
    parent = await broker(eng, master)
    minted = await eng.mint_credential(
        OWNER, parent.credential_id, sub_account=sub.sub_id, ip_allowlist=["127.0.0.1"]
    )
    await settle(eng)
    await asyncio.sleep(1.1)  # OKX takes one key creation per second (docs/venues.md §2.10)
    async with aiohttp.ClientSession() as session:
        manager = build_sub_account_keys(venue, session, base_url=sim.urls[venue], timeout=5.0)
        grant = KeyGrant(ip_allowlist=("127.0.0.1",), label=label_for(minted.credential_id))
        orphan = await manager.create_key(master.key.api_keys, sub.sub_id, grant)
    held = await eng.reveal_keys(OWNER, minted.credential_id)
    assert len(sim.sub_account_keys(venue, master.key.uid, sub.sub_id)) == 2
    assert await eng.reconcile_broker_keys() == 1
    await settle(eng)
    assert [k.api_key for k in sim.sub_account_keys(venue, master.key.uid, sub.sub_id)] == [held.api_key]
    assert not await works(sim, venue, orphan.keys)


@pytest.mark.parametrize("venue", [Venue.COINBASE, Venue.KRAKEN], ids=["coinbase", "kraken"])
async def test_coinbase_and_kraken_broker_keys_verify_but_mint_nothing(
    make_engine: Factory, sim: Simulator, venue: Venue
) -> None:
    eng = await open_engine(make_engine, sim)
    key = sim.add_key(venue, ip_allowlist=("127.0.0.1",))
    cred = await eng.create_credential(
        OWNER, venue=venue, api_key=key.api_keys.api_key, api_secret=key.api_keys.api_secret,
        api_passphrase=key.api_keys.api_passphrase, credential_type="BROKER",
    )  # fmt: skip
    await settle(eng)
    cred = await eng.get_credential(OWNER, cred.credential_id)
    assert cred.status is CredentialStatus.VERIFIED
    with pytest.raises(errors.BrokerUnsupported) as refused:
        await eng.mint_credential(OWNER, cred.credential_id, sub_account="sub-1")
    assert refused.value.errno == -100021 and venue.display_name in refused.value.message


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_broker_calls_leave_no_key_material_for_the_garbage_collector(
    make_engine: Factory, sim: Simulator, venue: Venue
) -> None:
    """A BROKER master key without the permission (its discovery's refused calls are dropped), one with it that
    mints, rotates and revokes: no frame of the venue code and no key object is left in a reference cycle,
    waiting for a collection with the master's secret in it."""
    eng = await open_engine(make_engine, sim)

    async def run() -> None:
        refused = await broker(
            eng, sim.add_master_account(venue, sub_accounts=1, **WITHOUT_PERMISSION[venue])
        )
        assert refused.permissions is not None and not refused.permissions.sub_account_keys
        master = sim.add_master_account(venue, sub_accounts=1)
        parent = await broker(eng, master)
        minted = await eng.mint_credential(
            OWNER,
            parent.credential_id,
            sub_account=master.sub_accounts[0].sub_id,
            ip_allowlist=allowlist(venue),
        )
        await settle(eng)
        await eng.rotate_credential(OWNER, minted.credential_id, automatic=True)
        await settle(eng)
        await eng.revoke_credential(OWNER, minted.credential_id)
        await settle(eng)

    frames, key_objects = await left_for_the_collector(run, (ApiKeys,))
    assert (frames, key_objects) == (set(), set())
