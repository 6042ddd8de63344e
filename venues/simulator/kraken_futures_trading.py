"""Kraken Futures' trading endpoints: enough for a ccxt client to load markets and trade a little.

Public ``GET /derivatives/api/v3/instruments`` (the multi-collateral perpetuals PF_XBTUSD and PF_ETHUSD).
Signed as every derivatives call (docs/venues.md §5B.9): ``POST sendorder`` (limit ``lmt`` only),
``POST cancelorder``, ``GET openorders``, on the key's ``futures`` (flex) wallet, margin = notional in USD
(leverage 1). The order parameters travel in the query string or the form body (ccxt sends them in the
query string); either is what ``postData`` signs.

Outcomes of order actions are in ``sendStatus.status`` / ``cancelStatus.status`` with ``result``
"success", as Kraken answers them: ``placed``, ``insufficientAvailableFunds``, ``cancelled``, ``notFound``.
A malformed request answers ``{"result":"error","error":"invalidArgument: <field>"}`` (HTTP 400,
simulator choice of status).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from venues.simulator import common, trading
from venues.simulator.registry import TestKey

PREFIX = "/derivatives/api/v3"
MARKETS: Mapping[str, trading.Market] = {
    "PF_XBTUSD": trading.Market(
        "PF_XBTUSD", "BTC", "USD", Decimal("1"), Decimal("0.0001"), Decimal("0.0001"), True
    ),
    "PF_ETHUSD": trading.Market(
        "PF_ETHUSD", "ETH", "USD", Decimal("0.1"), Decimal("0.001"), Decimal("0.001"), True
    ),
}
COSTS = {f"{PREFIX}/sendorder": 10, f"{PREFIX}/cancelorder": 10, f"{PREFIX}/openorders": 2}
PUBLIC_PATHS = (f"{PREFIX}/instruments",)
FLEX_NAMES = {"BTC": "xbt", "ETH": "eth", "USD": "usd", "USDT": "usdt"}


class KrakenFuturesTrading(common.VenueServer):
    """The trading half of Kraken Futures (mixed into :class:`venues.simulator.kraken.KrakenServer`)."""

    async def futures_authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # KrakenFutures'

    def futures_trading_routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/instruments", self.futures_instruments),
            web.post(f"{PREFIX}/sendorder", self.futures_send_order),
            web.post(f"{PREFIX}/cancelorder", self.futures_cancel_order),
            web.get(f"{PREFIX}/openorders", self.futures_open_orders),
        ]

    def _futures_success(self, **fields: Any) -> web.Response:
        return common.answer({"result": "success", **fields, "serverTime": common.iso_ms(self.now_ms())})

    def _futures_invalid(self, field: str) -> common.Reject:
        body = {
            "result": "error",
            "error": f"invalidArgument: {field}",
            "serverTime": common.iso_ms(self.now_ms()),
        }
        return common.Reject(common.answer(body, 400), auth=False)

    def flex_currencies(self, key: TestKey) -> dict[str, dict[str, float]]:
        """The ``currencies`` of the flex account in GET accounts: the key's futures wallet."""
        held = self.state.book.balances(self.wallet(key, "futures"))
        return {
            FLEX_NAMES.get(asset, asset.lower()): {
                "quantity": float(free + locked),
                "value": float(free + locked),
                "collateral_value": float(free + locked),
                "available": float(free),
                "haircut": 0.0,
                "conversion_spread": 0.0,
            }
            for asset, (free, locked) in held.items()
        }

    async def futures_instruments(self, request: web.Request) -> web.Response:
        instruments = [
            {
                "symbol": m.symbol,
                "type": "flexible_futures",
                "tradeable": True,
                "tickSize": float(m.tick),
                "contractSize": 1,
                "impactMidSize": 1,
                "maxPositionSize": 1000000,
                "openingDate": "2022-01-01T00:00:00.000Z",
                "marginLevels": [
                    {"numNonContractUnits": 0, "initialMargin": 0.02, "maintenanceMargin": 0.01}
                ],
                "fundingRateCoefficient": 8,
                "maxRelativeFundingRate": 0.001,
                "contractValueTradePrecision": max(0, -m.step.as_tuple().exponent),  # type: ignore[operator]
                "postOnly": False,
                "feeScheduleUid": "eef90775-995b-4596-9257-0917f6134766",
                "mtf": False,
                "base": m.base,
                "quote": m.quote,
                "pair": f"{m.base}:{m.quote}",
                "category": "",
                "tags": [],
                "tradfi": False,
            }
            for m in MARKETS.values()
        ]
        return self._futures_success(instruments=instruments)

    async def _futures_trader(self, request: web.Request) -> tuple[TestKey, dict[str, str]]:
        key = await self.futures_authenticate(request)
        if not key.trade or "futures" not in key.identities:
            raise common.Reject(self.futures_error("authenticationError", 401), auth=False)
        body = await request.text() if request.body_exists else ""
        return key, dict(parse_qsl(body or request.rel_url.raw_query_string, keep_blank_values=True))

    def futures_error(
        self, code: str, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        raise NotImplementedError  # KrakenFutures'

    @staticmethod
    def _futures_order(order: trading.Order) -> dict[str, Any]:
        return {
            "orderId": order.order_id,
            "cliOrdId": order.client_id,
            "type": "lmt",
            "symbol": order.symbol,
            "side": order.side,
            "quantity": float(order.amount),
            "filled": 0.0,
            "limitPrice": float(order.price),
            "reduceOnly": False,
            "timestamp": common.iso_ms(order.created_ms),
            "lastUpdateTimestamp": common.iso_ms(order.updated_ms),
        }

    async def futures_send_order(self, request: web.Request) -> web.Response:
        key, fields = await self._futures_trader(request)
        market = MARKETS.get(fields.get("symbol", ""))
        if market is None:
            raise self._futures_invalid("symbol")
        if fields.get("orderType") != "lmt":
            raise self._futures_invalid("orderType")  # simulator: limit orders only
        side = fields.get("side")
        if side not in ("buy", "sell"):
            raise self._futures_invalid("side")
        price, size = trading.decimal(fields.get("limitPrice")), trading.decimal(fields.get("size"))
        if price is None:
            raise self._futures_invalid("limitPrice")
        if size is None:
            raise self._futures_invalid("size")
        received = common.iso_ms(self.now_ms())
        order_id = str(uuid.uuid4())
        try:
            order = self.state.book.place(
                self.wallet(key, "futures"),
                market,
                order_id=order_id,
                client_id=fields.get("cliOrdId") or None,
                side=side,
                price=price,
                amount=size,
                now_ms=self.now_ms(),
            )
        except trading.InsufficientBalance:
            return self._futures_success(
                sendStatus={"status": "insufficientAvailableFunds", "receivedTime": received}
            )
        except trading.TooManyOrders:
            return self._futures_success(
                sendStatus={"status": "maxPositionViolation", "receivedTime": received}
            )
        status = {
            "order_id": order_id,
            "status": "placed",
            "receivedTime": received,
            "orderEvents": [{"order": self._futures_order(order), "reducedQuantity": None, "type": "PLACE"}],
        }
        return self._futures_success(sendStatus=status)

    async def futures_cancel_order(self, request: web.Request) -> web.Response:
        key, fields = await self._futures_trader(request)
        order_id, client_id = fields.get("order_id"), fields.get("cliOrdId")
        if not order_id and not client_id:
            raise self._futures_invalid("order_id")
        received = common.iso_ms(self.now_ms())
        try:
            order = self.state.book.cancel(
                self.wallet(key, "futures"),
                order_id=order_id or None,
                client_id=client_id or None,
                now_ms=self.now_ms(),
            )
        except trading.UnknownOrder:
            return self._futures_success(cancelStatus={"status": "notFound", "receivedTime": received})
        status = {
            "status": "cancelled",
            "order_id": order.order_id,
            "receivedTime": received,
            "orderEvents": [{"uid": order.order_id, "order": self._futures_order(order), "type": "CANCEL"}],
        }
        return self._futures_success(cancelStatus=status)

    async def futures_open_orders(self, request: web.Request) -> web.Response:
        key = await self.futures_authenticate(request)
        if not (key.read or key.trade) or "futures" not in key.identities:
            raise common.Reject(self.futures_error("authenticationError", 401), auth=False)
        listed = [
            {
                "order_id": o.order_id,
                "cliOrdId": o.client_id,
                "symbol": o.symbol,
                "side": o.side,
                "orderType": "lmt",
                "limitPrice": float(o.price),
                "unfilledSize": float(o.amount),
                "filledSize": 0.0,
                "receivedTime": common.iso_ms(o.created_ms),
                "lastUpdateTime": common.iso_ms(o.updated_ms),
                "status": "untouched",
                "reduceOnly": False,
            }
            for o in self.state.book.open_orders(self.wallet(key, "futures"))
        ]
        return self._futures_success(openOrders=listed)
