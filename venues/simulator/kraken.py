"""Kraken's server side: Spot ``/0/private/*`` and ``/0/public/Time``, plus Futures (same port, contract).

Spot authentication (docs/venues.md §5A.2): headers ``API-Key`` and ``API-Sign`` = base64(HMAC-SHA512(
base64decode(secret), URI path || SHA256(nonce + POST data))); the body (form-encoded, or JSON when
``Content-Type: application/json``) carries ``nonce``, which must exceed every nonce used before with that
key (no nonce window). Errors are HTTP 200 ``{"error":["E...:..."]}``.

Checks run in this order: key known, not expired, production (``EAPI:Invalid key``, contract), signature
(``EAPI:Invalid signature``: docs/venues.md lists it; a key that exists but signs wrong is told apart here),
nonce (``EAPI:Invalid nonce``), IP allow-list (``EGeneral:Permission denied``, contract), then the
endpoint's permission (``EGeneral:Permission denied``).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from venues.base import Venue
from venues.simulator import common, faults, kraken_futures, kraken_trading, ratelimit
from venues.simulator.registry import TestKey

# Kraken's per-key call counter, Starter tier (docs/venues.md §5A.6): at most 15, decaying 0.33 per second.
SPOT_COUNTER = ratelimit.Bucket(capacity=15, rate=0.33)
# Strings from docs/venues.md §5A.3 (the four confirmed ones).
READ_PERMISSIONS = ("query-funds", "query-open-trades")


def api_sign(secret_b64: str, uri_path: str, nonce: str, post_data: str) -> str:
    """The ``API-Sign`` header value (docs/venues.md §5A.2)."""
    message = uri_path.encode() + hashlib.sha256((nonce + post_data).encode()).digest()
    return base64.b64encode(hmac.digest(base64.b64decode(secret_b64), message, "sha512")).decode()


def body_nonce(body: str, content_type: str) -> str | None:
    """The ``nonce`` of a form or JSON body, as the text that is hashed; None if absent or unreadable."""
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            return None
        value = data.get("nonce") if isinstance(data, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | str):
            return None
        return str(value)
    values = dict(parse_qsl(body, keep_blank_values=True))
    return values.get("nonce")


def error(message: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return common.answer({"error": [message]}, status, headers)


class KrakenServer(kraken_futures.KrakenFutures, kraken_trading.KrakenTrading):
    venue = Venue.KRAKEN

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/0/public/Time", self.server_time),
            web.post("/0/private/GetApiKeyInfo", self.api_key_info),
            web.post("/0/private/Balance", self.balance),
            web.post("/0/private/TradeBalance", self.trade_balance),
            *self.trading_routes(),
            *self.futures_routes(),
        ]

    def claimed_key(self, request: web.Request) -> str | None:
        return request.headers.get("API-Key") or request.headers.get("APIKey") or None

    def rate_rules(self, request: web.Request, key: TestKey | None) -> list[ratelimit.Rule]:
        if kraken_futures.is_futures(request.path):
            return self.futures_rules(request, key)
        if not request.path.startswith("/0/private/") or request.path in kraken_trading.NOT_COUNTED:
            return []
        return [ratelimit.Rule(f"kraken:key:{request.headers.get('API-Key', '')}", SPOT_COUNTER)]

    def rate_limited(self, request: web.Request, retry_after: float, rule: ratelimit.Rule) -> web.Response:
        if kraken_futures.is_futures(request.path):
            return self.futures_rate_limited(retry_after)
        # Retry-After is a simulator addition: Kraken documents only the error string.
        return error(
            "EAPI:Rate limit exceeded", headers={"Retry-After": faults.retry_after_header(retry_after)}
        )

    def fault(self, request: web.Request, kind: str, retry_after: float) -> web.Response:
        if kraken_futures.is_futures(request.path):
            return self.futures_fault(kind, retry_after)
        if kind == faults.RATE_LIMITED:
            return self.rate_limited(request, retry_after, ratelimit.Rule("fault", SPOT_COUNTER))
        if kind == faults.MAINTENANCE:
            return error("EService:Unavailable")
        if kind == faults.MALFORMED:
            return common.truncated(
                '{"error":[],"result":{"apiKeyName":"sim","permissions":["query-funds"]}}'
            )
        # docs/venues.md §5A.5: a non-200 status means the request never reached the API (a proxy answered).
        return error("EGeneral:Internal error", 500)

    # -- authentication ---------------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> TestKey:
        key = self.lookup(request.headers.get("API-Key", ""))
        if key is None or not self.usable(key, kinds=("spot",)):
            raise common.Reject(error("EAPI:Invalid key"))
        body = await request.text() if request.can_read_body else ""
        nonce = body_nonce(body, request.content_type)
        try:
            expected = api_sign(key.api_secret, request.path, nonce or "", body)
        except binascii.Error:
            raise common.Reject(error("EAPI:Invalid key")) from None
        if not hmac.compare_digest(expected, request.headers.get("API-Sign", "")):
            raise common.Reject(error("EAPI:Invalid signature"))
        if (
            nonce is None
            or not nonce.isdigit()
            or not self.state.registry.accept_nonce(key.api_key, int(nonce))
        ):
            raise common.Reject(error("EAPI:Invalid nonce"))
        if not common.ip_allowed(key, request):
            raise common.Reject(error("EGeneral:Permission denied"))
        return self.accepted(request, key)

    def _funds(self, key: TestKey) -> None:
        """Balance and TradeBalance need "Query Funds" (docs/venues.md §5A.3) and the spot identity."""
        if not key.read or "spot" not in key.identities:
            raise common.Reject(error("EGeneral:Permission denied"), auth=False)

    # -- endpoints --------------------------------------------------------------------------------

    async def server_time(self, request: web.Request) -> web.Response:
        now = self.now_ms() // 1000
        moment = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
        rfc1123 = moment.strftime("%a, %d %b %y %H:%M:%S +0000")
        return common.answer({"error": [], "result": {"unixtime": now, "rfc1123": rfc1123}})

    async def api_key_info(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        permissions = [*READ_PERMISSIONS] if key.read else []
        if key.trade:
            permissions.append("modify-trades")
        if key.withdraw:
            permissions.append("withdraw-funds")
        created = str(key.created_at_ms // 1000)
        result: dict[str, Any] = {
            "apiKeyName": key.label or "simulator-key",
            "apiKey": key.api_key,
            "nonce": str(self.state.registry.last_nonce(key.api_key) or 0),
            "nonceWindow": 0,
            "permissions": permissions,
            "iban": key.uid,
            "validUntil": str(key.expires_at_ms // 1000) if key.expires_at_ms is not None else "0",
            "queryFrom": "0",
            "queryTo": "0",
            "createdTime": created,
            "modifiedTime": created,
            "ipAllowlist": list(key.ip_allowlist),
            "lastUsed": str(self.now_ms() // 1000),
        }
        return common.answer({"error": [], "result": result})

    async def balance(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._funds(key)
        return common.answer({"error": [], "result": {"ZUSD": "0.0000", "XXBT": "0.0000000000"}})

    async def trade_balance(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._funds(key)
        fields = ("eb", "tb", "m", "n", "c", "v", "e", "mf")  # Kraken's TradeBalance keys (plausible zeros)
        return common.answer({"error": [], "result": {name: "0.0000" for name in fields}})
