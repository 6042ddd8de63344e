"""OKX (API v5): base64 HMAC-SHA256 over timestamp + METHOD + requestPath + body (docs/venues.md §2).

One probe = one round trip: ``GET /api/v5/account/config`` (the key's ``perm``, ``ip`` and the account ``uid``)
and the two identity calls at once: trading ``/api/v5/account/balance`` and funding ``/api/v5/asset/balances``;
the config call's refusal decides.
Every key has a passphrase; a key of the demo-trading environment is told apart by retrying with
``x-simulated-trading: 1`` (venues/README.md, probe <-> simulator contract).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from venues import base, http

CONFIG_PATH = "/api/v5/account/config"
TRADING_BALANCE_PATH = "/api/v5/account/balance"
FUNDING_BALANCES_PATH = "/api/v5/asset/balances"
TIME_PATH = "/api/v5/public/time"  # docs/venues.md §6, clock-sync endpoints
DEMO_HEADER = "x-simulated-trading"  # docs/venues.md §2.1: demo trading = same host + this header set to "1"
ENVIRONMENT_MISMATCH_CODE = "50101"

# docs/venues.md §2.5: code -> (outcome, what it means). The doc's "bug" rows (a header we always send reported
# missing, a method we never use) are SERVER_ERROR: transient, so a probe bug never marks a key FAILED.
_CODES: dict[str, tuple[base.Outcome, str]] = {
    "50100": (base.Outcome.ACCOUNT_RESTRICTED, "API frozen, contact OKX customer service"),
    "50101": (base.Outcome.WRONG_ENVIRONMENT, "API key does not match the current environment (demo/live)"),
    "50102": (base.Outcome.CLOCK_SKEW, "request timestamp expired"),
    "50103": (base.Outcome.SERVER_ERROR, "OK-ACCESS-KEY header reported empty (a probe bug)"),
    "50104": (base.Outcome.SERVER_ERROR, "OK-ACCESS-PASSPHRASE header reported empty (a probe bug)"),
    "50105": (base.Outcome.INVALID_PASSPHRASE, "the passphrase does not match the key"),
    "50106": (base.Outcome.SERVER_ERROR, "OK-ACCESS-SIGN header reported empty (a probe bug)"),
    "50107": (base.Outcome.SERVER_ERROR, "OK-ACCESS-TIMESTAMP header reported empty (a probe bug)"),
    "50108": (base.Outcome.WRONG_ENVIRONMENT, "exchange (broker) ID does not exist"),
    "50109": (base.Outcome.WRONG_ENVIRONMENT, "exchange domain does not exist"),
    "50110": (base.Outcome.IP_NOT_ALLOWED, "this IP is not on the key's IP whitelist"),
    "50111": (base.Outcome.INVALID_KEY, "invalid OK-ACCESS-KEY"),
    "50112": (base.Outcome.CLOCK_SKEW, "invalid OK-ACCESS-TIMESTAMP"),
    "50113": (base.Outcome.INVALID_SECRET, "invalid signature: the API secret does not belong to this key"),
    "50114": (base.Outcome.INVALID_KEY, "invalid authorization"),
    "50115": (base.Outcome.SERVER_ERROR, "invalid request method (a probe bug)"),
    "50119": (
        base.Outcome.INVALID_KEY,
        "API key doesn't exist (deleted, expired, or created on another OKX domain such as EEA or US)",
    ),
    "50120": (base.Outcome.PERMISSION_DENIED, "API key doesn't have permission"),
    "50121": (base.Outcome.IP_NOT_ALLOWED, "access not allowed from this IP or region"),
    "50007": (base.Outcome.ACCOUNT_RESTRICTED, "account blocked"),
    "50009": (base.Outcome.ACCOUNT_RESTRICTED, "account suspended (liquidation)"),
    "50027": (base.Outcome.ACCOUNT_RESTRICTED, "account restricted from trading"),
    "50008": (base.Outcome.INVALID_KEY, "user does not exist"),
    "50011": (base.Outcome.RATE_LIMITED, "rate limit reached"),
    "50061": (base.Outcome.RATE_LIMITED, "sub-account rate limit reached"),
    "50001": (base.Outcome.MAINTENANCE, "service temporarily unavailable"),
    "50004": (base.Outcome.TIMEOUT, "endpoint request timeout"),
    "50005": (base.Outcome.MAINTENANCE, "API is offline or unavailable"),
    "50013": (base.Outcome.SERVER_ERROR, "system busy"),
    "50026": (base.Outcome.SERVER_ERROR, "system error"),
}
ERRORS: dict[str, base.Outcome] = {code: outcome for code, (outcome, _) in _CODES.items()}

# Answers without an OKX error code, by HTTP status. Any other 4xx/5xx is SERVER_ERROR (transient).
HTTP_STATUS: dict[int, base.Outcome] = {429: base.Outcome.RATE_LIMITED}

_API_KEY = re.compile(r"[A-Za-z0-9-]{8,128}")  # a UUID in practice
_SECRET = re.compile(r"[A-Za-z0-9]{8,128}")  # 32 upper-case hex in practice
_PASSPHRASE = re.compile(r"[\x21-\x7e]{1,128}")  # chosen by the user: visible ASCII (it travels in a header)
INACTIVITY_DELETION_DAYS = 14  # docs/venues.md §2.7 [3rd-party]: trade/withdraw keys without a bound IP


def iso_timestamp(ms: int) -> str:
    """UTC ISO-8601 with milliseconds, as OK-ACCESS-TIMESTAMP wants: ``2020-12-08T09:08:57.715Z``."""
    whole = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return f"{whole:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def sign(secret: str, timestamp: str, method: str, request_path: str, body: str = "") -> str:
    """OK-ACCESS-SIGN: base64(HMAC-SHA256(secret as text, timestamp + METHOD + requestPath + body)).

    ``request_path`` includes ``?query`` for GET; ``body`` is the exact JSON sent (docs/venues.md §2.2).
    """
    message = f"{timestamp}{method.upper()}{request_path}{body}"
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def auth_headers(
    keys: base.ApiKeys, timestamp: str, method: str, request_path: str, body: str = "", *, demo: bool = False
) -> dict[str, str]:
    """The four OK-ACCESS-* headers (plus Content-Type with a body, the demo header when asked)."""
    headers = {
        "OK-ACCESS-KEY": keys.api_key,
        "OK-ACCESS-SIGN": sign(keys.api_secret, timestamp, method, request_path, body),
        "OK-ACCESS-TIMESTAMP": timestamp,
        "OK-ACCESS-PASSPHRASE": keys.api_passphrase or "",
    }
    if body:
        headers["Content-Type"] = "application/json"
    if demo:
        headers[DEMO_HEADER] = "1"
    return headers


def classify(reply: http.Reply) -> base.ProbeFailure | None:
    """The failure an OKX answer means, or None when it is a readable success (``code`` "0")."""
    body = reply.body
    raw_code = body.get("code") if isinstance(body, dict) else None
    code = str(raw_code) if raw_code is not None else None
    retry_after = reply.retry_after()
    if reply.status == 429:
        return base.ProbeFailure(
            base.Outcome.RATE_LIMITED,
            "OKX rate limit hit (HTTP 429)",
            retry_after=retry_after,
            venue_code=code or "HTTP 429",
        )
    if code is not None and code != "0":
        outcome, meaning = _CODES.get(code, (base.Outcome.SERVER_ERROR, "unrecognised error code"))
        return base.ProbeFailure(
            outcome,
            f"OKX {code}: {meaning}",
            retry_after=retry_after if outcome.transient else None,
            venue_code=code,
        )
    if reply.status >= 400:
        return base.ProbeFailure(
            HTTP_STATUS.get(reply.status, base.Outcome.SERVER_ERROR),
            f"OKX answered HTTP {reply.status}",
            retry_after=retry_after,
            venue_code=f"HTTP {reply.status}",
        )
    if code != "0" or not isinstance(body.get("data"), list):
        return base.ProbeFailure(
            base.Outcome.SERVER_ERROR, f"OKX sent an unreadable answer (HTTP {reply.status})"
        )
    return None


def permissions_from_config(config: Any) -> base.Permissions:
    """Map ``account/config`` ``data[0]`` (docs/venues.md §2.3) to permissions; ``ValueError`` if malformed."""
    if not isinstance(config, dict):
        raise ValueError("config is not an object")
    perm, ip = config.get("perm"), config.get("ip", "")
    if not isinstance(perm, str) or not isinstance(ip, str):
        raise ValueError("config without perm/ip strings")
    granted = {p.strip() for p in perm.split(",") if p.strip()}
    allowlist = tuple(a.strip() for a in ip.split(",") if a.strip())
    return base.Permissions(
        read=True,  # account/config itself needs the Read permission (docs/venues.md §2.3)
        trade="trade" in granted,
        withdraw="withdraw" in granted,
        transfer=False,  # OKX keys have no separate transfer permission (perm: read_only, trade, withdraw)
        ip_restricted=bool(allowlist),
        ip_allowlist=allowlist,
        expires_at_ms=None,  # no expiry field (docs/venues.md §2.7)
    )


class OkxProbe(http.VenueProbe):
    """Verifies an OKX key + secret + passphrase, reads its permissions and finds trading / funding."""

    venue: ClassVar[base.Venue] = base.Venue.OKX
    default_urls: ClassVar[Mapping[str, str]] = {"rest": "https://www.okx.com"}
    # OKX counts these endpoints per UID (docs/venues.md §2.6: account/config 5/2 s, balance 10/2 s,
    # asset balances 6/s);
    # no per-IP figure is documented, so the venue-wide bucket is only a safety cap
    rate_per_second: ClassVar[float] = 100.0
    burst: ClassVar[float | None] = 100.0
    key_windows: ClassVar[Mapping[str, tuple[int, float]]] = {
        CONFIG_PATH: (5, 2.0),
        TRADING_BALANCE_PATH: (10, 2.0),
        FUNDING_BALANCES_PATH: (6, 1.0),
    }

    def check_keys(self, keys: base.ApiKeys) -> None:
        """A UUID-like key, an alphanumeric secret and a passphrase (required) of visible ASCII."""
        base.check_token(
            "apiKey", keys.api_key, _API_KEY, "must be 8 to 128 letters, digits or '-' (OKX keys are UUIDs)"
        )
        base.check_token(
            "apiSecret", keys.api_secret, _SECRET, "must be 8 to 128 letters and digits (OKX: 32 hex)"
        )
        if keys.api_passphrase is None or keys.api_passphrase == "":
            raise base.KeyFormatProblem("apiPassphrase", "is required for OKX keys")
        base.check_token(
            "apiPassphrase",
            keys.api_passphrase,
            _PASSPHRASE,
            "must be at most 128 visible ASCII characters",
        )

    async def probe(self, keys: base.ApiKeys) -> base.ProbeResult:
        try:
            self.check_keys(keys)
        except base.KeyFormatProblem as problem:
            raise base.format_failure(self.venue, problem) from None
        # One round trip: account/config and both balance calls go out at once (docs/venues.md §6); the config
        # call's refusal decides (a bad key fails all three). What the speculation costs: a bad key spends two
        # more requests, refused before any UID is known, so no per-UID window of a real account (§2.6) pays
        # for them, and the client-side windows still hold every call. A good key sends the same three calls.
        config_reply, *answers = await http.gather_identities(
            [
                self._verify(keys),
                self._signed_get(keys, TRADING_BALANCE_PATH),
                self._signed_get(keys, FUNDING_BALANCES_PATH),
            ]
        )
        http.raise_verify_failure(config_reply, answers)
        try:
            config = config_reply.body["data"][0]
            permissions = permissions_from_config(config)
            uid = config["uid"]
        except (KeyError, IndexError, TypeError, ValueError):
            raise self.malformed(config_reply) from None
        if isinstance(uid, bool) or not isinstance(uid, int | str) or str(uid) == "":
            raise self.malformed(config_reply)

        # a success is reached; a permanent refusal (50120 no permission, ...) is not
        identities = [
            name
            for name, answer in zip(("trading", "funding"), http.settle_identities(answers), strict=True)
            if isinstance(answer, http.Reply)
        ]
        return base.ProbeResult(
            venue=self.venue,
            venue_account_id=str(uid),
            permissions=permissions,
            identities=tuple(sorted(identities)),
            details=_details(config, permissions),
        )

    async def _verify(self, keys: base.ApiKeys) -> http.Reply:
        """``account/config``; on 50101 tell a demo-trading key (WRONG_ENVIRONMENT) from an unknown one."""
        try:
            return await self._signed_get(keys, CONFIG_PATH)
        except base.ProbeFailure as failure:
            if failure.venue_code != ENVIRONMENT_MISMATCH_CODE:
                raise
            base.release_frames(failure)  # dropped: its frames hold the keys
        try:
            await self._signed_get(keys, CONFIG_PATH, demo=True)
        except base.ProbeFailure as failure:
            if failure.transient:
                raise
            raise base.ProbeFailure(
                base.Outcome.INVALID_KEY,
                "OKX 50101: the key does not match the live environment and is not a demo-trading key either",
                venue_code=ENVIRONMENT_MISMATCH_CODE,
            ) from None
        raise base.ProbeFailure(
            base.Outcome.WRONG_ENVIRONMENT,
            "OKX 50101: the key belongs to OKX demo trading, not the live environment",
            venue_code=ENVIRONMENT_MISMATCH_CODE,
        )

    async def _signed_get(self, keys: base.ApiKeys, path: str, *, demo: bool = False) -> http.Reply:
        """One signed GET; on CLOCK_SKEW resync from the public time endpoint and retry once."""
        seen = self.clock_generation
        reply = await self._send(keys, path, demo)
        failure = classify(reply)
        if failure is not None and failure.outcome is base.Outcome.CLOCK_SKEW:
            await self._resync(seen)
            reply = await self._send(keys, path, demo)
            failure = classify(reply)
        if failure is not None:
            raise failure
        return reply

    async def _send(self, keys: base.ApiKeys, request_path: str, demo: bool) -> http.Reply:
        # wait first, then stamp: a queued request must not go out stale
        await self.throttle(keys.api_key, path=request_path.partition("?")[0])
        timestamp = iso_timestamp(self.now_ms())
        headers = auth_headers(keys, timestamp, "GET", request_path, demo=demo)
        return await self._call("GET", self.url("rest", request_path), headers=headers, limit=False)

    async def _resync(self, seen: int) -> None:
        """Learn OKX's clock from ``GET /api/v5/public/time`` (``data[0].ts``)."""
        await self.resync_clock(self.url("rest", TIME_PATH), self._server_ms, seen=seen)

    def _server_ms(self, reply: http.Reply) -> float:
        failure = classify(reply)
        if failure is not None:
            raise failure
        try:
            return float(int(reply.body["data"][0]["ts"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise self.malformed(reply) from None


def _details(config: Mapping[str, Any], permissions: base.Permissions) -> dict[str, str]:
    """Non-secret facts worth showing: the key's label, the account mode, main/sub account, deletion risk."""
    details: dict[str, str] = {}
    for field_name, key in (("label", "label"), ("accountMode", "acctLv"), ("mainUid", "mainUid")):
        value = config.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            details[field_name] = str(value)
    if (permissions.trade or permissions.withdraw) and not permissions.ip_restricted:
        details["deletedAfterInactiveDays"] = str(INACTIVITY_DELETION_DAYS)
    return details
