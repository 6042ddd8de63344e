"""Key leases in one process (engine/live): opening rules, swaps after staged and immediate rotations, revocation,
the audit trail, callbacks, closing, and that nothing shows a secret."""

from __future__ import annotations

import asyncio
import io
import pickle
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from engine import (
    CredentialEngine,
    CredentialRevoked,
    CredentialStatus,
    KeyLease,
    LeaseChange,
    LeaseClosed,
    Venue,
    errors,
)
from engine import logs as logsmod
from engine.live import ChangeKind
from engine.testing import FakeVenue, settle

OWNER = "owner-lease"
SECRET = "LEASECANARYSECRET-3d5f7a9c1e"
NEW_SECRET = "LEASECANARYNEWSECRET-8b6d4f2a0c"
PASS = "LEASECANARYPASS-x9y8z7"


async def verified(
    eng: CredentialEngine, fake: FakeVenue, key: str = "lease-key-1", secret: str = SECRET
) -> Any:
    fake.add_key(key, secret, passphrase=PASS, account_id="uid-l")
    cred = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key=key, api_secret=secret, api_passphrase=PASS
    )
    await settle(eng)
    cred = await eng.get_credential(OWNER, cred.credential_id)
    assert cred.status is CredentialStatus.VERIFIED
    return cred


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait (bounded) until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


def lease_metrics(eng: CredentialEngine) -> dict[str, float]:
    """The key-lease samples of the engine's Prometheus collector (``name/result`` for labelled ones)."""
    found: dict[str, float] = {}
    for family in eng.metrics.collector.collect():
        for sample in family.samples:
            if sample.name.startswith("credential_engine_key_lease"):
                label = sample.labels.get("result")
                found[f"{sample.name}/{label}" if label else sample.name] = sample.value
    return found


async def audit(eng: CredentialEngine, cid: uuid.UUID) -> list[tuple[str, int, str | None]]:
    """(access, secret version, purpose) of every key-access audit row of ``cid``, oldest first."""
    rows = await eng.db.fetch("list_key_access", cid, OWNER, 100)
    return [(r["access"], int(r["secret_version"]), r["purpose"]) for r in reversed(rows)]


async def test_lease_hands_out_keys_and_is_audited_once(eng: CredentialEngine, fake: FakeVenue) -> None:
    """A VERIFIED credential's lease gives its keys by memory reads; opening is audited once, reads never."""
    cred = await verified(eng, fake)
    async with eng.lease_keys(OWNER, cred.credential_id, purpose="market maker") as lease:
        assert isinstance(lease, KeyLease)
        for _ in range(1000):
            assert lease.keys.api_secret == SECRET
        assert lease.keys.api_passphrase == PASS
        assert lease.secret_version == cred.secret_version == 1
        assert lease.status is CredentialStatus.VERIFIED and lease.verified
        assert lease.venue_account_id == "uid-l"
        assert lease.venue is Venue.OKX
        assert not lease.revoked
        assert eng.leases.open_leases == 1
    assert await audit(eng, cred.credential_id) == [("lease_open", 1, "market maker")]
    assert eng.leases.open_leases == 0
    await eng.reveal_keys(OWNER, cred.credential_id, purpose="one-off")
    assert (await audit(eng, cred.credential_id))[-1] == ("reveal", 1, "one-off")
    with pytest.raises(LeaseClosed) as info:
        _ = lease.keys
    assert info.value.errno == -100019


