"""Binance's server side: spot /api, wallet and margin /sapi, USD-M /fapi and COIN-M /dapi on one port.

Authentication (docs/venues.md §1.2): ``X-MBX-APIKEY`` header; ``signature`` = lower hex HMAC-SHA256 of the query
string concatenated with the body (no separator), sent as the last parameter; ``timestamp`` accepted iff
``timestamp < serverTime + 1000`` and ``serverTime - timestamp <= recvWindow`` (default 5000, max 60000).
Unknown, expired and IP-refused keys, and keys with reading disabled, all answer -2015 (HTTP 401) with the
caller's IP in the message, as Binance does (contract).

Checks run in this order: key format (-2014), key known (-2015), signature (-1022), timestamp (-1021),
IP allow-list and reading permission (-2015).
"""

from __future__ import annotations

import hmac
import re
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from venues.base import Venue
from venues.simulator import binance_subaccounts, binance_trading, common, faults, ratelimit
from venues.simulator.registry import TestKey

_KEY_FORMAT = re.compile(r"[A-Za-z0-9]{1,128}")
DEFAULT_RECV_WINDOW = 5000  # ms, docs/venues.md §1.2
MAX_RECV_WINDOW = 60000  # ms
AHEAD_TOLERANCE = 1000  # ms a timestamp may be ahead of the server (docs/venues.md §1.2)
TRADING_PERMISSION_DAYS = (
    30  # docs/venues.md §1.7: trading on keys without an IP whitelist lapses after 30 days
)

# Weight per endpoint (docs/venues.md §1.6) and the per-IP budget of its host (REQUEST_WEIGHT per minute).
WEIGHTS = {
    "/api/v3/time": 1,
    "/fapi/v1/time": 1,
    "/dapi/v1/time": 1,
    "/sapi/v1/account/apiRestrictions": 1,
    "/sapi/v1/account/info": 1,
    "/api/v3/account": 20,
    "/sapi/v1/margin/account": 10,
    "/fapi/v2/account": 5,
    "/fapi/v3/account": 5,
    "/dapi/v1/account": 5,  # not documented (docs/venues.md §8); taken as the fapi weight
    # trading (docs/venues.md §1.9)
    "/api/v3/exchangeInfo": 20,
    "/fapi/v1/exchangeInfo": 1,
    "/dapi/v1/exchangeInfo": 1,
    "/sapi/v1/capital/config/getall": 10,
    "/sapi/v1/margin/allPairs": 1,
    "/sapi/v1/margin/isolated/allPairs": 10,
    "/api/v3/order": 1,
    "/api/v3/openOrders": 6,  # with a symbol (80 without)
    "/sapi/v1/margin/order": 6,  # UID weight in Binance's table; counted on the IP budget here
    "/sapi/v1/margin/openOrders": 10,
    "/fapi/v2/balance": 5,
    "/fapi/v3/balance": 5,
    "/fapi/v1/order": 1,
    "/fapi/v1/openOrders": 1,  # with a symbol (40 without)
    # Binance Link (docs/venues.md §1.10): only the create call's IP weight is documented (8); the rest count 1
    "/sapi/v1/broker/subAccount": 1,
    "/sapi/v1/broker/subAccountApi": 1,
    "/sapi/v1/broker/subAccountApi/ipRestriction": 1,
    "/sapi/v2/broker/subAccountApi/ipRestriction": 1,  # 3000 on the master account's UID weight (not counted)
}
METHOD_WEIGHTS = {("POST", "/sapi/v1/broker/subAccountApi"): 8}
HOST_BUDGETS = {
    "api": ratelimit.Window(6000, 60.0),  # spot REQUEST_WEIGHT 6000/min per IP
    "sapi": ratelimit.Window(12000, 60.0),  # ccxt: 12 000/min per IP for /sapi
    "fapi": ratelimit.Window(2400, 60.0),  # USD-M REQUEST_WEIGHT 2400/min
    "dapi": ratelimit.Window(2400, 60.0),  # not documented; taken as the fapi budget
}


def sign(secret: str, payload: str) -> str:
    """lower hex HMAC-SHA256(secret as ASCII, totalParams) (docs/venues.md §1.2 step 4)."""
    return hmac.digest(secret.encode(), payload.encode(), "sha256").hex()


def signature_valid(secret: str, payload: str, signature: str) -> bool:
    """True when ``signature`` signs ``payload`` with ``secret``; HMAC signatures are case-insensitive."""
    return hmac.compare_digest(sign(secret, payload), signature.lower())


