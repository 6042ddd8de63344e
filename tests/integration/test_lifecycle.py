"""The credential lifecycle through the public API, on the real (embedded) PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from engine import (
    CredentialEngine,
    CredentialStatus,
    CredentialType,
    Event,
    TradingAccountStatus,
    Venue,
    errors,
    lifecycle,
)
from engine.testing import FakeVenue, settle
from venues.base import Outcome

OWNER = "owner-1"


async def created(eng: CredentialEngine, fake: FakeVenue, key: str = "key-A", **kwargs: object) -> uuid.UUID:
    fake.add_key(key, "secret-" + key, **kwargs)  # type: ignore[arg-type]
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key=key, api_secret="secret-" + key)
    return cred.credential_id


async def verified(eng: CredentialEngine, fake: FakeVenue, key: str = "key-A", **kwargs: object) -> uuid.UUID:
    cid = await created(eng, fake, key, **kwargs)
    await settle(eng)
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.VERIFIED
    return cid


async def test_create_stores_pending_and_enqueues_verification(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """create -> PENDING with a masked key and nothing secret; the queued verify makes it VERIFIED."""
    fake.add_key("AKIAEXAMPLEKEY123", "s3cr3t", identities=("spot", "margin"), account_id="uid-9")
    cred = await eng.create_credential(
        OWNER, venue="binance", api_key="  AKIAEXAMPLEKEY123 ", api_secret="s3cr3t", nickname=" Main "
    )
    assert cred.status is CredentialStatus.PENDING
    assert cred.credential_type is CredentialType.EXCHANGE
    assert cred.nickname == "Main"
    assert cred.masked_api_key.endswith("***") and "EXAMPLEKEY123" not in cred.masked_api_key
    assert cred.identities == ()
    await settle(eng)
    done = await eng.get_credential(OWNER, cred.credential_id)
    assert done.status is CredentialStatus.VERIFIED
    assert done.identities == ("margin", "spot")
    assert done.venue_account_id == "uid-9"
    assert done.permissions is not None and done.permissions.trade and not done.permissions.withdraw
    assert done.verified_at_ms is not None


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.INVALID_KEY,
        Outcome.INVALID_SECRET,
        Outcome.IP_NOT_ALLOWED,
        Outcome.KEY_EXPIRED,
        Outcome.PERMISSION_DENIED,
    ],
)
async def test_permanent_outcomes_fail_with_their_reason(
    eng: CredentialEngine, fake: FakeVenue, outcome: Outcome
) -> None:
    """verify_rejected: a permanent venue answer makes the credential FAILED naming the outcome."""
    fake.fail_key("bad", outcome, api_secret="x")
    cred = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key="bad", api_secret="x", api_passphrase="p"
    )
    await settle(eng)
    done = await eng.get_credential(OWNER, cred.credential_id)
    assert done.status is CredentialStatus.FAILED
    assert done.failure_reason == outcome.value


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.RATE_LIMITED,
        Outcome.SERVER_ERROR,
        Outcome.TIMEOUT,
        Outcome.MAINTENANCE,
        Outcome.NETWORK,
        Outcome.CLOCK_SKEW,
    ],
)
async def test_transient_outcomes_never_fail_a_credential(
    eng: CredentialEngine, fake: FakeVenue, outcome: Outcome
) -> None:
    """A venue that is down keeps the credential PENDING (retrying), then VERIFIED once it answers."""
    # retry_after keeps the retries out of the first run_until_idle() even on a loaded machine
    fake.flaky_key("flaky", "s", transient=3, outcome=outcome, retry_after=0.3)
    cred = await eng.create_credential(OWNER, venue=Venue.BYBIT, api_key="flaky", api_secret="s")
    await eng.run_until_idle()
    assert (await eng.get_credential(OWNER, cred.credential_id)).status is CredentialStatus.PENDING
    await settle(eng)
    assert (await eng.get_credential(OWNER, cred.credential_id)).status is CredentialStatus.VERIFIED
    assert fake.calls.count("flaky") == 4


async def test_transient_retry_honours_retry_after(make_engine: object, fake: FakeVenue) -> None:
    """A RATE_LIMITED answer with Retry-After schedules the next attempt no sooner than that."""
    eng = await make_engine()  # type: ignore[operator]
    fake.flaky_key("slow", "s", transient=1, retry_after=30.0)
    await eng.create_credential(OWNER, venue=Venue.KRAKEN, api_key="slow", api_secret="s")
    await eng.run_until_idle()
    jobs = await eng.queue.list_jobs(state="queued")
    verify = [j for j in jobs if j.kind == "verify"]
    assert len(verify) == 1
    delay = (verify[0].run_at - verify[0].created_at).total_seconds()
    assert delay >= 29


async def test_policy_rejects_withdraw_keys(eng: CredentialEngine, fake: FakeVenue) -> None:
    """The default policy fails keys that can withdraw, naming the rule."""
    fake.add_key("wd", "s", withdraw=True)
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="wd", api_secret="s")
    await settle(eng)
    done = await eng.get_credential(OWNER, cred.credential_id)
    assert done.status is CredentialStatus.FAILED
    assert done.failure_reason == "POLICY_WITHDRAW_ENABLED"


async def test_reverify_transitions_verified_to_failed_and_back(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """verify_rejected from VERIFIED and verify_succeeded from FAILED, with events for each change."""
    cid = await verified(eng, fake, "k1")
    fake.keys["k1"].failure = Outcome.INVALID_KEY
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.FAILED
    fake.keys["k1"].failure = None
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.VERIFIED
    types = [e.type for e in await eng.list_events(OWNER, cid)]
    assert types == [
        "credential.created",
        "credential.verified",
        "credential.verification_failed",
        "credential.verified",
    ]


async def test_unchanged_reverify_emits_nothing_but_permission_change_does(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """Re-verifying with the same findings is silent; new permissions emit credential.permissions_changed."""
    cid = await verified(eng, fake, "k2")
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    assert len(await eng.list_events(OWNER, cid)) == 2
    fake.keys["k2"].identities = ("futures", "spot")
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    evs = await eng.list_events(OWNER, cid)
    assert [e.type for e in evs][-1] == "credential.permissions_changed"
    assert (await eng.get_credential(OWNER, cid)).identities == ("futures", "spot")


async def test_staged_rotation_keeps_old_keys_until_new_ones_verify(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """rotate stages the new keys; reveal_keys still returns the old ones until rotation_succeeded."""
    cid = await verified(eng, fake, "old-key", account_id="uid-1")
    fake.add_key("new-key", "secret-new-key", account_id="uid-1")
    cred = await eng.rotate_credential(OWNER, cid, api_key="new-key", api_secret="secret-new-key")
    assert cred.status is CredentialStatus.VERIFIED
    assert cred.pending_rotation is not None
    assert (await eng.reveal_keys(OWNER, cid)).api_key == "old-key"
    with pytest.raises(errors.RotationPending):
        await eng.rotate_credential(OWNER, cid, api_key="third-key", api_secret="x")
    await settle(eng)
    done = await eng.get_credential(OWNER, cid)
    assert done.status is CredentialStatus.VERIFIED and done.pending_rotation is None
    assert done.secret_version == 2
    assert (await eng.reveal_keys(OWNER, cid)).api_key == "new-key"
    assert await eng.db.fetchrow("get_secret", cid, 1) is None  # the old material is destroyed
    assert [e.type for e in await eng.list_events(OWNER, cid)][-2:] == [
        "credential.rotation_started",
        "credential.rotated",
    ]


async def test_rotation_to_another_account_is_rejected(eng: CredentialEngine, fake: FakeVenue) -> None:
    """rotation_rejected: keys of a different venue account are discarded; the old keys stay in use."""
    cid = await verified(eng, fake, "acct1-key", account_id="uid-1")
    fake.add_key("acct2-key", "s2", account_id="uid-2")
    await eng.rotate_credential(OWNER, cid, api_key="acct2-key", api_secret="s2")
    await settle(eng)
    done = await eng.get_credential(OWNER, cid)
    assert done.status is CredentialStatus.VERIFIED
    assert done.pending_rotation is None
    assert done.failure_reason == "ACCOUNT_MISMATCH"
    assert done.secret_version == 1
    assert (await eng.reveal_keys(OWNER, cid)).api_key == "acct1-key"
    assert (await eng.list_events(OWNER, cid))[-1].type == "credential.rotation_failed"


async def test_rotation_with_bad_keys_is_rejected_and_status_unchanged(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """rotation_rejected from FAILED leaves it FAILED; from VERIFIED leaves it VERIFIED."""
    fake.fail_key("dead", Outcome.INVALID_KEY, api_secret="s")
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="dead", api_secret="s")
    await settle(eng)
    await eng.rotate_credential(OWNER, cred.credential_id, api_key="also-unknown", api_secret="s")
    await settle(eng)
    done = await eng.get_credential(OWNER, cred.credential_id)
    assert done.status is CredentialStatus.FAILED
    assert done.pending_rotation is None


async def test_rotation_from_failed_succeeds(eng: CredentialEngine, fake: FakeVenue) -> None:
    """rotation_succeeded from FAILED (never verified, no account known) promotes and verifies."""
    fake.fail_key("dead2", Outcome.INVALID_SECRET, api_secret="s")
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="dead2", api_secret="s")
    await settle(eng)
    fake.add_key("fresh", "fs")
    await eng.rotate_credential(OWNER, cred.credential_id, api_key="fresh", api_secret="fs")
    await settle(eng)
    done = await eng.get_credential(OWNER, cred.credential_id)
    assert done.status is CredentialStatus.VERIFIED
    assert (await eng.reveal_keys(OWNER, cred.credential_id)).api_key == "fresh"


async def test_immediate_rotation_destroys_old_material_at_once(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """rotate_immediately: PENDING at once, the old secret row is gone before any verification runs."""
    cid = await verified(eng, fake, "leaked", account_id="uid-5")
    fake.add_key("replacement", "r", account_id="uid-5")
    cred = await eng.rotate_credential(OWNER, cid, api_key="replacement", api_secret="r", immediate=True)
    assert cred.status is CredentialStatus.PENDING
    assert await eng.db.fetchrow("get_secret", cid, 1) is None
    assert (await eng.reveal_keys(OWNER, cid)).api_key == "replacement"
    await settle(eng)
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.VERIFIED


async def test_immediate_rotation_to_another_account_fails(eng: CredentialEngine, fake: FakeVenue) -> None:
    """After an immediate rotation, keys of another venue account fail verification (ACCOUNT_MISMATCH)."""
    cid = await verified(eng, fake, "leaked2", account_id="uid-5")
    fake.add_key("stranger", "r", account_id="uid-6")
    await eng.rotate_credential(OWNER, cid, api_key="stranger", api_secret="r", immediate=True)
    await settle(eng)
    done = await eng.get_credential(OWNER, cid)
    assert done.status is CredentialStatus.FAILED and done.failure_reason == "ACCOUNT_MISMATCH"


async def test_revoke_destroys_material_and_disconnects_accounts(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """revoke: REVOKED, no secret rows left, ACTIVE accounts DISABLED, events for each, in one go."""
    cid = await verified(eng, fake, "rk", identities=("spot", "futures"))
    spot = await eng.connect_trading_account(OWNER, credential_id=cid, account_type="spot", name="Spot")
    fut = await eng.connect_trading_account(OWNER, credential_id=cid, account_type="FUTURES")
    with pytest.raises(errors.ActiveAccountsExist):
        await eng.revoke_credential(OWNER, cid, cascade=False)
    cred = await eng.revoke_credential(OWNER, cid)
    assert cred.status is CredentialStatus.REVOKED and cred.secret_version == 0
    left = await eng.db.fetchval("count_secrets_to_rewrap", -1)
    assert left == 0
    for account in (spot, fut):
        assert (
            await eng.get_trading_account(OWNER, account.trading_account_id)
        ).status is TradingAccountStatus.DISABLED
    types = [e.type for e in await eng.list_events(OWNER, cid)]
    assert types[-3:] == [
        "trading_account.disconnected",
        "trading_account.disconnected",
        "credential.revoked",
    ]
    with pytest.raises(errors.InvalidTransition):
        await eng.reveal_keys(OWNER, cid)


async def test_revoke_without_cascade_when_no_active_accounts(eng: CredentialEngine, fake: FakeVenue) -> None:
    """revoke(cascade=False) succeeds once every account is disconnected."""
    cid = await verified(eng, fake, "rk2")
    account = await eng.connect_trading_account(OWNER, credential_id=cid)
    await eng.disconnect_trading_account(OWNER, account.trading_account_id)
    assert (await eng.revoke_credential(OWNER, cid, cascade=False)).status is CredentialStatus.REVOKED


@pytest.mark.parametrize("trigger", ["verify", "rotate", "rotate_immediately", "revoke"])
async def test_revoked_is_terminal(eng: CredentialEngine, fake: FakeVenue, trigger: str) -> None:
    """Every trigger on a REVOKED credential is InvalidTransition (409), and nothing changes."""
    cid = await verified(eng, fake, "term")
    await eng.revoke_credential(OWNER, cid)
    before = await eng.list_events(OWNER, cid)
    if trigger == "verify":
        call = eng.verify_credential(OWNER, cid)
    elif trigger == "revoke":
        call = eng.revoke_credential(OWNER, cid)
    else:
        call = eng.rotate_credential(
            OWNER, cid, api_key="k", api_secret="s", immediate=trigger == "rotate_immediately"
        )
    with pytest.raises(errors.InvalidTransition):
        await call
    assert await eng.list_events(OWNER, cid) == before
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.REVOKED


def test_transition_table_matches_design() -> None:
    """The machine encodes exactly the table of docs/design.md §3.2: every row allowed, everything else forbidden."""
    live = {"PENDING", "VERIFIED", "FAILED"}
    expected = {
        "verify_succeeded": {s: "VERIFIED" for s in live},
        "verify_rejected": {s: "FAILED" for s in live},
        "rotate": {s: s for s in live},
        "rotate_immediately": {s: "PENDING" for s in live},
        "rotation_succeeded": {s: "VERIFIED" for s in live},
        "rotation_rejected": {s: s for s in live},
        "revoke": {s: "REVOKED" for s in live},
    }
    for trigger, rows in expected.items():
        for status in ("PENDING", "VERIFIED", "FAILED", "REVOKED"):
            if status in rows:
                assert lifecycle.target(trigger, status).value == rows[status]
            else:
                with pytest.raises(errors.InvalidTransition):
                    lifecycle.target(trigger, status)
    assert lifecycle.target("create", lifecycle.NEW) is CredentialStatus.PENDING
    assert lifecycle.triggers_from("REVOKED") == []


async def test_late_probe_result_after_rotation_is_discarded(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Fencing: a verification of version 1 that answers after an immediate rotation to version 2 changes nothing."""
    cid = await verified(eng, fake, "fence-old", account_id="uid-1")
    gate = asyncio.Event()
    fake.keys["fence-old"].gate = gate
    fake.keys["fence-old"].failure = Outcome.INVALID_KEY  # would fail the credential if applied
    await eng.verify_credential(OWNER, cid)
    late = asyncio.create_task(eng.run_until_idle())
    while "fence-old" not in fake.calls[1:]:  # noqa: ASYNC110 - polling a plain list the fake appends to
        await asyncio.sleep(0.01)
    fake.add_key("fence-new", "n", account_id="uid-1")
    await eng.rotate_credential(OWNER, cid, api_key="fence-new", api_secret="n", immediate=True)
    gate.set()
    await late
    await settle(eng)
    done = await eng.get_credential(OWNER, cid)
    assert done.status is CredentialStatus.VERIFIED
    assert done.failure_reason is None
    assert "credential.verification_failed" not in [e.type for e in await eng.list_events(OWNER, cid)]


