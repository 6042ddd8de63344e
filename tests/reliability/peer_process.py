"""The second engine process of the concurrency test, driven over a pipe (JSON lines on stdin and stdout).

It opens a CredentialEngine (no background workers) on the test's database with the same master keys and a
FakeVenue programmed like the test's (``reliability_support.program_fake``). Each request line is
``{"id": n, "op": ..., "at": <time.time() to start at>, ...}``; it runs concurrently with the others and is
answered ``{"id": n, "result": ...}`` or ``{"id": n, "error": "<class>", "module": "<module>"}``. ``at`` lets
the test start an operation here and one in its own engine at the same instant.

Usage: python tests/reliability/peer_process.py   (DATABASE_URL, ENGINE_MASTER_KEYS, ENGINE_DATA_DIR set)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from reliability_support import program_fake

from engine import CredentialEngine, EngineConfig
from engine import logs as logsmod
from engine.testing import FakeVenue, settle


async def run(engine: CredentialEngine, request: dict[str, Any]) -> Any:
    op = request["op"]
    owner = request.get("owner", "")
    if op == "create":
        cred = await engine.create_credential(
            owner, venue=request["venue"], api_key=request["key"], api_secret="s"
        )
        return str(cred.credential_id)
    if op == "verify":
        await engine.verify_credential(owner, request["cid"])
    elif op == "rotate":
        await engine.rotate_credential(
            owner, request["cid"], api_key=request["key"], api_secret="s", immediate=request["immediate"]
        )
    elif op == "revoke":
        await engine.revoke_credential(owner, request["cid"], cascade=request["cascade"])
    elif op == "connect":
        account = await engine.connect_trading_account(
            owner, credential_id=request["cid"], account_type=request["account_type"]
        )
        return str(account.trading_account_id)
    elif op == "disconnect":
        await engine.disconnect_trading_account(owner, request["aid"])
    elif op == "work":
        await settle(engine)
    else:
        raise ValueError(f"unknown op {op!r}")
    return None


async def serve(engine: CredentialEngine) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(request: dict[str, Any]) -> None:
        answer: dict[str, Any] = {"id": request["id"]}
        try:
            delay = float(request.get("at", 0)) - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            answer["result"] = await run(engine, request)
        except Exception as exc:  # every outcome goes back to the test, which judges it
            answer["error"] = type(exc).__name__
            answer["module"] = type(exc).__module__
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        task = asyncio.create_task(handle(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def main() -> None:
    logsmod.configure_logging("WARNING", json=True, stream=sys.stderr)  # stdout is the pipe back to the test
    fake = FakeVenue()
    program_fake(fake)
    config = EngineConfig.from_env(workers=0, backoff_base=0.005, backoff_max=0.01, poll_interval=0.2)
    async with CredentialEngine(config, probes=fake.probes()) as engine:
        print(json.dumps({"ready": os.getpid()}), flush=True)
        await serve(engine)


if __name__ == "__main__":
    asyncio.run(main())
