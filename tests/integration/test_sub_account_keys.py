"""Sub-account key management through a master key, per venue, against the simulator over loopback HTTP.

Each venue's manager (venues/{binance,okx,bybit}_subaccounts.py) lists the master's sub-accounts, mints a key on
one, and the minted key then verifies with the ordinary probe (``build_probe``) as a key of that sub-account;
the listing shows it, the delete removes it at the simulator at once (the probe then fails), and a second
delete is idempotent. A master without the permission the venue requires is refused with PERMISSION_DENIED;
Coinbase and Kraken have no such API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from venues import build_probe
from venues.base import ApiKeys, Outcome, ProbeFailure, Venue
from venues.simulator import Faults, Simulator
from venues.subaccounts import (
    GrantProblem,
    KeyGrant,
    SubAccountKeys,
    SubAccountsUnsupported,
    build_sub_account_keys,
    supports_sub_account_keys,
)

VENUES = [Venue.BINANCE, Venue.OKX, Venue.BYBIT]
IDS = [v.value.lower() for v in VENUES]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=15) as simulator:
        yield simulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def manager(venue: Venue, session: aiohttp.ClientSession, sim: Simulator) -> SubAccountKeys:
    # rate_limited: the client-side windows keep within the limits the simulator enforces (OKX writes: 1 a second)
    return build_sub_account_keys(venue, session, base_url=sim.urls[venue], timeout=5.0, rate_limited=True)


def grant(venue: Venue, label: str = "cred-0001") -> KeyGrant:
    # Binance Link takes no IP list at creation (docs/venues.md §1.10); the others bind loopback
    ips = () if venue is Venue.BINANCE else ("127.0.0.1",)
    return KeyGrant(read=True, trade=True, ip_allowlist=ips, label=label)


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_mint_verify_list_delete(venue: Venue, sim: Simulator, session: aiohttp.ClientSession) -> None:
    master = sim.add_master_account(venue, sub_accounts=2)
    keys = manager(venue, session, sim)
    assert await keys.can_manage_keys(master.key.api_keys) is True

    subs = await keys.list_sub_accounts(master.key.api_keys)
    assert sorted(s.sub_id for s in subs) == sorted(s.sub_id for s in master.sub_accounts)
    target = master.sub_accounts[1]

    minted = await keys.create_key(master.key.api_keys, target.sub_id, grant(venue))
    assert minted.sub_id == target.sub_id
    assert minted.info.trade and not minted.info.withdraw
    # the simulator's registry has exactly this key on that sub-account, and nothing on the other
    registered = sim.sub_account_keys(venue, master.key.uid, target.sub_id)
    assert [k.api_key for k in registered] == [minted.keys.api_key]
    assert sim.sub_account_keys(venue, master.key.uid, master.sub_accounts[0].sub_id) == []
    assert registered[0].parent_uid == master.key.uid

    # the minted key verifies with the normal probe, as a key of the sub-account (its own uid)
    probe = build_probe(venue, session, base_url=sim.urls[venue], timeout=5.0, rate_limited=False)
    result = await probe.probe(minted.keys)
    assert result.venue_account_id == target.uid
    assert result.permissions.trade and not result.permissions.withdraw

    listed = await keys.list_keys(master.key.api_keys, target.sub_id)
    assert len(listed) == 1 and listed[0].matches(minted.keys.api_key)
    assert listed[0].trade and not listed[0].withdraw
    if venue is not Venue.BINANCE:
        assert listed[0].key_id == minted.keys.api_key
        assert listed[0].label == "cred-0001"
        assert listed[0].ip_allowlist == ("127.0.0.1",)
    else:
        assert listed[0].masked and listed[0].key_id != minted.keys.api_key

    assert await keys.delete_key(master.key.api_keys, target.sub_id, minted.keys.api_key) is True
    assert sim.sub_account_keys(venue, master.key.uid) == []
    with pytest.raises(ProbeFailure) as stopped:
        await probe.probe(minted.keys)
    assert stopped.value.outcome is Outcome.INVALID_KEY
    assert await keys.list_keys(master.key.api_keys, target.sub_id) == ()
    # idempotent: the venue no longer has it
    assert await keys.delete_key(master.key.api_keys, target.sub_id, minted.keys.api_key) is False


# (venue, what the master lacks): each refused as the venue refuses it
REFUSED = [
    (Venue.BINANCE, {"trade": False}),  # Binance Link: the key needs its "trade" option
    (Venue.OKX, {"trade": False}),  # OKX: create/delete need the Trade permission
    (Venue.OKX, {"ip_allowlist": ()}),  # OKX: ... and a master key linked to IP addresses
    (Venue.BYBIT, {"transfer": False, "withdraw": False}),  # Bybit: a transfer or withdrawal permission
]


@pytest.mark.parametrize(
    ("venue", "lacking"), REFUSED, ids=["binance-trade", "okx-trade", "okx-ip", "bybit-wallet"]
)
async def test_master_without_permission_is_refused(
    venue: Venue, lacking: dict[str, object], sim: Simulator, session: aiohttp.ClientSession
) -> None:
    master = sim.add_master_account(venue, sub_accounts=1, **lacking)  # type: ignore[arg-type]
    keys = manager(venue, session, sim)
    assert await keys.can_manage_keys(master.key.api_keys) is False
    with pytest.raises(ProbeFailure) as refused:
        await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(venue))
    assert refused.value.outcome is Outcome.PERMISSION_DENIED
    assert sim.sub_account_keys(venue, master.key.uid) == []


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_plain_key_and_sub_key_are_not_masters(
    venue: Venue, sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """A minted sub-account key cannot manage sub-account keys. Neither can an ordinary account's key on Binance
    (Binance Link is for broker masters); on OKX and Bybit every main account is a master, with no sub-accounts."""
    keys = manager(venue, session, sim)
    plain = sim.add_key(venue, ip_allowlist=["127.0.0.1"])
    if venue is Venue.BINANCE:
        assert await keys.can_manage_keys(plain.api_keys) is False
        with pytest.raises(ProbeFailure) as refused:
            await keys.list_sub_accounts(plain.api_keys)
        assert refused.value.outcome is Outcome.PERMISSION_DENIED
    else:
        assert await keys.can_manage_keys(plain.api_keys) is True
        assert await keys.list_sub_accounts(plain.api_keys) == ()

    master = sim.add_master_account(venue, sub_accounts=1)
    minted = await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(venue))
    assert await keys.can_manage_keys(minted.keys) is False
    with pytest.raises(ProbeFailure) as sub_refused:
        await keys.list_sub_accounts(minted.keys)
    assert sub_refused.value.outcome is Outcome.PERMISSION_DENIED


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_other_masters_sub_account_is_refused(
    venue: Venue, sim: Simulator, session: aiohttp.ClientSession
) -> None:
    mine = sim.add_master_account(venue, sub_accounts=1)
    theirs = sim.add_master_account(venue, sub_accounts=1)
    keys = manager(venue, session, sim)
    with pytest.raises(ProbeFailure) as refused:
        await keys.create_key(mine.key.api_keys, theirs.sub_accounts[0].sub_id, grant(venue))
    assert refused.value.outcome is Outcome.PERMISSION_DENIED
    assert sim.sub_account_keys(venue, theirs.key.uid) == []


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_delete_of_another_subs_key_is_idempotent_false(
    venue: Venue, sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Deleting a key id the sub-account does not have answers False and deletes nothing."""
    master = sim.add_master_account(venue, sub_accounts=2)
    keys = manager(venue, session, sim)
    first, second = master.sub_accounts
    minted = await keys.create_key(master.key.api_keys, first.sub_id, grant(venue))
    if venue is Venue.BYBIT:
        # Bybit's delete names only the key: the master deletes any key of its sub-accounts
        assert await keys.delete_key(master.key.api_keys, second.sub_id, "NoSuchKey12345678") is False
    else:
        assert await keys.delete_key(master.key.api_keys, second.sub_id, minted.keys.api_key) is False
        assert [k.api_key for k in sim.sub_account_keys(venue, master.key.uid)] == [minted.keys.api_key]