async def test_concurrent_conflicting_operations_stay_consistent(
    make_engine: object, fake: FakeVenue
) -> None:
    """50 concurrent rotate/revoke/verify calls on one credential leave it consistent and its events gapless."""
    eng: CredentialEngine = await make_engine(workers=4)  # type: ignore[operator]
    cid = await verified(eng, fake, "busy", account_id="uid-1")
    for i in range(50):
        fake.add_key(f"busy-{i}", f"s{i}", account_id="uid-1")

    async def one(i: int) -> str:
        try:
            if i % 5 == 0:
                await eng.revoke_credential(OWNER, cid)
            elif i % 5 in (1, 2):
                await eng.rotate_credential(
                    OWNER, cid, api_key=f"busy-{i}", api_secret=f"s{i}", immediate=i % 2 == 0
                )
            else:
                await eng.verify_credential(OWNER, cid)
        except errors.Conflict as exc:
            return type(exc).__name__
        return "ok"

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert set(results) <= {"ok", "InvalidTransition", "RotationPending", "DuplicateCredential"}
    await settle(eng)
    cred = await eng.get_credential(OWNER, cid)
    assert cred.status is CredentialStatus.REVOKED and cred.secret_version == 0
    assert await eng.db.fetchval("count_secrets_to_rewrap", -1) == 0
    seqs = [e.sequence for e in await eng.list_events(OWNER, cid)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert results.count("ok") >= 1


async def test_duplicate_api_key_is_refused_per_owner_and_venue(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """The same API key twice for one owner and venue is 409; another owner or venue may hold it."""
    fake.add_key("dup", "s")
    await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="dup", api_secret="s")
    with pytest.raises(errors.DuplicateCredential) as info:
        await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key=" dup ", api_secret="other")
    assert info.value.field == "apiKey"
    await eng.create_credential("owner-2", venue=Venue.BINANCE, api_key="dup", api_secret="s")
    await eng.create_credential(OWNER, venue=Venue.BYBIT, api_key="dup", api_secret="s")
    page = await eng.list_credentials(OWNER)
    assert page.total == 2