async def test_second_lease_of_a_credential_reuses_the_decrypted_keys(
    eng: CredentialEngine, fake: FakeVenue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two leases of one credential in one process decrypt once; each opening is audited."""
    cred = await verified(eng, fake)
    opened = 0
    original = eng.store.open_secret

    def counting(secret: Any) -> Any:
        nonlocal opened
        opened += 1
        return original(secret)

    monkeypatch.setattr(eng.store, "open_secret", counting)
    async with (
        eng.lease_keys(OWNER, cred.credential_id, purpose="a") as a,
        eng.lease_keys(OWNER, cred.credential_id, purpose="b") as b,
    ):
        assert a.keys is b.keys
    assert opened == 1
    assert await audit(eng, cred.credential_id) == [("lease_open", 1, "a"), ("lease_open", 1, "b")]


async def test_opening_is_refused_for_revoked_pending_failed_and_other_owners(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """REVOKED: CredentialRevoked; PENDING: InvalidTransition unless allow_pending; FAILED: InvalidTransition;
    another owner's id: NotFound. Nothing is audited for a refusal."""
    fake.add_key("pending-key", SECRET, passphrase=PASS)
    pending = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key="pending-key", api_secret=SECRET, api_passphrase=PASS
    )
    with pytest.raises(errors.InvalidTransition) as info:
        async with eng.lease_keys(OWNER, pending.credential_id):
            pass
    assert "PENDING" in str(info.value)
    async with eng.lease_keys(OWNER, pending.credential_id, allow_pending=True) as lease:
        assert lease.status is CredentialStatus.PENDING and not lease.verified
        assert lease.keys.api_secret == SECRET
    with pytest.raises(errors.NotFound):
        async with eng.lease_keys("someone-else", pending.credential_id, allow_pending=True):
            pass
    with pytest.raises(errors.NotFound):
        async with eng.lease_keys(OWNER, uuid.uuid4()):
            pass
    with pytest.raises(errors.InvalidRequest):
        async with eng.lease_keys(OWNER, "not-a-uuid"):
            pass
    fake.fail_key("failing-key", __import__("venues.base", fromlist=["Outcome"]).Outcome.INVALID_KEY, SECRET)
    failed = await eng.create_credential(
        OWNER, venue=Venue.OKX, api_key="failing-key", api_secret=SECRET, api_passphrase=PASS
    )
    await settle(eng)
    assert (await eng.get_credential(OWNER, failed.credential_id)).status is CredentialStatus.FAILED
    with pytest.raises(errors.InvalidTransition):
        async with eng.lease_keys(OWNER, failed.credential_id, allow_pending=True):
            pass
    await eng.revoke_credential(OWNER, pending.credential_id)
    with pytest.raises(CredentialRevoked) as revoked:
        async with eng.lease_keys(OWNER, pending.credential_id, allow_pending=True):
            pass
    assert revoked.value.errno == -100018 and revoked.value.http_status == 409
    assert await audit(eng, pending.credential_id) == [("lease_open", 1, None)]
    assert eng.leases.open_leases == 0


