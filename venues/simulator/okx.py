"""OKX v5's server side: account/config, account/balance, asset/balances and the public time.

Authentication (docs/venues.md §2.2): headers ``OK-ACCESS-KEY``, ``OK-ACCESS-TIMESTAMP`` (ISO-8601 ms UTC),
``OK-ACCESS-PASSPHRASE`` (plaintext) and ``OK-ACCESS-SIGN`` = base64(HMAC-SHA256(secret as text,
timestamp + METHOD + requestPath(with ?query) + body)); the timestamp must be within 30 s of server time.
Demo keys (environment "demo") need ``x-simulated-trading: 1`` and production keys must not send it, else
50101 (contract). Expired keys answer 50119 "API key doesn't exist" (contract).

Every 501xx answer is HTTP 401 (docs/venues.md §2.5, OKX tables as quoted by pyted/okx), 50120 included.
Checks run in this order: headers present (50103/50104/50106/50107), timestamp format (50112), timestamp
window (50102), key known (50111) and not expired (50119), environment (50101), passphrase (50105),
signature (50113), IP allow-list (50110).
"""

from __future__ import annotations

import base64
import datetime
import hmac

from aiohttp import web

from venues.base import Venue
from venues.simulator import common, faults, okx_subaccounts, okx_trading, ratelimit
from venues.simulator.registry import TestKey

TIMESTAMP_WINDOW_MS = 30_000  # docs/venues.md §2.2: +-30 s
# (limit, seconds) per endpoint, rule "User ID" (docs/venues.md §2.6)
ENDPOINT_LIMITS = {
    "/api/v5/account/config": ratelimit.Window(5, 2.0),
    "/api/v5/account/balance": ratelimit.Window(10, 2.0),
    "/api/v5/asset/balances": ratelimit.Window(6, 1.0),
    # trading (docs/venues.md §2.9)
    "/api/v5/public/instruments": ratelimit.Window(20, 2.0),
    "/api/v5/asset/currencies": ratelimit.Window(6, 1.0),
    "/api/v5/trade/order": ratelimit.Window(60, 2.0),
    "/api/v5/trade/cancel-order": ratelimit.Window(60, 2.0),
    "/api/v5/trade/batch-orders": ratelimit.Window(300, 2.0),
    "/api/v5/trade/cancel-batch-orders": ratelimit.Window(300, 2.0),
    "/api/v5/trade/orders-pending": ratelimit.Window(60, 2.0),
}
PUBLIC_PATHS = ("/api/v5/public/instruments",)
REQUIRED_HEADERS = (
    ("OK-ACCESS-KEY", 50103),
    ("OK-ACCESS-PASSPHRASE", 50104),
    ("OK-ACCESS-SIGN", 50106),
    ("OK-ACCESS-TIMESTAMP", 50107),
)


def sign(secret: str, prehash: str) -> str:
    """base64(HMAC-SHA256(key = secret as UTF-8 text, not base64-decoded, prehash)) (docs/venues.md §2.2)."""
    return base64.b64encode(hmac.digest(secret.encode(), prehash.encode(), "sha256")).decode()


def error(code: int, msg: str, status: int = 401) -> web.Response:
    return common.answer({"code": str(code), "msg": msg, "data": []}, status)


def parse_timestamp(value: str) -> int | None:
    """ms since the epoch of an ``OK-ACCESS-TIMESTAMP`` (``2020-12-08T09:08:57.715Z``), None if malformed."""
    if not value.endswith("Z"):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value[:-1] + "+00:00")
    except ValueError:
        return None
    return int(moment.timestamp() * 1000)


