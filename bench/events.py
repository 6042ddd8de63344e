"""Lifecycle events from commit to consumer: an in-process listener, and a webhook receiver on loopback.

    python -m bench.events [--n 2000] [--producers 20] [--workers 20]      (--n 300 for a quick run)

N credentials are created (``producers`` calls at a time) and verified by ``workers`` jobs, with FakeVenue as
every venue's probe so that only the engine is measured: 2 N events (``credential.created``, then
``credential.verified``). Three phases on one engine, fresh owners each:

* **listener, flat out**: one ``subscribe`` callback, no webhook endpoint, credentials created as fast as the
  producers go;
* **webhook, flat out**: the same plus one endpoint whose receiver is an aiohttp server in this process
  (loopback, 200 at once). Every request is signed; after the run each body is verified with
  ``engine.webhooks.Verifier``. Flat out, deliveries queue up, so latency here includes that queue;
* **webhook, paced**: N / 2 credentials created at an even pace of half the webhook rate just measured: the
  latency a receiver sees when the engine keeps up.

Figures per consumer: events/s from the first commit to the last arrival, and the latency of each event from its
commit (the event's ``timestamp``, taken by PostgreSQL inside the writing transaction just before it commits, ms)
to its arrival (this process's clock, same machine). No peer is measured: the figures are informative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bench import common
from engine import webhooks
from engine.engine import CredentialEngine
from engine.models import Event
from engine.testing import FakeVenue
from venues.base import Venue

PHASE_TIMEOUT = 300.0
POLL = 0.05


class Arrivals:
    """Arrival time (ms) and commit time (ms) of each event id, first arrival only."""

    def __init__(self) -> None:
        self.at: dict[str, tuple[float, int]] = {}
        self.bodies: list[tuple[bytes, dict[str, str]]] = []

    def note(self, event_id: str, committed_ms: int) -> None:
        if event_id not in self.at:
            self.at[event_id] = (time.time() * 1000, committed_ms)

    def figures(self) -> dict[str, float]:
        if not self.at:
            return {"events": 0, "per_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
        latencies = [arrived - committed for arrived, committed in self.at.values()]
        first_commit = min(committed for _, committed in self.at.values())
        last_arrival = max(arrived for arrived, _ in self.at.values())
        span = max(last_arrival - first_commit, 1.0) / 1000
        return {
            "events": len(self.at),
            "per_s": len(self.at) / span,
            "p50_ms": common.percentile(latencies, 0.50),
            "p99_ms": common.percentile(latencies, 0.99),
            "max_ms": max(latencies),
        }


async def receiver(arrivals: Arrivals) -> tuple[web.AppRunner, str]:
    """A webhook receiver on 127.0.0.1 that notes arrivals and keeps bodies for verification afterwards."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        payload = json.loads(body)
        arrivals.note(request.headers["webhook-id"], int(payload["timestamp"]))
        arrivals.bodies.append((body, dict(request.headers)))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hooks", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/hooks"


async def produce(eng: CredentialEngine, fake: FakeVenue, owner: str, n: int, producers: int) -> None:
    """``n`` create_credential calls, ``producers`` at a time."""
    gate = asyncio.Semaphore(producers)

    async def one(i: int) -> None:
        key = f"{owner}-key-{i}"
        fake.add_key(key, "bench-secret", account_id=f"uid-{owner}-{i}")
        async with gate:
            await eng.create_credential(owner, venue=Venue.BINANCE, api_key=key, api_secret="bench-secret")

    await asyncio.gather(*(one(i) for i in range(n)))


async def produce_paced(eng: CredentialEngine, fake: FakeVenue, owner: str, n: int, per_s: float) -> None:
    """``n`` create_credential calls started at an even pace of ``per_s`` per second."""
    started = time.monotonic()
    tasks = []
    for i in range(n):
        delay = started + i / per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        key = f"{owner}-key-{i}"
        fake.add_key(key, "bench-secret", account_id=f"uid-{owner}-{i}")
        tasks.append(
            asyncio.create_task(
                eng.create_credential(owner, venue=Venue.BINANCE, api_key=key, api_secret="bench-secret")
            )
        )
    await asyncio.gather(*tasks)


