"""A hostile tenant: one owner floods every endpoint while another owner's lifecycle runs beside it.

The attacker has a valid token and many concurrent clients. For a bounded time (and a bounded number of
requests, all to loopback) it calls every route of the REST API with a mix of valid and invalid requests:
creates with fresh and duplicate keys, reads of its own and of random ids, verify and rotate storms, connect and
disconnect (the already-disabled path too), revokes, webhook endpoints, broken JSON, unknown routes and
requests without a token. Meanwhile the victim runs whole lifecycles through the same API (create, wait for
VERIFIED, connect, staged rotation, disconnect, revoke) and a probe asks ``/readyz`` four times a second.

What must hold: the victim sees no 5xx and no timeout, every victim lifecycle ends as planned with all its
events; ``/readyz`` answers 200 throughout; the attacker gets no 500 (its excess is 429, its mistakes 4xx);
every create the attacker was told succeeded is stored; the database invariants hold. The figures (attacker
requests by class, victim latency) are printed in the reliability table.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
from reliability_support import WebhookReceiver

from engine import CredentialEngine
from engine.api import ApiConfig, ApiServer, auth
from engine.testing import FakeVenue, broken_invariants

ATTACKER, VICTIM = "owner-flood", "owner-calm"
CALL_TIMEOUT = 10.0  # a victim call that takes longer counts as a timeout (the test fails)


class Attacker:
    """Concurrent clients picking a random route for each request until the deadline or the request cap."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str, hooks: str, cap: int) -> None:
        self.session = session
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.hooks = hooks
        self.cap = cap
        self.sent = 0
        self.statuses: Counter[int] = Counter()
        self.server_errors: list[str] = []
        self.created: set[uuid.UUID] = set()
        self.accounts: list[str] = []
        self.endpoints: list[str] = []
        self.rng = random.Random(7)  # a reproducible mix, not a secret

    def _credential(self) -> str:
        if self.created and self.rng.random() < 0.8:
            return str(self.rng.choice(sorted(self.created)))
        return str(uuid.uuid4())

    def _request(self) -> tuple[str, str, Any, dict[str, str] | None, bool]:
        """(method, path, json body or raw text, query, send the token)."""
        n = self.rng.randrange(100)
        key = f"flood-key-{self.rng.randrange(400):04d}"
        if n < 14:
            body = {"venue": "BINANCE", "apiKey": key, "apiSecret": "flood-secret-" + key[-4:]}
            return "POST", "/api/v3/credential/create", body, None, True
        if n < 24:
            return "GET", "/api/v3/credential/list", None, {"limit": "100"}, True
        if n < 32:
            return "GET", "/api/v3/credential/get", None, {"credentialId": self._credential()}, True
        if n < 42:
            return "POST", "/api/v3/credential/verify", {"credentialId": self._credential()}, None, True
        if n < 48:
            body = {
                "credentialId": self._credential(),
                "apiKey": key,
                "apiSecret": "flood-secret-" + key[-4:],
            }
            return "POST", "/api/v3/credential/rotate", body, None, True
        if n < 56:
            body = {"credentialId": self._credential(), "accountType": "spot"}
            return "POST", "/api/v3/tradingAccount/connect", body, None, True
        if n < 66:
            account = self.rng.choice(self.accounts) if self.accounts else str(uuid.uuid4())
            return "POST", "/api/v3/tradingAccount/disconnect", {"tradingAccountId": account}, None, True
        if n < 70:
            return "GET", "/api/v3/tradingAccount/list", None, None, True
        if n < 74:
            return "POST", "/api/v3/credential/revoke", {"credentialId": self._credential()}, None, True
        if n < 78:
            body = {"url": f"{self.hooks}/flood/{self.rng.randrange(1000)}"}
            return "POST", "/api/v3/webhook/create", body, None, True
        if n < 82:
            return "GET", "/api/v3/webhook/list", None, None, True
        if n < 85:
            endpoint = self.rng.choice(self.endpoints) if self.endpoints else str(uuid.uuid4())
            return "POST", "/api/v3/webhook/delete", {"endpointId": endpoint}, None, True
        if n < 90:
            return "POST", "/api/v3/credential/create", "{not json", None, True
        if n < 94:
            return "GET", "/api/v3/nowhere", None, None, True
        return "GET", "/api/v3/credential/list", None, None, False  # no token: the address's bucket

    async def client(self, deadline: float) -> None:
        while time.monotonic() < deadline and self.sent < self.cap:
            self.sent += 1
            method, path, body, query, with_token = self._request()
            headers = dict(self.headers) if with_token else {}
            data = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
            if data is not None:
                headers["Content-Type"] = "application/json"
            try:
                async with self.session.request(
                    method, self.url + path, data=data, params=query, headers=headers
                ) as resp:
                    text = await resp.text()
                    self.statuses[resp.status] += 1
                    if resp.status >= 500 and resp.status != 503:
                        self.server_errors.append(f"{resp.status} {method} {path}: {text[:200]}")
                    if resp.status == 200:
                        self._remember(path, json.loads(text)["data"])
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.server_errors.append(f"{type(exc).__name__} {method} {path}")

    def _remember(self, path: str, data: Any) -> None:
        if path == "/api/v3/credential/create":
            self.created.add(uuid.UUID(data["credentialId"]))
            self.sent_creates_ok = getattr(self, "sent_creates_ok", 0) + 1
        elif path == "/api/v3/tradingAccount/connect":
            self.accounts.append(data["tradingAccountId"])
        elif path == "/api/v3/webhook/create":
            self.endpoints.append(data["endpointId"])


