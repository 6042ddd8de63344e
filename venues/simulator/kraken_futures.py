"""Kraken Futures' server side: the auth service's key check and ``/derivatives/api/v3/accounts``.

Authentication (docs/venues.md §5B and the contract): headers ``APIKey``, ``Authent`` and optional ``Nonce``;
``Authent = base64(HMAC-SHA512(base64decode(secret), SHA256(postData + Nonce + endpointPath)))`` where
postData is the query string for GET (the body for POST), Nonce is "" when not sent, and endpointPath is the
URL path without a leading ``/derivatives`` (``/api/auth/v1/api-keys/v3/check`` for the auth service).
A sent Nonce must exceed the last one of the key (``nonceDuplicate`` / ``nonceBelowThreshold``).

Unknown, expired, badly signed and IP-refused keys all answer HTTP 401
``{"result":"error","error":"authenticationError"}`` (contract). Other errors (nonces, rate limit,
faults) use the same body shape; their HTTP statuses are simulator choices (200 for nonce errors, 429 for
``apiLimitExceeded``, 5xx for server faults).

The ``permissions`` object of the key check is not documented (docs/venues.md §5B, 8): the simulator answers
``{"general": "FULL_ACCESS" | "READ_ONLY" | "NO_ACCESS", "withdrawal": "FULL_ACCESS" | "NO_ACCESS"}``,
after the Futures UI's "General API" and "Withdrawal API" settings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

from aiohttp import web

from venues.simulator import common, faults, keygen, kraken_futures_trading, ratelimit
from venues.simulator.registry import TestKey

CHECK_PATH = "/api/auth/v1/api-keys/v3/check"
ACCOUNTS_PATH = "/derivatives/api/v3/accounts"
DERIVATIVES_BUDGET = ratelimit.Window(500, 10.0)  # 500 cost per 10 s (docs/venues.md §5B)
COSTS = {ACCOUNTS_PATH: 2, **kraken_futures_trading.COSTS}


def authent(secret_b64: str, post_data: str, nonce: str, endpoint_path: str) -> str:
    """The ``Authent`` header value (docs/venues.md §5B)."""
    digest = hashlib.sha256((post_data + nonce + endpoint_path).encode()).digest()
    return base64.b64encode(hmac.digest(base64.b64decode(secret_b64), digest, "sha512")).decode()


def endpoint_path(path: str) -> str:
    """The signed path: the URL path without a leading ``/derivatives`` (contract)."""
    return path[len("/derivatives") :] if path.startswith("/derivatives/") else path


def is_futures(path: str) -> bool:
    return path.startswith(("/derivatives/", "/api/auth/"))


class KrakenFutures(kraken_futures_trading.KrakenFuturesTrading):
    """The Futures half of the KRAKEN venue server (see :mod:`venues.simulator.kraken`)."""

    def futures_routes(self) -> list[web.RouteDef]:
        return [
            web.get(CHECK_PATH, self.futures_check),
            web.get(ACCOUNTS_PATH, self.futures_accounts),
            *self.futures_trading_routes(),
        ]

    def futures_error(
        self, code: str, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        body = {"result": "error", "error": code, "serverTime": common.iso_ms(self.now_ms())}
        return common.answer(body, status, headers)

    def futures_rules(self, request: web.Request, key: TestKey | None) -> list[ratelimit.Rule]:
        if (
            not request.path.startswith("/derivatives/")
            or request.path in kraken_futures_trading.PUBLIC_PATHS
        ):
            return []  # the auth service's budget is not documented; public calls cost nothing
        claimed = request.headers.get("APIKey", "")
        cost = COSTS.get(request.path, 1)
        return [ratelimit.Rule(f"kraken-futures:key:{claimed}", DERIVATIVES_BUDGET, cost)]

    def futures_rate_limited(self, retry_after: float) -> web.Response:
        return self.futures_error(
            "apiLimitExceeded", 429, {"Retry-After": faults.retry_after_header(retry_after)}
        )

    def futures_fault(self, kind: str, retry_after: float) -> web.Response:
        if kind == faults.RATE_LIMITED:
            return self.futures_rate_limited(retry_after)
        if kind == faults.MAINTENANCE:
            return self.futures_error("unavailable", 503)
        if kind == faults.MALFORMED:
            return common.truncated('{"result":"success","accounts":{"cash":{"type":"cashAccount"}}}')
        return self.futures_error("Server Error", 500)

    async def futures_authenticate(self, request: web.Request) -> TestKey:
        headers = request.headers
        key = self.lookup(headers.get("APIKey", ""))
        if key is None or not self.usable(key, kinds=("futures",)):
            raise self._denied()
        nonce = headers.get("Nonce", "")
        if request.method == "GET":
            post_data = request.rel_url.raw_query_string
        else:
            # POST parameters may travel in the form body or, as ccxt sends them, in the query string.
            body = await request.text() if request.can_read_body else ""
            post_data = body or request.rel_url.raw_query_string
        try:
            expected = authent(key.api_secret, post_data, nonce, endpoint_path(request.path))
        except binascii.Error:
            raise self._denied() from None
        if not hmac.compare_digest(expected, headers.get("Authent", "")):
            raise self._denied()
        if nonce:
            self._accept_nonce(key, nonce)
        if not common.ip_allowed(key, request):
            raise self._denied()
        return self.accepted(request, key)

    def _denied(self) -> common.Reject:
        """A fresh refusal each time (one kept in a local and raised would hold this frame in a cycle)."""
        return common.Reject(self.futures_error("authenticationError", 401))

    def _accept_nonce(self, key: TestKey, nonce: str) -> None:
        if not nonce.isdigit():
            raise common.Reject(self.futures_error("nonceBelowThreshold"))
        last = self.state.registry.last_nonce(key.api_key)
        if not self.state.registry.accept_nonce(key.api_key, int(nonce)):
            code = "nonceDuplicate" if last == int(nonce) else "nonceBelowThreshold"
            raise common.Reject(self.futures_error(code))

    async def futures_check(self, request: web.Request) -> web.Response:
        key = await self.futures_authenticate(request)
        general = "FULL_ACCESS" if key.trade else "READ_ONLY" if key.read else "NO_ACCESS"
        body: dict[str, Any] = {
            "apiKey": key.api_key,
            "accountUid": key.uid,
            "iiban": keygen.iiban(key.uid),
            "createdAt": common.iso_ms(key.created_at_ms),
            "permissions": {"general": general, "withdrawal": "FULL_ACCESS" if key.withdraw else "NO_ACCESS"},
            "allowedCidrBlock": key.ip_allowlist[0] if key.ip_allowlist else None,
            "allowedCidrBlocks": list(key.ip_allowlist),
        }
        return common.answer(body)

    async def futures_accounts(self, request: web.Request) -> web.Response:
        key = await self.futures_authenticate(request)
        if not (key.read or key.trade) or "futures" not in key.identities:
            raise common.Reject(self.futures_error("authenticationError", 401), auth=False)
        flex_id = common.stable_uuid(f"credential-engine-simulator:{key.uid}:flex")
        # Account types from docs/venues.md §5B; balances and other fields are plausible choices.
        accounts = {
            "cash": {"type": "cashAccount", "balances": {"xbt": 0.0, "usd": 0.0}},
            "flex": {
                "type": "multiCollateralMarginAccount",
                "id": str(flex_id),
                "currencies": self.flex_currencies(key),
                "initialMargin": 0.0,
                "maintenanceMargin": 0.0,
                "balanceValue": 0.0,
                "portfolioValue": 0.0,
                "collateralValue": 0.0,
                "pnl": 0.0,
                "availableMargin": 0.0,
            },
        }
        return common.answer(
            {"result": "success", "accounts": accounts, "serverTime": common.iso_ms(self.now_ms())}
        )
