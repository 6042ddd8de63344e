"""The probe seam: what the engine asks of an exchange module, and what it gets back.

venues/README.md holds the conventions and the probe <-> simulator contract every venue module follows.

A probe takes one set of API keys, signs requests exactly as its venue documents (``shared/venues.md``), and
answers with one frozen :class:`ProbeResult` or raises :class:`ProbeFailure` carrying one normalized
:class:`Outcome`. Permanent outcomes fail verification; transient ones make the job retry, honouring
``retry_after`` when the venue gave one.

Everything here is venue-neutral: the shared HTTP call (:meth:`VenueProbe._call`) translates aiohttp's errors
at this one place and raises ``from None``, because aiohttp's exceptions carry request URLs (signed query
strings) and headers (API keys) in their ``str``/``repr``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy


class Venue(enum.StrEnum):
    """The exchanges the engine speaks to; values are the seeds' spelling."""

    BINANCE = "BINANCE"
    OKX = "OKX"
    BYBIT = "BYBIT"
    COINBASE = "COINBASE"
    KRAKEN = "KRAKEN"

    @property
    def display_name(self) -> str:
        """How people write it: "Binance", "OKX", "Bybit", "Coinbase", "Kraken"."""
        return "OKX" if self is Venue.OKX else self.value.title()


class Outcome(enum.StrEnum):
    """One normalized answer for every venue reply (DESIGN.md, venues.md section 0)."""

    OK = "OK"
    INVALID_KEY = "INVALID_KEY"
    INVALID_SECRET = "INVALID_SECRET"  # noqa: S105 - an outcome name, not a secret
    INVALID_PASSPHRASE = "INVALID_PASSPHRASE"  # noqa: S105 - an outcome name, not a secret
    IP_NOT_ALLOWED = "IP_NOT_ALLOWED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    KEY_EXPIRED = "KEY_EXPIRED"
    WRONG_ENVIRONMENT = "WRONG_ENVIRONMENT"
    ACCOUNT_RESTRICTED = "ACCOUNT_RESTRICTED"
    RATE_LIMITED = "RATE_LIMITED"
    CLOCK_SKEW = "CLOCK_SKEW"
    MAINTENANCE = "MAINTENANCE"
    SERVER_ERROR = "SERVER_ERROR"
    TIMEOUT = "TIMEOUT"
    NETWORK = "NETWORK"

    @property
    def transient(self) -> bool:
        """True when retrying later may succeed: never a reason to mark a credential FAILED."""
        return self in TRANSIENT_OUTCOMES


TRANSIENT_OUTCOMES = frozenset(
    {
        Outcome.RATE_LIMITED,
        Outcome.CLOCK_SKEW,
        Outcome.MAINTENANCE,
        Outcome.SERVER_ERROR,
        Outcome.TIMEOUT,
        Outcome.NETWORK,
    }
)
PERMANENT_OUTCOMES = frozenset(set(Outcome) - TRANSIENT_OUTCOMES - {Outcome.OK})


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Decrypted key material. Its ``repr``/``str`` never show the secret parts.

    ``api_key`` is the public half (for Coinbase CDP keys: the key *name*); ``api_secret`` is the HMAC
    secret or the PEM private key; ``api_passphrase`` is OKX's / Coinbase Exchange's passphrase.
    """

    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    api_passphrase: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"ApiKeys(api_key={mask_api_key(self.api_key)!r}, api_secret='***', api_passphrase='***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # pickling would copy secrets into places nobody audits
        raise TypeError("ApiKeys cannot be pickled")


def mask_api_key(api_key: str) -> str:
    """The display form of an API key: a short prefix, then ``***`` (seed 02 shows ``your-api-***``).

    Short keys show less, so that the shown part is never most of the key.
    """
    visible = min(8, len(api_key) // 3)
    return api_key[:visible] + "***"


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a key may do, as its venue reports it."""

    read: bool = False
    trade: bool = False
    withdraw: bool = False
    transfer: bool = False
    ip_restricted: bool = False
    ip_allowlist: tuple[str, ...] = ()
    expires_at_ms: int | None = None  # when the key (or its trading permission) expires, if the venue says

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "trade": self.trade,
            "withdraw": self.withdraw,
            "transfer": self.transfer,
            "ipRestricted": self.ip_restricted,
            "ipAllowlist": list(self.ip_allowlist),
            "expiresAt": self.expires_at_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Permissions:
        return cls(
            read=bool(data.get("read", False)),
            trade=bool(data.get("trade", False)),
            withdraw=bool(data.get("withdraw", False)),
            transfer=bool(data.get("transfer", False)),
            ip_restricted=bool(data.get("ipRestricted", False)),
            ip_allowlist=tuple(str(x) for x in data.get("ipAllowlist", ()) or ()),
            expires_at_ms=(int(data["expiresAt"]) if data.get("expiresAt") is not None else None),
        )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a successful probe found. ``identities`` use the seeds' account-type names."""

    venue: Venue
    venue_account_id: str
    permissions: Permissions
    identities: tuple[str, ...]
    environment: str = "production"  # or "testnet" / "demo" where the probe found the key there
    details: Mapping[str, str] = field(default_factory=dict)  # venue-specific, non-secret (key label, mode)


