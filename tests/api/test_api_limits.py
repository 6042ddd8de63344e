"""Rate limits and quotas over HTTP (engine/api/limits.py, engine/bounds/quotas.py): 429 with Retry-After in the
envelope, per owner and per client address, refill on an injected clock, shared by two API processes on one
database; quota refusals with their documented status and errno."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from conftest import OWNER, Api, Reply

from engine import CredentialEngine, errors
from engine.api import ApiConfig, ApiServer
from engine.api.limits import LIMITER, RateLimiter, RateLimits, parse_networks
from engine.config import Quotas

LIST = "/api/v3/credential/list"
CREATE = "/api/v3/credential/create"


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


Served = tuple[Api, RateLimiter]
Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(jwt_secret: str) -> AsyncIterator[Serve]:
    """Start an API server for an engine with these rate limits; its limiter runs on ``clock``."""
    servers: list[ApiServer] = []
    async with aiohttp.ClientSession() as session:

        async def start(engine: CredentialEngine, clock: Clock | None = None, **limits: Any) -> Served:
            server = ApiServer(
                engine, ApiConfig(jwt_secret=jwt_secret, port=0, rate_limits=RateLimits(**limits))
            )
            await server.start()
            servers.append(server)
            limiter = server.app[LIMITER]
            if clock is not None:
                limiter.clock = clock
            return Api(session, server.url, jwt_secret), limiter

        yield start
        for server in servers:
            await server.close()


def assert_rate_limited(reply: Reply, retry_after: int) -> None:
    assert reply.status == 429, (reply.status, reply.text)
    assert reply.body["errno"] == errors.RateLimited.errno == -100014
    assert reply.body["success"] is False and reply.body["data"] is None
    assert "too many requests" in reply.body["error"]
    assert reply.headers["Retry-After"] == str(retry_after)
    assert reply.headers["X-Request-Id"]


async def test_a_burst_beyond_the_owner_limit_is_refused_and_refills(
    eng: CredentialEngine, serve: Serve, create_body: Callable[..., Any]
) -> None:
    """Burst 5 at 1 request/s: the 6th request at once answers 429 with Retry-After: 1 in the envelope and is
    not executed (nothing is stored); another owner is unaffected; one second later one more request passes;
    after a long pause the bucket holds the burst again, not more."""
    clock = Clock()
    api, _ = await serve(eng, clock, owner_rate=1.0, owner_burst=5.0)
    for _ in range(5):
        assert (await api.get(LIST)).status == 200
    assert_rate_limited(await api.post(CREATE, create_body()), retry_after=1)
    assert (await api.get(LIST, owner="owner-2")).status == 200  # its own bucket
    clock.now += 0.5
    assert_rate_limited(await api.get(LIST), retry_after=1)  # half a token is not a request
    clock.now += 0.5
    assert (await api.get(LIST)).status == 200
    assert_rate_limited(await api.get(LIST), retry_after=1)
    clock.now += 3600
    for _ in range(5):
        reply = await api.get(LIST)
        assert reply.status == 200
    assert reply.data == []  # the refused create stored nothing
    assert_rate_limited(await api.get(LIST), retry_after=1)


async def test_slow_rates_say_how_long_to_wait(eng: CredentialEngine, serve: Serve) -> None:
    """At 0.1 request/s an empty bucket answers Retry-After: 10, then fewer as the clock moves."""
    clock = Clock()
    api, _ = await serve(eng, clock, owner_rate=0.1, owner_burst=1.0)
    assert (await api.get(LIST)).status == 200
    assert_rate_limited(await api.get(LIST), retry_after=10)
    clock.now += 7.5
    assert_rate_limited(await api.get(LIST), retry_after=3)
    clock.now += 2.5
    assert (await api.get(LIST)).status == 200


async def test_requests_without_a_valid_token_are_limited_per_client_address(
    eng: CredentialEngine, serve: Serve
) -> None:
    """Missing or bad tokens, unknown routes and /openapi.json take the address's tokens (401 until the bucket
    is empty, then 429); an owner with a valid token from the same address is not affected; the probes and
    the metrics (/healthz, /readyz, /metrics) are never limited."""
    clock = Clock()
    api, _ = await serve(eng, clock, address_rate=1.0, address_burst=3.0)
    assert (await api.get(LIST, token=None)).status == 401
    assert (await api.get(LIST, token="not.a.jwt")).status == 401
    assert (await api.get("/api/v3/nothing-here", token=None)).status == 401
    assert_rate_limited(await api.get(LIST, token=None), retry_after=1)
    assert_rate_limited(await api.get("/openapi.json", token=None), retry_after=1)
    assert_rate_limited(await api.get("/no/such/route", token=None), retry_after=1)
    assert (await api.get(LIST)).status == 200
    for _ in range(30):
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await api.get(path, token=None)).status == 200, path
    clock.now += 1
    assert (await api.get("/openapi.json", token=None)).status == 200


async def test_forwarded_for_is_ignored_from_untrusted_peers(eng: CredentialEngine, serve: Serve) -> None:
    """Without trusted proxies X-Forwarded-For changes nothing: every request counts as the socket peer's."""
    clock = Clock()
    direct, _ = await serve(eng, clock, address_rate=1.0, address_burst=2.0)
    for n in range(2):
        assert (
            await direct.get(LIST, token=None, headers={"X-Forwarded-For": f"203.0.113.{n}"})
        ).status == 401
    assert_rate_limited(
        await direct.get(LIST, token=None, headers={"X-Forwarded-For": "203.0.113.9"}), retry_after=1
    )


