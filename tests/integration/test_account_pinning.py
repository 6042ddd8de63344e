"""A credential stays on the venue account of its first successful verification: every later verification
(manual, the re-verification sweep, a staged or an immediate rotation) that reaches another account fails with
ACCOUNT_MISMATCH, and the credential's trading accounts never follow the keys to another account."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from engine import CredentialEngine, CredentialStatus, TradingAccountStatus, Venue, errors, jobs
from engine.testing import FakeVenue, broken_invariants, settle

OWNER = "owner-pin"


async def verified_with_account(
    eng: CredentialEngine, fake: FakeVenue, key: str = "pin-key"
) -> tuple[uuid.UUID, Any]:
    """A credential VERIFIED on uid-A with an ACTIVE spot trading account."""
    fake.add_key(key, "secret-" + key, account_id="uid-A", identities=("spot", "margin"))
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key=key, api_secret="secret-" + key)
    await settle(eng)
    done = await eng.get_credential(OWNER, cred.credential_id)
    assert (done.status, done.venue_account_id) == (CredentialStatus.VERIFIED, "uid-A")
    account = await eng.connect_trading_account(OWNER, credential_id=cred.credential_id, account_type="spot")
    return cred.credential_id, account


async def assert_stayed_on_uid_a(eng: CredentialEngine, cid: uuid.UUID, account: Any) -> None:
    """FAILED with ACCOUNT_MISMATCH, still on uid-A, its trading account untouched, no event showing uid-B."""
    done = await eng.get_credential(OWNER, cid)
    assert (done.status, done.failure_reason, done.venue_account_id) == (
        CredentialStatus.FAILED,
        "ACCOUNT_MISMATCH",
        "uid-A",
    )
    still = await eng.get_trading_account(OWNER, account.trading_account_id)
    assert (still.status, still.credential_id, still.updated_at_ms) == (
        TradingAccountStatus.ACTIVE,
        cid,
        account.updated_at_ms,
    )
    assert done.pinned_venue_account_id == "uid-A"
    history = await eng.list_events(OWNER, cid)
    assert all(e.data["credential"]["venueAccountId"] != "uid-B" for e in history)
    last = history[-1]
    assert (last.type, last.data["reason"]) == ("credential.verification_failed", "ACCOUNT_MISMATCH")
    assert await broken_invariants(eng) == {}


async def test_manual_verify_reaching_another_account_fails(eng: CredentialEngine, fake: FakeVenue) -> None:
    """The same keys now reach uid-B: verify fails with ACCOUNT_MISMATCH; back on uid-A they verify again."""
    cid, account = await verified_with_account(eng, fake)
    fake.keys["pin-key"].account_id = "uid-B"
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    await assert_stayed_on_uid_a(eng, cid, account)
    fake.keys["pin-key"].account_id = "uid-A"
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    assert (await eng.get_credential(OWNER, cid)).status is CredentialStatus.VERIFIED


async def test_reverification_sweep_reaching_another_account_fails(make_engine: Any, fake: FakeVenue) -> None:
    """The periodic sweep re-verifies a credential whose keys now reach uid-B: ACCOUNT_MISMATCH, not uid-B."""
    eng: CredentialEngine = await make_engine(reverify_interval=3600.0)
    cid, account = await verified_with_account(eng, fake)
    fake.keys["pin-key"].account_id = "uid-B"
    async with eng.db.connection() as conn:  # due for re-verification
        await conn._conn.execute(
            "UPDATE credentials SET verified_at = now() - interval '2 hours' WHERE id = $1", cid
        )
    await eng.queue.enqueue(jobs.REVERIFY_SWEEP, {})
    await settle(eng)
    assert fake.calls.count("pin-key") == 2
    await assert_stayed_on_uid_a(eng, cid, account)


async def test_immediate_rotation_to_another_account_cannot_move_it_later(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """Immediate rotation to keys of uid-B fails; verifying those keys again (by hand) fails again."""
    cid, account = await verified_with_account(eng, fake)
    fake.add_key("stranger-key", "s", account_id="uid-B")
    await eng.rotate_credential(OWNER, cid, api_key="stranger-key", api_secret="s", immediate=True)
    await settle(eng)
    await assert_stayed_on_uid_a(eng, cid, account)
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    assert fake.calls.count("stranger-key") == 2
    await assert_stayed_on_uid_a(eng, cid, account)
    # the stored keys now reach uid-B: they are not handed to a trading backend bound to uid-A
    with pytest.raises(errors.Conflict, match="another venue account"):
        await eng.reveal_keys(OWNER, cid, purpose="order signing")


async def test_staged_rotation_checks_the_pinned_account(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Keys that moved to uid-B fail; a staged rotation to other keys of uid-B is rejected (old keys kept), one to
    keys of uid-A is promoted. A mismatching staged rotation of a VERIFIED credential leaves it VERIFIED."""
    cid, account = await verified_with_account(eng, fake)
    fake.add_key("b-key", "sb", account_id="uid-B")
    await eng.rotate_credential(OWNER, cid, api_key="b-key", api_secret="sb")
    await settle(eng)
    kept = await eng.get_credential(OWNER, cid)
    assert (kept.status, kept.failure_reason, kept.secret_version) == (
        CredentialStatus.VERIFIED,
        "ACCOUNT_MISMATCH",
        1,
    )
    fake.keys["pin-key"].account_id = "uid-B"  # the venue now answers uid-B for the old keys too
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    await assert_stayed_on_uid_a(eng, cid, account)
    fake.add_key("b-key-2", "sb2", account_id="uid-B")
    await eng.rotate_credential(OWNER, cid, api_key="b-key-2", api_secret="sb2")
    await settle(eng)
    rejected = await eng.get_credential(OWNER, cid)
    assert (rejected.status, rejected.failure_reason, rejected.venue_account_id) == (
        CredentialStatus.FAILED,
        "ACCOUNT_MISMATCH",
        "uid-A",
    )
    assert rejected.secret_version == 1  # the old keys stay, but they reach uid-B now: not handed out
    with pytest.raises(errors.Conflict, match="another venue account"):
        await eng.reveal_keys(OWNER, cid)
    fake.add_key("a-key-2", "sa2", account_id="uid-A")
    await eng.rotate_credential(OWNER, cid, api_key="a-key-2", api_secret="sa2")
    await settle(eng)
    promoted = await eng.get_credential(OWNER, cid)
    assert (promoted.status, promoted.venue_account_id) == (CredentialStatus.VERIFIED, "uid-A")
    assert (await eng.reveal_keys(OWNER, cid)).api_key == "a-key-2"
    assert (
        await eng.get_trading_account(OWNER, account.trading_account_id)
    ).status is TradingAccountStatus.ACTIVE


