"""The HTTP probe every venue module builds on: base URLs, clock resync, throttling and the one HTTP call.

:class:`VenueProbe` is the shared machinery of the five venue modules. Its :meth:`VenueProbe._call` sends one
signed request exactly as signed and translates aiohttp's errors at this one place, raising ``from None``:
aiohttp's exceptions carry request URLs (signed query strings) and headers (API keys) in their ``str``/``repr``.
:func:`gather_identities` runs a probe's calls at once (the verify call and every identity call: one round trip);
:func:`raise_verify_failure` and :func:`settle_identities` judge their answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from venues.base import Outcome, ProbeFailure, Venue, release_frames
from venues.limits import UNLIMITED, IpBudget, IpBudgets, KeyLimiters, RateLimiter, SlidingWindows


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
MAX_BODY_BYTES = 4 * 1024 * 1024  # a probe answer bigger than this is malformed for our purposes


class VenueProbe:
    """Shared machinery of the five venue modules: base URLs, clock offset, rate limit, HTTP.

    Subclasses set ``venue``, ``default_urls`` (host role -> production URL) and ``rate_per_second``,
    and implement ``check_keys`` and ``probe``. When ``base_url`` is given (sandbox, test server, the
    simulator), every host role of the venue uses it (``EngineConfig.venue_urls``).

    ``ip_budgets`` maps request path prefixes to the venue's per-IP limits (the longest matching prefix counts
    a call). With ``budgets`` (the engine's shared budgets, :class:`venues.limits.IpBudgets`), each call takes
    its cost from that budget too, after this process's own buckets: the processes behind one egress IP
    together stay within it. Without, this process's buckets are the only limit (one process per IP).
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
    # per-IP budgets shared with the other processes of the egress IP: request path prefix -> budget
    ip_budgets: ClassVar[Mapping[str, IpBudget]] = {}

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        limiter: RateLimiter | None = None,
        rate_limited: bool = True,
        budgets: IpBudgets | None = None,
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
        self.budgets = budgets if rate_limited else None
        self.clock_offset_ms = 0  # venue time minus our time, learnt after a CLOCK_SKEW answer
        self.clock_generation = 0  # bumped by each resync (see resync_clock)
        self._clock_lock = asyncio.Lock()

    def url(self, role: str, path: str) -> str:
        """The absolute URL of ``path`` on the host that serves ``role`` (e.g. "api", "fapi")."""
        base = self.base_url or self.default_urls[role]
        return base + path

    def ip_budget(self, path: str) -> IpBudget | None:
        """The per-IP budget a call to ``path`` draws on (the longest matching prefix of ``ip_budgets``)."""
        best = ""
        for prefix in self.ip_budgets:
            if path.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return self.ip_budgets.get(best) if best else None

    async def _take_ip_budget(self, path: str | None, cost: float) -> None:
        if self.budgets is not None and path is not None:
            budget = self.ip_budget(path)
            if budget is not None:
                await self.budgets.take(budget, cost)

    async def throttle(
        self,
        api_key: str | None,
        cost: float = 1.0,
        *,
        path: str | None = None,
        windows: Sequence[tuple[str, str, int, float]] = (),
    ) -> None:
        """Wait for the key's own bucket, its windows for ``path`` and for every call (and any other
        ``windows``: (window key, endpoint, limit, seconds)), the venue-wide bucket, then (with shared
        ``budgets``) the per-IP budget ``path`` draws on.

        The windows' places are held while the buckets and the budget are waited for and taken only at the
        end, stamped with that moment (:meth:`limits.SlidingWindows.reserved`): a window records when the
        request leaves, not when its turn came (stamped before a wait for the venue-wide bucket, a storm
        could show the venue more than its limit in one window), and the budget is spent only once the request
        can leave (spent before a wait in a window, it would be freed for others while this request still
        comes, and the venue would see more than our share of the IP).

        Call it *before* stamping a timestamp or nonce, and send with ``_call(limit=False)``: a request that
        waited in a queue must not go out stale.
        """
        if api_key is not None and self.key_limiters is not None:
            await self.key_limiters.acquire(api_key)
        rules = list(windows)
        if api_key is not None and self.windows is not None:
            endpoints = ["*"] if path is None or path == "*" else ["*", path]
            for endpoint in endpoints:
                rule = self.key_windows.get(endpoint)
                if rule is not None:
                    rules.append((api_key, endpoint, *rule))
        if not rules or self.windows is None:
            await self.limiter.acquire(cost)
            await self._take_ip_budget(path, cost)
            return
        async with self.windows.reserved(rules):
            await self.limiter.acquire(cost)
            await self._take_ip_budget(path, cost)

    async def resync_clock(
        self,
        url: str,
        server_ms_of: Callable[[Reply], float],
        *,
        seen: int | None = None,
        headers: Mapping[str, str] | None = None,
        resolution_ms: float = 0.0,
    ) -> None:
        """Learn the venue's clock from its public time endpoint ``url`` (docs/venues.md §6) into ``clock_offset_ms``.

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
            await self._take_ip_budget(URL(url).path, 1.0)  # public time calls count per IP too
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


def _exact_url(url: str) -> URL:
    return URL(url, encoded=True)


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


def raise_verify_failure(verify: object, others: Sequence[object]) -> None:
    """Raise what a probe whose calls all went out at once must report before it reads any identity answer.

    ``verify`` is the answer (or exception) of the call that verifies the key and reads its permissions,
    ``others`` those of the identity calls sent beside it. Where the verify call failed, it decides
    (docs/venues.md §6): a permanent failure is the key's verdict, whatever the identity calls answered (a bad
    key fails them all, often with another code). A transient one retries the whole probe: the transient
    failure with the longest ``retry_after`` among all the calls is raised (the verify call's on a tie), so the
    retry does not come back before a limit that refused another call has passed. Returns when the verify call
    succeeded.
    """
    if not isinstance(verify, BaseException):
        return
    if not isinstance(verify, ProbeFailure) or not verify.transient:
        raise verify
    transient = [verify, *(r for r in others if isinstance(r, ProbeFailure) and r.transient)]
    raise max(transient, key=lambda failure: failure.retry_after or 0.0)


async def gather_identities(checks: Sequence[Any]) -> list[Any]:
    """Run a probe's calls concurrently (its verify call and one request per account type): one round trip.

    Failures are returned, not raised: the caller judges them together (:func:`raise_verify_failure`,
    :func:`settle_identities`). Each call still waits on the client-side limiters itself (``throttle``).
    """
    return list(await asyncio.gather(*map(_answer, checks), return_exceptions=True))


async def _answer(check: Awaitable[Any]) -> Any:
    """``check``'s answer; a :class:`ProbeFailure` is an answer too, returned without the frames it raised
    through (they hold the key pair, often in a cycle: :func:`release_frames`). Returned rather than raised, so
    its task keeps no traceback either. Any other exception is a bug: it is raised with its traceback."""
    try:
        return await check
    except ProbeFailure as failure:
        release_frames(failure)
        return failure
