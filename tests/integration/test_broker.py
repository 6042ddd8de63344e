"""BROKER credentials (issue 15) against engine.testing's FakeSubAccounts: discovery, minting, automatic rotation
with its grace, revoke, reconciliation of orphans, refusals. The simulator versions are in test_broker_sim.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from engine import CredentialEngine, CredentialStatus, CredentialType, EngineConfig, Event, errors
from engine.broker.labels import credential_of, label_for
from engine.broker.settings import BrokerSettings
from engine.crypto import MasterKeyring
from engine.testing import FakeSubAccounts, FakeVenue, broken_invariants, settle
from venues.base import Outcome, Permissions, Venue

OWNER = "desk-1"
Factory = Callable[..., Awaitable[CredentialEngine]]


@pytest.fixture
def subs(fake: FakeVenue) -> FakeSubAccounts:
    return FakeSubAccounts(fake)


@pytest.fixture
async def make_broker_engine(
    database_url: str, master_keys: str, fake: FakeVenue, subs: FakeSubAccounts, tmp_path: Path
) -> AsyncIterator[Factory]:
    opened: list[CredentialEngine] = []

    async def factory(**overrides: Any) -> CredentialEngine:
        broker = overrides.pop("broker", BrokerSettings(rotation_grace=0.5, orphan_grace=0.0))
        settings: dict[str, Any] = {
            "database_url": database_url,
            "master_keys": master_keys,
            "data_dir": tmp_path,
            "workers": 0,
            "poll_interval": 0.2,
            "lease_seconds": 5.0,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            "broker": broker,
            **overrides,
        }
        eng = CredentialEngine(EngineConfig(**settings), probes=fake.probes(), sub_accounts=subs.managers())
        await eng.open()
        opened.append(eng)
        return eng

    yield factory
    for eng in reversed(opened):
        await eng.close()


async def verified_master(
    eng: CredentialEngine, subs: FakeSubAccounts, venue: Venue = Venue.BYBIT, *, can_manage: bool = True
) -> uuid.UUID:
    passphrase = "pass-1" if venue is Venue.OKX else None
    subs.add_master("master-key-1", "master-secret-1", venue=venue, subs=("sub-7", "sub-8"), can_manage=can_manage,
                    passphrase=passphrase)  # fmt: skip
    cred = await eng.create_credential(
        OWNER, venue=venue, api_key="master-key-1", api_secret="master-secret-1", api_passphrase=passphrase,
        credential_type=CredentialType.BROKER,
    )  # fmt: skip
    await settle(eng)
    cred = await eng.get_credential(OWNER, cred.credential_id)
    assert cred.status is CredentialStatus.VERIFIED
    return cred.credential_id


async def mint(eng: CredentialEngine, parent: uuid.UUID, sub: str = "sub-7", **kwargs: Any) -> uuid.UUID:
    cred = await eng.mint_credential(OWNER, parent, sub_account=sub, nickname="bot", **kwargs)
    await settle(eng)
    return cred.credential_id


def events_of(eng: CredentialEngine) -> list[Event]:
    heard: list[Event] = []

    async def listen(event: Event) -> None:
        heard.append(event)

    eng.subscribe(listen)
    return heard


@pytest.mark.parametrize("venue", [Venue.BINANCE, Venue.OKX, Venue.BYBIT])
async def test_a_broker_key_finds_its_sub_accounts_and_mints_a_verified_least_privilege_key(
    make_broker_engine: Factory, subs: FakeSubAccounts, venue: Venue
) -> None:
    eng = await make_broker_engine(broker=BrokerSettings(ip_allowlist=("203.0.113.9",)))
    heard = events_of(eng)
    parent = await verified_master(eng, subs, venue)
    master = await eng.get_credential(OWNER, parent)
    assert {"sub:sub-7", "sub:sub-8"} <= set(master.identities)
    assert master.permissions is not None and master.permissions.sub_account_keys

    cid = await mint(eng, parent)
    cred = await eng.get_credential(OWNER, cid)
    assert cred.status is CredentialStatus.VERIFIED
    assert cred.credential_type is CredentialType.EXCHANGE
    assert cred.venue_account_id == "sub-7"  # pinned to the sub-account
    [key] = subs.live_keys(venue, "sub-7")
    assert credential_of(key.label) == cid
    assert (key.read, key.trade, key.withdraw) == (True, True, False)
    assert key.ip_allowlist == ("203.0.113.9",)
    revealed = await eng.reveal_keys(OWNER, cid)
    assert revealed.api_key == key.key_id
    assert (venue is Venue.OKX) == (revealed.api_passphrase is not None)
    await eng.run_until_idle()
    types = [e.type for e in heard if e.credential_id == cid]
    assert types == ["credential.created", "credential.minted", "credential.verified"]
    assert await broken_invariants(eng) == {}


async def test_minting_refuses_withdraw_unknown_sub_accounts_and_keys_without_the_permission(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    eng = await make_broker_engine()
    parent = await verified_master(eng, subs, can_manage=False)
    master = await eng.get_credential(OWNER, parent)
    assert master.permissions is not None and not master.permissions.sub_account_keys
    with pytest.raises(errors.BrokerNotPermitted) as refused:
        await eng.mint_credential(OWNER, parent, sub_account="sub-7")
    assert refused.value.errno == -100022 and "subAccountKeys" in refused.value.message
    subs.masters["master-key-1"].can_manage = True
    await eng.verify_credential(OWNER, parent)
    await settle(eng)
    with pytest.raises(errors.WithdrawNotAllowed) as withdraw:
        await eng.mint_credential(OWNER, parent, sub_account="sub-7", permissions={"withdraw": True})
    assert withdraw.value.errno == -100023 and withdraw.value.field == "permissions.withdraw"
    with pytest.raises(errors.BrokerNotPermitted) as unknown:
        await eng.mint_credential(OWNER, parent, sub_account="sub-99")
    assert unknown.value.field == "subAccount"
    with pytest.raises(errors.InvalidRequest) as bad_ip:
        await eng.mint_credential(OWNER, parent, sub_account="sub-7", ip_allowlist=["not-an-ip"])
    assert bad_ip.value.field == "ipAllowlist"
    with pytest.raises(errors.NotFound):
        await eng.mint_credential("someone-else", parent, sub_account="sub-7")
    page = await eng.list_credentials(OWNER)
    assert len(page) == 1  # nothing written by the refusals
    assert subs.live_keys(Venue.BYBIT, "sub-7") == []


async def test_a_master_key_the_venue_refuses_at_creation_fails_the_minted_credential_cleanly(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    eng = await make_broker_engine()
    heard = events_of(eng)
    parent = await verified_master(eng, subs)
    subs.fail_next(Outcome.PERMISSION_DENIED)  # the next venue call: the mint's create
    cid = await mint(eng, parent)
    cred = await eng.get_credential(OWNER, cid)
    assert cred.status is CredentialStatus.FAILED and cred.failure_reason == "PERMISSION_DENIED"
    await eng.run_until_idle()
    failed = [e for e in heard if e.type == "credential.mint_failed"]
    assert failed and failed[0].data["reason"] == "PERMISSION_DENIED"
    assert subs.live_keys(Venue.BYBIT, "sub-7") == []
    assert await broken_invariants(eng) == {}
    with pytest.raises(errors.Conflict):
        await eng.reveal_keys(OWNER, cid)  # nothing half-written: no key material at all
    await eng.revoke_credential(OWNER, cid)
    await settle(eng)


@pytest.mark.parametrize("venue", [Venue.COINBASE, Venue.KRAKEN])
async def test_coinbase_and_kraken_broker_keys_verify_but_never_mint(
    make_broker_engine: Factory, fake: FakeVenue, venue: Venue
) -> None:
    eng = await make_broker_engine()
    fake.add_key("cb-master", "cb-secret", account_id="acct-1")
    cred = await eng.create_credential(
        OWNER, venue=venue, api_key="cb-master", api_secret="cb-secret", credential_type="BROKER",
    )  # fmt: skip
    await settle(eng)
    cred = await eng.get_credential(OWNER, cred.credential_id)
    assert cred.status is CredentialStatus.VERIFIED
    assert cred.permissions is not None and not cred.permissions.sub_account_keys
    with pytest.raises(errors.BrokerUnsupported) as refused:
        await eng.mint_credential(OWNER, cred.credential_id, sub_account="sub-1")
    assert refused.value.errno == -100021 and venue.display_name in refused.value.message
    with pytest.raises(errors.BrokerUnsupported):
        await eng.rotate_credential(OWNER, cred.credential_id, automatic=True)


async def test_automatic_rotation_swaps_keys_and_deletes_the_old_one_only_after_the_grace(
    make_broker_engine: Factory, subs: FakeSubAccounts, fake: FakeVenue
) -> None:
    eng = await make_broker_engine(broker=BrokerSettings(rotation_grace=3.0, orphan_grace=0.0))
    heard = events_of(eng)
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    old = (await eng.reveal_keys(OWNER, cid)).api_key
    await eng.rotate_credential(OWNER, cid, automatic=True)
    await eng.run_until_idle()
    cred = await eng.get_credential(OWNER, cid)
    new = (await eng.reveal_keys(OWNER, cid)).api_key
    assert new != old and cred.status is CredentialStatus.VERIFIED and cred.secret_version == 2
    rotated = [e for e in heard if e.type == "credential.rotated"]
    assert rotated and rotated[0].data["automatic"] is True
    started = [e for e in heard if e.type == "credential.rotation_started"]
    assert started and started[0].data["automatic"] is True
    # within the grace both keys work at the venue (signers still holding the old key finish)
    assert {k.key_id for k in subs.live_keys(Venue.BYBIT, "sub-7")} == {old, new}
    assert old in fake.keys
    await asyncio.sleep(1.5)
    await settle(eng, horizon=0.0)  # halfway through the grace: the old key is still there
    assert old in fake.keys and len(subs.live_keys(Venue.BYBIT, "sub-7")) == 2
    await asyncio.sleep(2.0)
    await settle(eng)
    assert [k.key_id for k in subs.live_keys(Venue.BYBIT, "sub-7")] == [new]
    assert old not in fake.keys  # the old key no longer probes
    assert await broken_invariants(eng) == {}


async def test_the_policy_rotates_keys_past_their_maximum_age_or_near_the_venues_expiry(
    make_broker_engine: Factory, subs: FakeSubAccounts, fake: FakeVenue
) -> None:
    eng = await make_broker_engine(broker=BrokerSettings(rotation_max_age=3600, orphan_grace=0.0))
    parent = await verified_master(eng, subs)
    young = await mint(eng, parent, "sub-7")
    aged = await mint(eng, parent, "sub-8")
    async with eng.db.connection() as conn:  # the aged key was minted 31 days ago
        await conn._conn.execute(
            "UPDATE credential_secrets SET created_at = now() - interval '31 days' WHERE credential_id = $1",
            aged,
        )
    await eng.queue.enqueue("broker_sweep", {})
    await settle(eng)
    assert (await eng.get_credential(OWNER, aged)).secret_version == 2
    assert (await eng.get_credential(OWNER, young)).secret_version == 1
    # a key the venue will expire within rotation_before_expiry (3 days by default) is rotated too
    key = (await eng.reveal_keys(OWNER, young)).api_key
    fake.keys[key].permissions = Permissions(
        read=True, trade=True, ip_restricted=True, expires_at_ms=int(time.time() * 1000) + 86_400_000
    )
    await eng.verify_credential(OWNER, young)
    await settle(eng)
    await eng.queue.enqueue("broker_sweep", {})
    await settle(eng)
    assert (await eng.get_credential(OWNER, young)).secret_version == 2


async def test_a_permanent_refusal_keeps_the_old_key_working_and_reports_it(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    eng = await make_broker_engine()
    heard = events_of(eng)
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    old = (await eng.reveal_keys(OWNER, cid)).api_key
    subs.fail_next(Outcome.PERMISSION_DENIED)
    await eng.rotate_credential(OWNER, cid, automatic=True)
    await settle(eng)
    await eng.run_until_idle()
    failed = [e for e in heard if e.type == "credential.rotation_failed"]
    assert failed and failed[0].data["automatic"] is True and failed[0].data["reason"] == "PERMISSION_DENIED"
    cred = await eng.get_credential(OWNER, cid)
    assert cred.status is CredentialStatus.VERIFIED and cred.secret_version == 1
    assert [k.key_id for k in subs.live_keys(Venue.BYBIT, "sub-7")] == [old]


async def test_transient_venue_failures_are_retried_until_the_rotation_goes_through(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    eng = await make_broker_engine()
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    subs.fail_next(Outcome.SERVER_ERROR, Outcome.RATE_LIMITED, Outcome.MAINTENANCE)
    await eng.rotate_credential(OWNER, cid, automatic=True)
    await settle(eng)
    assert (await eng.get_credential(OWNER, cid)).secret_version == 2


async def test_revoking_a_minted_credential_deletes_its_key_at_the_venue(
    make_broker_engine: Factory, subs: FakeSubAccounts, fake: FakeVenue
) -> None:
    eng = await make_broker_engine()
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    key = (await eng.reveal_keys(OWNER, cid)).api_key
    await eng.revoke_credential(OWNER, cid)
    await settle(eng)
    assert subs.live_keys(Venue.BYBIT, "sub-7") == []
    assert key not in fake.keys


async def test_a_key_created_at_the_venue_but_never_recorded_is_deleted_by_reconciliation(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    """The crash between the venue's create and the commit: the answer is lost (the job retries and mints
    another key), and a key is planted as a process killed after the create would leave it."""
    eng = await make_broker_engine()
    parent = await verified_master(eng, subs)
    subs.lose_answers = 1
    cid = await mint(eng, parent)
    assert len(subs.live_keys(Venue.BYBIT, "sub-7")) == 2  # the lost one and the recorded one
    subs.plant(Venue.BYBIT, "sub-7", label_for(cid))
    foreign = subs.plant(Venue.BYBIT, "sub-7", "made-by-a-person")
    unknown = subs.plant(Venue.BYBIT, "sub-7", label_for(uuid.uuid4()))  # another deployment's
    assert await eng.reconcile_broker_keys() == 1
    await settle(eng)
    held = (await eng.reveal_keys(OWNER, cid)).api_key
    assert {k.key_id for k in subs.live_keys(Venue.BYBIT, "sub-7")} == {held, foreign.key_id, unknown.key_id}


async def test_reconciliation_leaves_keys_of_operations_under_way_alone_within_the_orphan_grace(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    eng = await make_broker_engine(broker=BrokerSettings(orphan_grace=600.0))
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    planted = subs.plant(Venue.BYBIT, "sub-7", label_for(cid))  # created just now: young
    await eng.reconcile_broker_keys()
    await settle(eng)
    assert planted.key_id in {k.key_id for k in subs.live_keys(Venue.BYBIT, "sub-7")}


async def test_automatic_rotation_of_a_credential_not_minted_is_refused(
    make_broker_engine: Factory, fake: FakeVenue
) -> None:
    eng = await make_broker_engine()
    fake.add_key("plain-key", "plain-secret")
    cred = await eng.create_credential(
        OWNER, venue=Venue.BYBIT, api_key="plain-key", api_secret="plain-secret"
    )
    await settle(eng)
    with pytest.raises(errors.BrokerUnsupported) as refused:
        await eng.rotate_credential(OWNER, cred.credential_id, automatic=True)
    assert refused.value.field == "automatic"
    with pytest.raises(errors.InvalidRequest) as both:
        await eng.rotate_credential(OWNER, cred.credential_id, automatic=True, api_key="x")
    assert both.value.field == "apiKey"


async def test_no_secret_of_a_minted_key_reaches_events_logs_or_errors(
    make_broker_engine: Factory, subs: FakeSubAccounts, capsys: pytest.CaptureFixture[str]
) -> None:
    eng = await make_broker_engine()
    heard = events_of(eng)
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    await eng.rotate_credential(OWNER, cid, automatic=True)
    await settle(eng)
    await eng.run_until_idle()
    keys = await eng.reveal_keys(OWNER, cid)
    out = capsys.readouterr()
    text = repr([e.payload() for e in heard]) + out.out + out.err + repr(await eng.get_credential(OWNER, cid))
    for secret in (keys.api_secret, keys.api_key, "master-secret-1"):
        assert secret not in text


async def test_a_key_left_behind_by_a_failed_creation_is_deleted_and_the_mint_retried(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    """A creation that made the key but failed a follow-up step (Binance Link: binding the IP list) hands the
    key back (KeyLeftBehind): it is retired at once and deleted, and the mint retried."""
    eng = await make_broker_engine()
    parent = await verified_master(eng, subs)
    subs.leave_behind = 1
    cid = await mint(eng, parent)
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.VERIFIED
    held = (await eng.reveal_keys(OWNER, cid)).api_key
    assert [k.key_id for k in subs.live_keys(Venue.BYBIT, "sub-7")] == [held]


async def test_a_master_key_rotation_rewraps_retired_keys_and_their_deletion_still_works(
    make_broker_engine: Factory, subs: FakeSubAccounts, master_keys: str
) -> None:
    """A retired key waiting for its grace is sealed under the master key: rewrap_keys moves it to the new
    version, an engine holding only the new version starts, and deletes the key at the venue when due."""
    eng = await make_broker_engine(broker=BrokerSettings(rotation_grace=2.0, orphan_grace=0.0))
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    old = (await eng.reveal_keys(OWNER, cid)).api_key
    await eng.rotate_credential(OWNER, cid, automatic=True)
    await eng.run_until_idle()
    await eng.close()
    second = MasterKeyring.generate_spec(2)
    both = await make_broker_engine(master_keys=f"{master_keys},{second}")
    report = await both.rewrap_keys()
    assert report.complete and report.rewrapped["retired broker key"] == 1
    await both.close()
    only_new = await make_broker_engine(master_keys=second)
    await asyncio.sleep(2.2)
    await settle(only_new)
    assert old not in {k.key_id for k in subs.live_keys(Venue.BYBIT, "sub-7")}
    assert len(subs.live_keys(Venue.BYBIT, "sub-7")) == 1


async def test_the_sweep_deletes_settled_operations_past_the_job_retention(
    make_broker_engine: Factory, subs: FakeSubAccounts
) -> None:
    eng = await make_broker_engine(job_retention=3600.0)
    parent = await verified_master(eng, subs)
    cid = await mint(eng, parent)
    await eng.rotate_credential(OWNER, cid, automatic=True)
    await settle(eng)
    async with eng.db.connection() as conn:
        await conn._conn.execute(
            "UPDATE broker_intents SET updated_at = now() - interval '2 days' WHERE purpose = 'MINT'"
        )
    await eng.queue.enqueue("broker_sweep", {})
    await settle(eng)
    async with eng.db.connection() as conn:
        left = await conn._conn.fetch(
            "SELECT purpose, state FROM broker_intents WHERE credential_id = $1", cid
        )
    assert [(r["purpose"], r["state"]) for r in left] == [("ROTATE", "DONE")]