class ProbeFailure(Exception):
    """A probe could not confirm the key. ``message`` is safe to store and show: it never holds key material."""

    def __init__(
        self,
        outcome: Outcome,
        message: str = "",
        *,
        retry_after: float | None = None,
        venue_code: str | None = None,
    ) -> None:
        super().__init__(f"{outcome.value}: {message}" if message else outcome.value)
        self.outcome = outcome
        self.message = message
        self.retry_after = retry_after
        self.venue_code = venue_code

    @property
    def transient(self) -> bool:
        return self.outcome.transient


class KeyFormatProblem(ValueError):
    """Keys whose shape the venue cannot accept (empty secret, bad base64, bad PEM). Names the field."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class Probe(Protocol):
    """The protocol the engine calls. One instance per venue per engine; safe for concurrent use."""

    venue: Venue

    def check_keys(self, keys: ApiKeys) -> None:
        """Raise :class:`KeyFormatProblem` when the keys cannot be right for this venue (no I/O)."""

    async def probe(self, keys: ApiKeys) -> ProbeResult:
        """Verify the keys, read their permissions and discover their identities (concurrently)."""
        ...


class RateLimiter:
    """A token bucket: at most ``rate`` acquisitions per second on average, bursts up to ``burst``.

    Acquirers queue in arrival order (an ``asyncio.Lock`` is FIFO; Kraken's per-key nonce order relies on
    it: requests leave in the order they took their nonces), so a burst of probes spreads out
    instead of tripping the venue's limit and getting a 429 (or, on Binance, a 418 IP ban).
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, cost: float = 1.0) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= cost:
                    self._tokens -= cost
                    return
                await asyncio.sleep((cost - self._tokens) / self.rate)


