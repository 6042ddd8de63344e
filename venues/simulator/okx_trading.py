"""OKX v5's trading endpoints: enough for a ccxt client to load spot markets and trade a little.

Public ``GET /api/v5/public/instruments`` (SPOT lists BTC-USDT and ETH-USDT; other instrument types list
nothing). Signed (docs/venues.md §2.9): ``GET /api/v5/asset/currencies``, ``POST /api/v5/trade/order``
and ``batch-orders`` (limit, cash mode), ``POST /api/v5/trade/cancel-order`` and
``cancel-batch-orders``, ``GET /api/v5/trade/orders-pending``; the trading account's balances come from
:mod:`venues.simulator.trading` (wallet ``trading``).

Order answers carry the per-order ``sCode``/``sMsg`` of OKX: a refused order answers HTTP 200 with
``code`` "1" and ``sCode`` 51008 (insufficient balance), a cancel of an order that is not open ``sCode``
51400; a missing or malformed field answers 51000 "Parameter {field} error", an unknown instrument 51001.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aiohttp import web

from venues.simulator import common, trading
from venues.simulator.registry import TestKey

MARKETS: Mapping[str, trading.Market] = {
    "BTC-USDT": trading.Market("BTC-USDT", "BTC", "USDT", Decimal("0.1"), Decimal("0.00000001")),
    "ETH-USDT": trading.Market("ETH-USDT", "ETH", "USDT", Decimal("0.01"), Decimal("0.000001")),
}
BATCH_LIMIT = 20  # orders per batch request (docs/venues.md §2.9)
CHAINS = {"BTC": "BTC-Bitcoin", "ETH": "ETH-ERC20", "USDT": "USDT-ERC20"}


def envelope(data: list[dict[str, Any]], code: str = "0", msg: str = "") -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data}


def refuse(code: int, msg: str) -> common.Reject:
    """A parameter error: HTTP 400 with the code at the top (docs/venues.md §2.9)."""
    return common.Reject(common.answer(envelope([], str(code), msg), 400), auth=False)


class OkxTrading(common.VenueServer):
    """The trading half of the OKX venue server (see :mod:`venues.simulator.okx`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # OkxServer's

    def _require(self, key: TestKey, identity: str) -> None:
        raise NotImplementedError  # OkxServer's

    def trading_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v5/public/instruments", self.instruments),
            web.get("/api/v5/asset/currencies", self.currencies),
            web.post("/api/v5/trade/order", self.place_order),
            web.post("/api/v5/trade/batch-orders", self.place_batch),
            web.post("/api/v5/trade/cancel-order", self.cancel_order),
            web.post("/api/v5/trade/cancel-batch-orders", self.cancel_batch),
            web.get("/api/v5/trade/orders-pending", self.pending_orders),
        ]

    async def instruments(self, request: web.Request) -> web.Response:
        kind = request.query.get("instType", "")
        if kind not in ("SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION"):
            raise refuse(51000, "Parameter instType error")
        if kind != "SPOT":
            return common.answer(envelope([]))
        data = [
            {
                "instType": "SPOT",
                "instId": m.symbol,
                "uly": "",
                "instFamily": "",
                "baseCcy": m.base,
                "quoteCcy": m.quote,
                "settleCcy": "",
                "ctVal": "",
                "ctMult": "",
                "ctValCcy": "",
                "optType": "",
                "stk": "",
                "listTime": "1548133413000",
                "expTime": "",
                "lever": "",
                "tickSz": str(m.tick),
                "lotSz": str(m.step),
                "minSz": str(m.min_amount),
                "ctType": "",
                "alias": "",
                "state": "live",
                "ruleType": "normal",
                "maxLmtSz": "9999999999",
                "maxMktSz": "1000000",
                "maxLmtAmt": "20000000",
                "maxMktAmt": "1000000",
                "maxTwapSz": "9999999999",
                "maxIcebergSz": "9999999999",
                "maxTriggerSz": "9999999999",
                "maxStopSz": "1000000",
                "category": "1",
            }
            for m in MARKETS.values()
        ]
        return common.answer(envelope(data))

    async def currencies(self, request: web.Request) -> web.Response:
        await self.authenticate(request)
        data = [
            {
                "ccy": ccy,
                "name": ccy,
                "chain": chain,
                "canDep": True,
                "canWd": True,
                "canInternal": True,
                "minDep": "0.00005",
                "minWd": "0.001",
                "maxWd": "500",
                "wdTickSz": "8",
                "wdQuota": "10000000",
                "usedWdQuota": "0",
                "minFee": "0.0002",
                "maxFee": "0.0004",
                "mainNet": True,
                "needTag": False,
                "minDepArrivalConfirm": "1",
                "minWdUnlockConfirm": "2",
                "logoLink": "",
            }
            for ccy, chain in CHAINS.items()
        ]
        return common.answer(envelope(data))

    def trading_details(self, key: TestKey) -> list[dict[str, str]]:
        """The ``details`` of GET /api/v5/account/balance: every currency of the trading wallet."""
        now = str(self.now_ms())
        details = []
        for ccy, (free, locked) in self.state.book.balances(self.wallet(key, "trading")).items():
            total = trading.fmt(free + locked)
            details.append(
                {
                    "ccy": ccy,
                    "eq": total,
                    "cashBal": total,
                    "availBal": trading.fmt(free),
                    "availEq": trading.fmt(free),
                    "frozenBal": trading.fmt(locked),
                    "ordFrozen": trading.fmt(locked),
                    "disEq": total,
                    "eqUsd": "",
                    "upl": "0",
                    "liab": "",
                    "crossLiab": "",
                    "isoLiab": "",
                    "interest": "",
                    "uTime": now,
                }
            )
        return details

    async def _json(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.text() or "{}")
        except ValueError:
            raise refuse(50002, "Json data format error") from None

    async def _one(self, request: web.Request) -> dict[str, Any]:
        data = await self._json(request)
        if not isinstance(data, dict):
            raise refuse(50002, "Json data format error")
        return data

    async def _batch(self, request: web.Request) -> list[dict[str, Any]]:
        data = await self._json(request)
        if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
            raise refuse(50002, "Json data format error")
        if len(data) > BATCH_LIMIT:
            raise refuse(51000, "Parameter orders error")  # OKX: at most 20 orders per batch
        return data

    @staticmethod
    def _market(data: Mapping[str, Any]) -> trading.Market:
        inst = data.get("instId")
        if not isinstance(inst, str) or not inst:
            raise refuse(51000, "Parameter instId error")
        market = MARKETS.get(inst)
        if market is None:
            raise refuse(51001, "Instrument ID does not exist")
        return market

    def _trader(self, key: TestKey) -> None:
        self._require(key, "trading")
        if not key.trade:
            raise common.Reject(okx_error(50120, "API key doesn't have permission"), auth=False)

    def _item(self, order_id: str, client_id: str, s_code: int, s_msg: str) -> dict[str, Any]:
        return {
            "ordId": order_id,
            "clOrdId": client_id,
            "tag": "",
            "ts": str(self.now_ms()),
            "sCode": str(s_code),
            "sMsg": s_msg,
        }

    @staticmethod
    def _items_answer(items: list[dict[str, Any]]) -> web.Response:
        """HTTP 200; ``code`` 0 when every item succeeded, 1 when all failed, 2 when some did (OKX)."""
        failed = sum(1 for item in items if item["sCode"] != "0")
        if not failed:
            return common.answer(envelope(items))
        if failed == len(items):
            return common.answer(envelope(items, "1", "All operations failed"))
        return common.answer(envelope(items, "2", "Bulk operation partially succeeded"))

    def _place(self, key: TestKey, data: Mapping[str, Any]) -> dict[str, Any]:
        market = self._market(data)
        side = data.get("side")
        if side not in ("buy", "sell"):
            raise refuse(51000, "Parameter side error")
        if data.get("ordType") != "limit":
            raise refuse(51000, "Parameter ordType error")  # simulator: limit orders only
        if data.get("tdMode") != "cash":
            raise refuse(51000, "Parameter tdMode error")  # simulator: spot cash mode only
        price, amount = trading.decimal(data.get("px")), trading.decimal(data.get("sz"))
        if price is None:
            raise refuse(51000, "Parameter px error")
        if amount is None:
            raise refuse(51000, "Parameter sz error")
        client_id = str(data.get("clOrdId") or "")
        order_id = str(600_000_000_000_000_000 + self.state.book.next_id())
        try:
            self.state.book.place(
                self.wallet(key, "trading"),
                market,
                order_id=order_id,
                client_id=client_id or None,
                side=side,
                price=price,
                amount=amount,
                now_ms=self.now_ms(),
                extra={"tdMode": "cash", "tag": str(data.get("tag") or "")},
            )
        except trading.InsufficientBalance as short:
            msg = f"Order failed. Insufficient {short.asset} balance in account."
            return self._item("", client_id, 51008, msg)
        except trading.TooManyOrders:
            return self._item("", client_id, 51024, "Order failed. Too many pending orders.")
        return self._item(order_id, client_id, 0, "Order placed")

    def _cancel(self, key: TestKey, data: Mapping[str, Any]) -> dict[str, Any]:
        self._market(data)
        order_id, client_id = str(data.get("ordId") or ""), str(data.get("clOrdId") or "")
        if not order_id and not client_id:
            raise refuse(51000, "Parameter ordId error")
        try:
            order = self.state.book.cancel(
                self.wallet(key, "trading"),
                order_id=order_id or None,
                client_id=client_id or None,
                now_ms=self.now_ms(),
            )
        except trading.UnknownOrder:
            msg = "Order cancellation failed as the order has been filled, canceled or does not exist."
            return self._item(order_id, client_id, 51400, msg)
        return self._item(order.order_id, order.client_id or "", 0, "")

    async def place_order(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._trader(key)
        return self._items_answer([self._place(key, await self._one(request))])

    async def place_batch(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._trader(key)
        return self._items_answer([self._place(key, item) for item in await self._batch(request)])

    async def cancel_order(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._trader(key)
        return self._items_answer([self._cancel(key, await self._one(request))])

    async def cancel_batch(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._trader(key)
        return self._items_answer([self._cancel(key, item) for item in await self._batch(request)])

    async def pending_orders(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        self._require(key, "trading")
        kind, inst = request.query.get("instType"), request.query.get("instId")
        if kind not in (None, "SPOT"):
            return common.answer(envelope([]))
        if inst:
            self._market({"instId": inst})
        orders = self.state.book.open_orders(self.wallet(key, "trading"), inst or None)
        data = [
            {
                "instType": "SPOT",
                "instId": o.symbol,
                "ordId": o.order_id,
                "clOrdId": o.client_id or "",
                "tag": o.extra.get("tag", ""),
                "px": str(o.price),
                "sz": str(o.amount),
                "ordType": "limit",
                "side": o.side,
                "posSide": "net",
                "tdMode": o.extra.get("tdMode", "cash"),
                "accFillSz": "0",
                "fillPx": "",
                "fillSz": "0",
                "fillTime": "",
                "avgPx": "",
                "state": "live",
                "lever": "",
                "fee": "0",
                "feeCcy": MARKETS[o.symbol].base if o.side == "buy" else MARKETS[o.symbol].quote,
                "rebate": "0",
                "rebateCcy": "",
                "pnl": "0",
                "category": "normal",
                "ccy": "",
                "tgtCcy": "",
                "reduceOnly": "false",
                "cancelSource": "",
                "source": "",
                "uTime": str(o.updated_ms),
                "cTime": str(o.created_ms),
            }
            for o in reversed(orders)  # newest first, as OKX lists them
        ]
        return common.answer(envelope(data))


def okx_error(code: int, msg: str, status: int = 401) -> web.Response:
    return common.answer(envelope([], str(code), msg), status)
