"""The other engine process of the key-lease tests: a trading backend that signs with a lease.

Usage: ``python lease_peer.py DATABASE_URL MASTER_KEYS DATA_DIR OWNER CREDENTIAL_ID BINANCE_URL [POLL_INTERVAL]``.

It opens an engine (no workers) on the test's database, leases the credential's keys and signs a Binance
``GET /api/v3/openOrders`` with them against the simulator, one request at a time (the keys are read from the
lease right before each request, and the next read waits for the answer), until the lease refuses. It prints
one JSON object per line on stdout (logs go to stderr):

    {"ready": <secret version>, "api_key": ...}          the lease is open
    {"change": "rotated"|"verified"|"revoked", "old": v, "new": v, "at": <time.time()>}   from on_change
    {"signing": <api_key>, "at": <time.time()>}         the first request signed with another key than before
    {"refused": <time.time() of the read that raised CredentialRevoked>, "signed": <requests sent>}

A request is sent only after the answer to the previous one arrived, so no request signed with a key can arrive
at the simulator after the read that found the lease revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from engine import CredentialEngine, CredentialRevoked, EngineConfig, KeyLease, LeaseChange
from engine import logs as logsmod
from venues.base import ApiKeys
from venues.binance import signed_query

RUN_LIMIT = 180.0  # seconds: the peer ends by itself if the test never revokes


def say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def sign_one(session: aiohttp.ClientSession, base_url: str, keys: ApiKeys) -> int:
    """One signed Binance request with ``keys``; its HTTP status."""
    query = signed_query(keys.api_secret, int(time.time() * 1000), [("symbol", "BTCUSDT")])
    async with session.get(
        f"{base_url}/api/v3/openOrders?{query}",
        headers={"X-MBX-APIKEY": keys.api_key},
        timeout=aiohttp.ClientTimeout(total=10),
    ) as reply:
        await reply.read()
        return reply.status


async def main(
    database_url: str, master_keys: str, data_dir: str, owner: str, cid: str, url: str, poll: float
) -> None:
    logsmod.configure_logging("WARNING", json=True, stream=sys.stderr)
    config = EngineConfig(
        database_url=database_url,
        master_keys=master_keys,
        data_dir=Path(data_dir),
        workers=0,
        poll_interval=poll,
        key_lease_recheck_interval=120.0,  # far past the tests' bounds: what reaches the lease is the event bus
        pool_acquire_timeout=5.0,
        db_command_timeout=10.0,
    )
    async with CredentialEngine(config) as eng, eng.lease_keys(owner, cid, purpose="peer signer") as lease:

        async def changed(_lease: KeyLease, change: LeaseChange) -> None:
            say(change=change.kind.value, old=change.old_version, new=change.new_version, at=time.time())

        lease.on_change(changed)
        say(ready=lease.secret_version, api_key=lease.keys.api_key)
        signed, last_key = 0, lease.keys.api_key
        deadline = time.monotonic() + RUN_LIMIT
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    keys = lease.keys
                except CredentialRevoked:
                    say(refused=time.time(), signed=signed)
                    break
                if keys.api_key != last_key:
                    last_key = keys.api_key
                    say(signing=keys.api_key, at=time.time())
                # the simulator's answer does not matter here: what it recorded does
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await sign_one(session, url, keys)
                signed += 1
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)  # let the revocation callback print


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(*args[:6], float(args[6]) if len(args) > 6 else 0.2))