def pop_signature(params: str) -> tuple[str, str | None]:
    """Split ``a=1&b=2&signature=s`` into (``a=1&b=2``, ``s``); (params, None) when it carries none.

    The signature must be the last parameter (docs/venues.md §1.2 step 4).
    """
    if params.startswith("signature="):
        head, value = "", params[len("signature=") :]
    else:
        head, sep, value = params.rpartition("&signature=")
        if not sep:
            return params, None
    if "&" in value:
        return params, None
    return head, value


def error(code: int, msg: str, status: int = 400) -> web.Response:
    return common.answer({"code": code, "msg": msg}, status)


class BinanceServer(binance_trading.BinanceTrading, binance_subaccounts.BinanceSubAccounts):
    venue = Venue.BINANCE

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v3/time", self.server_time),
            web.get("/fapi/v1/time", self.server_time),
            web.get("/dapi/v1/time", self.server_time),
            web.get("/sapi/v1/account/apiRestrictions", self.api_restrictions),
            web.get("/sapi/v1/account/info", self.account_info),
            web.get("/api/v3/account", self.spot_account),
            web.get("/sapi/v1/margin/account", self.margin_account),
            web.get("/fapi/v2/account", self.futures_account),
            web.get("/fapi/v3/account", self.futures_account),
            web.get("/dapi/v1/account", self.futures_account),
            *self.trading_routes(),
            *self.sub_account_routes(),
        ]

    def claimed_key(self, request: web.Request) -> str | None:
        return request.headers.get("X-MBX-APIKEY") or None

    def rate_rules(self, request: web.Request, key: TestKey | None) -> list[ratelimit.Rule]:
        host = request.path.split("/")[1] if request.path.count("/") > 1 else ""
        budget = HOST_BUDGETS.get(host)
        if budget is None:
            return []
        ip = common.client_ip(request)
        cost = METHOD_WEIGHTS.get((request.method, request.path), WEIGHTS.get(request.path, 1))
        return [ratelimit.Rule(f"binance:ip:{ip}:{host}", budget, cost, by_ip=True)]

    def rate_limited(self, request: web.Request, retry_after: float, rule: ratelimit.Rule) -> web.Response:
        limit = int(rule.limit.limit) if isinstance(rule.limit, ratelimit.Window) else 6000
        msg = (
            f"Too much request weight used; current limit is {limit} request weight per "
            "1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API."
        )
        return common.answer(
            {"code": -1003, "msg": msg}, 429, {"Retry-After": faults.retry_after_header(retry_after)}
        )

    def fault(self, request: web.Request, kind: str, retry_after: float) -> web.Response:
        if kind == faults.RATE_LIMITED:
            return self.rate_limited(
                request, retry_after, ratelimit.Rule("fault", HOST_BUDGETS["api"], by_ip=True)
            )
        if kind == faults.MAINTENANCE:
            return error(-1016, "This service is no longer available.", 503)
        if kind == faults.MALFORMED:
            return common.truncated('{"ipRestrict":false,"createTime":1698645219000,"enableReading":true}')
        return error(-1001, "Internal error; unable to process your request. Please try again.", 500)

    # -- authentication ---------------------------------------------------------------------------

    def _rejected(self, request: web.Request) -> web.Response:
        msg = f"Invalid API-key, IP, or permissions for action, request ip: {common.client_ip(request)}"
        return error(-2015, msg, 401)

    async def authenticate(self, request: web.Request) -> TestKey:
        api_key = request.headers.get("X-MBX-APIKEY", "")
        if not _KEY_FORMAT.fullmatch(api_key):
            raise common.Reject(error(-2014, "API-key format invalid.", 401))
        body = await request.text() if request.can_read_body else ""
        query, query_sig = pop_signature(request.rel_url.raw_query_string)
        body, body_sig = pop_signature(body) if body else ("", None)
        signature = body_sig or query_sig
        if not signature:
            raise common.Reject(
                error(-1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.")
            )
        key = self.lookup(api_key)
        if key is None or not self.usable(key):
            raise common.Reject(self._rejected(request))
        payload = query + body  # totalParams: no separator at the join (docs/venues.md §1.2 step 3)
        if not signature_valid(key.api_secret, payload, signature):
            raise common.Reject(error(-1022, "Signature for this request is not valid."))
        params = dict(parse_qsl(query, keep_blank_values=True)) | dict(
            parse_qsl(body, keep_blank_values=True)
        )
        self._check_timestamp(params)
        if not common.ip_allowed(key, request) or not key.read:
            raise common.Reject(self._rejected(request))
        return self.accepted(request, key)

    def _check_timestamp(self, params: dict[str, str]) -> None:
        try:
            stamp = int(params["timestamp"])
        except (KeyError, ValueError):
            raise common.Reject(
                error(-1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.")
            ) from None
        if stamp >= 10**15:  # spot also accepts microseconds (docs/venues.md §1.2 step 2)
            stamp //= 1000
        try:
            recv_window = float(params.get("recvWindow", DEFAULT_RECV_WINDOW))
        except ValueError:
            raise common.Reject(error(-1102, "Mandatory parameter 'recvWindow' was malformed.")) from None
        if recv_window > MAX_RECV_WINDOW:
            raise common.Reject(error(-1131, "recvWindow must be less than 60000"))
        server = self.now_ms()
        if stamp >= server + AHEAD_TOLERANCE:
            raise common.Reject(
                error(-1021, "Timestamp for this request was 1000ms ahead of the server's time.")
            )
        if server - stamp > recv_window:
            raise common.Reject(error(-1021, "Timestamp for this request is outside of the recvWindow."))

    # -- endpoints --------------------------------------------------------------------------------

    async def server_time(self, request: web.Request) -> web.Response:
        return common.answer({"serverTime": self.now_ms()})

    async def api_restrictions(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        trade = key.trade
        body: dict[str, Any] = {
            "ipRestrict": bool(key.ip_allowlist),
            "createTime": key.created_at_ms,
            "enableReading": key.read,
            "enableWithdrawals": key.withdraw,
            "enableInternalTransfer": key.withdraw,  # simulator choice: transfers follow withdrawals
            "enableMargin": trade and "margin" in key.identities,
            "enableFutures": trade and "futures" in key.identities,
            "permitsUniversalTransfer": key.withdraw,  # simulator choice, as above
            "enableVanillaOptions": False,
            "enableFixApiTrade": False,
            "enableFixReadOnly": key.read,
            "enableSpotAndMarginTrading": trade,
            "enablePortfolioMarginTrading": False,
        }
        expiry = self._trading_expiry(key)
        if expiry is not None:
            body["tradingAuthorityExpirationTime"] = expiry
        return common.answer(body)

    def _trading_expiry(self, key: TestKey) -> int | None:
        """``tradingAuthorityExpirationTime``: the key's own expiry if set, else docs/venues.md §1.7's 30 days."""
        if not key.trade:
            return None
        if key.expires_at_ms is not None:
            return key.expires_at_ms
        if not key.ip_allowlist:
            return key.created_at_ms + TRADING_PERMISSION_DAYS * 86_400_000
        return None

    async def account_info(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        return common.answer(
            {
                "vipLevel": 0,
                "isMarginEnabled": "margin" in key.identities,
                "isFutureEnabled": "futures" in key.identities,
                "isOptionsEnabled": False,
                "isPortfolioMarginRetailEnabled": False,
            }
        )

    async def spot_account(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        if "spot" not in key.identities:
            raise common.Reject(self._rejected(request), auth=False)
        # Fields beyond uid/accountType/permissions/can*/balances are filled in plausibly (simulator).
        return common.answer(
            {
                "makerCommission": 10,
                "takerCommission": 10,
                "buyerCommission": 0,
                "sellerCommission": 0,
                "canTrade": True,
                "canWithdraw": True,
                "canDeposit": True,
                "brokered": False,
                "requireSelfTradePrevention": False,
                "preventSor": False,
                "updateTime": self.now_ms(),
                "accountType": "SPOT",
                "balances": self.spot_balances(key),
                "permissions": ["SPOT"],
                "uid": int(key.uid) if key.uid.isdigit() else key.uid,
            }
        )

    async def margin_account(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        if "margin" not in key.identities:
            raise common.Reject(error(-3003, "Margin account does not exist."), auth=False)
        # The whole body is a plausible invention: docs/venues.md documents only the -3003 answer.
        return common.answer(
            {
                "borrowEnabled": key.trade,
                "marginLevel": "999.00000000",
                "totalAssetOfBtc": "0.00000000",
                "totalLiabilityOfBtc": "0.00000000",
                "totalNetAssetOfBtc": "0.00000000",
                "tradeEnabled": key.trade,
                "transferEnabled": True,
                "userAssets": self.margin_assets(key),
            }
        )

    async def futures_account(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        if "futures" not in key.identities:
            # docs/venues.md §1.4: keys not enabled for futures answer -2015
            raise common.Reject(self._rejected(request), auth=False)
        # Plausible invention: docs/venues.md documents the endpoint, not its body.
        return common.answer(
            {
                "feeTier": 0,
                "canTrade": key.trade,
                "canDeposit": True,
                "canWithdraw": True,
                "updateTime": 0,
                "totalInitialMargin": "0.00000000",
                "totalMaintMargin": "0.00000000",
                "totalWalletBalance": "0.00000000",
                "totalUnrealizedProfit": "0.00000000",
                "totalMarginBalance": "0.00000000",
                "availableBalance": "0.00000000",
                "maxWithdrawAmount": "0.00000000",
                "assets": self.futures_assets(key),
                "positions": [],
            }
        )
