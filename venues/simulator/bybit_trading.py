"""Bybit V5's trading endpoints: enough for a ccxt client to load spot markets and trade a little.

Public ``GET /v5/market/instruments-info`` (category spot lists BTCUSDT and ETHUSDT; linear, inverse and
option list nothing). Signed (docs/venues.md §3.9): ``GET /v5/asset/coin/query-info``, ``POST
/v5/order/create`` (spot limit orders), ``POST /v5/order/cancel``, ``GET /v5/order/realtime``. Orders
trade from the key's unified wallet (``unified``), or its classic ``spot`` wallet for a classic account.

Errors are HTTP 200 with ``retCode`` (Bybit's usual style): 170131 "Insufficient balance." for an
unaffordable spot order, 170213 "Order does not exist." for a cancel of an order that is not open,
10001 for a missing or malformed parameter, 10005 for a key without trading permission.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aiohttp import web

from venues.simulator import common, trading
from venues.simulator.registry import TestKey

MARKETS: Mapping[str, trading.Market] = {
    "BTCUSDT": trading.Market(
        "BTCUSDT", "BTC", "USDT", Decimal("0.01"), Decimal("0.000001"), Decimal("0.000048")
    ),
    "ETHUSDT": trading.Market(
        "ETHUSDT", "ETH", "USDT", Decimal("0.01"), Decimal("0.00001"), Decimal("0.00062")
    ),
}
CATEGORIES = ("spot", "linear", "inverse", "option")
CHAINS = {"BTC": "BTC", "ETH": "ETH", "USDT": "ETH"}


class BybitTrading(common.VenueServer):
    """The trading half of the BYBIT venue server (see :mod:`venues.simulator.bybit`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # BybitServer's

    def envelope(self, result: Any, code: int = 0, msg: str = "OK") -> dict[str, Any]:
        raise NotImplementedError  # BybitServer's

    def error(
        self, code: int, msg: str, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        raise NotImplementedError  # BybitServer's

    def trading_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v5/market/instruments-info", self.instruments),
            web.get("/v5/asset/coin/query-info", self.coins),
            web.post("/v5/order/create", self.place_order),
            web.post("/v5/order/cancel", self.cancel_order),
            web.get("/v5/order/realtime", self.open_orders),
        ]

    @staticmethod
    def trading_wallet(key: TestKey) -> str:
        """The wallet spot orders trade from: unified if the account has one, else classic spot."""
        return "unified" if "unified" in key.identities else "spot"

    def coin_list(self, key: TestKey, wallet: str) -> list[dict[str, Any]]:
        """The ``coin`` list of GET /v5/account/wallet-balance for one wallet."""
        coins = []
        for coin, (free, locked) in self.state.book.balances(self.wallet(key, wallet)).items():
            total = trading.fmt(free + locked)
            coins.append(
                {
                    "coin": coin,
                    "equity": total,
                    "usdValue": "",
                    "walletBalance": total,
                    "free": trading.fmt(free),
                    "locked": trading.fmt(locked),
                    "spotHedgingQty": "0",
                    "borrowAmount": "0",
                    "accruedInterest": "0",
                    "totalOrderIM": "0",
                    "totalPositionIM": "0",
                    "totalPositionMM": "0",
                    "unrealisedPnl": "0",
                    "cumRealisedPnl": "0",
                    "bonus": "0",
                    "marginCollateral": True,
                    "collateralSwitch": True,
                    "availableToWithdraw": "",  # deprecated by Bybit for unified accounts: always ""
                }
            )
        return coins

    def _reject(self, code: int, msg: str) -> common.Reject:
        return common.Reject(self.error(code, msg), auth=False)

    async def instruments(self, request: web.Request) -> web.Response:
        category = request.query.get("category", "")
        if category not in CATEGORIES:
            raise self._reject(10001, "params error: category is invalid")
        listed = []
        if category == "spot":
            listed = [
                {
                    "symbol": m.symbol,
                    "baseCoin": m.base,
                    "quoteCoin": m.quote,
                    "innovation": "0",
                    "status": "Trading",
                    "marginTrading": "none",
                    "stTag": "0",
                    "lotSizeFilter": {
                        "basePrecision": str(m.step),
                        "quotePrecision": "0.00000001",
                        "minOrderQty": str(m.min_amount),
                        "maxOrderQty": "9000",
                        "minOrderAmt": "1",
                        "maxOrderAmt": "4000000",
                    },
                    "priceFilter": {"tickSize": str(m.tick)},
                    "riskParameters": {"priceLimitRatioX": "0.05", "priceLimitRatioY": "0.05"},
                }
                for m in MARKETS.values()
            ]
        return common.answer(self.envelope({"category": category, "list": listed, "nextPageCursor": ""}))

    async def coins(self, request: web.Request) -> web.Response:
        await self.authenticate(request)
        rows = [
            {
                "name": coin,
                "coin": coin,
                "remainAmount": "150000",
                "chains": [
                    {
                        "chainType": chain,
                        "confirmation": "10000",
                        "withdrawFee": "0.0005",
                        "depositMin": "0",
                        "withdrawMin": "0.001",
                        "chain": chain,
                        "chainDeposit": "1",
                        "chainWithdraw": "1",
                        "minAccuracy": "8",
                        "withdrawPercentageFee": "0",
                        "contractAddress": "",
                    }
                ],
            }
            for coin, chain in CHAINS.items()
        ]
        return common.answer(self.envelope({"rows": rows}))

    async def _trader(self, request: web.Request) -> tuple[TestKey, dict[str, Any]]:
        key = await self.authenticate(request)
        if not key.trade:
            raise self._reject(10005, "Permission denied, please check your API key permissions.")
        try:
            data = json.loads(await request.text() or "{}")
        except ValueError:
            raise self._reject(10001, "params error: body is not JSON") from None
        if not isinstance(data, dict):
            raise self._reject(10001, "params error: body is not a JSON object")
        if data.get("category") != "spot":
            raise self._reject(10001, "params error: category is invalid")  # simulator: spot only
        symbol = data.get("symbol")
        if not isinstance(symbol, str) or symbol not in MARKETS:
            raise self._reject(10001, "params error: symbol invalid")
        return key, data

    async def place_order(self, request: web.Request) -> web.Response:
        key, data = await self._trader(request)
        side = data.get("side")
        if side not in ("Buy", "Sell"):
            raise self._reject(10001, "params error: side invalid")
        if data.get("orderType") != "Limit":
            raise self._reject(10001, "params error: orderType invalid")  # simulator: limit orders only
        price, amount = trading.decimal(data.get("price")), trading.decimal(data.get("qty"))
        if price is None or amount is None:
            raise self._reject(10001, "params error: price or qty invalid")
        link = str(data.get("orderLinkId") or "")
        order_id = str(uuid.uuid4())
        try:
            self.state.book.place(
                self.wallet(key, self.trading_wallet(key)),
                MARKETS[data["symbol"]],
                order_id=order_id,
                client_id=link or None,
                side=side.lower(),
                price=price,
                amount=amount,
                now_ms=self.now_ms(),
                extra={"timeInForce": str(data.get("timeInForce") or "GTC")},
            )
        except trading.InsufficientBalance:
            raise self._reject(170131, "Insufficient balance.") from None
        except trading.TooManyOrders:
            raise self._reject(170201, "Your order quantity to buy is too large.") from None
        return common.answer(self.envelope({"orderId": order_id, "orderLinkId": link}))

    async def cancel_order(self, request: web.Request) -> web.Response:
        key, data = await self._trader(request)
        order_id, link = str(data.get("orderId") or ""), str(data.get("orderLinkId") or "")
        if not order_id and not link:
            raise self._reject(10001, "params error: orderId or orderLinkId is required")
        try:
            order = self.state.book.cancel(
                self.wallet(key, self.trading_wallet(key)),
                order_id=order_id or None,
                client_id=link or None,
                now_ms=self.now_ms(),
            )
        except trading.UnknownOrder:
            raise self._reject(170213, "Order does not exist.") from None
        return common.answer(self.envelope({"orderId": order.order_id, "orderLinkId": order.client_id or ""}))

    async def open_orders(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        category = request.query.get("category", "")
        if category not in CATEGORIES:
            raise self._reject(10001, "params error: category is invalid")
        symbol = request.query.get("symbol") or None
        listed: list[trading.Order] = []
        if category == "spot":
            listed = self.state.book.open_orders(self.wallet(key, self.trading_wallet(key)), symbol)
        orders = [self._order(o) for o in reversed(listed)]  # newest first
        return common.answer(self.envelope({"category": category, "list": orders, "nextPageCursor": ""}))

    @staticmethod
    def _order(order: trading.Order) -> dict[str, Any]:
        return {
            "orderId": order.order_id,
            "orderLinkId": order.client_id or "",
            "blockTradeId": "",
            "symbol": order.symbol,
            "price": str(order.price),
            "qty": str(order.amount),
            "side": order.side.capitalize(),
            "isLeverage": "0",
            "positionIdx": 0,
            "orderStatus": "New",
            "cancelType": "UNKNOWN",
            "rejectReason": "EC_NoError",
            "avgPrice": "0",
            "leavesQty": str(order.amount),
            "leavesValue": str(order.price * order.amount),
            "cumExecQty": "0",
            "cumExecValue": "0",
            "cumExecFee": "0",
            "timeInForce": order.extra.get("timeInForce", "GTC"),
            "orderType": "Limit",
            "stopOrderType": "",
            "orderIv": "",
            "triggerPrice": "0",
            "takeProfit": "",
            "stopLoss": "",
            "tpTriggerBy": "",
            "slTriggerBy": "",
            "triggerDirection": 0,
            "triggerBy": "",
            "lastPriceOnCreated": "",
            "reduceOnly": False,
            "closeOnTrigger": False,
            "smpType": "None",
            "smpGroup": 0,
            "smpOrderId": "",
            "tpslMode": "",
            "tpLimitPrice": "",
            "slLimitPrice": "",
            "placeType": "",
            "createdTime": str(order.created_ms),
            "updatedTime": str(order.updated_ms),
        }
