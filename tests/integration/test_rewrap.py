"""Master-key rotation on the real PostgreSQL: rewrap leaves nothing under an old version (or says what it left),
and an engine refuses to start with a keyring that lacks a version the database still uses."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from engine import CredentialEngine, Venue, errors
from engine.crypto import Sealed
from engine.keys.rewrap import Leftover
from engine.store import FINGERPRINT_KEY
from engine.testing import FakeVenue, settle
from engine.webhooks import signing
from engine.webhooks.secrets import secret_purpose

OWNER = "owner-rewrap"


@pytest.fixture
def second_key() -> str:
    from engine.crypto import MasterKeyring

    return MasterKeyring.generate_spec(2)


@pytest.fixture
async def raw(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of another client (not the engine's pool): it holds row locks and watches the server."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def populated(make_engine: Any, fake: FakeVenue) -> dict[str, Any]:
    """Under master key 1: a VERIFIED credential with a staged rotation (CURRENT and PENDING secrets), a PENDING
    one, and a webhook endpoint whose secret was rotated (the old one in its grace period); the fingerprint key."""
    eng: CredentialEngine = await make_engine(allow_private_webhook_urls=True)
    fake.add_key("rw-current", "secret-current")
    fake.add_key("rw-staged", "secret-staged")
    fake.add_key("rw-pending", "secret-pending")
    rotated = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="rw-current", api_secret="secret-current"
    )
    await settle(eng)
    await eng.rotate_credential(OWNER, rotated.credential_id, api_key="rw-staged", api_secret="secret-staged")
    pending = await eng.create_credential(OWNER, venue=Venue.OKX, api_key="rw-pending", api_secret="secret-pending",
                                          api_passphrase="pass-pending")  # fmt: skip
    endpoint = await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/hooks")
    new_secret = await eng.rotate_webhook_secret(OWNER, endpoint.endpoint_id)
    await eng.close()  # its queued jobs (the staged rotation's check) stay queued
    return {
        "rotated": rotated.credential_id,
        "pending": pending.credential_id,
        "endpoint": endpoint.endpoint_id,
        "webhook_secrets": {1: endpoint.secret, 2: new_secret},
    }


async def kek_versions(raw: asyncpg.Connection) -> dict[str, list[int]]:
    return {
        table: [r["kek_version"] for r in await raw.fetch(f"SELECT kek_version FROM {table} ORDER BY 1")]
        for table in ("credential_secrets", "webhook_secrets", "engine_keys")
    }


async def wait_until_blocked(raw: asyncpg.Connection, task: asyncio.Task[Any]) -> None:
    """Return once some session of this database waits for a lock; fail if ``task`` ends first (30 s bound)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if task.done():
            pytest.fail(f"the rewrap ended without waiting for the locked rows: {task.result()!r}")
        waiting = await raw.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    pytest.fail("no session waited for the locked rows within 30 s")


async def lock_one_of_each(raw: asyncpg.Connection, data: dict[str, Any]) -> None:
    """In ``raw``'s open transaction: lock the staged secret, a webhook secret and the fingerprint key."""
    await raw.execute(
        "SELECT 1 FROM credential_secrets WHERE credential_id = $1 AND state = 'PENDING' FOR UPDATE",
        data["rotated"],
    )
    await raw.execute("SELECT 1 FROM webhook_secrets WHERE endpoint_id = $1 AND version = 1 FOR UPDATE",
                      data["endpoint"])  # fmt: skip
    await raw.execute("SELECT 1 FROM engine_keys WHERE name = $1 FOR UPDATE", FINGERPRINT_KEY)


async def test_the_last_pass_waits_for_rows_other_transactions_hold(
    make_engine: Any, fake: FakeVenue, master_keys: str, second_key: str, raw: asyncpg.Connection
) -> None:
    """A credential secret, a webhook secret and the fingerprint key locked by another client while the rewrap
    runs: the skip-locked passes leave them, the last pass waits, and once they are released all are moved."""
    data = await populated(make_engine, fake)
    both = await make_engine(master_keys=f"{master_keys},{second_key}")
    transaction = raw.transaction()
    await transaction.start()
    await lock_one_of_each(raw, data)
    task = asyncio.create_task(both.rewrap_keys(batch_size=2, lock_timeout=60))
    try:
        await wait_until_blocked(raw, task)
        assert not task.done()
    finally:
        await transaction.commit()
    report = await asyncio.wait_for(task, timeout=30)
    assert report.complete, report.describe_left()
    assert report.rewrapped == {
        "credential secret": 3,
        "webhook secret": 2,
        "engine key": 1,
        "retired broker key": 0,
    }
    assert await kek_versions(raw) == {
        "credential_secrets": [2, 2, 2],
        "webhook_secrets": [2, 2],
        "engine_keys": [2],
    }


