"""Sub-account key management through a master key, per venue, against the simulator over loopback HTTP.

Each venue's manager (venues/{binance,okx,bybit}_subaccounts.py) lists the master's sub-accounts, mints a key on
one, and the minted key then verifies with the ordinary probe (``build_probe``) as a key of that sub-account;
the listing shows it, the delete removes it at the simulator at once (the probe then fails), and a second
delete is idempotent. A master without the permission the venue requires is refused with PERMISSION_DENIED;
Coinbase and Kraken have no such API.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from venues import build_probe, bybit
from venues.base import ApiKeys, Outcome, ProbeFailure, Venue
from venues.simulator import Faults, Simulator
from venues.subaccounts import (
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
    """Least privilege: read and trade, bound to loopback (Binance Link binds the IP list in a second call)."""
    return KeyGrant(read=True, trade=True, ip_allowlist=("127.0.0.1",), label=label)


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
    assert registered[0].ip_allowlist == ("127.0.0.1",) and not registered[0].withdraw

    # the master key (a BROKER credential) verifies with the normal probe, as a key of the master account
    probe = build_probe(venue, session, base_url=sim.urls[venue], timeout=5.0, rate_limited=False)
    assert (await probe.probe(master.key.api_keys)).venue_account_id == master.key.uid
    # the minted key verifies with the normal probe too, as a key of the sub-account (its own uid)
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

    assert sim.key_removed_at(minted.keys.api_key) is None
    before = time.time()
    assert await keys.delete_key(master.key.api_keys, target.sub_id, minted.keys.api_key) is True
    assert sim.sub_account_keys(venue, master.key.uid) == []
    removed = sim.key_removed_at(minted.keys.api_key)  # when, for tests that compare with the signing log
    assert removed is not None and before <= removed <= time.time()
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


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_minted_key_is_bound_to_the_granted_ips(
    venue: Venue, sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """A key bound to another address is refused from loopback: the IP list really reached the venue."""
    master = sim.add_master_account(venue, sub_accounts=1)
    keys = manager(venue, session, sim)
    elsewhere = KeyGrant(ip_allowlist=("10.9.9.9",), label="elsewhere")
    minted = await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, elsewhere)
    assert [k.ip_allowlist for k in sim.sub_account_keys(venue, master.key.uid)] == [("10.9.9.9",)]
    probe = build_probe(venue, session, base_url=sim.urls[venue], timeout=5.0, rate_limited=False)
    with pytest.raises(ProbeFailure) as refused:
        await probe.probe(minted.keys)
    # Binance cannot tell an IP refusal from an unknown key (-2015, docs/venues.md §1.5)
    assert refused.value.outcome is (
        Outcome.INVALID_KEY if venue is Venue.BINANCE else Outcome.IP_NOT_ALLOWED
    )


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
async def test_no_secret_in_reprs_errors_or_logs(
    venue: Venue, sim: Simulator, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Canary: a minted key's secret (and passphrase) appear in no repr, no failure message and no log line
    (the simulator's debug log included)."""
    caplog.set_level(logging.DEBUG)
    master = sim.add_master_account(venue, sub_accounts=1)
    keys = manager(venue, session, sim)
    minted = await keys.create_key(master.key.api_keys, master.sub_accounts[0].sub_id, grant(venue))
    secrets = [minted.keys.api_secret, master.key.api_secret]
    secrets += [p for p in (minted.keys.api_passphrase, master.key.api_passphrase) if p]
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
    shown += [str(failed.value), repr(failed.value), caplog.text]
    assert "simulator" in caplog.text  # the debug log did run
    for text in shown:
        for secret in secrets:
            assert secret not in text


# -- the simulator's side: ccxt as an independent client, limits, the admin API -----------------------------

CCXT_CALLS = {
    # venue: (ccxt exchange, its call listing sub-accounts, its call creating a sub-account key)
    Venue.OKX: ("okx", "privateGetUsersSubaccountList", "privatePostUsersSubaccountApikey"),
    Venue.BYBIT: ("bybit", "privateGetV5UserQuerySubMembers", "privatePostV5UserCreateSubApi"),
    Venue.BINANCE: ("binance", "sapiGetBrokerSubAccount", "sapiPostBrokerSubAccountApi"),
}


