"""LISTEN liveness: a LISTEN connection whose peer stops forwarding without closing is found by the interval
check and replaced, and what was committed meanwhile is read at once (tests/integration/pg_proxy.py is the
loopback proxy that stalls it). The engines here poll only every 60 s, so without the check the event (or the
job) would be seen only at the next poll."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pg_proxy import PgProxy

from engine import CredentialEngine, CredentialStatus, Event, Venue
from engine.testing import FakeVenue

CHECK_INTERVAL = 0.5
CHECK_TIMEOUT = 0.5
LONG_POLL = 60.0
# the stated bound: a check interval, a check timeout, the reconnect and one read, with room for a busy machine
BOUND = CHECK_INTERVAL + CHECK_TIMEOUT + 8.0


async def _wait(predicate: Any, within: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_silent_events_listen_connection_is_replaced_and_the_gap_is_read(
    make_engine: Any, database_url: str, fake: FakeVenue
) -> None:
    writer = await make_engine(poll_interval=LONG_POLL)
    async with PgProxy(database_url) as proxy:
        reader: CredentialEngine = await make_engine(
            database_url=proxy.dsn,
            poll_interval=LONG_POLL,
            listen_check_interval=CHECK_INTERVAL,
            listen_check_timeout=CHECK_TIMEOUT,
        )
        heard: list[Event] = []

        async def on_event(event: Event) -> None:
            heard.append(event)

        reader.subscribe(on_event)
        await _wait(lambda: proxy.count("ce-events-listen") == 1, 10, "the reader's LISTEN through the proxy")

        fake.add_key("key-one-aaaaaaaa", "secret-one", account_id="uid-1")
        await writer.create_credential(
            "o1", venue=Venue.BINANCE, api_key="key-one-aaaaaaaa", api_secret="secret-one"
        )
        await _wait(lambda: len(heard) == 1, 10, "an event heard through the live LISTEN connection")

        assert proxy.stall("ce-events-listen") == 1  # silently dead: nothing forwarded, nothing closed
        stalled_at = time.monotonic()
        fake.add_key("key-two-bbbbbbbb", "secret-two", account_id="uid-2")
        cred = await writer.create_credential(
            "o1", venue=Venue.BINANCE, api_key="key-two-bbbbbbbb", api_secret="secret-two"
        )
        await _wait(
            lambda: len(heard) == 2, BOUND, "the event committed while the LISTEN connection was dead"
        )
        took = time.monotonic() - stalled_at
        assert heard[1].credential_id == cred.credential_id
        assert reader.bus.stats.silent >= 1
        assert proxy.count("ce-events-listen", stalled=False) == 1  # a new connection replaced it
        assert took < LONG_POLL / 2
        print(f"\nevent heard {took:.2f} s after the LISTEN connection stalled (bound {BOUND:.1f} s)")

        # and the new connection carries NOTIFYs again
        fake.add_key("key-three-cccccccc", "secret-three", account_id="uid-3")
        await writer.create_credential(
            "o1", venue=Venue.BINANCE, api_key="key-three-cccccccc", api_secret="secret-three"
        )
        await _wait(lambda: len(heard) == 3, 10, "an event heard through the new LISTEN connection")
        await reader.close()


async def test_a_silent_queue_listen_connection_is_replaced_and_the_job_claimed(
    make_engine: Any, database_url: str, fake: FakeVenue
) -> None:
    producer = await make_engine(poll_interval=LONG_POLL)
    async with PgProxy(database_url) as proxy:
        worker: CredentialEngine = await make_engine(
            database_url=proxy.dsn,
            workers=2,
            poll_interval=LONG_POLL,
            listen_check_interval=CHECK_INTERVAL,
            listen_check_timeout=CHECK_TIMEOUT,
        )
        await _wait(lambda: proxy.count("ce-queue-listen") == 1, 10, "the worker's LISTEN through the proxy")
        await _wait(lambda: worker.queue.listening, 10, "the worker listening")
        await asyncio.sleep(
            0.5
        )  # the periodic jobs seeded at start have run; the fetcher sleeps on NOTIFY/poll

        assert proxy.stall("ce-queue-listen") == 1
        stalled_at = time.monotonic()
        fake.add_key("key-four-dddddddd", "secret-four", account_id="uid-4")
        cred = await producer.create_credential(
            "o2", venue=Venue.BINANCE, api_key="key-four-dddddddd", api_secret="secret-four"
        )

        async def verified() -> bool:
            got = await producer.get_credential("o2", cred.credential_id)
            return got.status is CredentialStatus.VERIFIED

        while not await verified():
            assert time.monotonic() - stalled_at < BOUND, (
                "the job enqueued while the LISTEN connection was dead"
            )
            await asyncio.sleep(0.05)
        took = time.monotonic() - stalled_at
        assert proxy.count("ce-queue-listen", stalled=False) == 1
        print(
            f"\njob claimed and done {took:.2f} s after the LISTEN connection stalled (bound {BOUND:.1f} s)"
        )
        await worker.close()