async def test_okx_minted_key_has_its_own_passphrase(sim: Simulator, session: aiohttp.ClientSession) -> None:
    master = sim.add_master_account(Venue.OKX, sub_accounts=1)
    keys = manager(Venue.OKX, session, sim)
    one = await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(Venue.OKX, "a-1"))
    two = await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(Venue.OKX, "a-2"))
    assert one.keys.api_passphrase and two.keys.api_passphrase
    assert one.keys.api_passphrase != two.keys.api_passphrase
    # a wrong passphrase is refused by the probe: the minted passphrase is the key's
    probe = build_probe(Venue.OKX, session, base_url=sim.urls[Venue.OKX], timeout=5.0, rate_limited=False)
    with pytest.raises(ProbeFailure) as wrong:
        await probe.probe(ApiKeys(one.keys.api_key, one.keys.api_secret, two.keys.api_passphrase))
    assert wrong.value.outcome is Outcome.INVALID_PASSPHRASE
    # a duplicate label is the venue's refusal (59502), permanent
    with pytest.raises(ProbeFailure) as duplicate:
        await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(Venue.OKX, "a-1"))
    assert duplicate.value.venue_code == "59502" and not duplicate.value.transient


async def test_bybit_minted_key_without_ip_expires_in_90_days(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    master = sim.add_master_account(Venue.BYBIT, sub_accounts=1)
    keys = manager(Venue.BYBIT, session, sim)
    sub = master.sub_accounts[0].sub_id
    await keys.create_key(master.key.api_keys, sub, KeyGrant(label="no-ip"))
    await keys.create_key(master.key.api_keys, sub, KeyGrant(label="with-ip", ip_allowlist=("127.0.0.1",)))
    listed = {info.label: info for info in await keys.list_keys(master.key.api_keys, sub)}
    unbound, bound = listed["no-ip"], listed["with-ip"]
    assert unbound.expires_at_ms is not None and unbound.created_at_ms is not None
    days = (unbound.expires_at_ms - unbound.created_at_ms) / 86_400_000
    assert 89.9 < days < 90.1
    assert bound.expires_at_ms is None


async def test_bybit_listing_pages_past_twenty_keys(sim: Simulator, session: aiohttp.ClientSession) -> None:
    master = sim.add_master_account(Venue.BYBIT, sub_accounts=1)
    keys = manager(Venue.BYBIT, session, sim)
    sub = master.sub_accounts[0].sub_id
    for index in range(23):
        await keys.create_key(
            master.key.api_keys, sub, KeyGrant(label=f"k{index}", ip_allowlist=("127.0.0.1",))
        )
    listed = await keys.list_keys(master.key.api_keys, sub)
    assert sorted(info.label for info in listed) == sorted(f"k{i}" for i in range(23))


async def test_binance_refuses_an_ip_allowlist_it_cannot_apply(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    master = sim.add_master_account(Venue.BINANCE, sub_accounts=1)
    keys = manager(Venue.BINANCE, session, sim)
    with pytest.raises(GrantProblem) as problem:
        await keys.create_key(
            master.key.api_keys, master.sub_accounts[0].sub_id, KeyGrant(ip_allowlist=("127.0.0.1",))
        )
    assert problem.value.field == "ipAllowlist"
    assert sim.sub_account_keys(Venue.BINANCE, master.key.uid) == []


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_faults_reach_the_sub_account_endpoints(
    venue: Venue, sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Injected faults apply to these endpoints too, and come back as transient failures."""
    master = sim.add_master_account(venue, sub_accounts=1)
    keys = manager(venue, session, sim)
    sim.set_faults(venue, Faults(error_rate=1.0, kinds=("server_error",)))
    with pytest.raises(ProbeFailure) as failed:
        await keys.list_sub_accounts(master.key.api_keys)
    assert failed.value.transient
    sim.set_faults(venue, Faults(error_rate=1.0, kinds=("rate_limited",), retry_after=2.0))
    with pytest.raises(ProbeFailure) as limited:
        await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(venue))
    assert limited.value.outcome is Outcome.RATE_LIMITED
    sim.clear_faults()
    assert sim.sub_account_keys(venue, master.key.uid) == []
    assert len(await keys.list_sub_accounts(master.key.api_keys)) == 1


@pytest.mark.parametrize("venue", [Venue.COINBASE, Venue.KRAKEN], ids=["coinbase", "kraken"])
async def test_coinbase_and_kraken_are_unsupported(venue: Venue, session: aiohttp.ClientSession) -> None:
    assert not supports_sub_account_keys(venue)
    with pytest.raises(SubAccountsUnsupported) as unsupported:
        build_sub_account_keys(venue, session)
    assert unsupported.value.venue is venue
    assert "docs/venues.md" in str(unsupported.value)
    with pytest.raises(ValueError, match="no sub-account key API"):
        Simulator().add_master_account(venue)


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_no_secret_in_reprs_or_errors(
    venue: Venue, sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Canary: a minted key's secret (and passphrase) appear in no repr and in no failure message."""
    master = sim.add_master_account(venue, sub_accounts=1)
    keys = manager(venue, session, sim)
    minted = await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(venue))
    secrets = [minted.keys.api_secret, master.key.api_secret]
    if minted.keys.api_passphrase:
        secrets.append(minted.keys.api_passphrase)
    shown = [
        repr(minted),
        str(minted),
        repr(minted.info),
        repr(master),
        repr(sim.sub_account_keys(venue, master.key.uid)),
    ]
    sim.set_faults(venue, Faults(error_rate=1.0, kinds=("malformed",)))
    with pytest.raises(ProbeFailure) as failed:
        await keys.list_keys(master.key.api_keys, master.sub_accounts[0].sub_id)
    shown += [str(failed.value), repr(failed.value)]
    for text in shown:
        for secret in secrets:
            assert secret not in text