class OkxServer(okx_trading.OkxTrading, okx_subaccounts.OkxSubAccounts):
    venue = Venue.OKX

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v5/public/time", self.server_time),
            web.get("/api/v5/account/config", self.account_config),
            web.get("/api/v5/account/balance", self.trading_balance),
            web.get("/api/v5/asset/balances", self.funding_balances),
            *self.trading_routes(),
            *self.sub_account_routes(),
        ]

    def claimed_key(self, request: web.Request) -> str | None:
        return request.headers.get("OK-ACCESS-KEY") or None

    def rate_rules(self, request: web.Request, key: TestKey | None) -> list[ratelimit.Rule]:
        endpoint = request.path
        limit = okx_subaccounts.METHOD_LIMITS.get((request.method, request.path))
        if limit is not None:  # the sub-account key calls share a path between GET and POST, not a limit
            endpoint = f"{request.method} {request.path}"
        else:
            limit = ENDPOINT_LIMITS.get(request.path)
        if limit is None:
            return []
        if request.path in PUBLIC_PATHS:  # public endpoints: the budget is the IP's
            ip = common.client_ip(request)
            return [ratelimit.Rule(f"okx:ip:{ip}:{endpoint}", limit, by_ip=True)]
        subject = self.subject(key, self.claimed_key(request))
        return [ratelimit.Rule(f"okx:{subject}:{endpoint}", limit)]

    def rate_limited(self, request: web.Request, retry_after: float, rule: ratelimit.Rule) -> web.Response:
        # Retry-After is a simulator addition; OKX documents only HTTP 429 + 50011 (docs/venues.md §2.5).
        return common.answer(
            {"code": "50011", "msg": "Too Many Requests", "data": []},
            429,
            {"Retry-After": faults.retry_after_header(retry_after)},
        )

    def fault(self, request: web.Request, kind: str, retry_after: float) -> web.Response:
        if kind == faults.RATE_LIMITED:
            return self.rate_limited(request, retry_after, ratelimit.Rule("fault", ratelimit.Window(1, 1)))
        if kind == faults.MAINTENANCE:
            return error(50001, "Service temporarily unavailable. Please try again later.", 503)
        if kind == faults.MALFORMED:
            return common.truncated('{"code":"0","msg":"","data":[{"acctLv":"2","perm":"read_only"}]}')
        return error(50026, "System error. Try again later.", 500)

    # -- authentication ---------------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> TestKey:
        headers = request.headers
        for name, code in REQUIRED_HEADERS:
            if not headers.get(name):
                raise common.Reject(error(code, f'Request header "{name}" cannot be empty.'))
        stamp_text = headers["OK-ACCESS-TIMESTAMP"]
        stamp = parse_timestamp(stamp_text)
        if stamp is None:
            raise common.Reject(error(50112, "Invalid OK-ACCESS-TIMESTAMP"))
        if abs(self.now_ms() - stamp) > TIMESTAMP_WINDOW_MS:
            raise common.Reject(error(50102, "Timestamp request expired"))
        key = self.lookup(headers["OK-ACCESS-KEY"])
        if key is None or key.environment == "testnet":
            raise common.Reject(error(50111, "Invalid OK-ACCESS-KEY"))
        if key.expired(self.now_ms()):
            raise common.Reject(error(50119, "API key doesn't exist"))
        demo_header = headers.get("x-simulated-trading") == "1"
        if demo_header != (key.environment == "demo"):
            raise common.Reject(error(50101, "APIKey does not match current environment."))
        if not hmac.compare_digest(headers["OK-ACCESS-PASSPHRASE"], key.api_passphrase or ""):
            raise common.Reject(error(50105, 'Request header "OK-ACCESS-PASSPHRASE" incorrect.'))
        body = await request.text() if request.can_read_body else ""
        # requestPath with its ?query exactly as sent (docs/venues.md §2.2); raw_path is the request target.
        prehash = stamp_text + request.method.upper() + request.raw_path + body
        if not hmac.compare_digest(sign(key.api_secret, prehash), headers["OK-ACCESS-SIGN"]):
            raise common.Reject(error(50113, "Invalid Sign"))
        if not common.ip_allowed(key, request):
            ip = common.client_ip(request)
            raise common.Reject(error(50110, f"Your IP {ip} is not included in your API key's IP whitelist."))
        return self.accepted(request, key)

    # -- endpoints --------------------------------------------------------------------------------

    async def server_time(self, request: web.Request) -> web.Response:
        return common.answer({"code": "0", "msg": "", "data": [{"ts": str(self.now_ms())}]})

    async def account_config(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        perms = [
            name
            for name, on in (("read_only", key.read), ("trade", key.trade), ("withdraw", key.withdraw))
            if on
        ]
        # docs/venues.md §2.3 names the fields; values beyond perm/ip/uid/mainUid/label/type are plausible choices.
        config = {
            "acctLv": "2",
            "autoLoan": False,
            "ctIsoMode": "automatic",
            "enableSpotBorrow": False,
            "greeksType": "PA",
            "ip": ",".join(key.ip_allowlist),
            "kycLv": "2",
            "label": key.label or "",
            "level": "Lv1",
            "levelTmp": "",
            "mainUid": key.parent_uid or key.uid,  # a sub-account key reports its master's uid
            "mgnIsoMode": "automatic",
            "opAuth": "0",
            "perm": ",".join(perms),
            "posMode": "net_mode",
            "roleType": "0",
            "spotBorrowAutoRepay": False,
            "traderInsts": [],
            "type": "0",
            "uid": key.uid,
        }
        return common.answer({"code": "0", "msg": "", "data": [config]})

    def _require(self, key: TestKey, identity: str) -> None:
        if identity not in key.identities:
            raise common.Reject(error(50120, "API key doesn't have permission"), auth=False)

    async def trading_balance(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._require(key, "trading")
        # Shape of docs/venues.md §2.4 (totalEq, details); the other fields are plausible choices.
        data = {
            "adjEq": "",
            "details": self.trading_details(key),
            "imr": "",
            "isoEq": "0",
            "mgnRatio": "",
            "mmr": "",
            "notionalUsd": "",
            "ordFroz": "",
            "totalEq": "0",
            "uTime": str(self.now_ms()),
        }
        return common.answer({"code": "0", "msg": "", "data": [data]})

    async def funding_balances(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._require(key, "funding")
        return common.answer({"code": "0", "msg": "", "data": []})  # only currencies with a balance
