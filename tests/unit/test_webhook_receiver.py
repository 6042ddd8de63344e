"""The consumer's aiohttp handler (engine.webhooks.aiohttp_handler) on a loopback server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine import Event, webhooks

SECRET = webhooks.generate_secret()


def signed(event: Event, *, secret: str = SECRET, ts: int | None = None) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event.payload()).encode()
    now = int(time.time()) if ts is None else ts
    msg_id = str(event.event_id)
    return body, {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(now),
        "webhook-signature": webhooks.sign(secret, msg_id, now, body),
    }


def an_event(sequence: int = 1) -> Event:
    cid = uuid.uuid4()
    return Event(
        event_id=uuid.uuid4(),
        type="credential.verified",
        owner_id="o-1",
        credential_id=cid,
        sequence=sequence,
        timestamp_ms=int(time.time() * 1000),
        data={"credential": {"credentialId": str(cid), "status": "VERIFIED"}},
    )


class App:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.url = ""

    async def on_event(self, event: Event) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("consumer bug")
        self.events.append(event)


@pytest.fixture
async def app() -> AsyncIterator[App]:
    state = App()
    web_app = web.Application()
    web_app.router.add_post(
        "/hooks", webhooks.aiohttp_handler([SECRET], state.on_event, capacity=100, max_body=4096)
    )
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/hooks"
    try:
        yield state
    finally:
        await runner.cleanup()


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status, await response.text()


async def test_verified_event_reaches_the_callback_once(app: App) -> None:
    """A signed request calls the callback with the parsed Event; the same webhook-id again is a 200 no-op."""
    event = an_event()
    body, headers = signed(event)
    assert await post(app.url, body, headers) == (200, "ok")
    assert app.events == [event]
    body, headers = signed(event, ts=int(time.time()) + 2)  # a redelivery: same id, new timestamp
    assert await post(app.url, body, headers) == (200, "duplicate")
    assert app.events == [event]


async def test_bad_signature_stale_timestamp_and_oversize_are_refused(app: App) -> None:
    """401 for a foreign signature or a stale timestamp, 413 beyond max_body; the callback is not called."""
    event = an_event()
    body, headers = signed(event, secret=webhooks.generate_secret())
    assert (await post(app.url, body, headers))[0] == 401
    body, headers = signed(event, ts=int(time.time()) - 3600)
    assert (await post(app.url, body, headers))[0] == 401
    big = an_event()
    big_body = json.dumps({**big.payload(), "pad": "x" * 5000}).encode()
    _, headers = signed(big)
    assert (await post(app.url, big_body, headers))[0] == 413
    assert app.events == []


async def test_callback_failure_answers_500_and_the_retry_is_handled(app: App) -> None:
    """A callback that raises gives 500 (the sender retries) and the id is not remembered as handled."""
    event = an_event()
    body, headers = signed(event)
    app.fail_next = 1
    assert (await post(app.url, body, headers))[0] == 500
    assert (await post(app.url, body, headers))[0] == 200
    assert app.events == [event]


async def test_concurrent_duplicate_is_told_to_come_back(app: App) -> None:
    """While an id is being handled, the same id gets 409 instead of running the callback twice."""
    event = an_event()
    body, headers = signed(event)
    app.gate = asyncio.Event()
    first = asyncio.create_task(post(app.url, body, headers))
    await asyncio.sleep(0.2)
    assert (await post(app.url, body, headers))[0] == 409
    app.gate.set()
    assert (await first)[0] == 200
    assert app.events == [event]


async def test_dedupe_memory_is_bounded(app: App) -> None:
    """Beyond ``capacity`` ids, the oldest id is forgotten (memory stays bounded)."""
    events: list[Any] = [an_event(i) for i in range(1, 103)]
    for event in events:
        body, headers = signed(event)
        assert (await post(app.url, body, headers))[0] == 200
    body, headers = signed(events[0])
    assert await post(app.url, body, headers) == (200, "ok")  # forgotten: handled again
    body, headers = signed(events[-1])
    assert await post(app.url, body, headers) == (200, "duplicate")
