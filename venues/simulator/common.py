"""What every simulated venue shares: the simulator state, the request pipeline, small answer helpers.

The pipeline of one request (:meth:`VenueServer.app`'s middleware), in order:

1. count it (per venue, and per claimed API key for the 1 s burst statistic);
2. sleep the venue's fault ``latency``;
3. check the venue's documented rate limits; when exceeded, record a violation and (if enforced) answer
   the venue's rate-limit error;
4. maybe inject a fault (``error_rate``); a ``timeout`` fault hangs, then the request goes on;
5. run the endpoint handler, which authenticates exactly as the venue does and raises :class:`Reject`
   with the venue's documented error answer when something is wrong.

Logging: one debug line per request with venue, method, path (never the query string: Binance signs in
it), the masked API key, status and duration. aiohttp's access log is off for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import ipaddress
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from aiohttp import web

from venues.base import Venue, mask_api_key
from venues.simulator import faults, masters, ratelimit, registry, signlog, stats, trading

log = logging.getLogger("venues.simulator")

AUTHENTICATED = web.RequestKey("simulator.authenticated", str)  # the API key the venue authenticated
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# one encoder for every answer: json.dumps builds a new JSONEncoder per call when given separators
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_NO_HEADERS: Mapping[str, str] = {}


class State:
    """Everything the venue servers of one simulator share. No I/O."""

    def __init__(self, *, seed: int | None, enforce_rate_limits: bool) -> None:
        self.registry = registry.Registry()
        self.sub_accounts = masters.SubAccounts()
        self.rng = random.Random(seed)
        self.enforce_rate_limits = enforce_rate_limits
        self.clock_offsets: dict[Venue, int] = {}
        self.faults: dict[Venue, faults.Faults] = {}
        self.limits = ratelimit.RateLimits()
        self.stats = {venue: stats.StatsRecorder(venue) for venue in Venue}
        self.closing = asyncio.Event()  # set by close(): hanging "timeout" faults end at once
        self.book = trading.Book()
        self.signing_log = signlog.SigningLog()

    def now_ms(self, venue: Venue) -> int:
        """The venue's clock: our clock shifted by the venue's configured offset."""
        return int(time.time() * 1000) + self.clock_offsets.get(venue, 0)


class Reject(Exception):
    """An endpoint refuses the request with ``response`` (the venue's documented error answer).

    ``auth`` marks authentication failures (key, signature, passphrase, timestamp, nonce, IP, expiry), which
    the stats count; a permission refusal on an identity endpoint is not one.
    """

    def __init__(self, response: web.Response, *, auth: bool = True) -> None:
        super().__init__(f"HTTP {response.status}")
        self.response = response
        self.auth = auth


def answer(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A compact JSON answer, as the venues send them."""
    return web.Response(
        status=status,
        text=_ENCODER.encode(body),
        content_type="application/json",
        headers=dict(headers or _NO_HEADERS),
    )


def truncated(body: str) -> web.Response:
    """The ``malformed`` fault: HTTP 200 whose JSON body stops half-way."""
    return web.Response(status=200, text=body[: max(1, len(body) // 2)], content_type="application/json")


@functools.lru_cache(maxsize=64)
def _iso_second(seconds: int) -> str:
    """``2020-12-08T09:08:57`` for whole seconds since the epoch (a clock asks for the same second often)."""
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_ms(ms: int) -> str:
    """``2020-12-08T09:08:57.715Z`` for a time in ms."""
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


def iso_seconds(ms: int) -> str:
    """``2023-07-06T10:30:03Z`` for a time in ms."""
    return _iso_second(ms // 1000) + "Z"


@functools.lru_cache(maxsize=8192)
def stable_uuid(name: str) -> uuid.UUID:
    """``uuid5(NAMESPACE_URL, name)``: the simulator's stable ids of accounts and users, worked out once."""
    return uuid.uuid5(uuid.NAMESPACE_URL, name)


def client_ip(request: web.Request) -> str:
    return request.remote or ""


@functools.lru_cache(maxsize=1024)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The caller's address parsed (None: not an address); callers come from a few addresses."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _networks(allowlist: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A key's allow-list parsed once (single IPs or CIDRs; host bits set are allowed)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in allowlist)


def ip_allowed(key: registry.TestKey, request: web.Request) -> bool:
    """True when the key has no allow-list or the caller's address is on it (single IPs or CIDRs)."""
    if not key.ip_allowlist:
        return True
    address = _address(client_ip(request))
    if address is None:
        return False
    return any(address in network for network in _networks(tuple(key.ip_allowlist)))


class VenueServer:
    """The server side of one venue. Subclasses list routes and render the venue's own error shapes."""

    venue: ClassVar[Venue]

    def __init__(self, state: State) -> None:
        self.state = state

    # -- what a venue module provides --------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def claimed_key(self, request: web.Request) -> str | None:
        """The API key the request claims to be from (not yet authenticated), if any."""
        raise NotImplementedError

    def rate_rules(self, request: web.Request, key: registry.TestKey | None) -> list[ratelimit.Rule]:
        """The documented budgets this request draws from (docs/venues.md §x.6)."""
        raise NotImplementedError

    def rate_limited(self, request: web.Request, retry_after: float, rule: ratelimit.Rule) -> web.Response:
        """The venue's answer when a budget is exceeded."""
        raise NotImplementedError

    def fault(self, request: web.Request, kind: str, retry_after: float) -> web.Response:
        """The venue's answer for an injected fault ``kind`` (not ``timeout``, which only hangs)."""
        raise NotImplementedError

    # -- shared helpers ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        return self.state.now_ms(self.venue)

    def lookup(self, api_key: str) -> registry.TestKey | None:
        return self.state.registry.get(api_key, self.venue)

    def usable(self, key: registry.TestKey | None, *, kinds: tuple[str | None, ...] = (None,)) -> bool:
        """True when ``key`` exists here: right kind, production environment, not expired."""
        return (
            key is not None
            and key.kind in kinds
            and key.environment == "production"
            and not key.expired(self.now_ms())
        )

    def accepted(self, request: web.Request, key: registry.TestKey) -> registry.TestKey:
        """Mark ``request`` as authenticated by ``key`` (the signing log records it); returns ``key``."""
        request[AUTHENTICATED] = key.api_key
        return key

    def wallet(self, key: registry.TestKey, wallet: str) -> trading.WalletId:
        """The trading-book wallet ``wallet`` of the key's account."""
        return (self.venue, key.uid, wallet)

    def subject(self, key: registry.TestKey | None, claimed: str | None) -> str:
        """The account a per-user budget belongs to: the uid when the key is known, else the claim."""
        return f"uid:{key.uid}" if key is not None else f"key:{claimed or ''}"

    # -- the pipeline -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        application = web.Application(middlewares=[self._middleware])
        application.add_routes(self.routes())
        return application

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        arrived = time.time()
        claimed = self.claimed_key(request)
        status = 500
        try:
            response = await self._pipeline(request, handler, claimed)
            status = response.status
            return response
        except web.HTTPException as exc:  # aiohttp's own answers (404, 405)
            status = exc.status
            raise
        finally:
            if claimed:
                self.state.signing_log.record(
                    signlog.SignedRequest(
                        venue=self.venue,
                        api_key=claimed[: signlog.MAX_KEY_CHARS],
                        method=request.method,
                        path=request.path,
                        at=arrived,
                        status=status,
                        authenticated=request.get(AUTHENTICATED) == claimed,  # full claim, not the cut
                    )
                )
            if log.isEnabledFor(logging.DEBUG):  # the masked key is not worked out for a line nobody logs
                log.debug(
                    "simulator %s %s %s key=%s -> %s in %.1f ms",
                    self.venue.value,
                    request.method,
                    request.path,
                    mask_api_key(claimed) if claimed else "-",
                    status,
                    (time.monotonic() - started) * 1000,
                )

    async def _pipeline(
        self, request: web.Request, handler: Handler, claimed: str | None
    ) -> web.StreamResponse:
        recorder = self.state.stats[self.venue]
        # per-key burst figures only for keys the simulator holds: made-up keys would grow them without end
        recorder.request(claimed if claimed and self.lookup(claimed) is not None else None, time.monotonic())
        settings = self.state.faults.get(self.venue)
        if settings is not None and settings.latency > 0:
            await asyncio.sleep(settings.latency)
        key = self.lookup(claimed) if claimed else None
        exceeded = self.state.limits.admit(
            self.rate_rules(request, key), time.monotonic(), enforce=self.state.enforce_rate_limits
        )
        if exceeded is not None:
            rule, wait = exceeded
            recorder.rate_limit_violations += 1
            if rule.by_ip:
                recorder.ip_rate_limit_violations += 1
            if self.state.enforce_rate_limits:
                return self.rate_limited(request, wait, rule)
        if settings is not None:
            kind = settings.pick(self.state.rng)
            if kind is not None:
                recorder.faults += 1
                if kind != faults.TIMEOUT:
                    return self.fault(request, kind, settings.retry_after)
                await self._hang(settings.hang)
        try:
            return await handler(request)
        except Reject as rejected:
            if rejected.auth:
                recorder.auth_failures += 1
            return rejected.response

    async def _hang(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.closing.wait(), timeout=seconds)