async def test_rows_still_locked_after_the_wait_are_reported(
    make_engine: Any, fake: FakeVenue, master_keys: str, second_key: str, raw: asyncpg.Connection
) -> None:
    """Rows held longer than lock_timeout: the report names each kind left, its count and version, locked."""
    data = await populated(make_engine, fake)
    both = await make_engine(master_keys=f"{master_keys},{second_key}")
    transaction = raw.transaction()
    await transaction.start()
    try:
        await lock_one_of_each(raw, data)
        started = time.monotonic()
        report = await asyncio.wait_for(both.rewrap_keys(lock_timeout=0.3), timeout=30)
        waited = time.monotonic() - started
    finally:
        await transaction.rollback()
    assert waited < 20  # the lock timeout bounds the whole last pass, not each row
    assert not report.complete
    assert report.left == (
        Leftover(kind="credential secret", count=1, kek_versions=(1,), locked=1),
        Leftover(kind="webhook secret", count=1, kek_versions=(1,), locked=1),
        Leftover(kind="engine key", count=1, kek_versions=(1,), locked=1),
    )
    assert report.rewrapped == {
        "credential secret": 2,
        "webhook secret": 1,
        "engine key": 0,
        "retired broker key": 0,
    }
    assert report.describe_left() == (
        "1 credential secret(s) under master key version(s) 1 (1 locked by other transactions); "
        "1 webhook secret(s) under master key version(s) 1 (1 locked by other transactions); "
        "1 engine key(s) under master key version(s) 1 (1 locked by other transactions)"
    )
    again = await both.rewrap_keys()  # released: a second run finishes the job
    assert again.complete and again.total == 3


async def test_after_rewrap_and_dropping_version_1_every_secret_opens(
    make_engine: Any, fake: FakeVenue, master_keys: str, second_key: str, raw: asyncpg.Connection
) -> None:
    """Current and staged credential secrets, both webhook secrets and the fingerprint key open with key 2 alone."""
    data = await populated(make_engine, fake)
    both = await make_engine(master_keys=f"{master_keys},{second_key}")
    assert (await both.rewrap_keys()).complete
    await both.close()
    only_new = await make_engine(master_keys=second_key, allow_private_webhook_urls=True)
    assert (await only_new.reveal_keys(OWNER, data["rotated"])).api_secret == "secret-current"
    pending_keys = await only_new.reveal_keys(OWNER, data["pending"])
    assert (pending_keys.api_secret, pending_keys.api_passphrase) == ("secret-pending", "pass-pending")
    staged = await only_new.store.get_secret(data["rotated"], 2)
    assert staged is not None and staged.state == "PENDING"
    assert only_new.store.open_secret(staged).api_secret == "secret-staged"
    rows = await raw.fetch(
        "SELECT * FROM webhook_secrets WHERE endpoint_id = $1 ORDER BY version", data["endpoint"]
    )
    assert [r["version"] for r in rows] == [1, 2]
    for row in rows:
        sealed = Sealed(row["kek_version"], row["wrapped_dek"], row["nonce"], row["ciphertext"])
        opened = only_new.store.vault.unwrap_blob(
            sealed, purpose=secret_purpose(data["endpoint"], row["version"])
        )
        assert opened == signing.secret_key(data["webhook_secrets"][row["version"]])
    with pytest.raises(errors.DuplicateCredential):  # the fingerprint key opens: duplicates are still found
        await only_new.create_credential(OWNER, venue=Venue.BINANCE, api_key="rw-current", api_secret="x")
    await settle(only_new)  # the staged rotation's check opens the staged secret and promotes it
    assert (await only_new.reveal_keys(OWNER, data["rotated"])).api_secret == "secret-staged"


async def test_an_engine_refuses_a_keyring_missing_a_version_in_use(
    make_engine: Any, fake: FakeVenue, second_key: str, raw: asyncpg.Connection
) -> None:
    """Start with a keyring lacking a version the database uses: ConfigurationError naming versions and kinds."""
    await populated(make_engine, fake)
    with pytest.raises(errors.ConfigurationError) as info:
        await make_engine(master_keys=second_key)
    message = info.value.message
    assert "master key version(s) 1 (credential secrets, engine keys, webhook secrets)" in message
    assert "it holds version(s) 2" in message
    assert info.value.field == "ENGINE_MASTER_KEYS"
    assert second_key.split(":")[1] not in message

    # every table counts: versions no keyring holds, written where the engine's own key would not reveal them
    await raw.execute("UPDATE credential_secrets SET kek_version = 9 WHERE state = 'PENDING'")
    await raw.execute("UPDATE webhook_secrets SET kek_version = 7 WHERE version = 1")
    with pytest.raises(errors.ConfigurationError) as info:
        await make_engine()  # holds version 1 only
    assert "master key version(s) 7, 9 (credential secrets, webhook secrets)" in info.value.message


async def test_a_data_key_that_does_not_open_is_reported_not_looped_on(
    make_engine: Any, fake: FakeVenue, master_keys: str, second_key: str, raw: asyncpg.Connection
) -> None:
    """A tampered wrapped data key: everything else moves, the rewrap ends and names the row as left."""
    data = await populated(make_engine, fake)
    await raw.execute(
        "UPDATE credential_secrets SET wrapped_dek = overlay(wrapped_dek PLACING '\\xff'::bytea FROM 20) "
        "WHERE credential_id = $1",
        data["pending"],
    )
    both = await make_engine(master_keys=f"{master_keys},{second_key}")
    report = await asyncio.wait_for(both.rewrap_keys(lock_timeout=0.2), timeout=30)
    assert report.left == (Leftover(kind="credential secret", count=1, kek_versions=(1,), unreadable=1),)
    assert report.rewrapped == {
        "credential secret": 2,
        "webhook secret": 2,
        "engine key": 1,
        "retired broker key": 0,
    }


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batchSize"),
        ({"batch_size": True}, "batchSize"),
        ({"lock_timeout": 0}, "lockTimeout"),
        ({"lock_timeout": math.nan}, "lockTimeout"),
        ({"lock_timeout": math.inf}, "lockTimeout"),
    ],
)
async def test_rewrap_refuses_bad_settings(eng: CredentialEngine, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        await eng.rewrap_keys(**kwargs)
    assert info.value.field == field
