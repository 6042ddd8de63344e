"""Public keys from an identity provider's JWKS (RFC 7517), for RS256, ES256 and EdDSA bearer tokens.

    keys = JwksKeys("https://idp.example/.well-known/jwks.json", algorithms={"RS256", "ES256"})
    await keys.start()                   # one bounded fetch; an unreachable IdP is logged, not fatal
    key = await keys.key(alg, header)    # the jwt.PyJWK named by the token's kid
    await keys.close()

The server builds one (``ENGINE_API_JWKS_URL``) and starts and closes it with the application
(``on_startup``/``on_cleanup``); it owns its own aiohttp session.

**Cache.** The keys of the last good fetch are used for ``cache_ttl`` seconds; after that the next token
starts a refetch in the background and is checked against the cached keys meanwhile (the IdP publishes a new
key before it signs with it). A token whose ``kid`` is not cached makes the request wait for one refetch,
but at most one fetch starts per ``min_refetch_interval`` seconds whatever the tokens say, and concurrent
requests share the fetch in flight: a flood of made-up ``kid`` values costs the IdP one request per interval.

**Bounds.** A fetch takes at most ``timeout`` seconds (connection included) and reads at most ``max_bytes``
of body; it follows no redirect; a JWKS with more than ``MAX_KEYS`` keys is refused. Keys are used only when
they are public signing keys for an allowed algorithm: ``use`` absent or ``sig``; ``key_ops`` absent or with
``verify``; no private members; RSA of at least ``MIN_RSA_BITS`` bits (RS256), EC on P-256 (ES256), OKP
Ed25519 (EdDSA); an ``alg``, when the JWK states one, that is the algorithm its type implies; a ``kid``
(tokens must name their key).

**When the IdP is down** (stale-while-error): a failed fetch keeps the last good keys, so tokens signed by
known keys keep working, and is logged (``jwks_fetch_failed``, with the reason, never the body). A token whose
``kid`` is unknown while the last fetch failed (an IdP down at start included) answers 503 with
``Retry-After`` (:class:`IdentityProviderUnavailable`): the service cannot tell, and a 401 would tell the
client to drop a token that may be good. A ``kid`` still unknown after a good fetch is 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import aiohttp
import jwt
import structlog
from yarl import URL

from engine import errors
from engine.api.auth import PUBLIC_KEY_ALGORITHMS

log = structlog.get_logger("engine.api.jwks")

DEFAULT_CACHE_TTL = 300.0  # seconds a good JWKS is used before a background refetch
DEFAULT_MIN_REFETCH_INTERVAL = 30.0  # at most one fetch per this many seconds, whatever tokens arrive
DEFAULT_TIMEOUT = 5.0  # one fetch, connection included
DEFAULT_MAX_BYTES = 256 * 1024  # IdP key sets are a few KiB
MAX_KEYS = 64
MAX_KID_LENGTH = 256
MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")  # RFC 7518 6.2.2, 6.3.2, 6.4
_LOOPBACK_NAMES = ("localhost",)


class IdentityProviderUnavailable(errors.CredentialEngineError):
    """A token names a key this service does not have, and the identity provider's JWKS could not be
    fetched: 503 with ``retry_after`` (the envelope's fixed 5xx text; the reason is in the log)."""

    http_status = 503
    errno = -110006

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _FetchFailed(Exception):
    """Why a fetch gave nothing usable (a reason to log, never a body)."""


def check_url(url: str) -> str:
    """``url`` when it is https, or http to a loopback host (tests, a sidecar); ConfigurationError otherwise."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        parsed = None
    if parsed is None or not parsed.is_absolute() or not parsed.host:
        raise errors.ConfigurationError(
            "ENGINE_API_JWKS_URL must be an absolute URL", field="ENGINE_API_JWKS_URL"
        )
    if parsed.scheme == "https":
        return url
    if parsed.scheme == "http" and _is_loopback(parsed.host):
        return url
    raise errors.ConfigurationError(
        "ENGINE_API_JWKS_URL must be https (plain http only to a loopback address)",
        field="ENGINE_API_JWKS_URL",
    )


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _implied_algorithm(jwk: Mapping[str, Any]) -> str | None:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and crv == "P-256":
        return "ES256"
    if kty == "OKP" and crv == "Ed25519":
        return "EdDSA"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate member name")
    return dict(pairs)


class JwksKeys:
    """The keys of one JWKS URL, cached and refetched as the module docstring says. One per server."""

    def __init__(
        self,
        url: str,
        *,
        algorithms: Collection[str] = PUBLIC_KEY_ALGORITHMS,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        min_refetch_interval: float = DEFAULT_MIN_REFETCH_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        allowed = frozenset(algorithms)
        if not allowed or not allowed <= PUBLIC_KEY_ALGORITHMS:
            raise errors.ConfigurationError(
                f"JWKS algorithms must be some of {sorted(PUBLIC_KEY_ALGORITHMS)}",
                field="ENGINE_API_JWT_ALGORITHMS",
            )
        for name, value in (("cache_ttl", cache_ttl), ("timeout", timeout)):
            if not value > 0:
                raise errors.ConfigurationError(f"{name} must be positive", field=name)
        if min_refetch_interval < 0:
            raise errors.ConfigurationError("min_refetch_interval must be >= 0", field="min_refetch_interval")
        if max_bytes < 1024:
            raise errors.ConfigurationError("max_bytes must be at least 1024", field="max_bytes")
        self.url = check_url(url)
        self.algorithms = allowed
        self._ttl = cache_ttl
        self._interval = min_refetch_interval
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last good fetch
        self._attempted_at: float | None = None  # last fetch started
        self._last_failed = False
        self.fetches = 0  # fetches started (tests and metrics read it)
        self._inflight: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"JwksKeys(url={self.url!r}, keys={sorted(self._keys)})"

    @property
    def kids(self) -> frozenset[str]:
        """The key ids cached now."""
        return frozenset(self._keys)

    async def start(self) -> None:
        """Fetch once, waiting at most ``timeout`` seconds; a failure is logged and tokens answer 503 until a
        later fetch succeeds."""
        self._start_fetch()
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    async def close(self) -> None:
        """Cancel a fetch in flight and close the session (idempotent)."""
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def key(self, alg: str, header: Mapping[str, Any]) -> jwt.PyJWK:
        """The key for a token with this ``alg`` and header; :class:`errors.Unauthorized` or
        :class:`IdentityProviderUnavailable` (module docstring)."""
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            raise errors.Unauthorized(
                "invalid access token: kid is required (a string naming a key of the JWKS)"
            )
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._ttl:
            self._start_fetch()  # stale: refresh in the background; the cached keys serve meanwhile
        found = self._keys.get(kid)
        if found is None:
            self._start_fetch()
            if self._inflight is not None:
                # the fetch bounds itself (timeout); shield: one request giving up does not cancel it for all
                await asyncio.shield(self._inflight)
            found = self._keys.get(kid)
        if found is None:
            if self._last_failed:
                raise IdentityProviderUnavailable(
                    "the identity provider's keys could not be fetched", retry_after=self._retry_after()
                )
            raise errors.Unauthorized("invalid access token: unknown kid (no such key in the JWKS)")
        if found.algorithm_name != alg:
            raise errors.Unauthorized("invalid access token: the key named by kid is not for this alg")
        return found

    def _retry_after(self) -> float:
        if self._attempted_at is None:
            return 1.0
        return max(1.0, self._interval - (self._clock() - self._attempted_at))

    def _start_fetch(self) -> None:
        """Start a fetch unless one is in flight or one started less than ``min_refetch_interval`` ago."""
        if self._closed or self._inflight is not None:
            return
        now = self._clock()
        if self._attempted_at is not None and now - self._attempted_at < self._interval:
            return
        self._attempted_at = now
        self.fetches += 1
        self._inflight = asyncio.get_running_loop().create_task(self._refresh(), name="jwks-fetch")

    async def _refresh(self) -> None:
        try:
            keys = await self._fetch()
        except (_FetchFailed, aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            self._last_failed = True
            reason = str(exc) if isinstance(exc, _FetchFailed) else type(exc).__name__
            log.warning("jwks_fetch_failed", url=self.url, reason=reason, cached_keys=len(self._keys))
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            self._last_failed = False
            log.info("jwks_fetched", url=self.url, keys=len(keys))
        finally:
            self._inflight = None

    async def _fetch(self) -> dict[str, jwt.PyJWK]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with asyncio.timeout(self._timeout):
            async with self._session.get(
                self.url,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"Accept": "application/json, application/jwk-set+json"},
            ) as resp:
                if resp.status != 200:
                    raise _FetchFailed(f"status {resp.status}")
                if resp.content_length is not None and resp.content_length > self._max_bytes:
                    raise _FetchFailed(f"body over {self._max_bytes} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):  # chunked bodies: counted as read
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise _FetchFailed(f"body over {self._max_bytes} bytes")
        return self._parse(bytes(body))

    def _parse(self, body: bytes) -> dict[str, jwt.PyJWK]:
        try:
            document = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError):
            raise _FetchFailed("not a JSON document") from None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise _FetchFailed("no keys array")
        if len(entries) > MAX_KEYS:
            raise _FetchFailed(f"more than {MAX_KEYS} keys")
        keys: dict[str, jwt.PyJWK] = {}
        skipped: list[str] = []
        for entry in entries:
            kid, key, why = self._usable(entry)
            if key is None or kid is None:
                skipped.append(why)
            elif kid in keys:
                skipped.append("duplicate kid")
                keys.pop(kid)  # two keys claim one kid: trust neither
            else:
                keys[kid] = key
        if skipped:
            log.info("jwks_keys_skipped", url=self.url, reasons=sorted(set(skipped)))
        if not keys:
            raise _FetchFailed("no usable key")
        return keys

    def _usable(self, jwk: Any) -> tuple[str | None, jwt.PyJWK | None, str]:
        """(kid, key, "") for a usable key; (None, None, why) otherwise."""
        if not isinstance(jwk, dict):
            return None, None, "not an object"
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            return None, None, "no kid"
        if jwk.get("use", "sig") != "sig":
            return None, None, "not for signatures"
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            return None, None, "key_ops without verify"
        if any(name in jwk for name in _PRIVATE_MEMBERS):
            return None, None, "private or symmetric key material"
        alg = _implied_algorithm(jwk)
        if alg is None or jwk.get("alg", alg) != alg:
            return None, None, "unsupported kty, crv or alg"
        if alg not in self.algorithms:
            return None, None, f"{alg} not allowed"
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            return None, None, "malformed key"
        size = getattr(key.key, "key_size", None)
        if alg == "RS256" and (not isinstance(size, int) or size < MIN_RSA_BITS):
            return None, None, f"RSA key under {MIN_RSA_BITS} bits"
        return kid, key, ""