async def test_revoked_key_may_be_added_again(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Revocation destroys the fingerprint with the material, so the same key can be stored anew."""
    cid = await verified(eng, fake, "again")
    await eng.revoke_credential(OWNER, cid)
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="again", api_secret="secret-again")
    assert cred.credential_id != cid


async def test_owners_are_isolated(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Another owner's ids answer NotFound for every read and change, and nothing changes."""
    cid = await verified(eng, fake, "mine")
    account = await eng.connect_trading_account(OWNER, credential_id=cid)
    intruder = "owner-evil"
    calls = [
        eng.get_credential(intruder, cid),
        eng.verify_credential(intruder, cid),
        eng.rotate_credential(intruder, cid, api_key="x", api_secret="y"),
        eng.revoke_credential(intruder, cid),
        eng.reveal_keys(intruder, cid),
        eng.connect_trading_account(intruder, credential_id=cid),
        eng.disconnect_trading_account(intruder, account.trading_account_id),
        eng.get_trading_account(intruder, account.trading_account_id),
        eng.list_events(intruder, cid),
    ]
    for call in calls:
        with pytest.raises(errors.NotFound):
            await call
    assert (await eng.list_credentials(intruder)).total == 0
    assert (await eng.list_trading_accounts(intruder)).total == 0
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.VERIFIED


async def test_list_filters_and_pagination(eng: CredentialEngine, fake: FakeVenue) -> None:
    """list_credentials filters by status, type and venue and pages (offset/limit/total, docs/api-dialect.md §6)."""
    for i in range(5):
        fake.add_key(f"p{i}", "s")
        await eng.create_credential(
            OWNER,
            venue=Venue.OKX if i % 2 else Venue.BINANCE,
            api_key=f"p{i}",
            api_secret="s",
            api_passphrase="pp",
            credential_type="BROKER" if i == 4 else "EXCHANGE",
        )
    page = await eng.list_credentials(OWNER, offset=1, limit=2)
    assert (page.total, page.offset, page.limit, len(page)) == (5, 1, 2, 2)
    assert (await eng.list_credentials(OWNER, venue="OKX")).total == 2
    assert (await eng.list_credentials(OWNER, credential_type="BROKER")).total == 1
    assert (await eng.list_credentials(OWNER, status="VERIFIED")).total == 0
    await settle(eng)
    assert (await eng.list_credentials(OWNER, status=CredentialStatus.VERIFIED)).total == 5
    with pytest.raises(errors.InvalidRequest) as info:
        await eng.list_credentials(OWNER, limit=0)
    assert info.value.field == "limit"


@pytest.mark.parametrize(
    ("kwargs", "field", "error"),
    [
        ({"venue": "FTX"}, "venue", errors.InvalidRequest),
        ({"api_key": ""}, "apiKey", errors.InvalidRequest),
        ({"api_secret": None}, "apiSecret", errors.InvalidRequest),
        ({"api_key": "a b"}, "apiKey", errors.InvalidKeyFormat),
        ({"api_key": "x" * 600}, "apiKey", errors.InvalidRequest),
        ({"venue": "OKX"}, "apiPassphrase", errors.InvalidRequest),
        ({"credential_type": "RETAIL"}, "credentialType", errors.InvalidRequest),
        ({"nickname": "n" * 101}, "nickname", errors.InvalidRequest),
        ({"api_key": "malformed-key"}, "apiKey", errors.InvalidKeyFormat),
        ({"api_key": 42}, "apiKey", errors.InvalidRequest),
    ],
)
async def test_invalid_input_is_a_typed_error_naming_the_field(
    eng: CredentialEngine, kwargs: dict[str, object], field: str, error: type[Exception]
) -> None:
    """Bad input raises the right error class with the field named, and stores nothing."""
    args: dict[str, object] = {"venue": "BINANCE", "api_key": "good-key", "api_secret": "good-secret"}
    args.update(kwargs)
    with pytest.raises(error) as info:
        await eng.create_credential(OWNER, **args)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert getattr(info.value, "field", None) == field
    assert (await eng.list_credentials(OWNER)).total == 0


async def test_connect_requires_verified_and_a_reachable_identity(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """Accounts connect only to VERIFIED credentials and only for account types the key reaches."""
    fake.add_key("ck", "s", identities=("spot",))
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="ck", api_secret="s")
    with pytest.raises(errors.Conflict):
        await eng.connect_trading_account(OWNER, credential_id=cred.credential_id)
    await settle(eng)
    with pytest.raises(errors.InvalidRequest) as info:
        await eng.connect_trading_account(OWNER, credential_id=cred.credential_id, account_type="futures")
    assert info.value.field == "accountType"
    account = await eng.connect_trading_account(OWNER, credential_id=cred.credential_id, name="Main")
    assert account.account_type == "spot" and account.status is TradingAccountStatus.ACTIVE
    assert account.public_dict()["accountType"] == "SPOT"
    with pytest.raises(errors.Conflict):
        await eng.connect_trading_account(OWNER, credential_id=cred.credential_id, account_type="spot")


async def test_connect_with_keys_creates_verifies_and_connects(make_engine: object, fake: FakeVenue) -> None:
    """docs/api-dialect.md §8's form: keys in, ACTIVE account out; bad keys are VerificationFailed and leave no keys."""
    eng: CredentialEngine = await make_engine(workers=2)  # type: ignore[operator]
    fake.add_key("seed05", "s", identities=("spot", "margin"))
    account = await eng.connect_trading_account(
        OWNER, venue="BINANCE", api_key="seed05", api_secret="s", name="My Binance Account", wait_timeout=10
    )
    assert account.status is TradingAccountStatus.ACTIVE and account.account_type == "margin"
    again = await eng.connect_trading_account(
        OWNER, venue="BINANCE", api_key="seed05", api_secret="s", account_type="spot", wait_timeout=10
    )
    assert again.credential_id == account.credential_id
    fake.fail_key("seed05-bad", Outcome.INVALID_SECRET, api_secret="s")
    with pytest.raises(errors.VerificationFailed) as info:
        await eng.connect_trading_account(
            OWNER, venue="BINANCE", api_key="seed05-bad", api_secret="s", wait_timeout=10
        )
    assert info.value.errno == -120001 and "BINANCE" in str(info.value)
    page = await eng.list_credentials(OWNER, status="REVOKED")
    assert page.total == 1


async def test_listeners_hear_events_in_sequence_order(eng: CredentialEngine, fake: FakeVenue) -> None:
    """subscribe() delivers each committed event once, per credential in sequence order, filtered by type."""
    heard: list[Event] = []
    verified_only: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    async def only_verified(event: Event) -> None:
        verified_only.append(event)

    eng.subscribe(listener)
    eng.subscribe(only_verified, types={"credential.verified"})
    cid = await verified(eng, fake, "ev")
    await eng.revoke_credential(OWNER, cid)
    await eng.run_until_idle()
    assert [e.type for e in heard] == ["credential.created", "credential.verified", "credential.revoked"]
    assert [e.sequence for e in heard] == [1, 2, 3]
    assert [e.type for e in verified_only] == ["credential.verified"]
    payload = heard[1].payload()
    assert payload["type"] == "credential.verified"
    assert payload["data"]["credential"]["status"] == "VERIFIED"


async def test_failing_listener_does_not_block_others(eng: CredentialEngine, fake: FakeVenue) -> None:
    """A listener that raises is counted and logged; the other listeners and the workers carry on."""
    good: list[str] = []

    async def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    async def slow(event: Event) -> None:
        await asyncio.sleep(0.05)

    async def fine(event: Event) -> None:
        good.append(event.type)

    eng.subscribe(broken)
    eng.subscribe(slow)
    eng.subscribe(fine)
    await verified(eng, fake, "lst")
    await eng.run_until_idle()
    assert good == ["credential.created", "credential.verified"]
    assert eng.bus.stats.listener_failures == 2


async def test_listener_in_another_engine_hears_changes(make_engine: object, fake: FakeVenue) -> None:
    """Two engines on one database: a listener on B hears what A's worker did, with no gap in sequence."""
    a: CredentialEngine = await make_engine()  # type: ignore[operator]
    b: CredentialEngine = await make_engine()  # type: ignore[operator]
    heard: list[Event] = []

    async def on_b(event: Event) -> None:
        heard.append(event)

    b.subscribe(on_b)
    cid = await verified(a, fake, "x-proc")
    await a.revoke_credential(OWNER, cid)
    for _ in range(100):
        await b.run_until_idle()
        if len(heard) >= 3:
            break
        await asyncio.sleep(0.05)
    assert [(e.type, e.sequence) for e in heard] == [
        ("credential.created", 1),
        ("credential.verified", 2),
        ("credential.revoked", 3),
    ]


async def test_engine_refuses_reopen_and_closes_idempotently(make_engine: object) -> None:
    """A closed engine cannot be reopened and refuses calls; close twice is fine."""
    eng: CredentialEngine = await make_engine()  # type: ignore[operator]
    await eng.close()
    await eng.close()
    with pytest.raises(errors.EngineClosed):
        await eng.open()
    with pytest.raises(errors.EngineClosed):
        await eng.list_credentials(OWNER)


async def test_wait_for_status_times_out_with_a_typed_error(eng: CredentialEngine, fake: FakeVenue) -> None:
    """wait_for_status raises WaitTimeout when no worker moves the credential in time."""
    fake.add_key("w", "s")
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="w", api_secret="s")
    with pytest.raises(errors.WaitTimeout):
        await eng.wait_for_status(OWNER, cred.credential_id, {CredentialStatus.VERIFIED}, timeout=0.3)