async def wait_for(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not arrive within {PHASE_TIMEOUT:g}s")
        await asyncio.sleep(POLL)


def listener_for(arrivals: Arrivals, owner: str) -> Callable[[Event], Awaitable[None]]:
    async def listener(event: Event) -> None:
        if event.owner_id == owner:
            arrivals.note(str(event.event_id), event.timestamp_ms)

    return listener


async def run(n: int = 2000, producers: int = 20, workers: int = 20) -> dict[str, Any]:
    """Both phases on a fresh database; returns the figures (and ``summary`` rows for ``python -m bench``)."""
    fake = FakeVenue()
    result: dict[str, Any] = {"n": n, "events_per_phase": 2 * n, "producers": producers, "workers": workers}
    async with common.bench_database("events") as bdb:
        config = common.engine_config(
            bdb.dsn,
            workers=workers,
            allow_private_webhook_urls=True,
            pool_max_size=workers + producers // 2 + 4,
            poll_interval=0.5,
        )
        async with CredentialEngine(config, probes=fake.probes()) as eng:
            quiet = Arrivals()
            eng.subscribe(listener_for(quiet, "warmup"))
            await produce(eng, fake, "warmup", min(50, n), producers)
            await wait_for(lambda: len(quiet.at) >= 2 * min(50, n), "warm-up events")

            heard = Arrivals()
            eng.subscribe(listener_for(heard, "listener-only"))
            await produce(eng, fake, "listener-only", n, producers)
            await wait_for(lambda: len(heard.at) >= 2 * n, "listener events")
            result["listener"] = heard.figures()

            received = Arrivals()
            heard_too = Arrivals()
            runner, url = await receiver(received)
            try:
                endpoint = await eng.add_webhook_endpoint("with-webhook", url)
                eng.subscribe(listener_for(heard_too, "with-webhook"))
                await produce(eng, fake, "with-webhook", n, producers)
                await wait_for(lambda: len(received.at) >= 2 * n, "webhook deliveries")
                await wait_for(lambda: len(heard_too.at) >= 2 * n, "listener events (webhook phase)")
            finally:
                await runner.cleanup()
            assert endpoint.secret is not None
            verifier = webhooks.Verifier(endpoint.secret, tolerance=3600)
            for body, headers in received.bodies:
                verifier.verify(body, headers)
            result["webhook"] = received.figures()
            result["listener_during_webhooks"] = heard_too.figures()

            paced_n = max(1, n // 2)
            per_s = max(1.0, result["webhook"]["per_s"] / 4)  # credentials/s: 2 events each, half the rate
            result["paced_credentials_per_s"] = per_s
            paced = Arrivals()
            paced_heard = Arrivals()
            runner, url = await receiver(paced)
            try:
                paced_endpoint = await eng.add_webhook_endpoint("paced", url)
                eng.subscribe(listener_for(paced_heard, "paced"))
                await produce_paced(eng, fake, "paced", paced_n, per_s)
                await wait_for(lambda: len(paced.at) >= 2 * paced_n, "paced webhook deliveries")
                await wait_for(lambda: len(paced_heard.at) >= 2 * paced_n, "paced listener events")
            finally:
                await runner.cleanup()
            assert paced_endpoint.secret is not None
            paced_verifier = webhooks.Verifier(paced_endpoint.secret, tolerance=3600)
            for body, headers in paced.bodies:
                paced_verifier.verify(body, headers)
            result["webhook_paced"] = paced.figures()
            result["listener_paced"] = paced_heard.figures()
            result["webhook_requests"] = len(received.bodies) + len(paced.bodies)
            result["webhook_metrics"] = dict(eng.webhooks.metrics.outcomes)
    result["summary"] = [
        common.figure("listener events/s (commit -> callback)", result["listener"]["per_s"], "events/s"),
        common.figure("listener latency p50", result["listener"]["p50_ms"], "ms"),
        common.figure("listener latency p99", result["listener"]["p99_ms"], "ms"),
        common.figure("webhook events/s (commit -> receiver)", result["webhook"]["per_s"], "events/s"),
        common.figure("webhook latency p50, flat out (queueing)", result["webhook"]["p50_ms"], "ms"),
        common.figure("webhook latency p99, flat out (queueing)", result["webhook"]["p99_ms"], "ms"),
        common.figure("webhook latency p50, paced", result["webhook_paced"]["p50_ms"], "ms"),
        common.figure("webhook latency p99, paced", result["webhook_paced"]["p99_ms"], "ms"),
        common.figure("listener latency p50, paced", result["listener_paced"]["p50_ms"], "ms"),
        common.figure("listener latency p99, paced", result["listener_paced"]["p99_ms"], "ms"),
    ]
    return result


def render(result: dict[str, Any]) -> str:
    rows = []
    paced = f"paced, {2 * result['paced_credentials_per_s']:.0f} events/s"
    for label, key in (
        ("in-process listener, flat out", "listener"),
        ("loopback webhook receiver, flat out", "webhook"),
        ("listener, same time as that", "listener_during_webhooks"),
        (f"loopback webhook receiver, {paced}", "webhook_paced"),
        (f"listener, {paced}", "listener_paced"),
    ):
        f = result[key]
        rows.append([label, f["events"], f["per_s"], f["p50_ms"], f["p99_ms"], f["max_ms"]])
    head = (
        f"events from commit to consumer: {result['n']:,} credentials -> {result['events_per_phase']:,} events "
        f"per phase, {result['producers']} producers, {result['workers']} workers; "
        f"{result['webhook_requests']:,} webhook requests, every signature verified"
    )
    table = common.table(
        ["consumer", "events", "events/s", "p50 ms", "p99 ms", "max ms"], rows, right=[1, 2, 3, 4, 5]
    )
    return head + "\n" + table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="credentials per phase (2 events each)")
    parser.add_argument("--producers", type=int, default=20, help="create_credential calls at a time")
    parser.add_argument("--workers", type=int, default=20, help="jobs run at a time")
    args = parser.parse_args(argv)
    common.quiet_logs("WARNING")
    result = asyncio.run(run(args.n, args.producers, args.workers))
    print(render(result))


if __name__ == "__main__":
    main()
