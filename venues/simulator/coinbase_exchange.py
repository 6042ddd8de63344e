"""Coinbase Exchange's server side (key + base64 secret + passphrase): GET /accounts, /profiles, /time.

Authentication (docs/venues.md §4B): headers ``CB-ACCESS-KEY``, ``CB-ACCESS-TIMESTAMP`` (seconds since the epoch),
``CB-ACCESS-PASSPHRASE`` and ``CB-ACCESS-SIGN`` = base64(HMAC-SHA256(base64decode(secret), timestamp +
METHOD + requestPath + body)), requestPath including the query string (contract, as ccxt does); the
timestamp must be within 30 s of server time. Errors are ``{"message": ...}``.

Checks run in this order: headers present (400), key known and not expired (401 "Invalid API Key"),
passphrase (401 "Invalid Passphrase"), timestamp (400 "request timestamp expired"), signature (401 "invalid
signature"), IP allow-list (401 "IP address not allowed", contract). Statuses beyond docs/venues.md's "HTTP
400/401" are simulator choices.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math

from aiohttp import web

from venues.simulator import coinbase_exchange_trading, common, faults, ratelimit
from venues.simulator.registry import TestKey

TIMESTAMP_WINDOW = 30.0  # seconds, docs/venues.md §4B
PRIVATE_BUDGET = ratelimit.Bucket(capacity=30, rate=15)  # 15 rps per profile, burst 30 (docs/venues.md §4B)
PUBLIC_BUDGET = ratelimit.Bucket(capacity=15, rate=10)  # public 10 rps per IP, burst 15
REQUIRED_HEADERS = ("CB-ACCESS-KEY", "CB-ACCESS-SIGN", "CB-ACCESS-TIMESTAMP", "CB-ACCESS-PASSPHRASE")


def sign(secret_b64: str, prehash: str) -> str:
    """base64(HMAC-SHA256(key = base64decode(secret), prehash)) (docs/venues.md §4B)."""
    return base64.b64encode(hmac.digest(base64.b64decode(secret_b64), prehash.encode(), "sha256")).decode()


def error(message: str, status: int) -> web.Response:
    return common.answer({"message": message}, status)


class CoinbaseExchange(coinbase_exchange_trading.CoinbaseExchangeTrading):
    """The Exchange half of the COINBASE venue server (see :mod:`venues.simulator.coinbase`)."""

    def exchange_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/time", self.exchange_time),
            web.get("/accounts", self.exchange_accounts),
            web.get("/profiles", self.exchange_profiles),
            *self.exchange_trading_routes(),
        ]

    def exchange_rules(self, request: web.Request, key: TestKey | None) -> list[ratelimit.Rule]:
        if request.path in coinbase_exchange_trading.PUBLIC_PATHS:
            return [
                ratelimit.Rule(f"coinbase-exchange:ip:{common.client_ip(request)}", PUBLIC_BUDGET, by_ip=True)
            ]
        subject = self.subject(key, request.headers.get("CB-ACCESS-KEY"))
        return [ratelimit.Rule(f"coinbase-exchange:{subject}", PRIVATE_BUDGET)]

    def exchange_rate_limited(self, request: web.Request, retry_after: float) -> web.Response:
        public = request.path in coinbase_exchange_trading.PUBLIC_PATHS
        message = "Public rate limit exceeded" if public else "Private rate limit exceeded"
        return common.answer(
            {"message": message}, 429, {"Retry-After": faults.retry_after_header(retry_after)}
        )

    def exchange_fault(self, request: web.Request, kind: str, retry_after: float) -> web.Response:
        if kind == faults.RATE_LIMITED:
            return self.exchange_rate_limited(request, retry_after)
        if kind == faults.MAINTENANCE:
            return error("Exchange is under maintenance, please try again later", 503)  # "under maintenance"
        if kind == faults.MALFORMED:
            return common.truncated('[{"id":"71452118-efc7-4cc4-8780-a5e22d4baa53","currency":"BTC"}]')
        return error("Internal server error", 500)

    async def exchange_authenticate(self, request: web.Request) -> TestKey:
        headers = request.headers
        for name in REQUIRED_HEADERS:
            if not headers.get(name):
                raise common.Reject(error(f"{name} header is required", 400))
        key = self.lookup(headers["CB-ACCESS-KEY"])
        if key is None or not self.usable(key, kinds=("exchange",)):
            raise common.Reject(error("Invalid API Key", 401))
        if not hmac.compare_digest(headers["CB-ACCESS-PASSPHRASE"], key.api_passphrase or ""):
            raise common.Reject(error("Invalid Passphrase", 401))
        stamp_text = headers["CB-ACCESS-TIMESTAMP"]
        try:
            stamp = float(stamp_text)
        except ValueError:
            raise common.Reject(error("invalid timestamp", 400)) from None
        if not math.isfinite(stamp) or abs(self.now_ms() / 1000 - stamp) > TIMESTAMP_WINDOW:
            raise common.Reject(error("request timestamp expired", 400))
        body = await request.text() if request.can_read_body else ""
        try:
            expected = sign(key.api_secret, stamp_text + request.method.upper() + request.raw_path + body)
        except binascii.Error:
            raise common.Reject(error("invalid signature", 401)) from None
        if not hmac.compare_digest(expected, headers["CB-ACCESS-SIGN"]):
            raise common.Reject(error("invalid signature", 401))
        if not common.ip_allowed(key, request):
            raise common.Reject(error("IP address not allowed", 401))
        return self.accepted(request, key)

    def _readable(self, key: TestKey) -> None:
        if not key.read or "default" not in key.identities:
            # docs/venues.md §0: HTTP 403 [unconfirmed]; the wording is a simulator choice.
            raise common.Reject(error("Forbidden", 403), auth=False)

    async def exchange_time(self, request: web.Request) -> web.Response:
        # The shape of Coinbase Exchange's GET /time (not quoted in docs/venues.md): iso + epoch seconds.
        now = self.now_ms()
        return common.answer({"iso": common.iso_ms(now), "epoch": now / 1000})

    async def exchange_accounts(self, request: web.Request) -> web.Response:
        key = await self.exchange_authenticate(request)
        self._readable(key)
        # Account fields are plausible choices (docs/venues.md does not quote the body); balances are the
        # profile's wallet in the trading book.
        return common.answer(self.exchange_wallet_accounts(key))

    async def exchange_profiles(self, request: web.Request) -> web.Response:
        key = await self.exchange_authenticate(request)
        self._readable(key)
        # The key's profile is the default one; contract: venue account id = the is_default profile's id.
        profiles = [
            {
                "id": key.uid,
                "user_id": str(common.stable_uuid(f"credential-engine-simulator:user:{key.uid}")),
                "name": "default",
                "active": True,
                "is_default": True,
                "has_margin": False,
                "created_at": common.iso_ms(key.created_at_ms),
            }
        ]
        return common.answer(profiles)
