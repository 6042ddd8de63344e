"""The verification's hot path (engine/hotpath.py): one statement writes what the transaction path would, and
refuses whenever what it knows before the write could be wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from engine import errors, hotpath, jobs, queue
from engine.bounds import quotas
from engine.engine import CredentialEngine
from engine.models import CredentialStatus, Event
from engine.store import ms
from engine.testing import FakeVenue
from venues.base import Permissions, Venue

EngineFactory = Callable[..., Awaitable[CredentialEngine]]
OWNER = "owner-hot"


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each call of the hot path's statement answered (True: written), in order."""
    seen: list[bool] = []
    original = hotpath.verified_and_done

    async def spy(*args: Any, **kwargs: Any) -> bool:
        written = await original(*args, **kwargs)
        seen.append(written)
        return written

    monkeypatch.setattr(hotpath, "verified_and_done", spy)
    return seen


async def events_of(eng: CredentialEngine, cid: uuid.UUID) -> list[Event]:
    return await eng.list_events(OWNER, cid)


async def test_the_event_is_the_credential_as_written(
    eng: CredentialEngine, fake: FakeVenue, taken: list[bool]
) -> None:
    """The event the statement writes equals what the REST API shows of the row it wrote (timestamps too),
    and the job is done: first verification (credential.verified), then new permissions
    (credential.permissions_changed, with the previous ones)."""
    key = fake.add_key("hot-key-0001", "s3cret", identities=("spot", "margin"))
    cred = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="hot-key-0001", api_secret="s3cret"
    )
    await eng.run_until_idle(timeout=30)
    assert taken == [True]
    after = await eng.get_credential(OWNER, cred.credential_id)
    assert after.status is CredentialStatus.VERIFIED and after.identities == ("margin", "spot")
    _created, verified = await events_of(eng, cred.credential_id)
    assert (verified.type, verified.sequence) == ("credential.verified", 2)
    assert verified.data == {
        "credential": after.public_dict(),
        "previousStatus": "PENDING",
        "previousPermissions": None,
    }
    assert after.verified_at_ms == after.updated_at_ms == verified.data["credential"]["verifiedAt"]
    assert (await eng.queue.counts())["done"] == 1

    before = after
    key.permissions = dataclasses.replace(key.permissions, withdraw=False, trade=False)
    await eng.verify_credential(OWNER, cred.credential_id)
    await eng.run_until_idle(timeout=30)
    assert taken == [True, True]
    after = await eng.get_credential(OWNER, cred.credential_id)
    changed = (await events_of(eng, cred.credential_id))[-1]
    assert (changed.type, changed.sequence) == ("credential.permissions_changed", 3)
    assert changed.data == {
        "credential": after.public_dict(),
        "previousStatus": "VERIFIED",
        "previousPermissions": before.public_dict()["permissions"],
    }


async def test_a_row_changed_during_the_probe_takes_the_transaction_path(
    make_engine: EngineFactory, fake: FakeVenue, taken: list[bool]
) -> None:
    """A rotation staged while the probe runs moves the event sequence: the statement refuses, and the
    transaction path's event shows the staged rotation (the prediction made before the probe had none). The
    rotation's own check waits (its key gated) until then: a verification steps aside while its write is in
    flight (engine/queue/worker.py), so with the rotation's probe answering at once the rotation could be
    promoted first, which makes the verification stale instead."""
    gate, rotation_gate = asyncio.Event(), asyncio.Event()
    fake.add_key("hot-key-0002", "s3cret").gate = gate
    fake.add_key("hot-key-0003", "s3cret").gate = rotation_gate
    eng = await make_engine(workers=2)
    cred = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="hot-key-0002", api_secret="s3cret"
    )
    deadline = time.monotonic() + 30
    while "hot-key-0002" not in fake.calls:  # the job read the row and is probing
        assert time.monotonic() < deadline, "the verification never started"
        await asyncio.sleep(0.02)
    await eng.rotate_credential(OWNER, cred.credential_id, api_key="hot-key-0003", api_secret="s3cret")
    gate.set()
    await eng.wait_for_status(OWNER, cred.credential_id, [CredentialStatus.VERIFIED], timeout=30)
    assert taken[0] is False
    verified = next(e for e in await events_of(eng, cred.credential_id) if e.type == "credential.verified")
    assert verified.sequence == 3  # created, rotation_started, verified
    assert verified.data["credential"]["pendingRotation"] is not None
    rotation_gate.set()


async def test_a_lost_attempt_writes_nothing(eng: CredentialEngine, fake: FakeVenue) -> None:
    """An attempt that does not own its job (here: the job is still queued) makes the statement raise
    StaleAttempt: no status change, no event, the job untouched."""
    fake.add_key("hot-key-0004", "s3cret")
    cred = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="hot-key-0004", api_secret="s3cret"
    )
    [info] = await eng.queue.list_jobs(kind=jobs.VERIFY)
    now = datetime.now(UTC)
    forged = queue.Job(
        id=info.id,
        kind=jobs.VERIFY,
        payload=dict(info.payload),
        attempt=info.attempt + 1,
        max_attempts=info.max_attempts,
        dedupe_key=info.dedupe_key,
        run_at=now,
        created_at=now,
    )
    handler = eng.queue._handlers[jobs.VERIFY]  # the verify handler, called as a worker would
    with pytest.raises(queue.StaleAttempt):
        await handler(forged)
    after = await eng.get_credential(OWNER, cred.credential_id)
    assert after.status is CredentialStatus.PENDING and after.permissions is None
    assert [e.type for e in await events_of(eng, cred.credential_id)] == ["credential.created"]
    [still] = await eng.queue.list_jobs(kind=jobs.VERIFY)
    assert (still.state, still.attempt) == ("queued", info.attempt)