async def test_staged_rotation_swaps_the_keys_in_place_once_promoted(
    eng: CredentialEngine, fake: FakeVenue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys stay the old ones while the rotation is staged; once promoted, every lease holds the new keys
    (decrypted once for both, audited as one lease_swap row per lease) and the callbacks hear 'rotated' with the
    new keys already in place."""
    cred = await verified(eng, fake)
    fake.add_key("lease-key-2", NEW_SECRET, passphrase=PASS, account_id="uid-l")
    changes: list[tuple[str | None, LeaseChange]] = []
    seen_in_callback: list[str] = []

    async def heard(lease: KeyLease, change: LeaseChange) -> None:
        changes.append((lease.purpose, change))
        seen_in_callback.append(lease.keys.api_secret)

    async with (
        eng.lease_keys(OWNER, cred.credential_id, purpose="a") as a,
        eng.lease_keys(OWNER, cred.credential_id, purpose="b") as b,
    ):
        a.on_change(heard)
        b.on_change(heard)
        await eng.rotate_credential(
            OWNER, cred.credential_id, api_key="lease-key-2", api_secret=NEW_SECRET, api_passphrase=PASS
        )
        await eng.bus.drain()
        assert a.keys.api_secret == SECRET and a.secret_version == 1  # staged: not in use yet
        opened = 0
        original = eng.store.open_secret

        def counting(secret: Any) -> Any:
            nonlocal opened
            opened += 1
            return original(secret)

        monkeypatch.setattr(eng.store, "open_secret", counting)
        await settle(eng)  # the rotation verifies (its probe decrypts the staged keys once) and is promoted
        await until(lambda: a.secret_version == 2)
        assert a.keys.api_key == b.keys.api_key == "lease-key-2"
        assert b.keys.api_secret == NEW_SECRET and a.verified
        await until(lambda: len(changes) == 2)
    assert {p for p, _ in changes} == {"a", "b"}
    assert {c for _, c in changes} == {LeaseChange(ChangeKind.ROTATED, cred.credential_id, 1, 2)}
    assert seen_in_callback == [NEW_SECRET, NEW_SECRET]
    assert opened == 2  # one for the verification job, one for both leases
    rows = await audit(eng, cred.credential_id)
    assert rows[:2] == [("lease_open", 1, "a"), ("lease_open", 1, "b")]
    assert sorted(rows[2:]) == [("lease_swap", 2, "a"), ("lease_swap", 2, "b")]
    assert eng.leases.stats.swaps == 1


async def test_immediate_rotation_swaps_at_once_and_is_unverified_until_verified(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """An immediate rotation swaps the keys at once (the old material is gone) with the lease unverified, and
    'verified' follows when the new keys verify."""
    cred = await verified(eng, fake)
    fake.add_key("lease-key-2", NEW_SECRET, passphrase=PASS, account_id="uid-l")
    kinds: list[ChangeKind] = []

    async def heard(lease: KeyLease, change: LeaseChange) -> None:
        kinds.append(change.kind)

    async with eng.lease_keys(OWNER, cred.credential_id) as lease:
        lease.on_change(heard)
        await eng.rotate_credential(
            OWNER,
            cred.credential_id,
            api_key="lease-key-2",
            api_secret=NEW_SECRET,
            api_passphrase=PASS,
            immediate=True,
        )
        await until(lambda: lease.secret_version == 2)
        assert lease.keys.api_secret == NEW_SECRET
        assert lease.status is CredentialStatus.PENDING and not lease.verified
        await settle(eng)
        await until(lambda: lease.verified)
        await until(lambda: len(kinds) == 2)
    assert kinds == [ChangeKind.ROTATED, ChangeKind.VERIFIED]


async def test_revocation_drops_the_keys_wakes_waiters_and_calls_back(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """After a revocation keys raise CredentialRevoked, revoked is True, wait_revoked returns, callbacks hear it."""
    cred = await verified(eng, fake)
    changes: list[LeaseChange] = []

    async def heard(lease: KeyLease, change: LeaseChange) -> None:
        changes.append(change)

    async with eng.lease_keys(OWNER, cred.credential_id) as lease:
        lease.on_change(heard)
        with pytest.raises(errors.WaitTimeout):
            await lease.wait_revoked(timeout=0.05)
        waiter = asyncio.create_task(lease.wait_revoked(timeout=10))
        await asyncio.sleep(0)
        await eng.revoke_credential(OWNER, cred.credential_id)
        await asyncio.wait_for(waiter, 10)
        assert lease.revoked and lease.status is CredentialStatus.REVOKED
        with pytest.raises(CredentialRevoked):
            _ = lease.keys
        await lease.wait_revoked(timeout=0.01)  # at once now
        await until(lambda: len(changes) == 1)
        assert lease_metrics(eng)["credential_engine_key_leases"] == 1
    assert changes == [LeaseChange(ChangeKind.REVOKED, cred.credential_id, 1, 0)]
    scraped = lease_metrics(eng)
    assert scraped["credential_engine_key_leases"] == 0
    assert scraped["credential_engine_key_lease_changes_total/opened"] == 1
    assert scraped["credential_engine_key_lease_changes_total/revoked"] == 1


async def test_failing_and_hanging_callbacks_never_stop_the_registry(
    make_engine: Callable[..., Awaitable[CredentialEngine]], fake: FakeVenue
) -> None:
    """A callback that raises and one that hangs past the timeout are logged and counted; the others run, and
    later changes still reach the leases."""
    eng = await make_engine(key_lease_callback_timeout=0.2)
    cred = await verified(eng, fake)
    fake.add_key("lease-key-2", NEW_SECRET, passphrase=PASS, account_id="uid-l")
    good: list[ChangeKind] = []

    async def boom(lease: KeyLease, change: LeaseChange) -> None:
        raise RuntimeError(SECRET)  # its text must not be logged

    async def hang(lease: KeyLease, change: LeaseChange) -> None:
        await asyncio.sleep(3600)

    async def fine(lease: KeyLease, change: LeaseChange) -> None:
        good.append(change.kind)

    out = io.StringIO()
    logsmod.configure_logging("DEBUG", json=True, stream=out)
    async with eng.lease_keys(OWNER, cred.credential_id) as lease:
        for cb in (boom, hang, fine):
            lease.on_change(cb)
        await eng.rotate_credential(
            OWNER,
            cred.credential_id,
            api_key="lease-key-2",
            api_secret=NEW_SECRET,
            api_passphrase=PASS,
            immediate=True,
        )
        await until(lambda: lease.secret_version == 2)
        await eng.revoke_credential(OWNER, cred.credential_id)
        await until(lambda: lease.revoked)
        await until(lambda: good == [ChangeKind.ROTATED, ChangeKind.REVOKED])
        await until(lambda: eng.leases.stats.callback_failures == 4)
    text = out.getvalue()
    assert "key_lease_callback_failed" in text and "key_lease_callback_timeout" in text
    assert SECRET not in text and NEW_SECRET not in text


async def test_repr_str_and_pickle_never_show_key_material(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Canary: the lease, its keys, its change values and its errors show no secret, passphrase or whole key."""
    cred = await verified(eng, fake, key="LEASECANARYAPIKEY0123456789")
    out = io.StringIO()
    logsmod.configure_logging("DEBUG", json=True, stream=out)
    texts: list[str] = []
    async with eng.lease_keys(OWNER, cred.credential_id, purpose="canary") as lease:
        texts += [
            repr(lease),
            str(lease),
            f"{lease}",
            repr(lease.keys),
            repr(lease._held),
            repr(vars(type(lease))),
        ]
        with pytest.raises(TypeError):
            pickle.dumps(lease)
        await eng.revoke_credential(OWNER, cred.credential_id)
        await until(lambda: lease.revoked)
        with pytest.raises(CredentialRevoked) as info:
            _ = lease.keys
        texts += [repr(lease), str(info.value), repr(info.value.args)]
    texts.append(out.getvalue())
    assert out.getvalue().strip()
    for text in texts:
        for canary in (SECRET, PASS, "LEASECANARYAPIKEY0123456789"):
            assert canary not in text, text


async def test_engine_close_closes_every_lease(
    make_engine: Callable[..., Awaitable[CredentialEngine]], fake: FakeVenue
) -> None:
    """Closing the engine closes its leases: keys raise LeaseClosed and wait_revoked ends with it."""
    eng = await make_engine()
    cred = await verified(eng, fake)
    async with eng.lease_keys(OWNER, cred.credential_id) as lease:
        waiter = asyncio.create_task(lease.wait_revoked())
        await asyncio.sleep(0)
        await eng.close()
        with pytest.raises(LeaseClosed):
            await asyncio.wait_for(waiter, 10)
        with pytest.raises(LeaseClosed):
            _ = lease.keys
        assert lease.closed
    with pytest.raises(errors.EngineClosed):
        async with eng.lease_keys(OWNER, cred.credential_id):
            pass


async def test_a_revocation_missed_by_the_bus_is_found_by_the_recheck(
    make_engine: Callable[..., Awaitable[CredentialEngine]], fake: FakeVenue
) -> None:
    """The re-check is a second path: with the bus's listener taken away, the periodic re-check (one query for
    every leased credential) still finds the revocation."""
    eng = await make_engine(key_lease_recheck_interval=0.2)
    cred = await verified(eng, fake)
    async with eng.lease_keys(OWNER, cred.credential_id) as lease:
        assert eng.leases._unsubscribe is not None
        eng.leases._unsubscribe()  # the bus no longer tells the registry anything
        before = eng.leases.stats.rechecks
        await eng.revoke_credential(OWNER, cred.credential_id)
        await until(lambda: lease.revoked, timeout=10)
        assert eng.leases.stats.rechecks > before


async def test_a_lost_listen_connection_triggers_a_recheck_at_once(
    make_engine: Callable[..., Awaitable[CredentialEngine]], fake: FakeVenue
) -> None:
    """With the periodic re-check an hour away and the registry deaf to the bus, a revocation is still found
    once the bus's LISTEN connection is lost: every bus gap (reconnect, failed read) re-checks every lease."""
    eng = await make_engine(
        key_lease_recheck_interval=3600.0, listen_check_interval=0.2, listen_check_timeout=0.5
    )
    cred = await verified(eng, fake)
    async with eng.lease_keys(OWNER, cred.credential_id) as lease:
        assert eng.leases._unsubscribe is not None
        eng.leases._unsubscribe()
        await eng.revoke_credential(OWNER, cred.credential_id)
        await asyncio.sleep(0.3)
        assert not lease.revoked  # nothing told the registry
        reconnects = eng.bus.stats.reconnects
        async with eng.db.connection() as conn:
            killed = await conn._conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'ce-events-listen'"
            )
        assert killed >= 1
        await until(lambda: eng.bus.stats.reconnects > reconnects)
        await until(lambda: lease.revoked, timeout=5)


