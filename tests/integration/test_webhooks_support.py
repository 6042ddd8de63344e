"""Helpers of the webhook tests (no tests here): a programmable receiver on loopback, a fake DNS resolver."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from engine import CredentialEngine, Venue
from engine.testing import FakeVenue, settle

OWNER = "owner-wh"
# the retry schedule in tests: eight attempts, all within a fraction of a second
FAST_SCHEDULE = (0.0, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05)


@dataclass
class Received:
    """One request the receiver got."""

    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def key(self) -> tuple[str | None, int]:
        """(credential id, sequence) of the event carried."""
        data = self.payload["data"]
        credential = data.get("credential") or {}
        return credential.get("credentialId"), int(data["sequence"])


@dataclass
class Receiver:
    """An aiohttp server on 127.0.0.1 that records every request and answers as told.

    ``statuses``: answers for the next requests, in order (then 200). ``down``: answer 503 to everything.
    ``hang``: when set, requests wait for this event before answering. ``headers``: added to every answer.
    """

    path: str = "/hooks"
    statuses: list[int] = field(default_factory=list)
    down: bool = False
    hang: asyncio.Event | None = None
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    got_request: asyncio.Event = field(default_factory=asyncio.Event)
    on_request: Callable[[Received], Awaitable[None]] | None = None
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def _handle(self, request: web.Request) -> web.Response:
        got = Received(
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.read(),
            at=time.time(),
        )
        self.requests.append(got)
        self.got_request.set()
        if self.on_request is not None:
            await self.on_request(got)
        if self.hang is not None:
            await self.hang.wait()
        if self.down:
            return web.Response(status=503, headers=self.headers)
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok", headers=self.headers)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.hang is not None:
            self.hang.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def unique(self) -> list[Received]:
        """The requests with duplicates of a webhook id dropped, in arrival order (what a deduping consumer sees)."""
        seen: set[str] = set()
        out = []
        for r in self.requests:
            if r.webhook_id not in seen:
                seen.add(r.webhook_id)
                out.append(r)
        return out


class FakeResolver(AbstractResolver):
    """DNS as the test says: ``answers[host]`` is the list of addresses; the test may change it any time."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers: dict[str, list[str]] = dict(answers or {})
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.answers[host]
        ]

    async def close(self) -> None:
        return None


async def new_credential(eng: CredentialEngine, fake: FakeVenue, key: str, owner: str = OWNER) -> uuid.UUID:
    """A credential whose keys verify (its verify job is queued, not run)."""
    fake.add_key(key, "secret-" + key, account_id="uid-" + key)
    cred = await eng.create_credential(owner, venue=Venue.BINANCE, api_key=key, api_secret="secret-" + key)
    return cred.credential_id


async def settle_until(eng: CredentialEngine, done: Callable[[], bool], within: float = 15.0) -> None:
    """Run jobs (and wait for background workers) until ``done()``, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await settle(eng, horizon=1.0)
        await asyncio.sleep(0.02)
