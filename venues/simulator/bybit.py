"""Bybit V5's server side: user/query-api, account/info, user/get-member-type, account/wallet-balance.

Authentication (docs/venues.md §3.2): headers ``X-BAPI-API-KEY``, ``X-BAPI-TIMESTAMP`` (ms), ``X-BAPI-SIGN`` =
lower hex HMAC-SHA256(secret, timestamp + apiKey + recvWindow + queryString-or-body), optional
``X-BAPI-RECV-WINDOW`` (default 5000; the header text is what is signed, "" when absent). Accepted iff
``server - recvWindow <= timestamp < server + 1000``.

HTTP statuses: 10003 (unknown key, missing key header) is HTTP 401 (docs/venues.md §3.5 "401 invalid request:
wrong key / missing auth headers"); every other retCode comes with HTTP 200, Bybit's usual style.
Keys of another environment (testnet, demo) answer 10003 here (contract); expired keys 33004.
Checks run in this order: key header, timestamp format (10002), key known (10003), expiry (33004),
signature (10004), timestamp window (10002), IP allow-list (10010).
"""

from __future__ import annotations

import hmac
import zlib
from typing import Any

from aiohttp import web

from venues.base import Venue
from venues.simulator import bybit_subaccounts, bybit_trading, common, faults, ratelimit
from venues.simulator.registry import TestKey

DEFAULT_RECV_WINDOW = 5000  # ms
AHEAD_TOLERANCE = 1000  # ms
KEY_LIFETIME_DAYS = 90  # docs/venues.md §3.7: a key with no IP bound is invalid after 90 days
IP_BUDGET = ratelimit.Window(600, 5.0)  # 600 requests / 5 s per IP, all hosts (docs/venues.md §3.6)
ENDPOINT_LIMITS = {  # per UID per endpoint per second (docs/venues.md §3.6)
    "/v5/user/query-api": ratelimit.Window(10, 1.0),
    "/v5/user/get-member-type": ratelimit.Window(10, 1.0),
    "/v5/account/info": ratelimit.Window(50, 1.0),
    "/v5/account/wallet-balance": ratelimit.Window(50, 1.0),
    # trading (docs/venues.md §3.9)
    "/v5/order/create": ratelimit.Window(20, 1.0),
    "/v5/order/cancel": ratelimit.Window(20, 1.0),
    "/v5/order/realtime": ratelimit.Window(50, 1.0),
}
WALLETS = {"UNIFIED": "unified", "SPOT": "spot", "CONTRACT": "contract"}  # accountType -> identity


def sign(secret: str, prehash: str) -> str:
    """lower hex HMAC-SHA256(secret as UTF-8, prehash) (docs/venues.md §3.2)."""
    return hmac.digest(secret.encode(), prehash.encode(), "sha256").hex()


