"""The trading backend of the BROKER rotation test: an engine process that only holds key leases and signs.

Configuration is one JSON object in the environment variable ``LEASE_SIGNER`` (the master keys are a secret:
not on the command line): ``database_url``, ``master_keys``, ``data_dir``, ``owner``, ``credentials`` (ids),
``url`` (the simulator's Bybit base URL), ``interval`` (seconds between two requests of one lease),
``in_flight`` (requests of one lease under way at most), ``timeout`` (seconds per request).

It opens an engine without workers on the test's database, holds a lease on every credential for the whole run
and signs Bybit ``GET /v5/order/realtime`` with each lease's keys, read from the lease right before each request.
Requests of one lease overlap (up to ``in_flight``): a request signed with a key just before the lease swapped
it may still be under way (the simulator's hangs) when the old key's grace ends. It prints one JSON object per
line on stdout (logs go to stderr as JSON, WARNING and above):

    {"ready": {credential id: secret version}}                        every lease is open
    {"swap": id, "old": api key, "new": api key, "at": time.time()}     the first read of a new key from a lease
    {"refused": id, "api_key": ..., "status": HTTP, "code": retCode, "sent": time.time()}   not a fault answer
    {"final": {id: {"api_key": ..., "version": n, "revoked": bool}}, "sent": n, "answers": {kind: n}}

It stops signing when its stdin closes (or on SIGTERM), waits for the requests under way, prints ``final`` and
exits 0. The API keys printed are the simulator's public key ids; no secret is ever printed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from engine import CredentialEngine, EngineConfig, KeyLease
from engine import logs as logsmod
from venues.base import ApiKeys
from venues.bybit import auth_headers

PATH = "/v5/order/realtime"
QUERY = "category=spot"
# Answers of the simulator's fault injection (venues/simulator/bybit.py ``fault``): rate limited, maintenance,
# server error; a malformed body does not parse. Anything else but retCode 0 is a refusal.
FAULT_CODES = frozenset({10006, 10016})


def say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class Signer:
    """The signing loops of every lease and what the venue answered them."""

    def __init__(self, session: aiohttp.ClientSession, settings: dict[str, Any]) -> None:
        self.session = session
        self.url = str(settings["url"]) + PATH + "?" + QUERY
        self.interval = float(settings["interval"])
        self.in_flight = int(settings["in_flight"])
        self.timeout = aiohttp.ClientTimeout(total=float(settings["timeout"]))
        self.answers: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, cid: str, lease: KeyLease, stop: asyncio.Event) -> None:
        """Sign with ``lease``'s keys of the moment until ``stop``; report each swap once."""
        slots = asyncio.Semaphore(self.in_flight)
        last = lease.keys.api_key
        while not stop.is_set():
            await slots.acquire()
            keys = lease.keys  # right before signing: what the backend would do
            if keys.api_key != last:
                say(swap=cid, old=last, new=keys.api_key, at=time.time())
                last = keys.api_key
            task = asyncio.create_task(self._one(cid, keys, slots))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def _one(self, cid: str, keys: ApiKeys, slots: asyncio.Semaphore) -> None:
        sent = time.time()
        self.sent += 1
        try:
            headers = auth_headers(keys, int(sent * 1000), QUERY)
            async with self.session.get(self.url, headers=headers, timeout=self.timeout) as reply:
                text = await reply.text()
                status = reply.status
            try:
                body = json.loads(text)
                code = body.get("retCode") if isinstance(body, dict) else None
            except ValueError:
                self.answers["malformed"] += 1
                return
            if code == 0:
                self.answers["ok"] += 1
            elif code in FAULT_CODES:
                self.answers["fault"] += 1
            else:
                self.answers["refused"] += 1
                say(refused=cid, api_key=keys.api_key, status=status, code=code, sent=sent)
        except (aiohttp.ClientError, TimeoutError):
            self.answers["transport"] += 1
        finally:
            slots.release()


async def main() -> None:
    logsmod.configure_logging("WARNING", json=True, stream=sys.stderr)
    settings = json.loads(os.environ["LEASE_SIGNER"])
    config = EngineConfig(
        database_url=settings["database_url"],
        master_keys=settings["master_keys"],
        data_dir=Path(settings["data_dir"]),
        workers=0,
        poll_interval=0.2,
        pool_acquire_timeout=10.0,
        db_command_timeout=20.0,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def until_stdin_closes() -> None:
        while await reader.read(4096):
            pass
        stop.set()

    watcher = asyncio.create_task(until_stdin_closes())
    owner = str(settings["owner"])
    async with (
        CredentialEngine(config) as eng,
        contextlib.AsyncExitStack() as stack,
        aiohttp.ClientSession() as session,
    ):
        leases: dict[str, KeyLease] = {}
        for cid in settings["credentials"]:
            leases[cid] = await stack.enter_async_context(
                eng.lease_keys(owner, uuid.UUID(cid), purpose="reliability signer")
            )
        say(ready={cid: lease.secret_version for cid, lease in leases.items()})
        signer = Signer(session, settings)
        await asyncio.gather(*(signer.run(cid, lease, stop) for cid, lease in leases.items()))
        if signer.tasks:
            await asyncio.wait(set(signer.tasks), timeout=float(settings["timeout"]) + 5.0)
        final = {
            cid: {
                "api_key": None if lease.revoked else lease.keys.api_key,
                "version": lease.secret_version,
                "revoked": lease.revoked,
            }
            for cid, lease in leases.items()
        }
        say(final=final, sent=signer.sent, answers=dict(signer.answers))
    watcher.cancel()


if __name__ == "__main__":
    asyncio.run(main())
