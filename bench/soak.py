"""Soak: many events through listeners and a webhook receiver with a retention of seconds; the tables stay flat.

    python -m bench.soak [--events 200000] [--retention 5] [--sample 15] [--credentials 400]

A pool of credentials is rotated again and again (a staged rotation: ``credential.rotation_started``, then
``credential.rotated`` once the worker has verified the new keys: 2 events per rotation, and no new credential
rows), with a reveal of the keys every 10th rotation (key-access audit rows). FakeVenue is every venue's probe.
Two engines share the database: engine A runs the workers and holds one listener and a webhook endpoint whose
receiver is an aiohttp server on loopback; engine B (no workers) holds a second listener, so two event buses
publish their cursors. Every retention (events, delivered and dead deliveries, key-access rows) is
``--retention`` seconds and the purge job runs every ``--retention / 2`` seconds.

Every ``--sample`` seconds it prints the row count and ``pg_total_relation_size`` of each bounded table. The
queue's finished jobs are purged by ``JobQueue.purge`` (what the hourly ``purge_jobs`` job runs), called at
each sample here with the same retention. Producers pause while more than ``--backlog`` events wait for their
webhook, so that pending deliveries (never purged) do not pile up because the receiver is slower.

At the end: every event was heard by both listeners and delivered to the receiver (retention deleted nothing
still needed), and the figures of the last samples against the first ones after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import asyncpg
from aiohttp import web

from bench import common
from engine.engine import CredentialEngine
from engine.models import Event
from engine.testing import FakeVenue
from venues.base import Venue

TABLES = (
    "events",
    "webhook_deliveries",
    "webhook_attempts",
    "key_access_audit",
    "event_cursors",
    "queue_jobs",
)
ROTATION_TIMEOUT = 120.0


async def sample(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """(rows, bytes with indexes and TOAST) of each table."""
    out: dict[str, tuple[int, int]] = {}
    for table in TABLES:
        rows = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608 - constant table names
        size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
        out[table] = (int(rows), int(size))
    return out


async def run(
    events: int = 200_000,
    retention: float = 5.0,
    sample_every: float = 15.0,
    credentials: int = 400,
    workers: int = 20,
    backlog: int = 4000,
) -> dict[str, Any]:
    fake = FakeVenue()
    result: dict[str, Any] = {
        "events_target": events,
        "retention_s": retention,
        "credentials": credentials,
        "samples": [],
    }
    received: set[str] = set()

    async def handle(request: web.Request) -> web.Response:
        received.add(request.headers["webhook-id"])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hooks", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hooks"  # type: ignore[union-attr]

    keep = {
        "event_retention": retention,
        "delivery_retention": retention,
        "dead_delivery_retention": retention,
        "key_access_retention": retention,
        "retention_interval": max(0.5, retention / 2),
        "job_retention": retention,
    }
    try:
        async with common.bench_database("soak") as bdb:
            cfg_a = common.engine_config(
                bdb.dsn,
                workers=workers,
                allow_private_webhook_urls=True,
                pool_max_size=workers + 8,
                poll_interval=0.5,
                **keep,
            )
            async with CredentialEngine(cfg_a, probes=fake.probes()) as eng_a:
                cfg_b = common.engine_config(
                    bdb.dsn, workers=0, master_keys=str(cfg_a.master_keys), poll_interval=0.5, **keep
                )
                async with CredentialEngine(cfg_b, probes=fake.probes()) as eng_b:
                    result.update(
                        await _soak(
                            eng_a,
                            eng_b,
                            fake,
                            url,
                            bdb.dsn,
                            events,
                            sample_every,
                            credentials,
                            backlog,
                            received,
                        )
                    )
    finally:
        await runner.cleanup()
    return result


async def _soak(
    eng_a: CredentialEngine,
    eng_b: CredentialEngine,
    fake: FakeVenue,
    url: str,
    dsn: str,
    target: int,
    sample_every: float,
    credentials: int,
    backlog: int,
    received: set[str],
) -> dict[str, Any]:
    heard_a: set[uuid.UUID] = set()
    heard_b: set[uuid.UUID] = set()
    rotated: dict[uuid.UUID, asyncio.Event] = {}

    async def on_a(event: Event) -> None:
        heard_a.add(event.event_id)
        if event.type == "credential.rotated" and event.credential_id in rotated:
            rotated[event.credential_id].set()

    async def on_b(event: Event) -> None:
        heard_b.add(event.event_id)

    eng_a.subscribe(on_a)
    eng_b.subscribe(on_b)
    owners = [f"soak-{i % 20}" for i in range(credentials)]
    for owner in sorted(set(owners)):
        await eng_a.add_webhook_endpoint(owner, url)
    creds: list[tuple[str, uuid.UUID]] = []
    for i, owner in enumerate(owners):
        key = f"soak-{i}-v0-aaaaaaaa"
        fake.add_key(key, "soak-secret", account_id=f"uid-{i}")
        cred = await eng_a.create_credential(
            owner, venue=Venue.BINANCE, api_key=key, api_secret="soak-secret"
        )
        creds.append((owner, cred.credential_id))
        rotated[cred.credential_id] = asyncio.Event()
    await eng_a.run_until_idle()

    produced = 0
    written = 2 * credentials  # created + verified of the pool
    started = time.monotonic()
    stop = asyncio.Event()

    async def rotate_forever(i: int, owner: str, cid: uuid.UUID) -> None:
        nonlocal produced, written
        version = 0
        while not stop.is_set():
            # the receiver is behind: wait (pending deliveries are never purged, so they would pile up)
            while written - len(received) > backlog and not stop.is_set():  # noqa: ASYNC110 - polls counters
                await asyncio.sleep(0.05)
            version += 1
            key = f"soak-{i}-v{version}-aaaaaaaa"
            fake.add_key(key, "soak-secret", account_id=f"uid-{i}")
            done = rotated[cid]
            done.clear()
            await eng_a.rotate_credential(owner, cid, api_key=key, api_secret="soak-secret")
            written += 1
            await asyncio.wait_for(done.wait(), ROTATION_TIMEOUT)
            written += 1
            produced += 1
            if version % 10 == 0:
                await eng_a.reveal_keys(owner, cid, purpose="soak")
            if written >= target:
                stop.set()

    samples: list[dict[str, Any]] = []
    conn = await asyncpg.connect(dsn)

    async def sampler() -> None:
        while True:
            await asyncio.sleep(sample_every)
            purged = await eng_a.queue.purge(eng_a.config.job_retention)
            row = {
                "t": round(time.monotonic() - started, 1),
                "events_written": written,
                "jobs_purged": purged,
            }
            row.update({k: list(v) for k, v in (await sample(conn)).items()})
            samples.append(row)
            print(_line(row), flush=True)

    print(_header(), flush=True)
    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(rotate_forever(i, o, c) for i, (o, c) in enumerate(creds)))
        deadline = time.monotonic() + 300
        while min(len(received), len(heard_a), len(heard_b)) < written and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        await asyncio.sleep(sample_every * 2)  # the tables after the purge has caught up
    finally:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        final = await sample(conn)
        await conn.close()
    return {
        "events_written": written,
        "rotations": produced,
        "seconds": round(elapsed, 1),
        "events_per_s": round(written / elapsed, 1),
        "heard_a": len(heard_a),
        "heard_b": len(heard_b),
        "webhooks_received": len(received),
        "samples": samples,
        "final": {k: list(v) for k, v in final.items()},
        "cursor_expired": [eng.bus.beacon.expired if eng.bus.beacon else None for eng in (eng_a, eng_b)],
        "summary": [
            common.figure("soak: events written", written, "events"),
            common.figure("soak: events heard by each listener", min(len(heard_a), len(heard_b)), "events"),
            common.figure("soak: webhook deliveries received", len(received), "events"),
            common.figure("soak: events rows at the end", final["events"][0], "rows"),
            common.figure("soak: events table size at the end", final["events"][1] / 1e6, "MB"),
        ],
    }


def _header() -> str:
    cols = " ".join(f"{t[:14]:>22}" for t in TABLES)
    return f"{'t s':>7} {'written':>9} {cols}   (rows / MB each)"


def _line(row: dict[str, Any]) -> str:
    cells = " ".join(f"{row[t][0]:>11,}/{row[t][1] / 1e6:>8.2f}MB"[-22:].rjust(22) for t in TABLES)
    return f"{row['t']:>7} {row['events_written']:>9,} {cells}"


def render(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['events_written']:,} events ({result['rotations']:,} rotations of "
        f"{result['credentials']} credentials) in {result['seconds']} s, {result['events_per_s']} events/s; "
        f"retention {result['retention_s']} s",
        f"heard by listener A {result['heard_a']:,}, by listener B {result['heard_b']:,}; webhook deliveries "
        f"received {result['webhooks_received']:,}; cursor expiries {result['cursor_expired']}",
        _header(),
    ]
    lines += [_line(row) for row in result["samples"]]
    final = {"t": "end", "events_written": result["events_written"], **result["final"]}
    lines.append(_line(final))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events to write (2 per rotation)")
    parser.add_argument("--retention", type=float, default=5.0, help="seconds every retention keeps rows")
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between samples of the tables")
    parser.add_argument("--credentials", type=int, default=400, help="credentials rotated concurrently")
    parser.add_argument("--workers", type=int, default=20, help="jobs run at a time")
    args = parser.parse_args(argv)
    common.quiet_logs("WARNING")
    result = asyncio.run(run(args.events, args.retention, args.sample, args.credentials, args.workers))
    print(render(result))


if __name__ == "__main__":
    main()
