"""An engine worker process for the reliability suite: a CredentialEngine with workers on the test's database.

Configuration comes from the environment, as for ``credential-engine worker``: ``DATABASE_URL``,
``ENGINE_MASTER_KEYS``, ``ENGINE_VENUE_URLS``, ``ENGINE_WORKERS``, ``ENGINE_LEASE_SECONDS``, ``ENGINE_DATA_DIR``;
``RELIABILITY_OVERRIDES`` (JSON) sets the other ``EngineConfig`` fields (poll interval, backoff, ...). Its logs
go to stderr as redacted JSON lines (the leak canary reads them, even after a SIGKILL). Once open it prints
``ready <queue worker id>`` on stdout; SIGTERM closes it gracefully (exit 0).

Usage: python tests/reliability/worker_process.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from engine import CredentialEngine, EngineConfig
from engine import logs as logsmod


async def main() -> None:
    logsmod.configure_logging(os.environ.get("ENGINE_LOG_LEVEL", "DEBUG"), json=True, stream=sys.stderr)
    overrides: dict[str, Any] = {  # JSON has no tuples; EngineConfig's sequences are tuples
        name: tuple(value) if isinstance(value, list) else value
        for name, value in json.loads(os.environ.get("RELIABILITY_OVERRIDES", "{}")).items()
    }
    config = EngineConfig.from_env(None, **overrides)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with CredentialEngine(config) as engine:
        print("ready", engine.queue.worker_id, flush=True)
        await stop.wait()
    print("closed", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