async def test_forwarded_for_counts_behind_a_trusted_proxy(eng: CredentialEngine, serve: Serve) -> None:
    """From a trusted proxy the client is the right-most untrusted hop of X-Forwarded-For, so what a client
    writes to the left of it changes nothing, and two clients behind the proxy have their own buckets."""
    clock = Clock()
    proxied, _ = await serve(
        eng, clock, address_rate=1.0, address_burst=2.0, trusted_proxies=parse_networks("127.0.0.0/8, ::1")
    )
    for forwarded in ("203.0.113.1", "198.51.100.7, 203.0.113.1"):  # the left part is the client's to write
        assert (await proxied.get(LIST, token=None, headers={"X-Forwarded-For": forwarded})).status == 401
    assert_rate_limited(
        await proxied.get(LIST, token=None, headers={"X-Forwarded-For": "10.9.9.9, 203.0.113.1"}),
        retry_after=1,
    )
    assert (await proxied.get(LIST, token=None, headers={"X-Forwarded-For": "203.0.113.2"})).status == 401


async def test_two_api_processes_on_one_database_share_the_limit(make_engine: Any, serve: Serve) -> None:
    """Two API servers on two engines on one database: each counts the other in api_instances and keeps half
    of the burst, so an owner whose requests alternate between them gets the configured 10, not 20. When one
    stops, the other takes the whole limit again at its next heartbeat."""
    clock = Clock()
    first_engine = await make_engine()
    second_engine = await make_engine()
    first, first_limiter = await serve(first_engine, clock, owner_rate=0.01, owner_burst=10.0)
    second, second_limiter = await serve(second_engine, clock, owner_rate=0.01, owner_burst=10.0)
    assert first_limiter.membership is not None and second_limiter.membership is not None
    assert await first_limiter.membership.beat() == 2  # as its heartbeat would, a few seconds later
    assert second_limiter.processes == 2
    statuses = [(await api.get(LIST)).status for _ in range(10) for api in (first, second)]
    assert statuses.count(200) == 10 and statuses.count(429) == 10

    await second_limiter.membership.stop()  # the second process leaves (its row is deleted)
    assert await first_limiter.membership.beat() == 1
    accepted = [(await first.get(LIST, owner="owner-3")).status for _ in range(12)]
    assert accepted.count(200) == 10


async def test_quota_refusals_over_http(
    make_engine: Any, serve: Serve, create_body: Callable[..., Any]
) -> None:
    """A full count quota answers 409 errno -100015; a spent hourly verify quota answers 429 errno -100017 with
    Retry-After (the seconds until the oldest request of the hour leaves the window)."""
    eng = await make_engine(quotas=Quotas(credentials=1, webhook_endpoints=1, verify_requests_per_hour=2))
    api, _ = await serve(eng)
    created = (await api.post(CREATE, create_body())).data
    refused = await api.post(CREATE, create_body(apiKey="binance-key-0002", apiSecret="binance-secret-0002"))
    assert (refused.status, refused.body["errno"]) == (409, errors.QuotaExceeded.errno) == (409, -100015)
    assert refused.body["error"].startswith("credentials:")
    hook = {"url": "http://127.0.0.1:9/hooks"}
    assert (await api.post("/api/v3/webhook/create", hook)).status == 200
    refused = await api.post("/api/v3/webhook/create", hook)
    assert (refused.status, refused.body["errno"]) == (409, -100015)

    verify = {"credentialId": created["credentialId"]}
    for _ in range(2):
        assert (await api.post("/api/v3/credential/verify", verify)).status == 200
    spent = await api.post("/api/v3/credential/verify", verify)
    assert (spent.status, spent.body["errno"]) == (429, errors.RequestQuotaExceeded.errno) == (429, -100017)
    assert 3500 <= int(spent.headers["Retry-After"]) <= 3600
    assert spent.body["error"].startswith("verify_requests_per_hour:")
    assert OWNER not in spent.body["error"]
