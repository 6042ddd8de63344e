"""Coinbase's server side: Advanced Trade (CDP keys, JWT bearer tokens) and Exchange, on one port.

Advanced Trade (docs/venues.md §4A): ``/api/v3/brokerage/key_permissions``, ``/accounts``, ``/portfolios`` and the
public ``/time``. Tokens are checked by :mod:`venues.simulator.coinbase_jwt`. Every authentication failure
is HTTP 401 ``{"error":"unauthorized","error_details":<reason>,"message":<reason>}`` (docs/venues.md §4A.5 gives
the shape, the reasons are the simulator's, and none of them mentions an IP unless the IP is the cause:
the contract's IP answer). Missing view scope is HTTP 403 ``PERMISSION_DENIED``.

Exchange paths (``/accounts``, ``/profiles``, ``/time``) are served by
:class:`venues.simulator.coinbase_exchange.CoinbaseExchange`.
"""

from __future__ import annotations

from aiohttp import web

from venues.base import Venue
from venues.simulator import (
    coinbase_exchange,
    coinbase_exchange_trading,
    coinbase_jwt,
    coinbase_trading,
    common,
    faults,
    ratelimit,
)
from venues.simulator.registry import TestKey

PREFIX = "/api/v3/brokerage"
PRIVATE_BUDGET = ratelimit.Window(30, 1.0)  # 30 requests/s per user (docs/venues.md §4A.6)
PUBLIC_BUDGET = ratelimit.Window(10, 1.0)  # 10 requests/s per IP
BEARER = "Bearer "
# the request's bearer token decoded once (the claimed key, the rate rules and authenticate all read it):
# (token, "") or (None, the reason it is malformed)
_TOKEN: web.RequestKey[tuple[coinbase_jwt.Token | None, str]] = web.RequestKey(
    "simulator.coinbase_token", tuple
)


def bearer_token(request: web.Request) -> coinbase_jwt.Token | None:
    """The request's ``Bearer`` token, decoded but unchecked, once per request; None without one.
    :class:`coinbase_jwt.JwtError` when it is malformed."""
    authorization = request.headers.get("Authorization", "")
    if not authorization.startswith(BEARER):
        return None
    cached = request.get(_TOKEN)
    if cached is None:
        try:
            cached = (coinbase_jwt.decode(authorization[len(BEARER) :].strip()), "")
        except coinbase_jwt.JwtError as exc:
            cached = (None, str(exc))
        request[_TOKEN] = cached
    token, reason = cached
    if token is None:
        raise coinbase_jwt.JwtError(reason)
    return token


def unauthorized(reason: str) -> web.Response:
    return common.answer({"error": "unauthorized", "error_details": reason, "message": reason}, 401)