class Victim:
    """Whole lifecycles through the API, one call at a time, every call timed."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.session = session
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.done: list[uuid.UUID] = []

    async def call(self, method: str, path: str, body: Any = None, query: Any = None) -> Any:
        started = time.monotonic()
        try:
            async with self.session.request(
                method,
                self.url + path,
                data=json.dumps(body) if body is not None else None,
                params=query,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.failures.append(f"{type(exc).__name__} {method} {path}")
            raise
        finally:
            self.latencies.append(time.monotonic() - started)
        if status != 200:
            self.failures.append(f"{status} {method} {path}: {text[:200]}")
            raise AssertionError(self.failures[-1])
        return json.loads(text)["data"]

    async def wait(self, cid: str, check: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            cred: dict[str, Any] = await self.call(
                "GET", "/api/v3/credential/get", query={"credentialId": cid}
            )
            if check(cred):
                return cred
            assert time.monotonic() < deadline, f"victim credential stuck: {cred['status']}"
            await asyncio.sleep(0.05)

    async def lifecycle(self, n: int) -> None:
        key, new_key = f"calm-key-{n:03d}", f"calm-key-{n:03d}-r"
        body = {"venue": "BINANCE", "apiKey": key, "apiSecret": "calm-secret", "nickname": f"calm {n}"}
        cid = (await self.call("POST", "/api/v3/credential/create", body))["credentialId"]
        await self.wait(cid, lambda c: c["status"] == "VERIFIED")
        account = await self.call(
            "POST", "/api/v3/tradingAccount/connect", {"credentialId": cid, "accountType": "spot"}
        )
        rotate = {"credentialId": cid, "apiKey": new_key, "apiSecret": "calm-secret-r"}
        await self.call("POST", "/api/v3/credential/rotate", rotate)
        await self.wait(cid, lambda c: c["status"] == "VERIFIED" and c.get("pendingRotation") is None)
        await self.call(
            "POST", "/api/v3/tradingAccount/disconnect", {"tradingAccountId": account["tradingAccountId"]}
        )
        await self.call("POST", "/api/v3/credential/revoke", {"credentialId": cid})
        self.done.append(uuid.UUID(cid))


async def test_a_flooding_owner_cannot_hurt_another(
    make_engine: Any, fake: FakeVenue, size: Any, report: Any
) -> None:
    lifecycles = size(3, 12)
    seconds = size(6.0, 40.0)
    for i in range(400):
        fake.add_key(f"flood-key-{i:04d}", f"flood-secret-{i:04d}", account_id=f"flood-uid-{i}", delay=0.02)
    for n in range(lifecycles):
        fake.add_key(f"calm-key-{n:03d}", "calm-secret", account_id=f"calm-uid-{n}", delay=0.02)
        fake.add_key(f"calm-key-{n:03d}-r", "calm-secret-r", account_id=f"calm-uid-{n}", delay=0.02)
    eng: CredentialEngine = await make_engine(workers=8)
    secret = auth.generate_secret()
    server = ApiServer(eng, ApiConfig(jwt_secret=secret, port=0))
    hooks = WebhookReceiver()
    await hooks.start()
    await server.start()
    ready: Counter[int] = Counter()
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            attacker = Attacker(
                session, server.url, auth.mint_token(secret, ATTACKER), hooks.url, cap=size(30_000, 200_000)
            )
            victim = Victim(session, server.url, auth.mint_token(secret, VICTIM))
            started = time.monotonic()
            deadline = started + seconds
            stop = asyncio.Event()

            async def probe_readiness() -> None:
                while not stop.is_set():
                    try:
                        async with session.get(
                            server.url + "/readyz", timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)
                        ) as resp:
                            ready[resp.status] += 1
                    except (TimeoutError, aiohttp.ClientError):
                        ready[0] += 1
                    await asyncio.sleep(0.25)

            async def victim_runs() -> None:
                await asyncio.sleep(0.5)  # the flood is under way first
                for n in range(lifecycles):
                    await victim.lifecycle(n)

            flood = [asyncio.create_task(attacker.client(deadline)) for _ in range(48)]
            prober = asyncio.create_task(probe_readiness())
            try:
                await asyncio.wait_for(victim_runs(), timeout=seconds + 120)
            finally:
                await asyncio.wait_for(asyncio.gather(*flood), timeout=120)
                stop.set()
                await prober
            elapsed = time.monotonic() - started
    finally:
        await server.close()
        await hooks.close()

    assert victim.failures == []
    assert attacker.server_errors == [], attacker.server_errors[:5]
    assert set(ready) == {200}, ready
    assert len(victim.done) == lifecycles
    for cid in victim.done:
        kinds = [e.type for e in await eng.list_events(VICTIM, cid)]
        assert kinds == [
            "credential.created",
            "credential.verified",
            "trading_account.connected",
            "credential.rotation_started",
            "credential.rotated",
            "trading_account.disconnected",
            "credential.revoked",
        ], kinds
    for cid in attacker.created:  # every create the attacker was told succeeded is stored
        await eng.get_credential(ATTACKER, cid)
    assert await broken_invariants(eng) == {}
    assert attacker.statuses[429] > 0, "the flood never reached the rate limit: the test proves nothing"
    lat = sorted(victim.latencies)
    report(
        "hostile tenant",
        seconds=elapsed,
        attacker_requests=attacker.sent,
        attacker_2xx=sum(v for k, v in attacker.statuses.items() if 200 <= k < 300),
        attacker_429=attacker.statuses[429],
        attacker_other_4xx=sum(v for k, v in attacker.statuses.items() if 400 <= k < 500 and k != 429),
        attacker_503=attacker.statuses[503],
        victim_lifecycles=len(victim.done),
        victim_calls=len(lat),
        victim_p50_ms=1000 * lat[len(lat) // 2],
        victim_p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        victim_max_ms=1000 * lat[-1],
        readyz_checks=sum(ready.values()),
    )
