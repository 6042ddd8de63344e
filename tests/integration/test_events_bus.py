"""The in-process side of the event bus: listener bookkeeping that metrics and run_until_idle rely on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from engine import CredentialEngine, Event, Venue, events
from engine.testing import FakeVenue

OWNER = "owner-bus"


async def create(eng: CredentialEngine, fake: FakeVenue, key: str) -> None:
    fake.add_key(key, "s")
    await eng.create_credential(OWNER, venue=Venue.BINANCE, api_key=key, api_secret="s")


async def test_unsubscribing_a_busy_listener_releases_a_waiting_drain(
    eng: CredentialEngine, fake: FakeVenue
) -> None:
    """drain() waits for a listener's backlog; unsubscribing that listener mid-wait must release it, not hang."""
    gate = asyncio.Event()

    async def stuck(event: Event) -> None:
        await gate.wait()

    unsubscribe = eng.subscribe(stuck)
    for i in range(3):
        await create(eng, fake, f"bus-{i}")
    drain = asyncio.create_task(eng.bus.drain())
    await asyncio.sleep(0.3)
    assert not drain.done()  # the stuck listener holds it
    unsubscribe()
    await asyncio.wait_for(drain, 5)


async def test_listener_failures_are_counted_per_listener(eng: CredentialEngine, fake: FakeVenue) -> None:
    """Each failing listener's failures are counted under its name; the total too; the others still hear all."""
    heard: list[str] = []

    async def flaky_risk_feed(event: Event) -> None:
        raise RuntimeError("risk feed down")

    async def audit(event: Event) -> None:
        heard.append(event.type)

    eng.subscribe(flaky_risk_feed)
    eng.subscribe(audit)
    await create(eng, fake, "bus-fail")
    await eng.run_until_idle()
    stats = eng.bus.stats
    name = flaky_risk_feed.__qualname__
    assert stats.failures_by_listener == {name: 2}
    assert stats.listener_failures == 2
    assert heard == ["credential.created", "credential.verified"]


async def test_a_bus_without_listeners_moves_its_cursor_without_reading_events(
    eng: CredentialEngine, fake: FakeVenue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No listener: the bus passes the finished events (cursor, read count) with one row and no event data;
    the first listener then hears every event committed after it subscribed."""
    asked: list[str] = []
    db = eng.db
    fetch, fetchrow = db.fetch, db.fetchrow

    async def spy_fetch(name: str, *args: Any) -> Any:
        asked.append(name)
        return await fetch(name, *args)

    async def spy_fetchrow(name: str, *args: Any) -> Any:
        asked.append(name)
        return await fetchrow(name, *args)

    monkeypatch.setattr(db, "fetch", spy_fetch)
    monkeypatch.setattr(db, "fetchrow", spy_fetchrow)
    before = eng.bus.stats.read
    for i in range(3):
        await create(eng, fake, f"idle-bus-{i}")
    await eng.bus.drain()
    assert "events_after" not in asked and "events_passed_after" in asked
    assert eng.bus.stats.read - before == 3
    last = await db.fetchrow("events_passed_after", 0, 0, 1000)
    assert last is not None and eng.bus.cursor == (last["txid"], last["position"])

    heard: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    eng.subscribe(listener)
    await create(eng, fake, "idle-bus-3")
    await eng.bus.drain()
    assert [(e.type, e.data["credential"]["apiKey"]) for e in heard] == [
        ("credential.created", (await eng.list_credentials(OWNER)).items[-1].masked_api_key)
    ]
    assert "events_after" in asked


async def test_a_bus_without_listeners_passes_a_backlog_in_bounded_steps(
    eng: CredentialEngine, fake: FakeVenue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each cursor move passes at most IDLE_BATCH events; a longer backlog takes several, none is skipped."""
    monkeypatch.setattr(events, "IDLE_BATCH", 2)
    start = eng.bus.stats.read
    for i in range(5):
        await create(eng, fake, f"backlog-bus-{i}")
    await eng.bus.drain()
    assert eng.bus.stats.read - start == 5
    last = await eng.db.fetchrow("events_passed_after", 0, 0, 1000)
    assert last is not None and eng.bus.cursor == (last["txid"], last["position"])


async def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_the_bus_listens_only_while_a_listener_is_subscribed(
    make_engine: Any, fake: FakeVenue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without listeners the bus does not LISTEN (no NOTIFY to wake it for nothing); the first subscription
    LISTENs, and another engine's events then arrive by NOTIFY, long before the next poll; UNLISTEN_AFTER the
    last unsubscribe, it UNLISTENs."""
    monkeypatch.setattr(events, "UNLISTEN_AFTER", 0.2)
    reader: CredentialEngine = await make_engine(poll_interval=60.0)
    writer: CredentialEngine = await make_engine()
    await asyncio.sleep(0.3)
    assert not reader.bus.listening
    heard: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    unsubscribe = reader.subscribe(listener)
    await wait_until(lambda: reader.bus.listening, 10, "the first subscription LISTENs")
    await create(writer, fake, "listen-0")
    await wait_until(lambda: len(heard) == 1, 10, "another engine's event, by NOTIFY")
    unsubscribe()
    assert reader.bus.listening  # for UNLISTEN_AFTER: a listener may come back at once
    await wait_until(lambda: not reader.bus.listening, 10, "UNLISTEN_AFTER the last unsubscribe")