class CoinbaseServer(coinbase_trading.CoinbaseTrading, coinbase_exchange.CoinbaseExchange):
    venue = Venue.COINBASE

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/time", self.server_time),
            web.get(f"{PREFIX}/key_permissions", self.key_permissions),
            web.get(f"{PREFIX}/accounts", self.accounts),
            web.get(f"{PREFIX}/portfolios", self.portfolios),
            *self.trading_routes(),
            *self.exchange_routes(),
        ]

    @staticmethod
    def advanced(request: web.Request) -> bool:
        """Advanced Trade's paths, and the v2 lists ccxt loads with its markets (answered in its shapes)."""
        return request.path.startswith((PREFIX + "/", "/v2/"))

    def claimed_key(self, request: web.Request) -> str | None:
        if "CB-ACCESS-KEY" in request.headers:
            return request.headers["CB-ACCESS-KEY"] or None
        try:
            token = bearer_token(request)
        except coinbase_jwt.JwtError:
            return None
        kid = None if token is None else token.header.get("kid")
        return kid if isinstance(kid, str) else None

    def rate_rules(self, request: web.Request, key: TestKey | None) -> list[ratelimit.Rule]:
        if not self.advanced(request):
            if coinbase_exchange_trading.is_exchange_path(request.path):
                return self.exchange_rules(request, key)
            return []
        if request.path == f"{PREFIX}/time" or request.path in coinbase_trading.PUBLIC_PATHS:
            return [ratelimit.Rule(f"coinbase:ip:{common.client_ip(request)}", PUBLIC_BUDGET, by_ip=True)]
        subject = self.subject(key, self.claimed_key(request))
        return [ratelimit.Rule(f"coinbase:{subject}", PRIVATE_BUDGET)]

    def rate_limited(self, request: web.Request, retry_after: float, rule: ratelimit.Rule) -> web.Response:
        if not self.advanced(request):
            return self.exchange_rate_limited(request, retry_after)
        body = {
            "error": "rate_limit_exceeded",
            "error_details": "Too many requests",
            "message": "Too many requests",
        }
        return common.answer(body, 429, {"Retry-After": faults.retry_after_header(retry_after)})

    def fault(self, request: web.Request, kind: str, retry_after: float) -> web.Response:
        if not self.advanced(request):
            return self.exchange_fault(request, kind, retry_after)
        if kind == faults.RATE_LIMITED:
            return self.rate_limited(request, retry_after, ratelimit.Rule("fault", PRIVATE_BUDGET))
        if kind == faults.MALFORMED:
            return common.truncated('{"can_view":true,"can_trade":false,"can_transfer":false}')
        if kind == faults.MAINTENANCE:
            # docs/venues.md §4A.5 names no maintenance answer: HTTP 503 in the error shape is a simulator choice.
            reason = "service unavailable: under maintenance"
            return common.answer({"error": "unavailable", "error_details": reason, "message": reason}, 503)
        reason = "internal server error"
        return common.answer(
            {"error": "internal_server_error", "error_details": reason, "message": reason}, 500
        )

    # -- authentication ---------------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> TestKey:
        try:
            token = bearer_token(request)
        except coinbase_jwt.JwtError as exc:
            raise common.Reject(unauthorized(str(exc))) from None
        if token is None:
            raise common.Reject(unauthorized("missing bearer token"))
        kid = token.header.get("kid")
        key = self.lookup(kid) if isinstance(kid, str) else None
        if key is None or key.kind not in coinbase_jwt.ALGORITHMS or key.environment != "production":
            raise common.Reject(unauthorized("unknown API key"))
        if not coinbase_jwt.signature_valid(key.kind or "", key.api_secret, token):
            raise common.Reject(unauthorized("invalid JWT signature"))
        now = self.now_ms() / 1000
        try:
            coinbase_jwt.check_claims(
                token,
                key_name=key.api_key,
                now=now,
                method=request.method,
                host=request.host,
                path=request.path,
            )
        except coinbase_jwt.JwtError as exc:
            raise common.Reject(unauthorized(str(exc))) from None
        if key.expired(self.now_ms()):
            raise common.Reject(unauthorized("API key has expired"))
        if not common.ip_allowed(key, request):
            ip = common.client_ip(request)
            raise common.Reject(unauthorized(f"IP address {ip} is not in the API key's allowlist"))
        return self.accepted(request, key)

    def _view(self, key: TestKey) -> None:
        if not key.read or "default" not in key.identities:
            body = {
                "error": "PERMISSION_DENIED",
                "error_details": "Missing required scopes",
                "message": "Missing required scopes",
            }
            raise common.Reject(common.answer(body, 403), auth=False)

    # -- endpoints --------------------------------------------------------------------------------

    async def server_time(self, request: web.Request) -> web.Response:
        now = self.now_ms()
        return common.answer(
            {"iso": common.iso_ms(now), "epochSeconds": str(now // 1000), "epochMillis": str(now)}
        )

    async def key_permissions(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        return common.answer(
            {
                "can_view": key.read,
                "can_trade": key.trade,
                "can_transfer": key.withdraw,
                "portfolio_uuid": key.uid,
                "portfolio_type": "DEFAULT",
            }
        )

    async def accounts(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._view(key)
        # Plausible account fields (docs/venues.md §4A.4 names the endpoint only); balances from the book.
        accounts = self.portfolio_accounts(key)
        return common.answer({"accounts": accounts, "has_next": False, "cursor": "", "size": len(accounts)})

    async def portfolios(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._view(key)
        portfolio = {"name": "Default", "uuid": key.uid, "type": "DEFAULT", "deleted": False}
        return common.answer({"portfolios": [portfolio]})
