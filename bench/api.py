"""REST API throughput: requests/s and latency percentiles of create and list with N concurrent clients.

    python -m bench.api [--clients 1,8,32] [--requests 1000]

The server is ``credential-engine serve`` in its own process (API only: ``ENGINE_WORKERS=0``, so the numbers
are the API's and the database's, not the verification jobs'), on a fresh database; the clients are aiohttp
tasks in this process, each with its own keep-alive connection, over loopback. ``create`` stores a new
Binance-format key per request (one INSERT transaction with its outbox event and verify job); ``list`` reads
the first page (50) of the owner's credentials with its total. Latency is per request, measured by the client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp

from bench import common
from engine import crypto
from engine.api import auth

OWNER = "bench-owner"
START_TIMEOUT = 60.0


@contextlib.asynccontextmanager
async def server(dsn: str) -> AsyncIterator[tuple[str, str, int]]:
    """``credential-engine serve`` on a free port: (URL, a token, its pid); stopped with SIGTERM at exit."""
    secret = auth.generate_secret()
    with tempfile.TemporaryDirectory(prefix="ce-bench-api-") as data_dir:
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "ENGINE_MASTER_KEYS": crypto.MasterKeyring.generate_spec(1),
            "ENGINE_API_JWT_SECRET": secret,
            "ENGINE_API_PORT": "0",
            "ENGINE_WORKERS": "0",
            # the API's own throughput, one owner at full speed: the per-owner rate limit would measure itself
            "ENGINE_API_RATE_LIMIT": "0",
            "ENGINE_QUOTA_CREDENTIALS": "0",
            "ENGINE_LOG_LEVEL": "WARNING",
            "ENGINE_DATA_DIR": data_dir,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "serve", env=env, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
            if b"listening on " not in line:
                raise RuntimeError(f"the server did not start: {line.decode(errors='replace')!r}")
            url = line.decode().split("listening on ", 1)[1].split()[0]
            yield url, auth.mint_token(secret, OWNER, ttl=3600), proc.pid
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def measure(clients: int, total: int, one: Callable[[int], Awaitable[int]]) -> dict[str, float | int]:
    """``total`` requests spread over ``clients`` concurrent loops; per-request latency and throughput."""
    latencies: list[float] = []
    errors = 0
    issued = 0

    async def client() -> None:
        nonlocal errors, issued
        while issued < total:
            n = issued
            issued += 1
            started = time.perf_counter()
            status = await one(n)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": common.percentile(latencies, 0.50) * 1000,
        "p99_ms": common.percentile(latencies, 0.99) * 1000,
    }


async def run(
    *, clients: Sequence[int] = (1, 8, 32), requests: int = 1000, warmup: int = 50
) -> dict[str, Any]:
    """Measure create then list at each concurrency; returns the rows, the summary figures and a table."""
    rows: list[dict[str, Any]] = []
    async with common.bench_database("api") as db, server(db.dsn) as (url, token, _pid):
        headers = {"Authorization": f"Bearer {token}"}
        connector = aiohttp.TCPConnector(limit=max(clients))
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

            async def create(_n: int) -> int:
                body = {
                    "venue": "BINANCE",
                    "apiKey": secrets.token_hex(32),
                    "apiSecret": secrets.token_hex(32),
                }
                async with http.post(f"{url}/api/v3/credential/create", json=body) as resp:
                    await resp.read()
                    return resp.status

            async def list_page(_n: int) -> int:
                async with http.get(f"{url}/api/v3/credential/list", params={"limit": "50"}) as resp:
                    await resp.read()
                    return resp.status

            await measure(max(clients), warmup, create)  # connections, pool, caches
            await measure(max(clients), warmup, list_page)
            for n in clients:
                rows.append({"operation": "create", **await measure(n, requests, create)})
                rows.append({"operation": "list", **await measure(n, requests, list_page)})
    top = max(clients)
    best = {r["operation"]: r for r in rows if r["clients"] == top}
    summary = [
        common.figure(f"create req/s, {top} clients", best["create"]["rps"], "req/s"),
        common.figure(f"create p99, {top} clients", best["create"]["p99_ms"], "ms"),
        common.figure(f"list req/s, {top} clients", best["list"]["rps"], "req/s"),
        common.figure(f"list p99, {top} clients", best["list"]["p99_ms"], "ms"),
        common.figure(
            "errors", sum(r["errors"] for r in rows), "", target="0", ok=all(r["errors"] == 0 for r in rows)
        ),
    ]
    text = common.table(
        ["operation", "clients", "requests", "errors", "req/s", "p50 ms", "p99 ms"],
        [
            [r["operation"], r["clients"], r["requests"], r["errors"], r["rps"], r["p50_ms"], r["p99_ms"]]
            for r in rows
        ],
        right=(1, 2, 3, 4, 5, 6),
    )
    return {"rows": rows, "summary": summary, "table": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=1000, help="requests per operation and level")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    result = asyncio.run(run(clients=levels, requests=args.requests))
    print(result["table"])
    return 0 if all(r["errors"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