def retarget(urls: dict[str, Any], base_url: str) -> None:
    """Point every URL group of a ccxt exchange's ``urls["api"]`` at ``base_url``, keeping each group's path."""

    def moved(url: Any) -> Any:
        if isinstance(url, dict):
            return {name: moved(value) for name, value in url.items()}
        if not isinstance(url, str):
            return url
        return base_url + urlsplit(url.replace("{hostname}", "example.invalid")).path

    urls["api"] = moved(urls["api"])


@pytest.mark.parametrize("venue", VENUES, ids=IDS)
async def test_ccxt_signs_requests_the_simulator_accepts(venue: Venue, sim: Simulator) -> None:
    """ccxt (its own signing code) lists sub-accounts and mints a key at the simulator; the key then verifies."""
    ccxt = pytest.importorskip("ccxt.async_support")
    master = sim.add_master_account(venue, sub_accounts=1)
    sub = master.sub_accounts[0]
    name, list_call, create_call = CCXT_CALLS[venue]
    config = {"apiKey": master.key.api_key, "secret": master.key.api_secret, "enableRateLimit": False}
    if master.key.api_passphrase:
        config["password"] = master.key.api_passphrase
    exchange = getattr(ccxt, name)(config)
    retarget(exchange.urls, sim.urls[venue])
    try:
        listed = await getattr(exchange, list_call)()
        if venue is Venue.OKX:
            assert [row["subAcct"] for row in listed["data"]] == [sub.sub_id]
            made = await getattr(exchange, create_call)(
                {
                    "subAcct": sub.sub_id,
                    "label": "by-ccxt",
                    "passphrase": "Ccxt-Pass1!",
                    "perm": "read_only,trade",
                }
            )
            minted = ApiKeys(made["data"][0]["apiKey"], made["data"][0]["secretKey"], "Ccxt-Pass1!")
        elif venue is Venue.BYBIT:
            assert [m["uid"] for m in listed["result"]["subMembers"]] == [sub.uid]
            made = await getattr(exchange, create_call)(
                {
                    "subuid": int(sub.uid),
                    "note": "by-ccxt",
                    "readOnly": 0,
                    "permissions": {"Spot": ["SpotTrade"]},
                }
            )
            minted = ApiKeys(made["result"]["apiKey"], made["result"]["secret"])
        else:
            assert [row["subaccountId"] for row in listed] == [sub.sub_id]
            made = await getattr(exchange, create_call)({"subAccountId": sub.sub_id, "canTrade": "true"})
            minted = ApiKeys(made["apiKey"], made["secretKey"])
    finally:
        await exchange.close()
    assert [k.api_key for k in sim.sub_account_keys(venue, master.key.uid)] == [minted.api_key]
    async with aiohttp.ClientSession() as client:
        probe = build_probe(venue, client, base_url=sim.urls[venue], timeout=5.0, rate_limited=False)
        assert (await probe.probe(minted)).venue_account_id == sub.uid