class KeyLimiters:
    """One token bucket per API key, for limits the venue counts per key or per user (OKX and Bybit per UID,
    Coinbase per user/profile, Kraken spot per key: venues.md 2.6, 3.6, 4A.6, 4B, 5A.6).

    Bounded (least recently used keys are forgotten past ``max_keys``) and holds no key: buckets are found by
    the SHA-256 of the key.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._by_key: OrderedDict[bytes, RateLimiter] = OrderedDict()

    async def acquire(self, api_key: str, cost: float = 1.0) -> None:
        slot = hashlib.sha256(api_key.encode()).digest()
        limiter = self._by_key.get(slot)
        if limiter is None:
            limiter = self._by_key[slot] = RateLimiter(self.rate, self.burst)
        self._by_key.move_to_end(slot)
        if len(self._by_key) > self._max_keys:
            self._by_key.popitem(last=False)
        await limiter.acquire(cost)


class SlidingWindows:
    """At most ``limit`` calls in any ``seconds`` window, per (key, endpoint): exactly how OKX and Bybit count
    per UID and endpoint, and Coinbase per user (venues.md 2.6, 3.6, 4A.6). A token bucket of burst B and
    rate R lets B + R calls through in one second; a window never lets more than ``limit`` through.

    Windows are widened by ``margin`` (10 %): requests leave here in order but reach the venue with jitter.
    Bounded (LRU past ``max_slots``); slots are found by the SHA-256 of the key, so no key is held.
    """

    def __init__(self, *, margin: float = 0.10, max_slots: int = 20_000) -> None:
        self._margin = margin
        self._max_slots = max_slots
        self._slots: OrderedDict[bytes, tuple[asyncio.Lock, collections.deque[float]]] = OrderedDict()

    async def acquire(self, api_key: str, endpoint: str, limit: int, seconds: float) -> None:
        slot = hashlib.sha256(f"{endpoint}\x00{api_key}".encode()).digest()
        entry = self._slots.get(slot)
        if entry is None:
            entry = self._slots[slot] = (asyncio.Lock(), collections.deque())
        self._slots.move_to_end(slot)
        if len(self._slots) > self._max_slots:
            self._slots.popitem(last=False)
        lock, sent = entry
        window = seconds * (1 + self._margin)
        async with lock:  # FIFO, like RateLimiter
            while True:
                now = time.monotonic()
                while sent and now - sent[0] >= window:
                    sent.popleft()
                if len(sent) < limit:
                    sent.append(now)
                    return
                await asyncio.sleep(sent[0] + window - now)


UNLIMITED = 1e9  # a rate that never waits: for simulators and benchmarks that must not be throttled


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, already read and parsed. ``body`` is the decoded JSON (or None if not JSON)."""

    status: int
    headers: Mapping[str, str]
    body: Any
    text: str

    def retry_after(self) -> float | None:
        """The ``Retry-After`` header in seconds, if present and numeric."""
        value = self.headers.get("Retry-After")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return None


DEFAULT_TIMEOUT = 10.0  # seconds for one venue request, connect included
# The most requests one probe makes one after another, each bounded by the request timeout: the verify call, the
# clock resync it may need and its retry (3); OKX's demo-environment check after a 50101 refusal (3 more); then
# the concurrent identity calls, each with its own resync and retry, plus a wait for another call's resync (4).
# Kraken (spot, then futures), Bybit, Binance and Coinbase stay within it. The engine bounds a verification job
# by this many request timeouts plus a margin for the client-side rate limiters and its own database work.
MAX_SEQUENTIAL_REQUESTS = 10
MAX_BODY_BYTES = 4 * 1024 * 1024  # a probe answer bigger than this is malformed for our purposes