async def test_keys_reaching_another_account_are_withheld_until_rotated_back(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """An immediate rotation to keys of another venue account swaps them in unverified; once verification finds
    ACCOUNT_MISMATCH the lease withholds them (Conflict, as reveal_keys), and a rotation to keys of the pinned
    account brings keys back."""
    cred = await verified(eng, fake)
    fake.add_key("elsewhere-key", NEW_SECRET, passphrase=PASS, account_id="uid-other")
    fake.add_key("lease-key-3", SECRET + "-3", passphrase=PASS, account_id="uid-l")
    kinds: list[ChangeKind] = []

    async def heard(lease: KeyLease, change: LeaseChange) -> None:
        kinds.append(change.kind)

    async with eng.lease_keys(OWNER, cred.credential_id) as lease:
        lease.on_change(heard)
        await eng.rotate_credential(
            OWNER,
            cred.credential_id,
            api_key="elsewhere-key",
            api_secret=NEW_SECRET,
            api_passphrase=PASS,
            immediate=True,
        )
        await until(lambda: lease.secret_version == 2)
        await settle(eng)
        assert (await eng.get_credential(OWNER, cred.credential_id)).failure_reason == "ACCOUNT_MISMATCH"
        await until(lambda: lease.status is CredentialStatus.FAILED)
        with pytest.raises(errors.Conflict) as info:
            _ = lease.keys
        assert not isinstance(info.value, CredentialRevoked) and not lease.revoked
        await eng.rotate_credential(
            OWNER,
            cred.credential_id,
            api_key="lease-key-3",
            api_secret=SECRET + "-3",
            api_passphrase=PASS,
            immediate=True,
        )
        await until(lambda: lease.secret_version == 3)
        assert lease.keys.api_key == "lease-key-3"
        await settle(eng)
        await until(lambda: lease.verified)
        await until(lambda: len(kinds) == 4)
    assert kinds == [ChangeKind.ROTATED, ChangeKind.WITHHELD, ChangeKind.ROTATED, ChangeKind.VERIFIED]


async def test_leases_opened_while_the_credential_is_revoked_never_outlive_it(
    make_engine: Callable[..., Awaitable[CredentialEngine]], fake: FakeVenue
) -> None:
    """Opens racing a revocation from another engine (another bus): each is refused at opening or, if it opened,
    ends revoked; none keeps handing out keys (a lease is registered before the credential is read)."""
    eng = await make_engine()
    other = await make_engine()
    cred = await verified(eng, fake)
    opened: list[KeyLease] = []
    refused = 0

    async def open_one(i: int) -> None:
        nonlocal refused
        await asyncio.sleep(0.002 * i)
        try:
            async with eng.lease_keys(OWNER, cred.credential_id, purpose=f"racer-{i}") as lease:
                opened.append(lease)
                await until(lambda: lease.revoked, timeout=10)
        except CredentialRevoked:
            refused += 1

    async def revoke() -> None:
        await asyncio.sleep(0.02)
        await other.revoke_credential(OWNER, cred.credential_id)

    await asyncio.gather(revoke(), *(open_one(i) for i in range(30)))
    assert refused + len(opened) == 30
    assert refused > 0 and opened  # the race was real: opens on both sides of the revocation
    assert all(lease.revoked for lease in opened)


async def test_a_process_without_leases_leaves_the_bus_idle(
    make_engine: Any, fake: FakeVenue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry subscribes with the first lease and gives the subscription up with the last one, so a process
    holding no lease keeps the bus's no-listener economy (it neither LISTENs nor reads event data)."""
    from engine import events as eventsmod

    monkeypatch.setattr(eventsmod, "UNLISTEN_AFTER", 0.2)
    eng: CredentialEngine = await make_engine()
    cred = await verified(eng, fake)
    await until(lambda: not eng.bus.listening)
    async with eng.lease_keys(OWNER, cred.credential_id, purpose="idle check") as lease:
        await until(lambda: eng.bus.listening)
        async with eng.lease_keys(OWNER, cred.credential_id, purpose="second") as second:
            pass
        assert second.closed and not lease.closed
        await asyncio.sleep(0.4)
        assert eng.bus.listening  # one lease is still open
        await eng.revoke_credential(OWNER, cred.credential_id)
        await asyncio.wait_for(lease.wait_revoked(), 10)
    await until(lambda: not eng.bus.listening)


class _GatedPasses:
    """The bus's database, whose next idle cursor move ("events_passed_after") waits for the test: a seam to
    run a lease's opening and a revocation while that statement is on its way to the server."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.armed = True
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == "events_passed_after" and self.armed:
            self.armed = False
            self.entered.set()
            async with asyncio.timeout(10):
                await self.release.wait()
        return await self._db.fetchrow(query, *args, **kwargs)


async def test_a_revocation_while_the_idle_bus_moves_its_cursor_reaches_the_new_lease(
    make_engine: Callable[..., Awaitable[CredentialEngine]], fake: FakeVenue
) -> None:
    """Race: a bus without listeners moves its cursor past events reading no data. When the first lease
    subscribes while such a move is on its way, and the credential is revoked after the lease read it, the
    move must not pass the revocation unseen: the lease is revoked at once, not only at the next periodic
    re-check (here 10 minutes away)."""
    eng = await make_engine(key_lease_recheck_interval=600.0)
    cred = await verified(eng, fake)
    bus: Any = eng.bus
    assert not bus._subs  # nothing listens: the bus moves its cursor without reading events
    gate = _GatedPasses(bus._db)
    bus._db = gate
    try:
        bus.poke()
        async with asyncio.timeout(10):
            await gate.entered.wait()
        async with eng.lease_keys(OWNER, cred.credential_id, purpose="race") as lease:
            await eng.revoke_credential(OWNER, cred.credential_id)
            gate.release.set()
            await until(lambda: lease.revoked, timeout=5.0)
    finally:
        gate.release.set()
        bus._db = gate._db


async def test_run_until_idle_waits_for_the_swap_but_not_for_a_slow_callback(
    eng: CredentialEngine, fake: FakeVenue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_until_idle returns once the leases hold the new keys; a backend callback still running past the
    settle bound neither holds it longer nor makes it raise."""
    from engine.live import registry as registrymod

    monkeypatch.setattr(registrymod, "SETTLE_TIMEOUT", 0.3)
    cred = await verified(eng, fake)
    fake.add_key("lease-key-2", NEW_SECRET, passphrase=PASS, account_id="uid-l")
    release = asyncio.Event()

    async def slow(lease: KeyLease, change: LeaseChange) -> None:
        await release.wait()

    async with eng.lease_keys(OWNER, cred.credential_id, purpose="slow callback") as lease:
        lease.on_change(slow)
        await eng.rotate_credential(
            OWNER, cred.credential_id, api_key="lease-key-2", api_secret=NEW_SECRET, api_passphrase=PASS
        )
        started = time.monotonic()
        await eng.run_until_idle()
        assert time.monotonic() - started < 8.0
        assert lease.secret_version == 2 and lease.keys.api_secret == NEW_SECRET
        release.set()