async def test_an_endpoint_that_wants_the_event_gets_its_delivery(
    make_engine: EngineFactory, fake: FakeVenue, taken: list[bool]
) -> None:
    """A webhook endpoint of the owner wanting credential.verified sends the verification down the
    transaction path, whose fan-out writes the delivery; another owner's endpoint changes nothing."""
    eng = await make_engine(allow_private_webhook_urls=True)
    await eng.add_webhook_endpoint("someone-else", "http://127.0.0.1:9/hook", ["credential.verified"])
    fake.add_key("hot-key-0005", "s3cret")
    fake.add_key("hot-key-0006", "s3cret", account_id="uid-2")
    plain = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="hot-key-0005", api_secret="s3cret"
    )
    await eng.run_until_idle(timeout=30)
    assert taken == [True]
    await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/hook", ["credential.verified"])
    wanted = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key="hot-key-0006", api_secret="s3cret", api_passphrase="pp"
    )
    await eng.queue.run_until_idle(timeout=30)
    assert taken == [True, False]
    for cred in (plain, wanted):
        got = await eng.get_credential(OWNER, cred.credential_id)
        assert got.status is CredentialStatus.VERIFIED
    page = await eng.list_webhook_deliveries(OWNER)
    assert [(d.event_type, d.credential_id) for d in page.items] == [
        ("credential.verified", wanted.credential_id)
    ]


async def test_a_created_credential_is_one_statement_and_its_event_is_the_row(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """create_credential writes the credential, its credential.created (the row as the API shows it) and its
    verification job (owner's, deduped) in one statement; the job runs."""
    fake.add_key("hot-key-0101", "s3cret")
    cred = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="hot-key-0101", api_secret="s3cret", nickname="desk"
    )
    got = await eng.get_credential(OWNER, cred.credential_id)
    assert cred == got and got.created_at_ms == got.updated_at_ms > 0
    [created] = await events_of(eng, cred.credential_id)
    assert (created.type, created.sequence, created.data) == (
        "credential.created",
        1,
        {"credential": got.public_dict()},
    )
    [job] = await eng.queue.list_jobs(kind=jobs.VERIFY)
    assert job.dedupe_key == f"verify:{cred.credential_id}" and job.state == "queued"
    await eng.run_until_idle(timeout=30)
    assert (await eng.get_credential(OWNER, cred.credential_id)).status is CredentialStatus.VERIFIED


async def test_an_endpoint_that_wants_credential_created_gets_its_delivery(
    make_engine: EngineFactory, fake: FakeVenue
) -> None:
    """The creation statement writes nothing when an endpoint of the owner wants credential.created: the
    transaction path stores it once, with the delivery."""
    eng = await make_engine(allow_private_webhook_urls=True)
    await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/hook", ["credential.created"])
    fake.add_key("hot-key-0102", "s3cret")
    cred = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key="hot-key-0102", api_secret="s3cret"
    )
    assert (await eng.list_credentials(OWNER)).total == 1
    assert [e.type for e in await events_of(eng, cred.credential_id)] == ["credential.created"]
    page = await eng.list_webhook_deliveries(OWNER)
    assert [(d.event_type, d.credential_id) for d in page.items] == [
        ("credential.created", cred.credential_id)
    ]
    assert len(await eng.queue.list_jobs(kind=jobs.VERIFY)) == 1


async def test_a_duplicate_key_is_refused_by_the_statement(eng: CredentialEngine, fake: FakeVenue) -> None:
    """The same key twice for one owner and venue: DuplicateCredential, and nothing of the second call stays."""
    fake.add_key("hot-key-0103", "s3cret")
    await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="hot-key-0103", api_secret="s3cret")
    with pytest.raises(errors.DuplicateCredential):
        await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="hot-key-0103", api_secret="other")
    assert (await eng.list_credentials(OWNER)).total == 1
    assert len(await eng.queue.list_jobs(kind=jobs.VERIFY)) == 1


async def test_waiting_for_the_owner_lock_to_create_is_bounded(
    make_engine: EngineFactory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The creation statement waits for the owner's quota lock at most quotas.LOCK_TIMEOUT (StorageError, 503)
    and writes nothing; other owners go on."""
    monkeypatch.setattr(quotas, "LOCK_TIMEOUT", "300ms")
    eng = await make_engine()
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(774412, hashtext($1))", OWNER)
            with pytest.raises(errors.StorageError):
                await asyncio.wait_for(
                    eng.create_credential(OWNER, venue=Venue.BINANCE, api_key="hot-key-0104", api_secret="s"),
                    timeout=10,
                )
            await asyncio.wait_for(
                eng.create_credential("other", venue=Venue.BINANCE, api_key="hot-key-0105", api_secret="s"),
                timeout=10,
            )
    finally:
        await holder.close()
    assert (await eng.list_credentials(OWNER)).total == 0
    assert len(await eng.queue.list_jobs(kind=jobs.VERIFY)) == 1


def test_ms_is_exact() -> None:
    """Milliseconds floored exactly, as the statement computes them (a float timestamp can land 1 ms short)."""
    at = datetime(2026, 12, 3, 11, 0, 0, 123000, tzinfo=UTC)
    assert ms(at) == 1796295600123
    assert ms(datetime(1970, 1, 1, 0, 0, 0, 999, tzinfo=UTC)) == 0
    assert Permissions.from_dict(Permissions(trade=True).as_dict()) == Permissions(trade=True)
