"""The REST API's rate limits: a token bucket per owner, and per client address for requests without a valid
token, so one tenant (or one anonymous flooder) cannot take the service from the others.

**What is limited.** Every ``/api/...`` request with a valid bearer token takes a token from its owner's bucket
(the token's ``sub``; ``RateLimits.owner_rate`` per second, ``owner_burst`` at most). Every other request takes
one from its client address's bucket (``address_rate``, ``address_burst``): ``/api/...`` requests whose token
is missing or does not verify (so guessing tokens is slow), unknown routes and ``/openapi.json``. An empty
bucket answers 429 :class:`errors.RateLimited` (errno -100014) in the envelope, with ``Retry-After`` (whole
seconds until a token is back), before the body is read or the database touched. The operator routes
``/healthz``, ``/readyz`` and ``/metrics`` are exempt: a 429 on a probe takes a healthy process out of rotation
(or restarts it), so one flooder could turn a limit into an outage; they are kept cheap instead (``/metrics``
reads its database counts through a shared cache, :mod:`engine.api.ops`). Keep them off the public network.

**The client address** is the socket peer. ``X-Forwarded-For`` is read only when the peer is one of
``RateLimits.trusted_proxies``: then the client is the right-most address of the header that is not a trusted
proxy (the left part of the header is whatever the client sent). IPv6 clients are bucketed by their /64 (one
host usually holds a whole /64); IPv4-mapped IPv6 peers count as their IPv4 address.

**Several processes.** The settings are totals for the whole service. Each ``serve`` process records itself in
``api_instances`` every ``instance_heartbeat`` seconds and divides rate and burst by the number of live
processes (rows refreshed within three heartbeats). Sharing the buckets through PostgreSQL instead would cost
a database write per request, 429s included, so a flood would land on the database that the limits are there
to protect; dividing costs one query per process every few seconds and refuses in memory. The price: the
total is exact when the load balancer spreads an owner's requests evenly (round robin, least connections);
a client pinned to one process gets its share of that process only (1/N of the limit), and for up to three
heartbeats after a process starts or stops the total can be off by one process's share.

**Bounded memory.** Each kind of bucket (owners, addresses) keeps at most ``max_keys`` buckets, least recently
used first out; a bucket that has refilled is the same as no bucket and is dropped as soon as it reaches the
old end. A flood of distinct addresses therefore costs a bounded table, and it can only evict other buckets
(giving them a fresh burst), never grow memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import structlog
from aiohttp import web

from engine import environment, errors
from engine.api import http, jwks

if TYPE_CHECKING:
    from engine.engine import CredentialEngine

log = structlog.get_logger("engine.api")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Clock = Callable[[], float]

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
IPV6_PREFIX = 64  # IPv6 clients are bucketed by this prefix
LIVE_BEATS = 3  # a process is counted while its row is younger than this many heartbeats


@dataclass(frozen=True, kw_only=True)
class RateLimits:
    """Rate limit settings (totals for the whole service, see the module docstring). A rate of 0 turns that
    kind of limit off."""

    owner_rate: float = 20.0  # requests per second per owner, sustained
    owner_burst: float = 100.0  # requests an idle owner may send at once
    address_rate: float = 5.0  # requests per second per client address without a valid token
    address_burst: float = 20.0
    trusted_proxies: tuple[Network, ...] = ()
    max_keys: int = 50_000  # buckets kept per kind (owners, addresses)
    instance_heartbeat: float = 5.0  # seconds between this process's registry refreshes

    ENV: ClassVar[environment.Section] = environment.Section(
        prefix="ENGINE_API_",
        names={
            "owner_rate": "ENGINE_API_RATE_LIMIT",
            "owner_burst": "ENGINE_API_RATE_BURST",
            "address_rate": "ENGINE_API_ADDRESS_RATE_LIMIT",
            "address_burst": "ENGINE_API_ADDRESS_RATE_BURST",
            "max_keys": "ENGINE_API_RATE_LIMIT_KEYS",
        },
        bounds={"max_keys": environment.Bound(minimum=1), "instance_heartbeat": environment.POSITIVE},
    )

    def __post_init__(self) -> None:
        for rate, burst, name in (
            (self.owner_rate, self.owner_burst, "owner"),
            (self.address_rate, self.address_burst, "address"),
        ):
            if not (math.isfinite(rate) and rate >= 0):
                raise errors.ConfigurationError(
                    f"{name}_rate must be >= 0 (0: no limit)", field=f"{name}_rate"
                )
            if rate and not (math.isfinite(burst) and burst >= 1):
                raise errors.ConfigurationError(f"{name}_burst must be >= 1", field=f"{name}_burst")
        if self.max_keys < 1:
            raise errors.ConfigurationError("max_keys must be >= 1", field="max_keys")
        if not self.instance_heartbeat > 0:
            raise errors.ConfigurationError("instance_heartbeat must be positive", field="instance_heartbeat")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RateLimits:
        """``ENGINE_API_RATE_LIMIT``, ``ENGINE_API_RATE_BURST``, ``ENGINE_API_ADDRESS_RATE_LIMIT``,
        ``ENGINE_API_ADDRESS_RATE_BURST``, ``ENGINE_API_RATE_LIMIT_KEYS``, ``ENGINE_API_TRUSTED_PROXIES``
        (comma-separated addresses or CIDR networks), ``ENGINE_API_INSTANCE_HEARTBEAT`` (``ENV``)."""
        return environment.build(cls, environment.settings_view(env))


def parse_networks(spec: str, *, setting: str = "ENGINE_API_TRUSTED_PROXIES") -> tuple[Network, ...]:
    """``"10.0.0.0/8, 192.0.2.7, fd00::/8"`` -> networks (a bare address is a /32 or /128)."""
    networks = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise errors.ConfigurationError(
                f"{setting} holds addresses or CIDR networks separated by commas", field=setting
            ) from None
    return tuple(networks)


# ---- token buckets ------------------------------------------------------------------------------------------


class TokenBuckets:
    """Token buckets by key, at most ``max_keys`` of them (least recently used dropped first).

    A bucket is ``[tokens, stamp]``: the tokens it held at ``stamp`` (``clock()`` seconds). It refills at
    ``rate`` per second up to ``burst``; an absent bucket is a full one.
    """

    def __init__(self, max_keys: int, clock: Clock = time.monotonic) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, rate: float, burst: float) -> float:
        """Take one token from ``key``'s bucket: 0.0 when there was one, else the seconds until there is."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now, rate, burst)
            bucket = self._buckets[key] = [burst, now]
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(burst, bucket[0] + max(0.0, now - bucket[1]) * rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            self._drop_refilled(now, rate, burst)
            return 0.0
        return (1.0 - bucket[0]) / rate

    def _make_room(self, now: float, rate: float, burst: float) -> None:
        self._drop_refilled(now, rate, burst)
        while len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)

    def _drop_refilled(self, now: float, rate: float, burst: float, most: int = 2) -> None:
        """Forget up to ``most`` buckets at the old end that have refilled (they equal absent ones)."""
        for _ in range(most):
            oldest = next(iter(self._buckets.values()), None)
            if oldest is None or oldest[0] + (now - oldest[1]) * rate < burst:
                return
            self._buckets.popitem(last=False)


