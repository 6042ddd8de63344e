"""Binance: HMAC-SHA256 signed query strings (docs/venues.md §1).

One probe = one round trip: the verify call (``GET /sapi/v1/account/apiRestrictions``, the key's permissions)
and the three identity calls at once: spot ``/api/v3/account`` (also the account ``uid``), cross margin
``/sapi/v1/margin/account`` and USD-M futures ``/fapi/v2/account``. The verify call's refusal decides.

Only HMAC keys are supported; RSA/Ed25519 keys (docs/venues.md §1.2 step 5) are refused by :meth:`check_keys`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote, urlencode

from venues import base, http, limits

RECV_WINDOW_MS = 5000  # docs/venues.md §1.2: the documented default (max 60000)
RESTRICTIONS_PATH = "/sapi/v1/account/apiRestrictions"
SPOT_ACCOUNT_PATH = "/api/v3/account"
MARGIN_ACCOUNT_PATH = "/sapi/v1/margin/account"
FUTURES_ACCOUNT_PATH = "/fapi/v2/account"
TIME_PATHS = {"api": "/api/v3/time", "fapi": "/fapi/v1/time"}  # docs/venues.md §6, clock-sync endpoints

# docs/venues.md §1.6: request weights of the calls a probe makes
RESTRICTIONS_WEIGHT = 1.0
SPOT_ACCOUNT_WEIGHT = 20.0
MARGIN_ACCOUNT_WEIGHT = 10.0
FUTURES_ACCOUNT_WEIGHT = 5.0

# docs/venues.md §1.5 (plus -3003 from 1.4): code -> (outcome, what it means). A code the doc classes as a bug of
# ours (-1131) is SERVER_ERROR: transient, so a probe bug never marks a customer's key FAILED.
_CODES: dict[int, tuple[base.Outcome, str]] = {
    -2014: (base.Outcome.INVALID_KEY, "API-key format invalid"),
    -2015: (
        base.Outcome.INVALID_KEY,
        "invalid API-key, IP, or permissions for action: the key is unknown, this IP is not on its "
        "allow-list, or it lacks 'Enable Reading' (Binance does not say which)",
    ),
    -2008: (base.Outcome.INVALID_KEY, "invalid API-key ID"),
    -1022: (base.Outcome.INVALID_SECRET, "signature not valid: the API secret does not belong to this key"),
    -1021: (base.Outcome.CLOCK_SKEW, "timestamp outside the recvWindow"),
    -1131: (base.Outcome.SERVER_ERROR, "recvWindow rejected (a probe bug, not a key problem)"),
    -1002: (base.Outcome.PERMISSION_DENIED, "not authorized to execute this request"),
    -1099: (base.Outcome.INVALID_KEY, "not found, authenticated, or authorized"),
    -2017: (base.Outcome.ACCOUNT_RESTRICTED, "API keys are locked on this account"),
    -4056: (base.Outcome.INVALID_KEY, "invalid API key type"),
    -4057: (base.Outcome.INVALID_KEY, "invalid RSA public key"),
    -3001: (base.Outcome.ACCOUNT_RESTRICTED, "2FA must be enabled on the account first"),
    -3003: (base.Outcome.PERMISSION_DENIED, "margin account does not exist"),
    -1003: (base.Outcome.RATE_LIMITED, "too many requests (weight exceeded or IP banned)"),
    -1015: (base.Outcome.RATE_LIMITED, "too many new orders"),
    -1000: (base.Outcome.SERVER_ERROR, "unknown error"),
    -1001: (base.Outcome.SERVER_ERROR, "internal error (disconnected)"),
    -1006: (base.Outcome.SERVER_ERROR, "unexpected response from the backend"),
    -1007: (base.Outcome.SERVER_ERROR, "backend timeout"),
    -1008: (base.Outcome.SERVER_ERROR, "server busy"),
    -1016: (base.Outcome.MAINTENANCE, "service no longer available"),
}
ERRORS: dict[int, base.Outcome] = {code: outcome for code, (outcome, _) in _CODES.items()}

# Answers without a Binance error code, by HTTP status (docs/venues.md §1.5 "HTTP"). 5xx is SERVER_ERROR.
HTTP_STATUS: dict[int, base.Outcome] = {
    418: base.Outcome.RATE_LIMITED,  # IP auto-banned after ignoring 429s
    429: base.Outcome.RATE_LIMITED,
    403: base.Outcome.RATE_LIMITED,  # WAF block (rate limit or security rule)
    408: base.Outcome.TIMEOUT,  # futures backend timeout
}

_TOKEN = re.compile(r"[A-Za-z0-9]{8,128}")


def encode_params(params: Sequence[tuple[str, str]]) -> str:
    """A query string, non-ASCII values percent-encoded as UTF-8 *before* signing (docs/venues.md §1.2 step 3)."""
    return urlencode(params, quote_via=quote)


def sign_query(secret: str, payload: str) -> str:
    """Lowercase hex HMAC-SHA256 of ``payload`` (query string + body, no separator) keyed by the secret."""
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def signed_query(
    secret: str,
    timestamp_ms: int,
    params: Sequence[tuple[str, str]] = (),
    *,
    recv_window: int = RECV_WINDOW_MS,
) -> str:
    """The query to send: ``timestamp``, ``recvWindow``, ``params``, then ``signature`` last (ccxt order)."""
    payload = encode_params([("timestamp", str(timestamp_ms)), ("recvWindow", str(recv_window)), *params])
    return f"{payload}&signature={sign_query(secret, payload)}"


def classify(reply: http.Reply) -> base.ProbeFailure | None:
    """The failure a Binance answer means, or None when it is a readable success."""
    body = reply.body
    code = body.get("code") if isinstance(body, dict) else None
    retry_after = reply.retry_after()
    if reply.status in (418, 429):  # whatever the body says: honour Retry-After
        return base.ProbeFailure(
            base.Outcome.RATE_LIMITED,
            f"Binance rate limit hit (HTTP {reply.status})",
            retry_after=retry_after,
            venue_code=str(code) if code is not None else None,
        )
    if isinstance(code, int) and not isinstance(code, bool) and (code < 0 or reply.status >= 400):
        outcome, meaning = _CODES.get(code, (base.Outcome.SERVER_ERROR, "unrecognised error code"))
        return base.ProbeFailure(
            outcome,
            f"Binance {code}: {meaning}",
            retry_after=retry_after if outcome.transient else None,
            venue_code=str(code),
        )
    status_outcome = HTTP_STATUS.get(reply.status)
    if status_outcome is None and reply.status >= 400:
        status_outcome = base.Outcome.SERVER_ERROR  # 5xx, or a status Binance does not document: transient
    if status_outcome is not None:
        return base.ProbeFailure(
            status_outcome,
            f"Binance answered HTTP {reply.status}",
            retry_after=retry_after,
            venue_code=f"HTTP {reply.status}",
        )
    if not isinstance(body, dict | list):
        return base.ProbeFailure(
            base.Outcome.SERVER_ERROR, f"Binance sent an unreadable answer (HTTP {reply.status})"
        )
    return None


def permissions_from_restrictions(body: Any) -> base.Permissions:
    """Map ``apiRestrictions`` (docs/venues.md §1.3) to :class:`Permissions`; ``ValueError`` if malformed."""
    if not isinstance(body, dict):
        raise ValueError("apiRestrictions is not an object")
    if not isinstance(body.get("enableReading"), bool) or not isinstance(body.get("ipRestrict"), bool):
        raise ValueError("apiRestrictions without enableReading/ipRestrict")
    expiry = body.get("tradingAuthorityExpirationTime")
    return base.Permissions(
        read=body["enableReading"],
        trade=any(
            body.get(flag) is True
            for flag in (
                "enableSpotAndMarginTrading",
                "enableFutures",
                "enableMargin",
                "enableVanillaOptions",
                "enablePortfolioMarginTrading",
                "enableFixApiTrade",
            )
        ),
        withdraw=body.get("enableWithdrawals") is True,
        transfer=body.get("enableInternalTransfer") is True or body.get("permitsUniversalTransfer") is True,
        ip_restricted=body["ipRestrict"],
        ip_allowlist=(),  # Binance does not return the list itself
        # the expiry of the spot & margin *trading* permission (docs/venues.md §1.7), not of the key
        expires_at_ms=int(expiry) if expiry is not None else None,
    )


class BinanceProbe(http.VenueProbe):
    """Verifies a Binance HMAC key, reads its permissions and finds its spot / margin / futures accounts."""

    venue: ClassVar[base.Venue] = base.Venue.BINANCE
    default_urls: ClassVar[Mapping[str, str]] = {
        "api": "https://api.binance.com",  # /api and /sapi
        "fapi": "https://fapi.binance.com",
    }
    # The limiter counts request *weight* (the cost of each call): spot allows 6000/min per IP (docs/venues.md
    # 1.6); we take half, leaving room for the trading backend on the same IP. A probe weighs 36.
    rate_per_second: ClassVar[float] = 50.0
    burst: ClassVar[float | None] = 60.0
    # Shared by the processes of one egress IP (docs/venues.md §1.6): weight per minute per IP, per host family;
    # half of each for us, as above. /sapi counts some endpoints per UID, ours per IP (12,000/min, ccxt).
    ip_budgets: ClassVar[Mapping[str, limits.IpBudget]] = {
        "/api/": limits.IpBudget("binance:api", 6000, 60.0),
        "/sapi/": limits.IpBudget("binance:sapi", 12000, 60.0),
        "/fapi/": limits.IpBudget("binance:fapi", 2400, 60.0),
    }

    def check_keys(self, keys: base.ApiKeys) -> None:
        """HMAC keys and secrets are 64 alphanumerics in production; 8..128 pass (testnet, other formats)."""
        base.check_token(
            "apiKey", keys.api_key, _TOKEN, "must be 8 to 128 letters and digits (Binance keys are 64)"
        )
        if "PRIVATE KEY" in keys.api_secret:
            raise base.KeyFormatProblem(
                "apiSecret", "is an RSA/Ed25519 private key: only HMAC keys are supported"
            )
        base.check_token(
            "apiSecret", keys.api_secret, _TOKEN, "must be 8 to 128 letters and digits (Binance keys are 64)"
        )

    async def probe(self, keys: base.ApiKeys) -> base.ProbeResult:
        try:
            self.check_keys(keys)
        except base.KeyFormatProblem as problem:
            raise base.format_failure(self.venue, problem) from None
        # docs/venues.md §6: the spot testnet has no /sapi (404), so /api/v3/account is the verify call there. Only
        # with a base_url: on the production hosts a 404 is an anomaly (a proxy?) and must never turn a key
        # that can withdraw into one reported without permissions.
        missing = (404,) if self.base_url is not None else ()
        # One round trip: the verify call and the three identity calls go out at once (docs/venues.md §6).
        # What the speculation costs: Binance counts request weight per IP (§1.6), and we take refused requests
        # to be charged too (docs/venues.md §8), so a bad key now spends 1 + 20 + 10 + 5 = 36 weight instead of
        # 1: 35 more, 0.6 % of the 6000 a minute per IP; a good key spends the same 36 as before. Bad keys are
        # rare (a typo, a deleted key), every call still waits on the client-side limiter, and every good key
        # saves a round trip.
        restrictions, *answers = await http.gather_identities(
            [
                self._signed_get(
                    keys, "api", RESTRICTIONS_PATH, cost=RESTRICTIONS_WEIGHT, passthrough=missing
                ),
                self._signed_get(
                    keys, "api", SPOT_ACCOUNT_PATH, [("omitZeroBalances", "true")], cost=SPOT_ACCOUNT_WEIGHT
                ),
                self._signed_get(
                    keys, "api", MARGIN_ACCOUNT_PATH, cost=MARGIN_ACCOUNT_WEIGHT, passthrough=missing
                ),
                self._signed_get(
                    keys, "fapi", FUTURES_ACCOUNT_PATH, cost=FUTURES_ACCOUNT_WEIGHT, passthrough=missing
                ),
            ]
        )
        http.raise_verify_failure(restrictions, answers)  # the verify call's refusal is the key's verdict
        permissions: base.Permissions | None = None
        if restrictions.status != 404:
            try:
                permissions = permissions_from_restrictions(restrictions.body)
            except (ValueError, TypeError):
                raise self.malformed(restrictions) from None
        if permissions is None and isinstance(answers[0], base.ProbeFailure):
            raise answers[0]  # the spot call was the verify call: its failure is the key's failure
        spot, margin, futures = http.settle_identities(answers)
        uid, spot_body = self._spot_account(spot)
        details: dict[str, str] = {}
        if permissions is None:
            # No /sapi on this host, so no key permissions and no withdrawals through this API at all
            permissions = base.Permissions(read=True, trade=spot_body.get("canTrade") is True)
            details["permissions"] = "account-level (no /sapi/v1/account/apiRestrictions on this host)"
        identities = {"spot"}
        if self._reached(margin):
            identities.add("margin")
        if self._reached(futures):
            identities.add("futures")
        return base.ProbeResult(
            venue=self.venue,
            venue_account_id=uid,
            permissions=permissions,
            identities=tuple(sorted(identities)),
            details=details,
        )

    def _spot_account(self, result: http.Reply | base.ProbeFailure) -> tuple[str, Mapping[str, Any]]:
        """The uid from ``/api/v3/account`` (the venue account id); the key must be able to read it."""
        if isinstance(result, base.ProbeFailure):
            if result.outcome in (base.Outcome.INVALID_KEY, base.Outcome.PERMISSION_DENIED):
                raise base.ProbeFailure(
                    base.Outcome.PERMISSION_DENIED,
                    "Binance accepted the key but it cannot read the spot account "
                    f"(code {result.venue_code}), so its account id is unknown",
                    venue_code=result.venue_code,
                )
            raise result
        body = result.body
        uid = body.get("uid") if isinstance(body, dict) else None
        if not isinstance(body, dict) or isinstance(uid, bool) or not isinstance(uid, int | str) or uid == "":
            raise self.malformed(result)
        return str(uid), body

    def _reached(self, result: http.Reply | base.ProbeFailure) -> bool:
        """One identity answer: a readable success means reached; a permanent refusal means not reached.

        Refusals here are permanent (transients were raised): -2015 (futures not enabled for the key),
        -3003 (margin account not opened), -2017 (keys locked), 404 from a base_url host that does not
        serve that product (a testnet).
        """
        if isinstance(result, base.ProbeFailure) or result.status == 404:
            return False
        if not isinstance(result.body, dict):
            raise self.malformed(result)
        return True

    async def _signed_get(
        self,
        keys: base.ApiKeys,
        role: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        cost: float,
        passthrough: Collection[int] = (),
    ) -> http.Reply:
        """One signed GET; on CLOCK_SKEW resync from the public time endpoint and retry once.

        Answers whose HTTP status is in ``passthrough`` are returned unclassified.
        """
        seen = self.clock_generation
        reply = await self._send(keys, role, path, params, cost)
        failure = None if reply.status in passthrough else classify(reply)
        if failure is not None and failure.outcome is base.Outcome.CLOCK_SKEW:
            await self._resync(role, seen)
            reply = await self._send(keys, role, path, params, cost)
            failure = None if reply.status in passthrough else classify(reply)
        if failure is not None:
            raise failure
        return reply

    async def _send(
        self, keys: base.ApiKeys, role: str, path: str, params: Sequence[tuple[str, str]], cost: float
    ) -> http.Reply:
        await self.throttle(
            None, cost, path=path
        )  # per IP only (1.6); wait first, then stamp: no stale requests
        query = signed_query(keys.api_secret, self.now_ms(), params)
        headers = {"X-MBX-APIKEY": keys.api_key}
        return await self._call("GET", f"{self.url(role, path)}?{query}", headers=headers, limit=False)

    async def _resync(self, role: str, seen: int) -> None:
        """Learn the venue's clock from the time endpoint of the host that refused (docs/venues.md §6)."""
        await self.resync_clock(self.url(role, TIME_PATHS[role]), self._server_ms, seen=seen)

    def _server_ms(self, reply: http.Reply) -> float:
        failure = classify(reply)
        if failure is not None:
            raise failure
        server_ms = reply.body.get("serverTime") if isinstance(reply.body, dict) else None
        if isinstance(server_ms, bool) or not isinstance(server_ms, int):
            raise self.malformed(reply)
        return float(server_ms)