class BybitServer(bybit_trading.BybitTrading, bybit_subaccounts.BybitSubAccounts):
    venue = Venue.BYBIT

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v5/market/time", self.server_time),
            web.get("/v5/user/query-api", self.query_api),
            web.get("/v5/account/info", self.account_info),
            web.get("/v5/user/get-member-type", self.member_type),
            web.get("/v5/account/wallet-balance", self.wallet_balance),
            *self.trading_routes(),
            *self.sub_account_routes(),
        ]

    def envelope(self, result: Any, code: int = 0, msg: str = "OK") -> dict[str, Any]:
        return {"retCode": code, "retMsg": msg, "result": result, "retExtInfo": {}, "time": self.now_ms()}

    def error(
        self, code: int, msg: str, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        return common.answer(self.envelope({}, code, msg), status, headers)

    def claimed_key(self, request: web.Request) -> str | None:
        return request.headers.get("X-BAPI-API-KEY") or None

    def rate_rules(self, request: web.Request, key: TestKey | None) -> list[ratelimit.Rule]:
        ip = common.client_ip(request)
        rules = [ratelimit.Rule(f"bybit:ip:{ip}", IP_BUDGET, by_ip=True)]
        limit = ENDPOINT_LIMITS.get(request.path)
        if limit is not None:
            subject = self.subject(key, self.claimed_key(request))
            rules.append(ratelimit.Rule(f"bybit:{subject}:{request.path}", limit))
        return rules

    def rate_limited(self, request: web.Request, retry_after: float, rule: ratelimit.Rule) -> web.Response:
        headers = {"Retry-After": faults.retry_after_header(retry_after)}  # simulator addition
        if rule.by_ip:
            # docs/venues.md §3.5: an IP over its budget gets HTTP 403; the JSON body is a simulator choice.
            return self.error(10006, "Too many visits. Exceeded the API Rate Limit.", 403, headers)
        reset_ms = self.now_ms() + int(retry_after * 1000)
        limit = rule.limit.limit if isinstance(rule.limit, ratelimit.Window) else rule.limit.capacity
        headers |= {
            "X-Bapi-Limit": str(int(limit)),
            "X-Bapi-Limit-Status": "0",
            "X-Bapi-Limit-Reset-Timestamp": str(reset_ms),
        }
        return self.error(10006, "Too many visits. Exceeded the API Rate Limit.", 200, headers)

    def fault(self, request: web.Request, kind: str, retry_after: float) -> web.Response:
        if kind == faults.RATE_LIMITED:
            return self.rate_limited(request, retry_after, ratelimit.Rule("fault", ratelimit.Window(10, 1.0)))
        if kind == faults.MAINTENANCE:
            # Not documented by docs/venues.md: 10016 ("service restarting") with HTTP 503 is a simulator choice.
            return self.error(10016, "Service is under maintenance, please try again later.", 503)
        if kind == faults.MALFORMED:
            return common.truncated('{"retCode":0,"retMsg":"OK","result":{"id":"1","readOnly":0},"time":1}')
        return self.error(10016, "Server error.", 500)

    # -- authentication ---------------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> TestKey:
        headers = request.headers
        api_key = headers.get("X-BAPI-API-KEY", "")
        if not api_key:
            raise common.Reject(self.error(10003, "API key is invalid.", 401))
        stamp_text = headers.get("X-BAPI-TIMESTAMP", "")
        recv_text = headers.get("X-BAPI-RECV-WINDOW", "")
        try:
            stamp = int(stamp_text)
            recv_window = int(recv_text) if recv_text else DEFAULT_RECV_WINDOW
        except ValueError:
            raise common.Reject(
                self.error(10002, "The request time exceeds the time window range.")
            ) from None
        key = self.lookup(api_key)
        if key is None or key.environment != "production":
            msg = (
                "API key is invalid. Check whether the key and domain are matched, there are 4 env: "
                "mainnet, testnet, mainnet-demo, testnet-demo"
            )
            raise common.Reject(self.error(10003, msg, 401))
        if key.expired(self.now_ms()):
            raise common.Reject(self.error(33004, "Your api key has expired"))
        if request.method == "GET":
            payload = request.rel_url.raw_query_string
        else:
            payload = await request.text() if request.can_read_body else ""
        expected = sign(key.api_secret, stamp_text + api_key + recv_text + payload)
        if not hmac.compare_digest(expected, headers.get("X-BAPI-SIGN", "").lower()):
            msg = "Error sign, please check your signature generation algorithm."
            raise common.Reject(self.error(10004, msg))
        server = self.now_ms()
        if not server - recv_window <= stamp < server + AHEAD_TOLERANCE:
            raise common.Reject(self.error(10002, "The request time exceeds the time window range."))
        if not common.ip_allowed(key, request):
            msg = "Unmatched IP, please check your API key's bound IP addresses."
            raise common.Reject(self.error(10010, msg))
        return self.accepted(request, key)

    # -- endpoints --------------------------------------------------------------------------------

    async def server_time(self, request: web.Request) -> web.Response:
        now = self.now_ms()
        result = {"timeSecond": str(now // 1000), "timeNano": str(now * 1_000_000)}
        return common.answer(self.envelope(result))

    async def query_api(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        return common.answer(self.envelope(self._key_info(key)))

    def key_permissions(self, key: TestKey) -> dict[str, list[str]]:
        """The ``permissions`` object query-api (and sub-apikeys) shows for ``key``."""
        trade = key.trade
        wallet = (["AccountTransfer", "SubMemberTransfer"] if key.transfer else []) + (
            ["Withdraw"] if key.withdraw else []
        )
        contract = "contract" in key.identities or "unified" in key.identities
        return {
            "ContractTrade": ["Order", "Position"] if trade and contract else [],
            "Spot": ["SpotTrade"] if trade else [],
            "Wallet": wallet,
            "Options": ["OptionsTrade"] if trade and "unified" in key.identities else [],
            "Derivatives": ["DerivativesTrade"] if trade and "unified" in key.identities else [],
            "Exchange": ["ExchangeHistory"],
            "Earn": [],
            "FiatP2P": [],
            "FiatBitPay": [],
            "FiatConvertBroker": [],
            "BlockTrade": [],
            "Affiliate": [],
        }

    def _key_info(self, key: TestKey) -> dict[str, Any]:
        trade = key.trade
        permissions = self.key_permissions(key)
        deadline_day, expired_at = self.key_expiry(key)
        return {
            "id": str(zlib.crc32(key.api_key.encode())),  # simulator choice: a stable numeric id
            "note": key.label or "",
            "apiKey": key.api_key,
            "readOnly": 0 if trade or key.withdraw else 1,
            "secret": "",
            "permissions": permissions,
            "ips": list(key.ip_allowlist) or ["*"],
            "type": 1,
            "deadlineDay": deadline_day,
            "expiredAt": expired_at,
            "createdAt": common.iso_seconds(key.created_at_ms),
            "unified": 0,
            "uta": 1 if "unified" in key.identities else 0,
            "userID": int(key.uid) if key.uid.isdigit() else key.uid,
            "inviterID": 0,
            "vipLevel": "No VIP",
            "mktMakerLevel": "0",
            "affiliateID": 0,
            "rsaPublicKey": "",
            "isMaster": key.parent_uid is None,
            "parentUid": key.parent_uid or "0",
            "kycLevel": "LEVEL_DEFAULT",
            "kycRegion": "",
        }

    def key_expiry(self, key: TestKey) -> tuple[int, str]:
        """(deadlineDay, expiredAt): the key's own expiry, else 90 days for keys with no IP bound
        (docs/venues.md §3.7); an IP-bound key shows -2 and the epoch, as in Bybit's example."""
        expires = key.expires_at_ms
        if expires is None and not key.ip_allowlist:
            expires = key.created_at_ms + KEY_LIFETIME_DAYS * 86_400_000
        if expires is None:
            return -2, "1970-01-01T00:00:00Z"
        days = max(0, (expires - self.now_ms()) // 86_400_000)
        return int(days), common.iso_seconds(expires)

    async def account_info(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        # docs/venues.md §3.4: 1 classic (spot/contract wallets), 3 UTA1.0 (unified plus a legacy wallet), 5 UTA2.0.
        if "unified" not in key.identities:
            status = 1
        elif key.identities == ("unified",):
            status = 5
        else:
            status = 3
        result = {
            "unifiedMarginStatus": status,
            "marginMode": "REGULAR_MARGIN",
            "isMasterTrader": False,
            "spotHedgingStatus": "OFF",
            "updatedTime": str(key.created_at_ms),
            "dcpStatus": "OFF",
            "timeWindow": 10,
            "smpGroup": 0,
        }
        return common.answer(self.envelope(result))

    async def member_type(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        wallets = ["FUND"] + [name for name, identity in WALLETS.items() if identity in key.identities]
        result = {"accounts": [{"uid": key.uid, "accountType": wallets}]}
        return common.answer(self.envelope(result))

    async def wallet_balance(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        account_type = request.query.get("accountType", "")
        if account_type not in (*WALLETS, "FUND"):
            raise common.Reject(self.error(10001, "params error: accountType is invalid"), auth=False)
        identity = WALLETS.get(account_type)
        if identity is not None and identity not in key.identities:
            # docs/venues.md §3.5 lists 10028 / 100028 (API only for / not for unified accounts); wording ours.
            if account_type == "UNIFIED":
                msg = "The API can only be accessed by unified account users."
                raise common.Reject(self.error(10028, msg), auth=False)
            msg = "The API cannot be accessed by unified account users."
            raise common.Reject(self.error(100028, msg), auth=False)
        # Fields of the documented wallet-balance answer, all zero (plausible choices).
        wallet = {
            "accountType": account_type,
            "totalEquity": "0",
            "totalWalletBalance": "0",
            "totalMarginBalance": "0",
            "totalAvailableBalance": "0",
            "totalPerpUPL": "0",
            "totalInitialMargin": "0",
            "totalMaintenanceMargin": "0",
            "accountIMRate": "0",
            "accountMMRate": "0",
            "accountLTV": "0",
            "coin": self.coin_list(key, identity) if identity is not None else [],
        }
        return common.answer(self.envelope({"list": [wallet]}))