async def test_the_first_success_pins_the_account_and_the_database_keeps_it(
    eng: CredentialEngine, fake: FakeVenue, database_url: str
) -> None:
    """Never verified (FAILED): a rotation's first success pins its account; the pin cannot be changed in SQL."""
    fake.add_key("first", "bad-secret-on-purpose")
    cred = await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="first", api_secret="wrong")
    await settle(eng)
    failed = await eng.get_credential(OWNER, cred.credential_id)
    assert (failed.status, failed.pinned_venue_account_id) == (CredentialStatus.FAILED, None)
    fake.add_key("fresh", "fs", account_id="uid-F")
    await eng.rotate_credential(OWNER, cred.credential_id, api_key="fresh", api_secret="fs")
    await settle(eng)
    done = await eng.get_credential(OWNER, cred.credential_id)
    assert (done.status, done.pinned_venue_account_id) == (CredentialStatus.VERIFIED, "uid-F")
    raw = await asyncpg.connect(database_url)
    try:
        for value in ("uid-X", None):
            with pytest.raises(asyncpg.CheckViolationError):
                await raw.execute(
                    "UPDATE credentials SET pinned_venue_account_id = $2 WHERE id = $1",
                    cred.credential_id,
                    value,
                )
        await raw.execute(
            "UPDATE credentials SET pinned_venue_account_id = 'uid-F' WHERE id = $1", cred.credential_id
        )
    finally:
        await raw.close()


async def test_the_schema_migration_pins_credentials_verified_before_it(
    make_engine: Any, fake: FakeVenue, database_url: str
) -> None:
    """A database from before the pin (no column, an older schema digest): the next engine to start applies the
    schema, which adds the column pinned to the account of every credential that has verified (none for the
    others); the rule then holds for them too."""
    old: CredentialEngine = await make_engine()
    cid, account = await verified_with_account(old, fake)
    fake.add_key("never", "n")
    never = await old.create_credential(OWNER, venue=Venue.BINANCE, api_key="never", api_secret="wrong")
    await settle(old)
    await old.close()
    raw = await asyncpg.connect(database_url)
    try:  # the schema as it was: no column, no trigger, the view without it, another digest
        await raw.execute("DROP VIEW credential_view")
        await raw.execute("ALTER TABLE credentials DROP COLUMN pinned_venue_account_id CASCADE")
        await raw.execute(
            "CREATE VIEW credential_view AS SELECT c.*, p.version AS pending_version, p.masked_api_key AS "
            "pending_masked_api_key, p.created_at AS pending_started_at FROM credentials c LEFT JOIN "
            "credential_secrets p ON p.credential_id = c.id AND p.state = 'PENDING'"
        )
        await raw.execute("UPDATE engine_schema SET digest = 'the previous schema'")
        eng: CredentialEngine = await make_engine()  # applies the schema as it starts
        pins = dict(await raw.fetch("SELECT id, pinned_venue_account_id FROM credentials"))
    finally:
        await raw.close()
    assert pins == {cid: "uid-A", never.credential_id: None}
    assert await eng.db.apply_schema(force=True)  # idempotent: applying it again changes nothing
    fake.keys["pin-key"].account_id = "uid-B"
    await eng.verify_credential(OWNER, cid)
    await settle(eng)
    await assert_stayed_on_uid_a(eng, cid, account)


async def test_concurrent_verifications_cannot_repin(eng: CredentialEngine, fake: FakeVenue) -> None:
    """The SQL of a successful verification is fenced on the pin too: a row pinned to uid-A is never marked
    VERIFIED with uid-B, even by a caller that skipped the job's check."""
    cid, _ = await verified_with_account(eng, fake)
    async with eng.db.transaction() as conn:
        row = await conn.fetchrow(
            "mark_verified", cid, ["VERIFIED"], 1, ["spot"], {"read": True}, "uid-B", None, []
        )
    assert row is None
    assert (await eng.get_credential(OWNER, cid)).venue_account_id == "uid-A"