async def test_okx_simulator_enforces_one_write_a_second(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """Without the client-side window, a second create within the second is refused as OKX refuses it."""
    master = sim.add_master_account(Venue.OKX, sub_accounts=1)
    unthrottled = build_sub_account_keys(Venue.OKX, session, base_url=sim.urls[Venue.OKX], rate_limited=False)
    sub = master.sub_accounts[0].sub_id
    await unthrottled.create_key(master.key.api_keys, sub, grant(Venue.OKX, "one"))
    with pytest.raises(ProbeFailure) as limited:
        await unthrottled.create_key(master.key.api_keys, sub, grant(Venue.OKX, "two"))
    assert limited.value.outcome is Outcome.RATE_LIMITED and limited.value.venue_code == "50011"
    assert len(sim.sub_account_keys(Venue.OKX, master.key.uid)) == 1


async def test_bybit_sub_key_deletes_itself(sim: Simulator, session: aiohttp.ClientSession) -> None:
    """Bybit also lets a sub-account key with a transfer permission delete itself (no apikey parameter)."""
    master = sim.add_master_account(Venue.BYBIT, sub_accounts=1)
    sub = master.sub_accounts[0]
    own = sim.add_key(Venue.BYBIT, uid=sub.uid, transfer=True)  # a key of the sub-account made on the website
    assert own.parent_uid == master.key.uid
    body = "{}"
    headers = bybit.auth_headers(own.api_keys, int(time.time() * 1000), body) | {
        "Content-Type": "application/json"
    }
    async with session.post(
        sim.urls[Venue.BYBIT] + "/v5/user/delete-sub-api", data=body, headers=headers
    ) as resp:
        answer = json.loads(await resp.text())
    assert answer["retCode"] == 0
    assert sim.sub_account_keys(Venue.BYBIT, master.key.uid) == []


async def test_admin_api_seeds_masters_and_reads_the_registry(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.admin_url + "/masters", json={"venue": "okx", "sub_accounts": 2}) as resp:
        assert resp.status == 201
        made = await resp.json()
    assert made["key"]["api_secret"] and made["key"]["api_passphrase"]
    uid = made["key"]["uid"]
    assert len(made["sub_accounts"]) == 2
    master = ApiKeys(made["key"]["api_key"], made["key"]["api_secret"], made["key"]["api_passphrase"])
    sub_id = made["sub_accounts"][0]["sub_id"]
    minted = await manager(Venue.OKX, session, sim).create_key(master, sub_id, grant(Venue.OKX))
    async with session.get(f"{sim.admin_url}/masters/OKX/{uid}/sub-accounts") as resp:
        rows = await resp.json()
    keys_of = {row["sub_id"]: [k["api_key"] for k in row["keys"]] for row in rows}
    assert keys_of[sub_id] == [minted.keys.api_key]
    assert all("api_secret" not in k for row in rows for k in row["keys"])
    async with session.post(
        f"{sim.admin_url}/masters/OKX/{uid}/sub-accounts", json={"label": "third"}
    ) as resp:
        assert resp.status == 201
    assert len(sim.sub_accounts(Venue.OKX, uid)) == 3
    async with session.post(sim.admin_url + "/masters", json={"venue": "KRAKEN"}) as resp:
        assert resp.status == 400
    async with session.post(sim.admin_url + "/masters/BYBIT/1/sub-accounts", json={}) as resp:
        assert resp.status == 404


async def test_demo_masters_can_manage_keys(sim: Simulator, session: aiohttp.ClientSession) -> None:
    made = sim.seed_demo_masters()
    assert sorted(m.key.venue.value for m in made) == ["BINANCE", "BYBIT", "OKX"]
    for master in made:
        assert len(master.sub_accounts) == 2
        assert await manager(master.key.venue, session, sim).can_manage_keys(master.key.api_keys) is True


async def test_binance_one_key_per_sub_account_a_second(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """The simulator refuses a second create on one sub-account within a second; the manager waits for it."""
    master = sim.add_master_account(Venue.BINANCE, sub_accounts=2)
    sub, other = (s.sub_id for s in master.sub_accounts)
    url = sim.urls[Venue.BINANCE]
    unthrottled = build_sub_account_keys(Venue.BINANCE, session, base_url=url, rate_limited=False)
    await unthrottled.create_key(master.key.api_keys, sub, grant(Venue.BINANCE))
    with pytest.raises(ProbeFailure) as limited:
        await unthrottled.create_key(master.key.api_keys, sub, grant(Venue.BINANCE))
    assert limited.value.outcome is Outcome.RATE_LIMITED
    assert len(sim.sub_account_keys(Venue.BINANCE, master.key.uid)) == 1
    throttled = manager(Venue.BINANCE, session, sim)  # on the other sub-account, whose second is fresh
    await throttled.create_key(master.key.api_keys, other, grant(Venue.BINANCE))
    await throttled.create_key(master.key.api_keys, other, grant(Venue.BINANCE))
    assert len(sim.sub_account_keys(Venue.BINANCE, master.key.uid, other)) == 2


async def test_okx_listing_does_not_spend_the_create_limit(
    sim: Simulator, session: aiohttp.ClientSession
) -> None:
    """GET and POST /users/subaccount/apikey share a path, not a limit: a listing right before a create is fine."""
    master = sim.add_master_account(Venue.OKX, sub_accounts=1)
    unthrottled = build_sub_account_keys(Venue.OKX, session, base_url=sim.urls[Venue.OKX], rate_limited=False)
    sub = master.sub_accounts[0].sub_id
    assert await unthrottled.list_keys(master.key.api_keys, sub) == ()
    minted = await unthrottled.create_key(master.key.api_keys, sub, grant(Venue.OKX))
    assert [k.key_id for k in await unthrottled.list_keys(master.key.api_keys, sub)] == [minted.keys.api_key]
