"""Coinbase probe: Advanced Trade with CDP keys (JWT) and Coinbase Exchange keys (HMAC + passphrase).

CDP keys (docs/venues.md §4A): ``GET /api/v3/brokerage/key_permissions`` gives can_view/can_trade/can_transfer
and the key's one portfolio (the account id); ``accounts`` and ``portfolios``, sent at the same time (one round
trip; key_permissions' refusal decides), confirm the "default" identity. A 401 cannot tell a bad key name from
a bad private key from clock skew (4A.5): we resync from the public time endpoint and retry once before calling
it INVALID_KEY.

Exchange keys (docs/venues.md §4B): there is no permission endpoint. ``GET /accounts`` (the verify) and
``GET /profiles`` (the account id: the default profile) run together; read=True is all we can say
(details "permissions": "unknown").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import aiohttp

from venues import base, coinbase_auth, http, limits

KEY_PERMISSIONS = "/api/v3/brokerage/key_permissions"
ACCOUNTS = "/api/v3/brokerage/accounts"
PORTFOLIOS = "/api/v3/brokerage/portfolios"
ADVANCED_TIME = "/api/v3/brokerage/time"
EXCHANGE_ACCOUNTS = "/accounts"
EXCHANGE_PROFILES = "/profiles"
EXCHANGE_TIME = "/time"
IDENTITY = "default"  # the one Coinbase identity of docs/api-dialect.md §5: the key's portfolio / profile

Outcome = base.Outcome

# Advanced Trade error codes (body "error" or "errors[0].id"), docs/venues.md §4A.5. Matched case-insensitively.
CDP_ERROR_CODES: Mapping[str, base.Outcome] = {
    "unauthorized": Outcome.INVALID_KEY,
    "authentication_error": Outcome.INVALID_KEY,
    "PERMISSION_DENIED": Outcome.PERMISSION_DENIED,
    "invalid_scope": Outcome.PERMISSION_DENIED,
    "rate_limit_exceeded": Outcome.RATE_LIMITED,
    "resource_exhausted": Outcome.RATE_LIMITED,
    "internal_server_error": Outcome.SERVER_ERROR,
}
# When the body names no known code (401 often comes as plain text "Unauthorized"). Other 5xx: SERVER_ERROR.
CDP_HTTP_STATUS: Mapping[int, base.Outcome] = {
    401: Outcome.INVALID_KEY,  # key name, private key or (after one resync) not skew: cannot be told apart
    403: Outcome.PERMISSION_DENIED,
    429: Outcome.RATE_LIMITED,
}
# Coinbase Exchange messages (body {"message": ...}), docs/venues.md §4B; matched case-insensitively as substrings.
EXCHANGE_MESSAGES: Mapping[str, base.Outcome] = {
    "Invalid API Key": Outcome.INVALID_KEY,
    "invalid signature": Outcome.INVALID_SECRET,
    "Invalid Passphrase": Outcome.INVALID_PASSPHRASE,
    "request timestamp expired": Outcome.CLOCK_SKEW,
    "Private rate limit exceeded": Outcome.RATE_LIMITED,
    "under maintenance": Outcome.MAINTENANCE,
    "Cancel only mode": Outcome.MAINTENANCE,
    "IP address not allowed": Outcome.IP_NOT_ALLOWED,  # the contract's answer (docs/venues.md §8: undocumented)
}
EXCHANGE_HTTP_STATUS: Mapping[int, base.Outcome] = {
    401: Outcome.INVALID_KEY,
    403: Outcome.PERMISSION_DENIED,  # docs/venues.md §4B [unconfirmed]
    429: Outcome.RATE_LIMITED,
}

_HINTS: Mapping[base.Outcome, str] = {
    Outcome.INVALID_KEY: "the key was rejected (unknown key, wrong private key or secret, or revoked)",
    Outcome.INVALID_SECRET: "the signature was rejected: the secret does not belong to this key",
    Outcome.INVALID_PASSPHRASE: "the passphrase does not belong to this key",
    Outcome.IP_NOT_ALLOWED: "this IP address is not on the key's allowlist",
    Outcome.PERMISSION_DENIED: "the key lacks the permission this call needs",
    Outcome.CLOCK_SKEW: "the request timestamp was refused, still after a clock resync",
    Outcome.RATE_LIMITED: "rate limit hit",
    Outcome.MAINTENANCE: "the venue is in maintenance",
    Outcome.SERVER_ERROR: "the venue failed or answered unexpectedly",
}
_CDP_CODES_BY_LOWER = {code.lower(): (code, outcome) for code, outcome in CDP_ERROR_CODES.items()}
_IP_WORDS = ("ip address", "allowlist", "whitelist", "allow list", "allow-list")
_CODE_RE = re.compile(r"[A-Za-z_]{1,48}")  # an echo-safe venue code: no digits, nothing key-like


class CoinbaseProbe(http.VenueProbe):
    """Verifies Coinbase CDP keys (Advanced Trade) and Coinbase Exchange keys; the secret tells which."""

    venue = base.Venue.COINBASE
    default_urls: ClassVar[Mapping[str, str]] = {
        "advanced": "https://api.coinbase.com",
        "exchange": "https://api.exchange.coinbase.com",
    }
    # Both private limits are per user / profile, so per key here: Advanced Trade 30 rps per user (4A.6),
    # Exchange 15 rps per profile, burst 30 (4B); the stricter one serves both kinds. Nothing per IP is
    # documented for private calls: the venue-wide bucket is only a safety cap.
    rate_per_second = 100.0
    burst = 100.0
    key_windows: ClassVar[Mapping[str, tuple[int, float]]] = {"*": (15, 1.0)}

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str | None = None,
        timeout: float = http.DEFAULT_TIMEOUT,
        limiter: limits.RateLimiter | None = None,
        rate_limited: bool = True,
        budgets: limits.IpBudgets | None = None,
    ) -> None:
        super().__init__(
            session,
            base_url=base_url,
            timeout=timeout,
            limiter=limiter,
            rate_limited=rate_limited,
            budgets=budgets,
        )

    def check_keys(self, keys: base.ApiKeys) -> None:
        coinbase_auth.signer_for(keys)

    async def probe(self, keys: base.ApiKeys) -> base.ProbeResult:
        try:
            signer = coinbase_auth.signer_for(keys)
        except base.KeyFormatProblem as problem:
            raise base.format_failure(self.venue, problem) from None
        if isinstance(signer, coinbase_auth.CdpSigner):
            return await self._probe_cdp(signer)
        return await self._probe_exchange(signer)

    # -- Advanced Trade (CDP keys) -------------------------------------------------------------------------

    async def _probe_cdp(self, signer: coinbase_auth.CdpSigner) -> base.ProbeResult:
        # One round trip: key_permissions and both identity calls go out at once (docs/venues.md §6); the
        # key_permissions answer decides (a bad key fails all three). What the speculation costs: a bad key
        # spends two more requests (four with the retry after the clock resync that a 401 triggers, §4A.5),
        # counted against that key's own per-user budget (§4A.6), which a refused key does not have anyway; the
        # clock is still fetched once for all of them. A good key sends the same three calls as before.
        found, accounts, portfolios = await http.gather_identities(
            [
                self._cdp_get(signer, KEY_PERMISSIONS),
                self._cdp_get(signer, ACCOUNTS, query="?limit=1"),
                self._cdp_get(signer, PORTFOLIOS),
            ]
        )
        http.raise_verify_failure(found, [accounts, portfolios])
        portfolio = found.get("portfolio_uuid")
        # A false flag may be left out (proto3 JSON drops defaults): missing reads as False.
        flags = [found.get(name, False) for name in ("can_view", "can_trade", "can_transfer")]
        if not isinstance(portfolio, str) or not portfolio or not all(isinstance(f, bool) for f in flags):
            raise self._unreadable(KEY_PERMISSIONS)
        can_view, can_trade, can_transfer = flags

        reached = False
        if not isinstance(accounts, BaseException):
            if not isinstance(accounts.get("accounts"), list):
                raise self._unreadable(ACCOUNTS)
            reached = True
        if not isinstance(portfolios, BaseException):
            listed = portfolios.get("portfolios")
            if not isinstance(listed, list):
                raise self._unreadable(PORTFOLIOS)
            reached = reached or any(isinstance(p, dict) and p.get("uuid") == portfolio for p in listed)
        if not reached:
            _raise_blocking([accounts, portfolios])

        details = {"keyKind": "cdp", "algorithm": signer.algorithm}
        if isinstance(found.get("portfolio_type"), str):
            details["portfolioType"] = found["portfolio_type"]
        return base.ProbeResult(
            venue=self.venue,
            venue_account_id=portfolio,
            # can_transfer covers withdrawals and portfolio moves alike (docs/venues.md §4A.3)
            permissions=base.Permissions(
                read=can_view, trade=can_trade, withdraw=can_transfer, transfer=can_transfer
            ),
            identities=(IDENTITY,) if reached else (),
            details=details,
        )

    async def _cdp_get(
        self, signer: coinbase_auth.CdpSigner, path: str, *, query: str = ""
    ) -> dict[str, Any]:
        """One signed GET; a 401 (or other INVALID_KEY answer) resyncs the clock and retries once (4A.5)."""
        url = self.url("advanced", path)
        for attempt in range(2):
            await self.throttle(signer.key_name)
            seen = self.clock_generation
            token = signer.token("GET", url, self.now_ms() // 1000)  # fresh per request: uri binds it
            reply = await self._call(
                "GET", url + query, headers={"Authorization": f"Bearer {token}"}, limit=False
            )
            if 200 <= reply.status < 300:
                if not isinstance(reply.body, dict):
                    raise self.malformed(reply)
                return reply.body
            failure = self._cdp_failure(reply, path, resynced=attempt > 0)
            if failure.outcome is not Outcome.INVALID_KEY or attempt > 0:
                raise failure
            await self._resync_clock(ADVANCED_TIME, seen)
        raise AssertionError("unreachable")  # pragma: no cover

    def _cdp_failure(self, reply: http.Reply, path: str, *, resynced: bool) -> base.ProbeFailure:
        code = _cdp_code(reply.body)
        known = _CDP_CODES_BY_LOWER.get(code.lower()) if code else None
        if reply.status in (401, 403) and _mentions_ip(reply.text):
            outcome, venue_code = Outcome.IP_NOT_ALLOWED, known[0] if known else None
        elif known:
            venue_code, outcome = known
        else:
            outcome = CDP_HTTP_STATUS.get(reply.status, Outcome.SERVER_ERROR)
            venue_code = code if code and _CODE_RE.fullmatch(code) else None
        hint = _HINTS.get(outcome, "")
        if outcome is Outcome.INVALID_KEY:
            hint = "the CDP key name or its private key was rejected" + (
                " (still after a clock resync)" if resynced else ""
            )
        shown = venue_code or f"HTTP {reply.status}"
        return base.ProbeFailure(
            outcome,
            f"Coinbase GET {path} answered {shown}: {hint}",
            retry_after=reply.retry_after() if outcome.transient else None,
            venue_code=venue_code,
        )

    # -- Coinbase Exchange (key + secret + passphrase) -------------------------------------------------------

    async def _probe_exchange(self, signer: coinbase_auth.ExchangeSigner) -> base.ProbeResult:
        accounts, profiles = await http.gather_identities(
            [self._exchange_get(signer, EXCHANGE_ACCOUNTS), self._exchange_get(signer, EXCHANGE_PROFILES)]
        )
        http.raise_verify_failure(accounts, [profiles])  # the verify call decides; its refusal is the verdict
        if not isinstance(accounts, list) or not all(isinstance(a, dict) for a in accounts):
            raise self._unreadable(EXCHANGE_ACCOUNTS)
        profile_id = self._default_profile(profiles, accounts)
        return base.ProbeResult(
            venue=self.venue,
            venue_account_id=profile_id,
            permissions=base.Permissions(read=True),  # GET /accounts worked; trade/transfer not exposed
            identities=(IDENTITY,),
            details={"keyKind": "exchange", "permissions": "unknown"},
        )

    def _default_profile(self, profiles: object, accounts: list[dict[str, Any]]) -> str:
        """The ``is_default`` (else first) profile id; if /profiles was refused: the accounts' profile_id."""
        if isinstance(profiles, list):
            listed = [p for p in profiles if isinstance(p, dict) and isinstance(p.get("id"), str) and p["id"]]
            if not listed:
                raise self._unreadable(EXCHANGE_PROFILES)
            chosen = next((p for p in listed if p.get("is_default") is True), listed[0])
            return str(chosen["id"])
        if isinstance(profiles, base.ProbeFailure) and not profiles.transient:
            for account in accounts:
                if isinstance(account.get("profile_id"), str):
                    return str(account["profile_id"])
        if isinstance(profiles, BaseException):
            raise profiles
        raise self._unreadable(EXCHANGE_PROFILES)

    async def _exchange_get(self, signer: coinbase_auth.ExchangeSigner, path: str) -> Any:
        """One signed GET; "request timestamp expired" resyncs the clock and retries once (docs/venues.md §4B)."""
        url = self.url("exchange", path)
        for attempt in range(2):
            await self.throttle(signer.api_key)
            seen = self.clock_generation
            headers = signer.headers("GET", path, "", self.now_ms() // 1000)  # signed after the wait
            reply = await self._call("GET", url, headers=headers, limit=False)
            if 200 <= reply.status < 300:
                if reply.body is None:
                    raise self.malformed(reply)
                return reply.body
            failure = self._exchange_failure(reply, path)
            if failure.outcome is not Outcome.CLOCK_SKEW or attempt > 0:
                raise failure
            await self._resync_clock(EXCHANGE_TIME, seen)
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange_failure(self, reply: http.Reply, path: str) -> base.ProbeFailure:
        body = reply.body
        message = body.get("message") if isinstance(body, dict) else None
        lowered = (message if isinstance(message, str) else reply.text).lower()
        matched = next(((k, v) for k, v in EXCHANGE_MESSAGES.items() if k.lower() in lowered), None)
        venue_code: str | None
        if matched:
            venue_code, outcome = matched
        elif reply.status in (401, 403) and _mentions_ip(lowered):
            venue_code, outcome = None, Outcome.IP_NOT_ALLOWED
        else:
            venue_code, outcome = None, EXCHANGE_HTTP_STATUS.get(reply.status, Outcome.SERVER_ERROR)
        shown = f'"{venue_code}"' if venue_code else f"HTTP {reply.status}"
        return base.ProbeFailure(
            outcome,
            f"Coinbase Exchange GET {path} answered {shown}: {_HINTS.get(outcome, '')}",
            retry_after=reply.retry_after() if outcome.transient else None,
            venue_code=venue_code,
        )

    # -- shared ---------------------------------------------------------------------------------------------

    async def _resync_clock(self, path: str, seen: int) -> None:
        """Learn the venue clock from its public time endpoint (docs/venues.md §6) unless it moved since ``seen``."""
        role = "advanced" if path == ADVANCED_TIME else "exchange"

        def server_ms(reply: http.Reply) -> float:
            if reply.status == 429:
                raise base.ProbeFailure(
                    Outcome.RATE_LIMITED,
                    f"Coinbase GET {path}: rate limit hit",
                    retry_after=reply.retry_after(),
                )
            value = _server_time_ms(reply.body) if reply.status == 200 else None
            if value is None:
                raise self.malformed(reply)
            return value

        await self.resync_clock(self.url(role, path), server_ms, seen=seen)

    def _unreadable(self, path: str) -> base.ProbeFailure:
        return base.ProbeFailure(Outcome.SERVER_ERROR, f"Coinbase GET {path} answered in an unexpected shape")


def _server_time_ms(body: object) -> float | None:
    """Advanced ``{"epochMillis": "...", "epochSeconds": "..."}``; Exchange ``{"epoch": 1420674445.201}``."""
    if not isinstance(body, dict):
        return None
    for name, scale in (("epochMillis", 1), ("epochSeconds", 1000), ("epoch", 1000)):
        value = body.get(name)
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number) and number > 0:
                return number * scale
    return None


def _cdp_code(body: object) -> str | None:
    """``{"error": "..."}`` or ``{"errors": [{"id": "..."}]}`` (docs/venues.md §4A.5)."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, str):
        return error
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0].get("id")
        return first if isinstance(first, str) else None
    return None


def _mentions_ip(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _IP_WORDS)


def _raise_blocking(results: Sequence[object]) -> None:
    """No identity check succeeded: raise what forbids concluding "not reached" (transient first)."""
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if not isinstance(failure, base.ProbeFailure) or failure.transient:
            raise failure
    for failure in failures:
        if isinstance(failure, base.ProbeFailure) and failure.outcome is not Outcome.PERMISSION_DENIED:
            raise failure
