"""Helpers of the reliability suite: an event recorder, engine worker processes, leak scanning, SQL snapshots."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from engine import Event
from venues.base import Outcome

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parents[1]
WORKER_SCRIPT = HERE / "worker_process.py"


# ---- events --------------------------------------------------------------------------------------------------


class EventLog:
    """A listener keeping every event it hears, by credential; tests wait on it instead of polling."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.by_credential: dict[uuid.UUID, list[Event]] = defaultdict(list)
        self._changed: dict[uuid.UUID, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.credential_id is not None:
            self.by_credential[event.credential_id].append(event)
            self._changed[event.credential_id].set()

    async def next_of(
        self,
        credential_id: uuid.UUID,
        types: Collection[str],
        *,
        after: int = 0,
        timeout: float = 60.0,  # noqa: ASYNC109 - a test helper's deadline
    ) -> Event:
        """The first event of ``types`` for the credential with a sequence above ``after`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.by_credential.get(credential_id, []):
                if event.sequence > after and event.type in types:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                heard = [(e.sequence, e.type) for e in self.by_credential.get(credential_id, [])]
                raise AssertionError(f"no {sorted(types)} for {credential_id} after {after}; heard {heard}")
            changed = self._changed[credential_id]
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 1.0))

    def last_sequence(self, credential_id: uuid.UUID) -> int:
        return max((e.sequence for e in self.by_credential.get(credential_id, [])), default=0)

    def sequence_problems(self) -> dict[uuid.UUID, list[int]]:
        """Credentials whose heard sequences are not exactly 1..n, each once (gaps, duplicates, disorder)."""
        bad: dict[uuid.UUID, list[int]] = {}
        for cid, heard in self.by_credential.items():
            sequences = [e.sequence for e in heard]
            if sequences != list(range(1, len(sequences) + 1)):
                bad[cid] = sequences
        return bad


# ---- SQL on the test's database (asyncpg directly: the engine's named queries are not the point here) --------


async def fetch(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def stored_events(dsn: str) -> dict[uuid.UUID, list[tuple[int, str, uuid.UUID]]]:
    """Every outbox event as (sequence, type, event id), by credential, in sequence order."""
    rows = await fetch(
        dsn, "SELECT credential_id, sequence, type, id FROM events ORDER BY credential_id, sequence"
    )
    out: dict[uuid.UUID, list[tuple[int, str, uuid.UUID]]] = defaultdict(list)
    for row in rows:
        out[row["credential_id"]].append((int(row["sequence"]), row["type"], row["id"]))
    return out


async def table_snapshot(dsn: str, where: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Every row of every table of the public schema as sorted text; ``where`` filters some tables (SQL)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
            )
        ]
        snapshot: dict[str, list[str]] = {}
        for table in tables:
            condition = (where or {}).get(table, "true")
            rows = await conn.fetch(f'SELECT t::text AS r FROM "{table}" t WHERE {condition}')
            snapshot[table] = sorted(r["r"] for r in rows)
        return snapshot
    finally:
        await conn.close()


async def database_text(dsn: str) -> str:
    """Every row of every table (views too) of the public schema, as text (bytea as hex): what a leak scan reads."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        chunks: list[str] = []
        for t in tables:
            rows = await conn.fetch(f'SELECT t::text AS r FROM "{t["table_name"]}" t')
            chunks.extend(r["r"] for r in rows)
        return "\n".join(chunks)
    finally:
        await conn.close()


# ---- leaks ---------------------------------------------------------------------------------------------------


def secret_forms(secret: str) -> set[str]:
    """The ways a secret could show up in text: plain, hex, base64 (standard and URL-safe), JSON-escaped."""
    raw = secret.encode()
    forms = {
        secret,
        raw.hex(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        json.dumps(secret)[1:-1],
    }
    if "\n" in secret:  # a PEM: any of its lines of key material is a leak on its own
        forms |= {line for line in secret.splitlines() if len(line) >= 16 and "-----" not in line}
    return {form for form in forms if len(form) >= 8}


class Canaries:
    """Secret values a test planted; :meth:`find` names those present in a text in any form."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._forms: dict[str, str] = {}
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret:
            for form in secret_forms(secret):
                self._forms[form] = secret

    def __len__(self) -> int:
        return len(set(self._forms.values()))

    def find(self, text: str) -> list[str]:
        return sorted({secret[:6] + "..." for form, secret in self._forms.items() if form in text})


# ---- a webhook receiver ------------------------------------------------------------------------------------------


class WebhookReceiver:
    """A loopback HTTP server that records every webhook request (path, headers, body) and answers
    ``status(path, n)`` (n: the request's number, from 1), so a test can make some attempts fail."""

    def __init__(self, status: Callable[[str, int], int] = lambda _path, _n: 200) -> None:
        self.status = status
        self.requests: list[
            tuple[str, dict[str, str], bytes, int]
        ] = []  # path, headers, body, status answered
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.status(request.path, len(self.requests) + 1)
        self.requests.append((request.path, dict(request.headers), body, status))
        return web.Response(status=status, text="ok")

    def delivered_ids(self, path: str | None = None) -> set[str]:
        """The ``webhook-id`` of every request answered 2xx (to ``path``, if given)."""
        ids = set()
        for where, headers, _, status in self.requests:
            if (path is None or where == path) and 200 <= status < 300:
                ids.add({k.lower(): v for k, v in headers.items()}.get("webhook-id", ""))
        return ids

    def text(self) -> str:
        """Every request as text (headers and bodies), for leak scans."""
        return "\n".join(
            f"{path} {json.dumps(headers)} {body.decode(errors='replace')}"
            for path, headers, body, _ in self.requests
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# ---- engine worker processes ------------------------------------------------------------------------------------


class WorkerProcess:
    """One ``worker_process.py``: a real OS process with an engine whose workers run jobs on the test database."""

    def __init__(self, env: Mapping[str, str], stderr_path: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env}
        self.stderr_path = stderr_path
        self.proc: asyncio.subprocess.Process | None = None
        self.worker_id = ""
        self._stderr: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - start-up deadline
        self._stderr = self.stderr_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER_SCRIPT),
            env=self.env,
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        words = line.decode().split()
        if words[:1] != ["ready"]:
            await self.kill()
            raise AssertionError(f"worker process did not start: {line!r}; see {self.stderr_path}")
        self.worker_id = words[1]

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no hand-back, leases left to expire."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        await self._finish()

    async def _finish(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            await (
                self.proc.stdout.read()
            )  # to EOF, so that the pipe transport closes with the loop still open
        self._close_stderr()

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109 - shutdown deadline
        """SIGTERM and wait: the engine finishes or hands back its jobs and exits 0."""
        assert self.proc is not None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                await self.kill()
        await self._finish()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,  # noqa: ASYNC109 - a test helper's deadline
    interval: float = 0.2,
    what: str = "condition",
) -> float:
    """Poll ``check`` until it is true; returns the seconds it took. AssertionError after ``timeout``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not reached within {timeout:g}s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


# ---- the keys of the concurrency test (both of its processes program their FakeVenue alike) -------------------

FAKE_KEYS = ("good-1", "good-2", "same-acct", "other-acct", "bad", "flaky", "withdraw")


def program_fake(fake: Any) -> None:
    """Program a FakeVenue with :data:`FAKE_KEYS` (secret "s"): good keys of three accounts (uid-1 has two keys,
    for rotations), a key the venue rejects, one that flakes (transient) once, one the policy rejects."""
    fake.add_key("good-1", "s", account_id="uid-1", identities=("spot", "margin"), delay=0.002)
    fake.add_key("good-2", "s", account_id="uid-2", identities=("spot",), delay=0.002)
    fake.add_key("same-acct", "s", account_id="uid-1", identities=("spot",), delay=0.002)
    fake.add_key("other-acct", "s", account_id="uid-3", delay=0.002)
    fake.fail_key("bad", Outcome.INVALID_SECRET, api_secret="s")
    fake.flaky_key("flaky", "s", transient=1, account_id="uid-2")
    fake.add_key("withdraw", "s", withdraw=True)
