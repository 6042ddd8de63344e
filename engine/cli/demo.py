"""``python -m engine.cli.demo`` (``make demo``): the whole credential lifecycle over the REST API, narrated.

Against the sandbox ``make run`` keeps running (found through its ``sandbox.json``), against the server given
with ``--url``/``--token``/``--admin-url``, or else against a sandbox it starts itself. Every step is a plain
HTTP call a client would make; test keys come from the exchange simulator's admin API, so the demo can run
again and again. A webhook receiver on loopback checks each event's Standard Webhooks signature and prints it.

Steps: webhook endpoint, a credential per venue, verification, a key the policy refuses, the list, a trading
account connected both ways (credentialId, and docs/api-dialect.md §8's keys), a staged rotation, a revocation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from engine import errors, logs, webhooks
from engine.cli import sandbox
from engine.config import EngineConfig
from engine.models import Event
from venues.base import Venue

WAIT = 30.0  # seconds any one step may wait for the workers


class DemoError(Exception):
    """A step did not go as the demo expects."""


@dataclass
class Client:
    """The REST API and the simulator's admin API, as any HTTP client would use them."""

    http: aiohttp.ClientSession
    url: str
    token: str = field(repr=False)  # a bearer token: a credential, never in a repr
    admin_url: str

    async def call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.http.request(
            method, self.url + path, json=body, params=params, headers=headers
        ) as resp:
            answer = await resp.json()
        if not answer.get("success"):
            raise DemoError(
                f"{method} {path} answered {resp.status} errno {answer.get('errno')}: {answer.get('error')}"
            )
        return answer

    async def post(self, path: str, body: Any) -> Any:
        return (await self.call("POST", path, body))["data"]

    async def get(self, path: str, **params: str) -> Any:
        return (await self.call("GET", path, params=params))["data"]

    async def new_key(self, venue: Venue, **options: Any) -> dict[str, Any]:
        """Fresh test keys from the simulator (its admin API answers the key material)."""
        async with self.http.post(f"{self.admin_url}/keys", json={"venue": venue.value, **options}) as resp:
            if resp.status != 201:
                raise DemoError(f"the simulator refused a test key: {await resp.text()}")
            key: dict[str, Any] = await resp.json()
            return key

    async def wait_for(self, credential_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            cred: dict[str, Any] = await self.get("/api/v3/credential/get", credentialId=credential_id)
            if done(cred):
                return cred
            if time.monotonic() > deadline:
                raise DemoError(f"credential {credential_id} still {cred['status']} after {WAIT:g}s")
            await asyncio.sleep(0.2)


@dataclass
class Receiver:
    """A webhook consumer: verifies every request with the endpoint's secret, prints each event once."""

    secrets: list[str] = field(default_factory=list, repr=False)  # the endpoints' signing secrets
    events: list[Event] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await webhooks.aiohttp_handler(self.secrets, self.on_event)(request)

        app = web.Application()
        app.router.add_post("/webhooks", handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[-1][1]}/webhooks"

    async def on_event(self, event: Event) -> None:
        self.events.append(event)
        cred = event.data.get("credential") or {}
        extra = event.data.get("reason") or (event.data.get("tradingAccount") or {}).get("accountType") or ""
        print(
            f"    <- webhook {event.type:<33} {cred.get('venue', ''):<9} {cred.get('status', ''):<9} "
            f"seq {event.sequence:<3} signature ok {extra}",
            flush=True,
        )

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def step(number: int, title: str) -> None:
    print(f"\n== {number}. {title}", flush=True)


def show(cred: dict[str, Any]) -> None:
    ids = ",".join(cred["identities"]) or "-"
    reason = f"  reason={cred['failureReason']}" if cred.get("failureReason") else ""
    head = f"    {cred['venue']:<9} {cred['credentialId']}  {cred['status']:<8}"
    print(f"{head} key={cred['apiKey']:<12} identities={ids}{reason}")


def _account(account: dict[str, Any]) -> None:
    print(
        f"    {account['venue']:<9} account {account['tradingAccountId']} {account['accountType']} {account['status']}"
    )


async def lifecycle(client: Client, receiver: Receiver) -> None:
    """The narrated walk through every operation."""
    step(1, "a webhook endpoint for our receiver (Standard Webhooks signatures)")
    endpoint = await client.post("/api/v3/webhook/create", {"url": receiver.url, "description": "make demo"})
    receiver.secrets.append(endpoint["secret"])
    print(f"    endpoint {endpoint['endpointId']} -> {receiver.url} (secret whsec_... kept by the receiver)")
    try:
        await _credentials(client, receiver)
    finally:
        await client.post("/api/v3/webhook/delete", {"endpointId": endpoint["endpointId"]})


async def _credentials(client: Client, receiver: Receiver) -> None:
    step(2, "create a credential for each venue (docs/api-dialect.md §4): PENDING, verification enqueued")
    created: dict[Venue, tuple[dict[str, Any], dict[str, Any]]] = {}
    for venue in Venue:
        key = await client.new_key(venue, label="make-demo")
        body = {"venue": venue.value, "credentialType": "EXCHANGE", "apiKey": key["api_key"],
                "apiSecret": key["api_secret"], "nickname": f"demo {venue.value.title()}"}  # fmt: skip
        if key.get("api_passphrase"):
            body["apiPassphrase"] = key["api_passphrase"]
        cred = await client.post("/api/v3/credential/create", body)
        created[venue] = (cred, key)
        show(cred)

    step(3, "verify: the workers probe each exchange (signed requests, permissions, accounts)")
    binance, binance_key = created[Venue.BINANCE]
    await client.post("/api/v3/credential/verify", {"credentialId": binance["credentialId"]})
    for cred, _ in created.values():
        show(await client.wait_for(cred["credentialId"], lambda c: c["status"] != "PENDING"))

    step(4, "a key that can withdraw: the policy refuses it (the best practices of docs/api-dialect.md §10)")
    risky = await client.new_key(Venue.BYBIT, withdraw=True, label="make-demo")
    body = {
        "venue": "BYBIT",
        "apiKey": risky["api_key"],
        "apiSecret": risky["api_secret"],
        "name": "withdraw-enabled",
    }
    bad = await client.post("/api/v3/credential/create", body)
    show(await client.wait_for(bad["credentialId"], lambda c: c["status"] != "PENDING"))

    step(5, "list VERIFIED credentials (docs/api-dialect.md §6)")
    answer = await client.call("GET", "/api/v3/credential/list", params={"credentialStatus": "VERIFIED"})
    for cred in answer["data"]:
        show(cred)
    print(f"    pagination {answer['pagination']}")

    step(
        6,
        "connect trading accounts (docs/api-dialect.md §8): from a verified credential, and in one call from keys",
    )
    spot = await client.post(
        "/api/v3/tradingAccount/connect",
        {"credentialId": binance["credentialId"], "accountType": "SPOT", "name": "Binance spot desk"},
    )
    _account(spot)
    exchange_key = await client.new_key(Venue.COINBASE, kind="exchange", label="make-demo")
    coinbase = await client.post(
        "/api/v3/tradingAccount/connect",
        {"venue": "COINBASE", "apiKey": exchange_key["api_key"], "apiSecret": exchange_key["api_secret"],
         "apiPassphrase": exchange_key["api_passphrase"], "name": "My Coinbase Account"},
    )  # fmt: skip
    _account(coinbase)

    step(7, "rotate the Binance keys: staged until the new keys verify on the same account")
    newer = await client.new_key(Venue.BINANCE, uid=binance_key["uid"], label="make-demo-rotation")
    staged = await client.post(
        "/api/v3/credential/rotate",
        {
            "credentialId": binance["credentialId"],
            "apiKey": newer["api_key"],
            "apiSecret": newer["api_secret"],
        },
    )
    print(
        f"    staged: key {staged['apiKey']} -> {staged['pendingRotation']['apiKey']} (old keys still in use)"
    )
    rotated = await client.wait_for(binance["credentialId"], lambda c: c["pendingRotation"] is None)
    if rotated["secretVersion"] < 2:
        raise DemoError("the rotation was not promoted")
    print(f"    promoted: key {rotated['apiKey']}, secret version {rotated['secretVersion']}, account kept")

    step(8, "revoke it: keys destroyed, its trading account disconnected")
    revoked = await client.post("/api/v3/credential/revoke", {"credentialId": binance["credentialId"]})
    show(revoked)
    account = await client.get("/api/v3/tradingAccount/get", tradingAccountId=spot["tradingAccountId"])
    print(f"    account {account['tradingAccountId']} is now {account['status']}")

    step(9, "webhooks received")
    await _wait_for_event(receiver, "credential.revoked", binance["credentialId"])
    deliveries = await client.call("GET", "/api/v3/webhook/delivery/list", params={"limit": "1"})
    print(f"    {len(receiver.events)} events received, every signature verified; "
          f"{deliveries['pagination']['total']} deliveries recorded")  # fmt: skip


async def _wait_for_event(receiver: Receiver, event_type: str, credential_id: str) -> None:
    deadline = time.monotonic() + WAIT
    while not any(e.type == event_type and str(e.credential_id) == credential_id for e in receiver.events):
        if time.monotonic() > deadline:
            raise DemoError(f"no {event_type} webhook within {WAIT:g}s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def target(args: argparse.Namespace) -> AsyncIterator[tuple[str, str, str]]:
    """(API URL, token, simulator admin URL): given, a running sandbox's, or a sandbox of our own."""
    if args.url:
        if not (args.token and args.admin_url):
            raise DemoError("--url needs --token and --admin-url (the simulator's admin API)")
        yield args.url, args.token, args.admin_url
        return
    info = sandbox.read_info()
    if info is not None and await _answers(info["url"]):
        print(f"using the running sandbox at {info['url']}")
        yield info["url"], info["token"], info["admin"]
        return
    print("starting a sandbox (simulator, engine, API) for the demo ...", flush=True)
    config = EngineConfig.from_env()
    async with sandbox.running(
        config, port=args.port, database="credential_engine_demo", write_info=False
    ) as live:
        print(f"sandbox API at {live.url}")
        yield live.url, live.token, live.admin_url


async def _answers(url: str) -> bool:
    """Whether a server answers /healthz there (a sandbox.json may outlive a killed process)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http,
            http.get(f"{url}/healthz") as resp,
        ):
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def run(args: argparse.Namespace) -> int:
    async with target(args) as (url, token, admin_url), aiohttp.ClientSession() as http:
        receiver = Receiver()
        await receiver.start()
        try:
            await lifecycle(Client(http, url.rstrip("/"), token, admin_url.rstrip("/")), receiver)
        finally:
            await receiver.close()
    print("\ndemo finished: every step succeeded")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.cli.demo", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--url", help="a running API (default: the running sandbox, else one started here)")
    parser.add_argument("--token", help="a bearer token for --url")
    parser.add_argument("--admin-url", help="the simulator's admin API for --url")
    parser.add_argument(
        "--port", type=int, default=0, help="port of the demo's own sandbox API (0: any free one)"
    )
    args = parser.parse_args(argv)
    logs.configure_logging("WARNING")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except (DemoError, aiohttp.ClientError, OSError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except errors.CredentialEngineError as exc:  # the sandbox could not start (database, configuration)
        print(f"demo failed: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
