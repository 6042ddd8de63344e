"""Binance's trading endpoints (spot ``/api/v3`` and USD-M ``/fapi``), enough for a ccxt client to trade a little.

Public: ``exchangeInfo`` of spot, USD-M and COIN-M (the last lists no symbol). Signed (docs/venues.md §1.9):
the wallet coin list, the cross-margin pairs (the spot pairs; no isolated pairs), spot ``account``
balances, cross-margin ``account`` ``userAssets``, USD-M ``account`` (v2/v3) and ``balance``, and per
product ``order`` (POST place, DELETE cancel) and ``openOrders`` (GET) under ``/api/v3``,
``/sapi/v1/margin`` and ``/fapi/v1``. Orders are LIMIT/GTC only and rest in
:mod:`venues.simulator.trading` (no matching). Spot orders trade from the ``spot`` wallet, cross-margin
orders from the ``margin`` wallet (no borrowing), USD-M orders from the ``futures`` wallet (margin =
notional, leverage 1).

Errors (docs/venues.md §1.9): an unaffordable spot order answers -2010 "Account has insufficient balance
for requested action." and a USD-M one -2019 "Margin is insufficient." (HTTP 400); cancelling an order that
is not open answers -2011 "Unknown order sent."; a missing or malformed parameter -1102 / -1100; an
unlisted symbol -1121 "Invalid symbol."; a key without trading permission -2015 (as Binance, HTTP 401).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from venues.simulator import common, trading
from venues.simulator.registry import TestKey

SPOT_MARKETS: Mapping[str, trading.Market] = {
    "BTCUSDT": trading.Market("BTCUSDT", "BTC", "USDT", Decimal("0.01"), Decimal("0.00001")),
    "ETHUSDT": trading.Market("ETHUSDT", "ETH", "USDT", Decimal("0.01"), Decimal("0.0001")),
}
FUTURES_MARKETS: Mapping[str, trading.Market] = {
    "BTCUSDT": trading.Market(
        "BTCUSDT", "BTC", "USDT", Decimal("0.1"), Decimal("0.001"), Decimal("0.001"), True
    ),
    "ETHUSDT": trading.Market(
        "ETHUSDT", "ETH", "USDT", Decimal("0.01"), Decimal("0.001"), Decimal("0.001"), True
    ),
}
COINS = ("BTC", "ETH", "USDT")


def _places(step: Decimal) -> int:
    return max(0, -step.normalize().as_tuple().exponent)  # type: ignore[operator]


def _error(code: int, msg: str, status: int = 400) -> web.Response:
    return common.answer({"code": code, "msg": msg}, status)


class BinanceTrading(common.VenueServer):
    """The trading half of the BINANCE venue server (see :mod:`venues.simulator.binance`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # BinanceServer's

    def trading_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v3/exchangeInfo", self.spot_exchange_info),
            web.get("/fapi/v1/exchangeInfo", self.futures_exchange_info),
            web.get("/dapi/v1/exchangeInfo", self.coin_exchange_info),
            web.get("/sapi/v1/capital/config/getall", self.coins),
            web.get("/sapi/v1/margin/allPairs", self.margin_pairs),
            web.get("/sapi/v1/margin/isolated/allPairs", self.isolated_margin_pairs),
            web.post("/api/v3/order", self.spot_place),
            web.delete("/api/v3/order", self.spot_cancel),
            web.get("/api/v3/openOrders", self.spot_open_orders),
            web.post("/sapi/v1/margin/order", self.margin_place),
            web.delete("/sapi/v1/margin/order", self.margin_cancel),
            web.get("/sapi/v1/margin/openOrders", self.margin_open_orders),
            web.get("/fapi/v2/balance", self.futures_balance),
            web.get("/fapi/v3/balance", self.futures_balance),
            web.post("/fapi/v1/order", self.futures_place),
            web.delete("/fapi/v1/order", self.futures_cancel),
            web.get("/fapi/v1/openOrders", self.futures_open_orders),
        ]

    # -- shared helpers ---------------------------------------------------------------------------

    async def params(self, request: web.Request) -> dict[str, str]:
        """Query and (form) body parameters together, as Binance reads them."""
        body = await request.text() if request.body_exists else ""
        return dict(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)) | dict(
            parse_qsl(body, keep_blank_values=True)
        )

    def _trader(self, request: web.Request, key: TestKey, identity: str) -> None:
        if not key.trade or identity not in key.identities:
            msg = f"Invalid API-key, IP, or permissions for action, request ip: {common.client_ip(request)}"
            raise common.Reject(_error(-2015, msg, 401), auth=False)

    @staticmethod
    def _market(markets: Mapping[str, trading.Market], params: Mapping[str, str]) -> trading.Market:
        symbol = params.get("symbol")
        if not symbol:
            raise common.Reject(
                _error(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."),
                auth=False,
            )
        market = markets.get(symbol)
        if market is None:
            raise common.Reject(_error(-1121, "Invalid symbol."), auth=False)
        return market

    async def _place(
        self, request: web.Request, markets: Mapping[str, trading.Market], wallet: str
    ) -> tuple[trading.Order, dict[str, str]]:
        key = await self.authenticate(request)
        self._trader(request, key, wallet)
        params = await self.params(request)
        market = self._market(markets, params)
        side = params.get("side", "")
        if side not in ("BUY", "SELL"):
            raise common.Reject(
                _error(-1102, "Mandatory parameter 'side' was not sent, was empty/null, or malformed."),
                auth=False,
            )
        if params.get("type") != "LIMIT":
            raise common.Reject(_error(-1116, "Invalid orderType."), auth=False)  # simulator: LIMIT only
        price = trading.decimal(params.get("price"))
        amount = trading.decimal(params.get("quantity"))
        if price is None or amount is None:
            raise common.Reject(
                _error(-1100, "Illegal characters found in parameter 'price' or 'quantity'."), auth=False
            )
        if amount < market.min_amount:
            raise common.Reject(_error(-1013, "Filter failure: LOT_SIZE"), auth=False)
        client_id = params.get("newClientOrderId") or f"sim{self.state.book.next_id()}"
        try:
            order = self.state.book.place(
                self.wallet(key, wallet),
                market,
                order_id=str(self.state.book.next_id()),
                client_id=client_id,
                side=side.lower(),
                price=price,
                amount=amount,
                now_ms=self.now_ms(),
                extra={"timeInForce": params.get("timeInForce", "GTC")},
            )
        except trading.InsufficientBalance:
            if wallet == "futures":
                raise common.Reject(_error(-2019, "Margin is insufficient."), auth=False) from None
            msg = "Account has insufficient balance for requested action."
            raise common.Reject(_error(-2010, msg), auth=False) from None
        except trading.TooManyOrders:
            raise common.Reject(_error(-1015, "Too many new orders."), auth=False) from None
        return order, params

    async def _cancel(
        self, request: web.Request, markets: Mapping[str, trading.Market], wallet: str
    ) -> trading.Order:
        key = await self.authenticate(request)
        self._trader(request, key, wallet)
        params = await self.params(request)
        self._market(markets, params)
        order_id, client_id = params.get("orderId"), params.get("origClientOrderId")
        if not order_id and not client_id:
            msg = "Param 'origClientOrderId' or 'orderId' must be sent, but both were empty/null!"
            raise common.Reject(_error(-1102, msg), auth=False)
        try:
            return self.state.book.cancel(
                self.wallet(key, wallet),
                order_id=order_id or None,
                client_id=client_id or None,
                now_ms=self.now_ms(),
            )
        except trading.UnknownOrder:
            raise common.Reject(_error(-2011, "Unknown order sent."), auth=False) from None

    async def _open(
        self, request: web.Request, markets: Mapping[str, trading.Market], wallet: str
    ) -> list[trading.Order]:
        key = await self.authenticate(request)
        params = await self.params(request)
        symbol = params.get("symbol")
        if symbol:
            self._market(markets, params)
        return self.state.book.open_orders(self.wallet(key, wallet), symbol or None)

    # -- public ---------------------------------------------------------------------------------

    def _filters(self, market: trading.Market) -> list[dict[str, Any]]:
        return [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": str(market.tick),
                "maxPrice": "1000000.00",
                "tickSize": str(market.tick),
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": str(market.min_amount),
                "maxQty": "9000.00000000",
                "stepSize": str(market.step),
            },
            {
                "filterType": "MIN_NOTIONAL" if market.futures else "NOTIONAL",
                "minNotional": "5",
                "notional": "5",
            },
        ]

    async def spot_exchange_info(self, request: web.Request) -> web.Response:
        symbols = [
            {
                "symbol": m.symbol,
                "status": "TRADING",
                "baseAsset": m.base,
                "baseAssetPrecision": 8,
                "quoteAsset": m.quote,
                "quotePrecision": 8,
                "quoteAssetPrecision": 8,
                "baseCommissionPrecision": 8,
                "quoteCommissionPrecision": 8,
                "orderTypes": ["LIMIT"],
                "icebergAllowed": False,
                "ocoAllowed": False,
                "isSpotTradingAllowed": True,
                "isMarginTradingAllowed": False,
                "filters": self._filters(m),
                "permissions": [],
                "permissionSets": [["SPOT"]],
                "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
                "allowedSelfTradePreventionModes": ["EXPIRE_MAKER"],
            }
            for m in SPOT_MARKETS.values()
        ]
        return common.answer(self._info(symbols))

    def _info(self, symbols: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "timezone": "UTC",
            "serverTime": self.now_ms(),
            "rateLimits": [],
            "exchangeFilters": [],
            "symbols": symbols,
        }

    async def futures_exchange_info(self, request: web.Request) -> web.Response:
        symbols = [
            {
                "symbol": m.symbol,
                "pair": m.symbol,
                "contractType": "PERPETUAL",
                "deliveryDate": 4133404800000,
                "onboardDate": 1569398400000,
                "status": "TRADING",
                "baseAsset": m.base,
                "quoteAsset": m.quote,
                "marginAsset": m.quote,
                "pricePrecision": _places(m.tick),
                "quantityPrecision": _places(m.step),
                "baseAssetPrecision": 8,
                "quotePrecision": 8,
                "underlyingType": "COIN",
                "settlePlan": 0,
                "triggerProtect": "0.0500",
                "liquidationFee": "0.012500",
                "marketTakeBound": "0.05",
                "filters": self._filters(m),
                "orderTypes": ["LIMIT"],
                "timeInForce": ["GTC"],
            }
            for m in FUTURES_MARKETS.values()
        ]
        return common.answer(self._info(symbols))

    async def coin_exchange_info(self, request: web.Request) -> web.Response:
        return common.answer(self._info([]))  # the simulator lists no COIN-M contract

    async def coins(self, request: web.Request) -> web.Response:
        await self.authenticate(request)
        # Shape of "All Coins' Information" with the fields ccxt reads; networks are left out (simulator).
        return common.answer(
            [
                {
                    "coin": coin,
                    "name": coin,
                    "depositAllEnable": True,
                    "withdrawAllEnable": True,
                    "free": "0",
                    "locked": "0",
                    "freeze": "0",
                    "withdrawing": "0",
                    "ipoing": "0",
                    "ipoable": "0",
                    "storage": "0",
                    "isLegalMoney": False,
                    "trading": True,
                    "networkList": [],
                }
                for coin in COINS
            ]
        )

    async def margin_pairs(self, request: web.Request) -> web.Response:
        await self.authenticate(request)
        pairs = [
            {
                "id": index,
                "symbol": m.symbol,
                "base": m.base,
                "quote": m.quote,
                "isMarginTrade": True,
                "isBuyAllowed": True,
                "isSellAllowed": True,
            }
            for index, m in enumerate(SPOT_MARKETS.values(), start=1)
        ]
        return common.answer(pairs)

    async def isolated_margin_pairs(self, request: web.Request) -> web.Response:
        await self.authenticate(request)
        return common.answer([])  # the simulator has no isolated margin

    # -- spot -----------------------------------------------------------------------------------

    def _spot_order(self, order: trading.Order, *, with_times: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "symbol": order.symbol,
            "orderId": int(order.order_id),
            "orderListId": -1,
            "clientOrderId": order.client_id,
            "price": trading.fmt(order.price),
            "origQty": trading.fmt(order.amount),
            "executedQty": "0.00000000",
            "cummulativeQuoteQty": "0.00000000",
            "status": "NEW" if order.status == "open" else "CANCELED",
            "timeInForce": order.extra.get("timeInForce", "GTC"),
            "type": "LIMIT",
            "side": order.side.upper(),
            "selfTradePreventionMode": "EXPIRE_MAKER",
        }
        if with_times:
            body |= {
                "stopPrice": "0.00000000",
                "icebergQty": "0.00000000",
                "time": order.created_ms,
                "updateTime": order.updated_ms,
                "isWorking": True,
                "workingTime": order.created_ms,
                "origQuoteOrderQty": "0.00000000",
            }
        return body

    async def spot_place(self, request: web.Request) -> web.Response:
        order, _ = await self._place(request, SPOT_MARKETS, "spot")
        body = self._spot_order(order, with_times=False)
        body |= {
            "transactTime": order.created_ms,
            "workingTime": order.created_ms,
            "origQuoteOrderQty": "0.00000000",
            "fills": [],
        }
        return common.answer(body)

    async def spot_cancel(self, request: web.Request) -> web.Response:
        order = await self._cancel(request, SPOT_MARKETS, "spot")
        body = self._spot_order(order, with_times=False)
        body |= {"origClientOrderId": order.client_id, "transactTime": order.updated_ms}
        return common.answer(body)

    async def spot_open_orders(self, request: web.Request) -> web.Response:
        orders = await self._open(request, SPOT_MARKETS, "spot")
        return common.answer([self._spot_order(o, with_times=True) for o in orders])

    def spot_balances(self, key: TestKey) -> list[dict[str, str]]:
        """The ``balances`` of GET /api/v3/account: every asset of the key's spot wallet."""
        held = self.state.book.balances(self.wallet(key, "spot"))
        return [
            {"asset": a, "free": trading.fmt(f), "locked": trading.fmt(lk)} for a, (f, lk) in held.items()
        ]

    # -- cross margin (same pairs as spot, the ``margin`` wallet, no borrowing) ---------------------

    async def margin_place(self, request: web.Request) -> web.Response:
        order, _ = await self._place(request, SPOT_MARKETS, "margin")
        body = self._spot_order(order, with_times=False) | {
            "transactTime": order.created_ms,
            "isIsolated": False,
        }
        return common.answer(body)

    async def margin_cancel(self, request: web.Request) -> web.Response:
        order = await self._cancel(request, SPOT_MARKETS, "margin")
        body = self._spot_order(order, with_times=False)
        return common.answer(body | {"origClientOrderId": order.client_id, "isIsolated": False})

    async def margin_open_orders(self, request: web.Request) -> web.Response:
        orders = await self._open(request, SPOT_MARKETS, "margin")
        return common.answer([self._spot_order(o, with_times=True) | {"isIsolated": False} for o in orders])

    def margin_assets(self, key: TestKey) -> list[dict[str, str]]:
        """The ``userAssets`` of GET /sapi/v1/margin/account: the key's margin wallet (nothing borrowed)."""
        return [
            {
                "asset": asset,
                "free": trading.fmt(free),
                "locked": trading.fmt(locked),
                "borrowed": "0.00000000",
                "interest": "0.00000000",
                "netAsset": trading.fmt(free + locked),
            }
            for asset, (free, locked) in self.state.book.balances(self.wallet(key, "margin")).items()
        ]

    # -- USD-M futures --------------------------------------------------------------------------

    def futures_assets(self, key: TestKey) -> list[dict[str, Any]]:
        """The ``assets`` of GET /fapi/v2|v3/account: the futures wallet, margin locked by open orders."""
        now = self.now_ms()
        assets = []
        for asset, (free, locked) in self.state.book.balances(self.wallet(key, "futures")).items():
            total = trading.fmt(free + locked)
            assets.append(
                {
                    "asset": asset,
                    "walletBalance": total,
                    "unrealizedProfit": "0.00000000",
                    "marginBalance": total,
                    "maintMargin": "0.00000000",
                    "initialMargin": trading.fmt(locked),
                    "positionInitialMargin": "0.00000000",
                    "openOrderInitialMargin": trading.fmt(locked),
                    "crossWalletBalance": total,
                    "crossUnPnl": "0.00000000",
                    "availableBalance": trading.fmt(free),
                    "maxWithdrawAmount": trading.fmt(free),
                    "updateTime": now,
                }
            )
        return assets

    async def futures_balance(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        return common.answer(
            [
                {
                    "accountAlias": "SgsR",
                    "asset": a["asset"],
                    "balance": a["walletBalance"],
                    "crossWalletBalance": a["crossWalletBalance"],
                    "crossUnPnl": "0.00000000",
                    "availableBalance": a["availableBalance"],
                    "maxWithdrawAmount": a["maxWithdrawAmount"],
                    "marginAvailable": True,
                    "updateTime": a["updateTime"],
                }
                for a in self.futures_assets(key)
            ]
        )

    def _futures_order(self, order: trading.Order) -> dict[str, Any]:
        return {
            "orderId": int(order.order_id),
            "symbol": order.symbol,
            "status": "NEW" if order.status == "open" else "CANCELED",
            "clientOrderId": order.client_id,
            "price": str(order.price),
            "avgPrice": "0.00",
            "origQty": str(order.amount),
            "executedQty": "0",
            "cumQty": "0",
            "cumQuote": "0",
            "timeInForce": order.extra.get("timeInForce", "GTC"),
            "type": "LIMIT",
            "reduceOnly": False,
            "closePosition": False,
            "side": order.side.upper(),
            "positionSide": "BOTH",
            "stopPrice": "0",
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "origType": "LIMIT",
            "priceMatch": "NONE",
            "selfTradePreventionMode": "NONE",
            "goodTillDate": 0,
            "time": order.created_ms,
            "updateTime": order.updated_ms,
        }

    async def futures_place(self, request: web.Request) -> web.Response:
        order, _ = await self._place(request, FUTURES_MARKETS, "futures")
        return common.answer(self._futures_order(order))

    async def futures_cancel(self, request: web.Request) -> web.Response:
        order = await self._cancel(request, FUTURES_MARKETS, "futures")
        return common.answer(self._futures_order(order))

    async def futures_open_orders(self, request: web.Request) -> web.Response:
        orders = await self._open(request, FUTURES_MARKETS, "futures")
        return common.answer([self._futures_order(o) for o in orders])