class VenueProbe:
    """Shared machinery of the five venue modules: base URLs, clock offset, rate limit, HTTP.

    Subclasses set ``venue``, ``default_urls`` (host role -> production URL) and ``rate_per_second``,
    and implement ``check_keys`` and ``probe``. When ``base_url`` is given (sandbox, test server, the
    simulator), every host role of the venue uses it (``EngineConfig.venue_urls``).
    """

    venue: ClassVar[Venue]
    default_urls: ClassVar[Mapping[str, str]] = {}
    # venue-wide bucket: limits counted per IP (shared by every key this process probes)
    rate_per_second: ClassVar[float] = 10.0
    burst: ClassVar[float | None] = None
    # per-key bucket: a counter per key that decays (Kraken spot's; None: no such counter)
    key_rate_per_second: ClassVar[float | None] = None
    key_burst: ClassVar[float | None] = None
    # per-key windows: request path (or "*": every call of the key) -> (at most N calls, in S seconds)
    key_windows: ClassVar[Mapping[str, tuple[int, float]]] = {}

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        limiter: RateLimiter | None = None,
        rate_limited: bool = True,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        if rate_limited:
            self.limiter = limiter or RateLimiter(self.rate_per_second, self.burst)
        else:  # against a simulator or a test server whose limits are not the venue's
            self.limiter = RateLimiter(UNLIMITED, UNLIMITED)
        key_rate = self.key_rate_per_second if rate_limited else None
        self.key_limiters: KeyLimiters | None = (
            KeyLimiters(key_rate, self.key_burst or max(1.0, key_rate)) if key_rate else None
        )
        self.windows: SlidingWindows | None = SlidingWindows() if rate_limited and self.key_windows else None
        self.clock_offset_ms = 0  # venue time minus our time, learnt after a CLOCK_SKEW answer
        self.clock_generation = 0  # bumped by each resync (see resync_clock)
        self._clock_lock = asyncio.Lock()

    def url(self, role: str, path: str) -> str:
        """The absolute URL of ``path`` on the host that serves ``role`` (e.g. "api", "fapi")."""
        base = self.base_url or self.default_urls[role]
        return base + path

    async def throttle(self, api_key: str | None, cost: float = 1.0, *, path: str | None = None) -> None:
        """Wait for the key's own limits (its bucket, its windows for ``path`` and for every call), then the
        venue-wide bucket.

        Call it *before* stamping a timestamp or nonce, and send with ``_call(limit=False)``: a request that
        waited in a queue must not go out stale.
        """
        if api_key is not None:
            if self.key_limiters is not None:
                await self.key_limiters.acquire(api_key)
            if self.windows is not None:
                endpoints = ["*"] if path is None or path == "*" else ["*", path]
                for endpoint in endpoints:
                    rule = self.key_windows.get(endpoint)
                    if rule is not None:
                        await self.windows.acquire(api_key, endpoint, *rule)
        await self.limiter.acquire(cost)

    async def resync_clock(
        self,
        url: str,
        server_ms_of: Callable[[Reply], float],
        *,
        seen: int | None = None,
        headers: Mapping[str, str] | None = None,
        resolution_ms: float = 0.0,
    ) -> None:
        """Learn the venue's clock from its public time endpoint ``url`` (venues.md 6) into ``clock_offset_ms``.

        ``server_ms_of`` reads the venue's time in ms from the answer (raising :class:`ProbeFailure` when the
        answer is a refusal or unreadable); the offset is taken against the midpoint of the round trip. With
        ``seen`` (``clock_generation`` read before the refused request), requests refused for the same skew
        share one fetch: whoever waited finds a newer generation and returns. ``resolution_ms``: the venue
        tells whole seconds (Kraken), so aim at the middle of one and ignore offsets it cannot see.
        """
        async with self._clock_lock:
            if seen is not None and seen != self.clock_generation:
                return
            await self.limiter.acquire()
            sent_ms = time.time() * 1000
            reply = await self._call("GET", url, headers=headers, limit=False)
            local_ms = (sent_ms + time.time() * 1000) / 2
            offset = server_ms_of(reply) + resolution_ms / 2 - local_ms
            self.clock_offset_ms = round(offset) if abs(offset) >= resolution_ms else 0
            self.clock_generation += 1

    def now_ms(self) -> int:
        """Our best guess of the venue's clock, in milliseconds."""
        return int(time.time() * 1000) + self.clock_offset_ms

    async def _call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: str | bytes | None = None,
        cost: float = 1.0,
        limit: bool = True,
    ) -> Reply:
        """Send one request and read its answer. ``url`` carries the exact query string that was signed.

        aiohttp errors become :class:`ProbeFailure` (TIMEOUT / NETWORK) raised ``from None``; nothing of the
        request (URL, headers) reaches the message.

        ``limit=False`` when the caller already waited on ``self.limiter``: a signed request should be
        stamped *after* its turn comes, or a queue longer than the venue's window sends stale timestamps
        (or out-of-order nonces).
        """
        if limit:
            await self.limiter.acquire(cost)
        try:
            async with self.session.request(
                method,
                # encoded=True: send the query exactly as signed, no re-quoting by yarl
                _exact_url(url),
                headers=dict(headers or {}),
                data=data,
                timeout=self.timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(MAX_BODY_BYTES + 1)
                status = resp.status
                resp_headers = CIMultiDictProxy(
                    CIMultiDict(resp.headers)
                )  # header names are case-insensitive
        except TimeoutError:
            raise ProbeFailure(Outcome.TIMEOUT, f"{self.venue.value} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise ProbeFailure(
                Outcome.NETWORK, f"{self.venue.value} unreachable ({type(exc).__name__})"
            ) from None
        if len(raw) > MAX_BODY_BYTES:
            raise ProbeFailure(Outcome.SERVER_ERROR, f"{self.venue.value} answer too large")
        text = raw.decode("utf-8", errors="replace")
        try:
            body = json.loads(text) if text.strip() else None
        except ValueError:
            body = None
        return Reply(status=status, headers=resp_headers, body=body, text=text)

    def malformed(self, reply: Reply) -> ProbeFailure:
        """The failure for an answer we cannot read: transient, the venue may be mid-deploy."""
        return ProbeFailure(
            Outcome.SERVER_ERROR, f"{self.venue.value} sent an unreadable answer (HTTP {reply.status})"
        )


def _exact_url(url: str) -> Any:
    from yarl import URL

    return URL(url, encoded=True)


MAX_FIELD_CHARS = 256  # no venue's key, secret or passphrase is longer (PEM secrets are checked separately)


def check_token(field_name: str, value: str, shape: re.Pattern[str], reason: str) -> None:
    """A key part that must be one printable token of ``shape``; :class:`KeyFormatProblem` names the field."""
    if not value:
        raise KeyFormatProblem(field_name, "is empty")
    if len(value) > MAX_FIELD_CHARS:
        raise KeyFormatProblem(field_name, f"is longer than {MAX_FIELD_CHARS} characters")
    if any(ch.isspace() for ch in value):
        raise KeyFormatProblem(field_name, "contains whitespace (a copy-paste slip?)")
    if not value.isprintable():
        raise KeyFormatProblem(field_name, "contains control characters")
    if not shape.fullmatch(value):
        raise KeyFormatProblem(field_name, reason)


def format_failure(venue: Venue, problem: KeyFormatProblem) -> ProbeFailure:
    """Keys that cannot be right, met at probe time: a permanent failure naming the field, never its value."""
    outcome = {
        "apiSecret": Outcome.INVALID_SECRET,
        "apiPassphrase": Outcome.INVALID_PASSPHRASE,
    }.get(problem.field, Outcome.INVALID_KEY)
    return ProbeFailure(outcome, f"{venue.display_name} keys are malformed: {problem}")


def settle_identities(results: Sequence[object]) -> list[Reply | ProbeFailure]:
    """Identity answers as replies or permanent refusals; a transient failure (or a bug) is raised instead.

    Never record a partial identity list as the truth (venues/README.md): the transient failure with the
    longest ``retry_after`` is raised, so the whole probe is retried after it.
    """
    settled: list[Reply | ProbeFailure] = []
    for result in results:
        if not isinstance(result, Reply | ProbeFailure):
            raise result if isinstance(result, BaseException) else TypeError(type(result).__name__)
        settled.append(result)
    transient = [r for r in settled if isinstance(r, ProbeFailure) and r.transient]
    if transient:
        raise max(transient, key=lambda failure: failure.retry_after or 0.0)
    return settled


async def gather_identities(checks: Sequence[Any]) -> list[Any]:
    """Run identity checks concurrently (one request per account type). Failures are returned, not raised."""
    return list(await asyncio.gather(*checks, return_exceptions=True))