async def test_workers_drive_verification_without_run_until_idle(
    make_engine: object, fake: FakeVenue
) -> None:
    """With workers on, a created credential becomes VERIFIED by itself (LISTEN/NOTIFY wake-up)."""
    eng: CredentialEngine = await make_engine(workers=4, poll_interval=5.0)  # type: ignore[operator]
    fake.add_key("auto", "s")
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="auto", api_secret="s")
    done = await eng.wait_for_status(OWNER, cred.credential_id, {CredentialStatus.VERIFIED}, timeout=4)
    assert done.status is CredentialStatus.VERIFIED


async def test_reverify_sweep_enqueues_stale_verified_credentials(
    make_engine: object, fake: FakeVenue
) -> None:
    """The periodic sweep re-verifies VERIFIED credentials older than reverify_interval."""
    eng: CredentialEngine = await make_engine(reverify_interval=60.0)  # type: ignore[operator]
    cid = await verified(eng, fake, "sweep")
    calls = fake.calls.count("sweep")
    async with eng.db.connection() as conn:
        await conn.execute_script("UPDATE credentials SET verified_at = now() - interval '2 hours'")
    await eng.queue.enqueue("reverify_sweep", {})
    await settle(eng)
    assert fake.calls.count("sweep") == calls + 1
    assert (await eng.get_credential(OWNER, cid)).verified_at_ms is not None


