"""Binance Link's sub-account key endpoints (docs/venues.md §1.10), for a broker master account.

``GET /sapi/v1/broker/subAccount`` lists the master's sub-accounts; ``POST /sapi/v1/broker/subAccountApi``
creates a key for one (``canTrade`` required, ``marginTrade``/``futuresTrade`` optional), ``GET`` of the same
path lists a sub-account's keys (masked, as Binance shows them: the first 3 characters then 13 ``*``) and
``DELETE`` deletes one; ``POST /sapi/v2/broker/subAccountApi/ipRestriction`` binds a key to IPs (``status`` 2
with ``ipAddress``) or unbinds it (1), ``GET /sapi/v1/broker/subAccountApi/ipRestriction`` reads that. Signed
like every ``USER_DATA``/``TRADE`` endpoint (docs/venues.md §1.2).

Who may call them: a key of a Binance Link master account (in the simulator: an account registered with
``Simulator.add_master_account``) whose "trade" option is enabled. Anything else answers -1002 "You are not
authorized to execute this request." (HTTP 401): Binance documents the requirement, not the refusal's code,
so the code is the simulator's choice (docs/venues.md §8). So are -1130 for a ``subAccountId`` that is not
one of the master's sub-accounts and -2008 "Invalid Api-Key ID." for a key the sub-account does not have.
A sub-account gets at most one new key per second (documented); a second answers the -1003 rate-limit answer.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from venues.simulator import common, masters, ratelimit
from venues.simulator.registry import TestKey

SUB_ACCOUNT_PATH = "/sapi/v1/broker/subAccount"
SUB_ACCOUNT_API_PATH = "/sapi/v1/broker/subAccountApi"
IP_RESTRICTION_PATH = "/sapi/v2/broker/subAccountApi/ipRestriction"  # POST: set (status 1 or 2, ipAddress)
IP_RESTRICTION_GET_PATH = "/sapi/v1/broker/subAccountApi/ipRestriction"  # GET: read
CREATE_PER_SUB = ratelimit.Window(1, 1.0)  # "only create 1 api key for each sub account per second"
MASK_VISIBLE = 3
MASK_STARS = 13
MAX_PAGE_SIZE = 500  # GET subAccountApi: size default 500, max 500


def _error(code: int, msg: str, status: int = 400) -> web.Response:
    return common.answer({"code": code, "msg": msg}, status)


def masked(api_key: str) -> str:
    """How Binance Link lists a sub-account key: ``vmP*************``."""
    return api_key[:MASK_VISIBLE] + "*" * MASK_STARS


def _flag(params: dict[str, str], name: str, *, required: bool = False) -> bool:
    value = params.get(name)
    if value is None:
        if required:
            raise common.Reject(
                _error(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."),
                auth=False,
            )
        return False
    if value.lower() not in ("true", "false"):
        raise common.Reject(_error(-1130, f"Data sent for parameter '{name}' is not valid."), auth=False)
    return value.lower() == "true"


class BinanceSubAccounts(common.VenueServer):
    """The Binance Link half of the BINANCE venue server (see :mod:`venues.simulator.binance`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # BinanceServer's

    async def params(self, request: web.Request) -> dict[str, str]:
        raise NotImplementedError  # BinanceTrading's

    def rate_limited(self, request: web.Request, retry_after: float, rule: ratelimit.Rule) -> web.Response:
        raise NotImplementedError  # BinanceServer's

    def sub_account_routes(self) -> list[web.RouteDef]:
        return [
            web.get(SUB_ACCOUNT_PATH, self.list_sub_accounts),
            web.post(SUB_ACCOUNT_API_PATH, self.create_sub_key),
            web.get(SUB_ACCOUNT_API_PATH, self.list_sub_keys),
            web.delete(SUB_ACCOUNT_API_PATH, self.delete_sub_key),
            web.post(IP_RESTRICTION_PATH, self.set_ip_restriction),
            web.get(IP_RESTRICTION_GET_PATH, self.get_ip_restriction),
        ]

    async def _broker(self, request: web.Request) -> tuple[TestKey, dict[str, str]]:
        """The authenticated key of a broker master with "trade" enabled, and the request's parameters."""
        key = await self.authenticate(request)
        if not key.trade or not self.state.sub_accounts.is_master(self.venue, key.uid):
            raise common.Reject(
                _error(-1002, "You are not authorized to execute this request.", 401), auth=False
            )
        return key, await self.params(request)

    def _sub(self, key: TestKey, params: dict[str, str]) -> masters.SubAccount:
        sub_id = params.get("subAccountId", "")
        if not sub_id:
            raise common.Reject(
                _error(
                    -1102, "Mandatory parameter 'subAccountId' was not sent, was empty/null, or malformed."
                ),
                auth=False,
            )
        sub = self.state.sub_accounts.find(self.venue, key.uid, sub_id)
        if sub is None:
            raise common.Reject(
                _error(-1130, "Data sent for parameter 'subAccountId' is not valid."), auth=False
            )
        return sub

    async def list_sub_accounts(self, request: web.Request) -> web.Response:
        key, params = await self._broker(request)
        wanted = params.get("subAccountId")
        rows = [
            {
                "subaccountId": sub.sub_id,
                "email": sub.email,
                "tag": sub.label,
                "makerCommission": "0.001",
                "takerCommission": "0.001",
                "marginMakerCommission": "-1",
                "marginTakerCommission": "-1",
                "createTime": sub.created_at_ms,
            }
            for sub in self.state.sub_accounts.subs(self.venue, key.uid)
            if wanted is None or sub.sub_id == wanted
        ]
        return common.answer(rows)

    async def create_sub_key(self, request: web.Request) -> web.Response:
        key, params = await self._broker(request)
        sub = self._sub(key, params)
        can_trade = _flag(params, "canTrade", required=True)
        margin = _flag(params, "marginTrade")
        futures = _flag(params, "futuresTrade")
        rule = ratelimit.Rule(f"binance:sub-create:{sub.sub_id}", CREATE_PER_SUB)
        exceeded = self.state.limits.admit([rule], time.monotonic(), enforce=self.state.enforce_rate_limits)
        if exceeded is not None and self.state.enforce_rate_limits:
            raise common.Reject(self.rate_limited(request, exceeded[1], rule), auth=False)
        identities = ["spot"] + (["margin"] if margin else []) + (["futures"] if futures else [])
        minted = self.state.registry.add(
            self.venue,
            uid=sub.uid,
            read=True,
            trade=can_trade,
            withdraw=False,
            transfer=False,
            identities=identities,
            parent_uid=key.uid,
        )
        return common.answer(
            {
                "subaccountId": sub.sub_id,
                "apiKey": minted.api_key,
                "secretKey": minted.api_secret,
                "canTrade": can_trade,
                "marginTrade": margin,
                "futuresTrade": futures,
            }
        )

    def _row(self, sub: masters.SubAccount, key: TestKey) -> dict[str, Any]:
        return {
            "apikey": masked(key.api_key),
            "subaccountId": sub.sub_id,
            "canTrade": key.trade,
            "marginTrade": key.trade and "margin" in key.identities,
            "futuresTrade": key.trade and "futures" in key.identities,
        }

    async def list_sub_keys(self, request: web.Request) -> web.Response:
        key, params = await self._broker(request)
        sub = self._sub(key, params)
        wanted = params.get("subAccountApiKey")
        try:
            page = max(1, int(params.get("page", "1")))
            size = min(MAX_PAGE_SIZE, max(1, int(params.get("size", str(MAX_PAGE_SIZE)))))
        except ValueError:
            raise common.Reject(
                _error(-1130, "Data sent for parameter 'page' is not valid."), auth=False
            ) from None
        keys = [
            k
            for k in self.state.registry.keys_of(self.venue, sub.uid)
            if wanted is None or k.api_key == wanted
        ]
        chosen = keys[(page - 1) * size : page * size]
        return common.answer([self._row(sub, k) for k in chosen])

    async def delete_sub_key(self, request: web.Request) -> web.Response:
        key, params = await self._broker(request)
        sub = self._sub(key, params)
        target = self._sub_key(sub, params)
        self.state.registry.remove(target.api_key)
        return common.answer({})

    def _sub_key(self, sub: masters.SubAccount, params: dict[str, str]) -> TestKey:
        target = self.state.registry.get(params.get("subAccountApiKey", ""), self.venue)
        if target is None or target.uid != sub.uid:
            raise common.Reject(_error(-2008, "Invalid Api-Key ID."), auth=False)
        return target

    async def set_ip_restriction(self, request: web.Request) -> web.Response:
        key, params = await self._broker(request)
        sub = self._sub(key, params)
        target = self._sub_key(sub, params)
        status = params.get("status", "")
        ips = [ip.strip() for ip in params.get("ipAddress", "").split(",") if ip.strip()]
        if status not in ("1", "2") or (status == "2" and not ips):
            raise common.Reject(_error(-1130, "Data sent for parameter 'status' is not valid."), auth=False)
        try:
            updated = self.state.registry.update(target.api_key, ip_allowlist=ips if status == "2" else [])
        except ValueError:
            raise common.Reject(
                _error(-1130, "Data sent for parameter 'ipAddress' is not valid."), auth=False
            ) from None
        answer: dict[str, Any] = {"status": status, "updateTime": self.now_ms(), "apiKey": updated.api_key}
        if updated.ip_allowlist:
            answer["ipList"] = list(updated.ip_allowlist)
        return common.answer(answer)

    async def get_ip_restriction(self, request: web.Request) -> web.Response:
        key, params = await self._broker(request)
        sub = self._sub(key, params)
        target = self._sub_key(sub, params)
        return common.answer(
            {
                "subaccountId": sub.sub_id,
                "ipRestrict": bool(target.ip_allowlist),
                "apikey": target.api_key,
                "ipList": list(target.ip_allowlist),
                "updateTime": target.created_at_ms,
            }
        )
