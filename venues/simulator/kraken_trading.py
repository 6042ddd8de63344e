"""Kraken Spot's trading endpoints: enough for a ccxt client to load markets and trade a little.

Public (docs/venues.md §5A.9): ``GET /0/public/Assets`` and ``GET /0/public/AssetPairs`` (XBT/USD and
ETH/USD). Private, signed as every ``/0/private/*`` call: ``BalanceEx`` (balance and ``hold_trade`` per
asset), ``AddOrder`` (limit), ``CancelOrder`` and ``OpenOrders``, on the key's ``spot`` wallet.

Errors are HTTP 200 ``{"error": [...]}``: ``EOrder:Insufficient funds`` for an unaffordable order,
``EOrder:Unknown order`` for a cancel of an order that is not open, ``EQuery:Unknown asset pair``,
``EGeneral:Invalid arguments:<field>``, and ``EGeneral:Permission denied`` for a key whose permissions
do not cover the call (trading needs the trade permission, reading the read permission).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from venues.simulator import common, trading
from venues.simulator.registry import TestKey

# Kraken's asset names for the book's common names.
ASSET_NAMES: Mapping[str, str] = {"BTC": "XXBT", "ETH": "XETH", "USD": "ZUSD", "USDT": "USDT"}
ASSETS: Mapping[str, dict[str, Any]] = {
    "XXBT": {"altname": "XBT", "decimals": 10, "display_decimals": 5},
    "XETH": {"altname": "ETH", "decimals": 10, "display_decimals": 5},
    "ZUSD": {"altname": "USD", "decimals": 4, "display_decimals": 2},
    "USDT": {"altname": "USDT", "decimals": 8, "display_decimals": 4},
}
MARKETS: Mapping[str, trading.Market] = {
    "XXBTZUSD": trading.Market(
        "XXBTZUSD", "BTC", "USD", Decimal("0.1"), Decimal("0.00000001"), Decimal("0.0001")
    ),
    "XETHZUSD": trading.Market(
        "XETHZUSD", "ETH", "USD", Decimal("0.01"), Decimal("0.00000001"), Decimal("0.002")
    ),
}
ALTNAMES = {"XBTUSD": "XXBTZUSD", "ETHUSD": "XETHZUSD"}  # Kraken accepts a pair's altname too
NOT_COUNTED = ("/0/private/AddOrder", "/0/private/CancelOrder")  # matching-engine limits, not the counter


def _error(message: str) -> common.Reject:
    return common.Reject(common.answer({"error": [message]}), auth=False)


def _altname(market: trading.Market) -> str:
    return next(alt for alt, pair in ALTNAMES.items() if pair == market.symbol)


def _fields(body: str, content_type: str) -> dict[str, str]:
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    return dict(parse_qsl(body, keep_blank_values=True))


def txid() -> str:
    """An order id in Kraken's shape: ``OQCLML-BW3P3-BUCMWZ``."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"

    def part(length: int) -> str:
        return "".join(secrets.choice(alphabet) for _ in range(length))

    return f"O{part(5)}-{part(5)}-{part(6)}"