async def test_expiring_key_warns_once(eng: CredentialEngine, fake: FakeVenue) -> None:
    """A key expiring within the warning window gets one credential.expiring event and a warning."""
    import time

    soon = int(time.time() * 1000) + 3 * 86_400_000
    cid = await verified(eng, fake, "exp", expires_at_ms=soon)
    await settle(eng)
    types = [e.type for e in await eng.list_events(OWNER, cid)]
    assert types.count("credential.expiring") == 1
    cred = await eng.get_credential(OWNER, cid)
    assert any(w.startswith("KEY_EXPIRING") for w in cred.warnings)


async def test_revoke_cascade_cancels_queued_checks(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Checks waiting out a venue's Retry-After when the credential is revoked are cancelled, never run."""
    cid = await verified(eng, fake, "cascade-key", account_id="uid-1")
    fake.keys["cascade-key"].transient_left, fake.keys["cascade-key"].retry_after = 1, 60.0
    await eng.verify_credential(OWNER, cid)
    fake.flaky_key("cascade-new", "n", transient=1, retry_after=60.0, account_id="uid-1")
    await eng.rotate_credential(OWNER, cid, api_key="cascade-new", api_secret="n")
    await eng.run_until_idle()  # both checks met a rate limit: queued again, a minute ahead
    calls = len(fake.calls)
    await eng.revoke_credential(OWNER, cid)
    await eng.run_until_idle()
    cancelled = await eng.queue.list_jobs(state="cancelled")
    assert sorted(j.kind for j in cancelled) == ["rotation_verify", "verify"]
    assert await eng.queue.list_jobs(state="queued", kind="verify") == []
    assert len(fake.calls) == calls  # no probe ran for a revoked credential


async def test_finished_jobs_are_purged_after_the_retention(make_engine: Any, fake: FakeVenue) -> None:
    """The purge job deletes done jobs older than job_retention and keeps recent and dead ones."""
    eng: CredentialEngine = await make_engine(job_retention=3600.0)
    await verified(eng, fake, "purge-a")
    await verified(eng, fake, "purge-b")
    done = await eng.queue.list_jobs(state="done")
    assert len(done) == 2
    async with eng.db.connection() as conn:
        await conn._conn.execute(
            "UPDATE queue_jobs SET finished_at = now() - interval '2 hours' WHERE id = $1", done[0].id
        )
    await eng.queue.enqueue("purge_jobs")
    await eng.run_until_idle()
    left = {j.id for j in await eng.queue.list_jobs(state="done")}
    assert done[0].id not in left
    assert done[1].id in left