# ---- the live process count ---------------------------------------------------------------------------------


class Membership:
    """This process's row in ``api_instances``: refreshed every ``interval`` seconds by a background task,
    which also learns how many API processes are live (``count``, 1 until the first answer)."""

    def __init__(self, engine: CredentialEngine, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self.instance_id = f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.count = 1
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def beat(self) -> int:
        """Refresh this process's row and count the live ones now (also run by tests instead of waiting)."""
        window = self.interval * LIVE_BEATS
        try:
            async with asyncio.timeout(self.interval):
                others = await self.engine.db.fetchval("api_instance_beat", self.instance_id, window)
        except (errors.StorageError, errors.EngineClosed, TimeoutError) as exc:
            if not self._failing:  # once per outage: the last count stays in force meanwhile
                log.warning("api_instances_unavailable", error=type(exc).__name__, processes=self.count)
            self._failing = True
            return self.count
        self._failing = False
        self.count = 1 + int(others)
        return self.count

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="api-instance-heartbeat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(errors.StorageError, errors.EngineClosed, TimeoutError):
            async with asyncio.timeout(self.interval):
                await self.engine.db.execute("api_instance_gone", self.instance_id)


# ---- the limiter --------------------------------------------------------------------------------------------


@dataclass
class RateLimiter:
    """Both kinds of buckets of one API process, with their share of the service-wide settings."""

    settings: RateLimits
    membership: Membership | None = None
    clock: Clock = time.monotonic
    owners: TokenBuckets = field(init=False)
    addresses: TokenBuckets = field(init=False)

    def __post_init__(self) -> None:
        self.owners = TokenBuckets(self.settings.max_keys, self._now)
        self.addresses = TokenBuckets(self.settings.max_keys, self._now)

    def _now(self) -> float:
        return self.clock()

    @property
    def processes(self) -> int:
        return max(1, self.membership.count) if self.membership is not None else 1

    def check_owner(self, owner: str) -> None:
        """:class:`errors.RateLimited` when ``owner`` has no token left in this process."""
        self._take(self.owners, owner, self.settings.owner_rate, self.settings.owner_burst, "this owner")

    def check_address(self, address: str) -> None:
        """:class:`errors.RateLimited` when the client address has no token left in this process."""
        rate, burst = self.settings.address_rate, self.settings.address_burst
        self._take(self.addresses, address, rate, burst, "this client address")

    def _take(self, buckets: TokenBuckets, key: str, rate: float, burst: float, who: str) -> None:
        if not rate:
            return
        share = self.processes
        wait = buckets.take(key, rate / share, max(1.0, burst / share))
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise errors.RateLimited(
                f"too many requests from {who} (limit {rate:g} per second, bursts of {burst:g}); "
                f"retry after {retry_after} s",
                retry_after=retry_after,
            )


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The bucket key of a client: its address (IPv6: its /64), from ``X-Forwarded-For`` only through
    trusted proxies (module docstring). ``peer`` is the socket peer's address (None or "" for a Unix socket)."""
    ip = _ip(peer)
    if ip is None:
        return "local"
    if trusted and _trusted(ip, trusted):
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            address = _ip(hop)
            if address is None:
                break  # junk the client wrote: the last trusted proxy is the best we know
            ip = address
            if not _trusted(address, trusted):
                break
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    value = text.strip()
    if value.startswith("["):  # "[2001:db8::1]:443"
        value = value[1 : value.find("]")] if "]" in value else value
    elif value.count(":") == 1:  # "192.0.2.1:443"
        value = value.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: tuple[Network, ...]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


# ---- the middleware -----------------------------------------------------------------------------------------

LIMITER: web.AppKey[RateLimiter] = web.AppKey("rate_limiter", RateLimiter)


def install(app: web.Application, engine: CredentialEngine, settings: RateLimits) -> RateLimiter:
    """Put a limiter on ``app`` (:data:`LIMITER`) whose process registry runs while the app runs."""
    membership = Membership(engine, settings.instance_heartbeat)
    limiter = RateLimiter(settings, membership)
    app[LIMITER] = limiter

    async def started(_app: web.Application) -> None:
        await membership.start()

    async def stopped(_app: web.Application) -> None:
        await membership.stop()

    app.on_startup.append(started)
    app.on_cleanup.append(stopped)
    return limiter


def _peer(request: web.Request) -> str | None:
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peername, tuple | list) and peername:
        return str(peername[0])
    return None


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: http.Handler) -> web.StreamResponse:
    """Between the envelope and auth middlewares: authenticates ``/api/...`` requests itself (so the owner is
    known before anything else runs) and takes their token; everything else but the operator routes takes a
    token of its client address."""
    limiter = request.app[LIMITER]
    if request.path.startswith("/api/"):
        try:
            owner = await http.authenticate(request)
        except (errors.Unauthorized, jwks.IdentityProviderUnavailable):
            # a 429 replaces the 401 (or the 503 of an unreachable identity provider) once over the limit
            limiter.check_address(_address(request, limiter))
            raise
        limiter.check_owner(owner)
    elif request.path not in EXEMPT_PATHS:
        limiter.check_address(_address(request, limiter))
    return await handler(request)


def _address(request: web.Request, limiter: RateLimiter) -> str:
    trusted = limiter.settings.trusted_proxies
    forwarded = request.headers.getall("X-Forwarded-For", ()) if trusted else ()
    return client_address(_peer(request), forwarded, trusted)