class KrakenTrading(common.VenueServer):
    """The Spot trading half of the KRAKEN venue server (see :mod:`venues.simulator.kraken`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # KrakenServer's

    def trading_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/0/public/Assets", self.assets),
            web.get("/0/public/AssetPairs", self.asset_pairs),
            web.post("/0/private/BalanceEx", self.balance_ex),
            web.post("/0/private/AddOrder", self.add_order),
            web.post("/0/private/CancelOrder", self.cancel_order),
            web.post("/0/private/OpenOrders", self.open_orders),
        ]

    async def assets(self, request: web.Request) -> web.Response:
        result = {
            name: {
                "aclass": "currency",
                "altname": info["altname"],
                "decimals": info["decimals"],
                "display_decimals": info["display_decimals"],
                "collateral_value": 1.0,
                "status": "enabled",
            }
            for name, info in ASSETS.items()
        }
        return common.answer({"error": [], "result": result})

    async def asset_pairs(self, request: web.Request) -> web.Response:
        result = {}
        for market in MARKETS.values():
            base, quote = ASSET_NAMES[market.base], ASSET_NAMES[market.quote]
            result[market.symbol] = {
                "altname": _altname(market),
                "wsname": f"{ASSETS[base]['altname']}/{ASSETS[quote]['altname']}",
                "aclass_base": "currency",
                "base": base,
                "aclass_quote": "currency",
                "quote": quote,
                "lot": "unit",
                "cost_decimals": 5,
                "pair_decimals": max(0, -market.tick.as_tuple().exponent),  # type: ignore[operator]
                "lot_decimals": 8,
                "lot_multiplier": 1,
                "leverage_buy": [],
                "leverage_sell": [],
                "fees": [[0, 0.4]],
                "fees_maker": [[0, 0.25]],
                "fee_volume_currency": "ZUSD",
                "margin_call": 80,
                "margin_stop": 40,
                "ordermin": str(market.min_amount),
                "costmin": "0.5",
                "tick_size": str(market.tick),
                "status": "online",
            }
        return common.answer({"error": [], "result": result})

    async def _private(self, request: web.Request, *, trade: bool) -> tuple[TestKey, dict[str, str]]:
        key = await self.authenticate(request)
        if not key.read or "spot" not in key.identities or (trade and not key.trade):
            raise _error("EGeneral:Permission denied")
        return key, _fields(await request.text(), request.content_type)

    async def balance_ex(self, request: web.Request) -> web.Response:
        key, _ = await self._private(request, trade=False)
        result = {
            ASSET_NAMES.get(asset, asset): {
                "balance": trading.fmt(free + locked, 10),
                "hold_trade": trading.fmt(locked, 10),
            }
            for asset, (free, locked) in self.state.book.balances(self.wallet(key, "spot")).items()
        }
        return common.answer({"error": [], "result": result})

    async def add_order(self, request: web.Request) -> web.Response:
        key, fields = await self._private(request, trade=True)
        pair = fields.get("pair", "")
        market = MARKETS.get(ALTNAMES.get(pair, pair))
        if market is None:
            raise _error("EQuery:Unknown asset pair")
        side = fields.get("type")
        if side not in ("buy", "sell"):
            raise _error("EGeneral:Invalid arguments:type")
        if fields.get("ordertype") != "limit":
            raise _error("EGeneral:Invalid arguments:ordertype")  # simulator: limit orders only
        price, volume = trading.decimal(fields.get("price")), trading.decimal(fields.get("volume"))
        if price is None:
            raise _error("EGeneral:Invalid arguments:price")
        if volume is None:
            raise _error("EGeneral:Invalid arguments:volume")
        if volume < market.min_amount:
            raise _error("EOrder:Order minimum not met")
        order_id = txid()
        try:
            order = self.state.book.place(
                self.wallet(key, "spot"),
                market,
                order_id=order_id,
                client_id=fields.get("cl_ord_id") or None,
                side=side,
                price=price,
                amount=volume,
                now_ms=self.now_ms(),
                extra={"userref": fields.get("userref")},
            )
        except trading.InsufficientBalance:
            raise _error("EOrder:Insufficient funds") from None
        except trading.TooManyOrders:
            raise _error("EOrder:Orders limit exceeded") from None
        return common.answer(
            {"error": [], "result": {"descr": {"order": self._text(order)}, "txid": [order_id]}}
        )

    @staticmethod
    def _text(order: trading.Order) -> str:
        return f"{order.side} {trading.fmt(order.amount)} {_altname(MARKETS[order.symbol])} @ limit {order.price}"

    async def cancel_order(self, request: web.Request) -> web.Response:
        key, fields = await self._private(request, trade=True)
        ref = fields.get("txid") or fields.get("cl_ord_id")
        if not ref:
            raise _error("EGeneral:Invalid arguments:txid")
        wallet = self.wallet(key, "spot")
        try:
            self.state.book.cancel(
                wallet,
                order_id=fields.get("txid") or None,
                client_id=fields.get("cl_ord_id") or None,
                now_ms=self.now_ms(),
            )
        except trading.UnknownOrder:
            raise _error("EOrder:Unknown order") from None
        return common.answer({"error": [], "result": {"count": 1}})

    async def open_orders(self, request: web.Request) -> web.Response:
        key, _ = await self._private(request, trade=False)
        result = {}
        for order in self.state.book.open_orders(self.wallet(key, "spot")):
            entry: dict[str, Any] = {
                "refid": None,
                "userref": int(order.extra["userref"])
                if str(order.extra.get("userref") or "").isdigit()
                else 0,
                "status": "open",
                "opentm": order.created_ms / 1000,
                "starttm": 0,
                "expiretm": 0,
                "descr": {
                    "pair": _altname(MARKETS[order.symbol]),
                    "type": order.side,
                    "ordertype": "limit",
                    "price": str(order.price),
                    "price2": "0",
                    "leverage": "none",
                    "order": self._text(order),
                    "close": "",
                },
                "vol": trading.fmt(order.amount),
                "vol_exec": "0.00000000",
                "cost": "0.00000",
                "fee": "0.00000",
                "price": "0.00000",
                "stopprice": "0.00000",
                "limitprice": "0.00000",
                "misc": "",
                "oflags": "fciq",
            }
            if order.client_id:
                entry["cl_ord_id"] = order.client_id
            result[order.order_id] = entry
        return common.answer({"error": [], "result": {"open": result}})
