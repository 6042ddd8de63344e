"""Coinbase Advanced Trade's trading endpoints: enough for a ccxt client to load markets and trade a little.

Public (docs/venues.md §4A.9): ``GET /api/v3/brokerage/market/products`` (SPOT: BTC-USD and ETH-USD; other
product types list nothing) and the v2 lists ccxt loads with the markets (``/v2/currencies``,
``/v2/currencies/crypto``, ``/v2/exchange-rates`` with fixed simulator rates). Signed with a CDP JWT as
every Advanced call: ``transaction_summary`` (fee tier), ``accounts`` (the portfolio's ``default``
wallet: available balance and hold per currency), ``POST orders`` (``limit_limit_gtc``),
``POST orders/batch_cancel`` and ``GET orders/historical/batch``.

Order outcomes follow Advanced Trade: HTTP 200 with ``success`` false and an ``error_response`` whose
``error`` is ``INSUFFICIENT_FUND`` for an unaffordable order (``UNKNOWN_PRODUCT_ID`` for an unknown product,
``INVALID_LIMIT_PRICE`` / ``INVALID_SIZE`` for bad fields); a cancel of an order that is not open answers
``success`` false with ``failure_reason`` ``UNKNOWN_CANCEL_ORDER``. A key without the trade permission
answers HTTP 403 ``PERMISSION_DENIED``.
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

PREFIX = "/api/v3/brokerage"
MARKETS: Mapping[str, trading.Market] = {
    "BTC-USD": trading.Market("BTC-USD", "BTC", "USD", Decimal("0.01"), Decimal("0.00000001")),
    "ETH-USD": trading.Market("ETH-USD", "ETH", "USD", Decimal("0.01"), Decimal("0.00000001")),
}
NAMES = {"BTC": "Bitcoin", "ETH": "Ethereum", "USD": "US Dollar", "USDT": "Tether"}
PUBLIC_PATHS = (f"{PREFIX}/market/products", "/v2/currencies", "/v2/currencies/crypto", "/v2/exchange-rates")
# Fixed simulator rates (units per 1 USD) for the v2 exchange-rates list; nothing trades at them.
RATES = {"USD": "1", "BTC": "0.00002", "ETH": "0.0004", "USDT": "1"}


def _permission_denied() -> common.Reject:
    body = {
        "error": "PERMISSION_DENIED",
        "error_details": "Missing required scopes",
        "message": "Missing required scopes",
    }
    return common.Reject(common.answer(body, 403), auth=False)


def _bad_request(reason: str) -> common.Reject:
    body = {"error": "INVALID_ARGUMENT", "error_details": reason, "message": reason}
    return common.Reject(common.answer(body, 400), auth=False)


class CoinbaseTrading(common.VenueServer):
    """The Advanced Trade trading half of the COINBASE venue server (see :mod:`venues.simulator.coinbase`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # CoinbaseServer's

    def trading_routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/market/products", self.market_products),
            web.get("/v2/currencies", self.fiat_currencies),
            web.get("/v2/currencies/crypto", self.crypto_currencies),
            web.get("/v2/exchange-rates", self.exchange_rates),
            web.get(f"{PREFIX}/transaction_summary", self.transaction_summary),
            web.post(f"{PREFIX}/orders", self.create_order),
            web.post(f"{PREFIX}/orders/batch_cancel", self.batch_cancel),
            web.get(f"{PREFIX}/orders/historical/batch", self.list_orders),
        ]

    def portfolio_accounts(self, key: TestKey) -> list[dict[str, Any]]:
        """GET accounts: one account per currency of the portfolio's wallet."""
        accounts = []
        stamp = common.iso_ms(key.created_at_ms)
        for currency, (free, locked) in self.state.book.balances(self.wallet(key, "default")).items():
            accounts.append(
                {
                    "uuid": str(common.stable_uuid(f"credential-engine-simulator:{key.uid}:{currency}")),
                    "name": f"{currency} Wallet",
                    "currency": currency,
                    "available_balance": {"value": str(free), "currency": currency},
                    "default": currency == "BTC",
                    "active": True,
                    "created_at": stamp,
                    "updated_at": stamp,
                    "deleted_at": None,
                    "type": "ACCOUNT_TYPE_FIAT" if currency == "USD" else "ACCOUNT_TYPE_CRYPTO",
                    "ready": True,
                    "hold": {"value": str(locked), "currency": currency},
                    "retail_portfolio_id": key.uid,
                }
            )
        return accounts

    async def market_products(self, request: web.Request) -> web.Response:
        kind = request.query.get("product_type", "SPOT")
        products: list[dict[str, Any]] = []
        if kind == "SPOT":
            products = [
                {
                    "product_id": m.symbol,
                    "price": "",
                    "price_percentage_change_24h": "",
                    "volume_24h": "0",
                    "volume_percentage_change_24h": "",
                    "base_increment": str(m.step),
                    "quote_increment": str(m.tick),
                    "quote_min_size": "1",
                    "quote_max_size": "150000000",
                    "base_min_size": str(m.min_amount),
                    "base_max_size": "3400",
                    "base_name": NAMES[m.base],
                    "quote_name": NAMES[m.quote],
                    "watched": False,
                    "is_disabled": False,
                    "new": False,
                    "status": "online",
                    "cancel_only": False,
                    "limit_only": False,
                    "post_only": False,
                    "trading_disabled": False,
                    "auction_mode": False,
                    "product_type": "SPOT",
                    "quote_currency_id": m.quote,
                    "base_currency_id": m.base,
                    "fcm_trading_session_details": None,
                    "mid_market_price": "",
                    "alias": "",
                    "alias_to": [],
                    "base_display_symbol": m.base,
                    "quote_display_symbol": m.quote,
                    "view_only": False,
                    "price_increment": str(m.tick),
                    "display_name": m.symbol,
                    "product_venue": "CBE",
                }
                for m in MARKETS.values()
            ]
        return common.answer({"products": products, "num_products": len(products)})

    async def fiat_currencies(self, request: web.Request) -> web.Response:
        return common.answer({"data": [{"id": "USD", "name": NAMES["USD"], "min_size": "0.01"}]})

    async def crypto_currencies(self, request: web.Request) -> web.Response:
        data = [
            {
                "code": code,
                "name": NAMES[code],
                "color": "#000000",
                "sort_index": index,
                "exponent": 8,
                "type": "crypto",
                "address_regex": "",
                "asset_id": str(common.stable_uuid(f"credential-engine-simulator:asset:{code}")),
            }
            for index, code in enumerate(("BTC", "ETH", "USDT"))
        ]
        return common.answer({"data": data})

    async def exchange_rates(self, request: web.Request) -> web.Response:
        currency = request.query.get("currency", "USD")
        if currency != "USD":
            body = {"errors": [{"id": "invalid_request", "message": "Invalid currency"}]}
            raise common.Reject(common.answer(body, 400), auth=False)  # simulator: USD rates only
        return common.answer({"data": {"currency": "USD", "rates": dict(RATES)}})

    async def transaction_summary(self, request: web.Request) -> web.Response:
        await self.authenticate(request)
        return common.answer(
            {
                "total_volume": 0,
                "total_fees": 0,
                "fee_tier": {
                    "pricing_tier": "Advanced 1",
                    "usd_from": "0",
                    "usd_to": "1000",
                    "taker_fee_rate": "0.012",
                    "maker_fee_rate": "0.006",
                    "aop_from": "",
                    "aop_to": "",
                },
                "margin_rate": None,
                "goods_and_services_tax": None,
                "advanced_trade_only_volume": 0,
                "advanced_trade_only_fees": 0,
                "coinbase_pro_volume": 0,
                "coinbase_pro_fees": 0,
                "total_balance": "",
                "has_promo_fee": False,
            }
        )

    async def _trader(self, request: web.Request) -> tuple[TestKey, dict[str, Any]]:
        key = await self.authenticate(request)
        if not key.trade or "default" not in key.identities:
            raise _permission_denied()
        try:
            data = json.loads(await request.text() or "{}")
        except ValueError:
            raise _bad_request("request body is not JSON") from None
        if not isinstance(data, dict):
            raise _bad_request("request body is not a JSON object")
        return key, data

    @staticmethod
    def _failed(error: str, message: str, configuration: Any) -> web.Response:
        body = {
            "success": False,
            "failure_reason": "UNKNOWN_FAILURE_REASON",
            "order_id": "",
            "error_response": {
                "error": error,
                "message": message,
                "error_details": "",
                "preview_failure_reason": f"PREVIEW_{error}",
            },
            "order_configuration": configuration,
        }
        return common.answer(body)

    async def create_order(self, request: web.Request) -> web.Response:
        key, data = await self._trader(request)
        configuration = data.get("order_configuration")
        client_id = str(data.get("client_order_id") or "")
        market = MARKETS.get(str(data.get("product_id", "")))
        if market is None:
            return self._failed("UNKNOWN_PRODUCT_ID", "Unknown product id", configuration)
        side = data.get("side")
        if side not in ("BUY", "SELL"):
            raise _bad_request("side must be BUY or SELL")
        limit = configuration.get("limit_limit_gtc") if isinstance(configuration, dict) else None
        if not isinstance(limit, dict):
            raise _bad_request("order_configuration must be limit_limit_gtc")  # simulator: limit GTC only
        price, size = trading.decimal(limit.get("limit_price")), trading.decimal(limit.get("base_size"))
        if price is None:
            return self._failed("INVALID_LIMIT_PRICE", "Invalid limit price", configuration)
        if size is None:
            return self._failed("INVALID_SIZE", "Invalid size", configuration)
        order_id = str(uuid.uuid4())
        try:
            self.state.book.place(
                self.wallet(key, "default"),
                market,
                order_id=order_id,
                client_id=client_id or None,
                side=side.lower(),
                price=price,
                amount=size,
                now_ms=self.now_ms(),
                extra={"post_only": bool(limit.get("post_only", False))},
            )
        except trading.InsufficientBalance:
            return self._failed("INSUFFICIENT_FUND", "Insufficient balance in source account", configuration)
        except trading.TooManyOrders:
            return self._failed("UNKNOWN_FAILURE_REASON", "too many open orders", configuration)
        body = {
            "success": True,
            "failure_reason": "UNKNOWN_FAILURE_REASON",
            "order_id": order_id,
            "success_response": {
                "order_id": order_id,
                "product_id": market.symbol,
                "side": side,
                "client_order_id": client_id,
            },
            "order_configuration": configuration,
        }
        return common.answer(body)

    async def batch_cancel(self, request: web.Request) -> web.Response:
        key, data = await self._trader(request)
        ids = data.get("order_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise _bad_request("order_ids must be a list of order ids")
        results = []
        for order_id in ids:
            try:
                self.state.book.cancel(self.wallet(key, "default"), order_id=order_id, now_ms=self.now_ms())
            except trading.UnknownOrder:
                results.append(
                    {"success": False, "failure_reason": "UNKNOWN_CANCEL_ORDER", "order_id": order_id}
                )
            else:
                results.append(
                    {"success": True, "failure_reason": "UNKNOWN_CANCEL_FAILURE_REASON", "order_id": order_id}
                )
        return common.answer({"results": results})

    async def list_orders(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        if not key.read or "default" not in key.identities:
            raise _permission_denied()
        statuses = request.query.getall("order_status", [])
        products = request.query.getall("product_ids", []) + request.query.getall("product_id", [])
        orders = []
        for order in reversed(self.state.book.orders(self.wallet(key, "default"))):  # newest first
            status = "OPEN" if order.status == "open" else "CANCELLED"
            if (statuses and status not in statuses) or (products and order.symbol not in products):
                continue
            orders.append(self._order(order, key, status))
        return common.answer({"orders": orders, "sequence": "0", "has_next": False, "cursor": ""})

    @staticmethod
    def _order(order: trading.Order, key: TestKey, status: str) -> dict[str, Any]:
        limit = {
            "base_size": str(order.amount),
            "limit_price": str(order.price),
            "post_only": order.extra.get("post_only", False),
        }
        return {
            "order_id": order.order_id,
            "product_id": order.symbol,
            "user_id": key.uid,
            "order_configuration": {"limit_limit_gtc": limit},
            "side": order.side.upper(),
            "client_order_id": order.client_id or "",
            "status": status,
            "time_in_force": "GOOD_UNTIL_CANCELLED",
            "created_time": common.iso_ms(order.created_ms),
            "completion_percentage": "0",
            "filled_size": "0",
            "average_filled_price": "0",
            "fee": "",
            "number_of_fills": "0",
            "filled_value": "0",
            "pending_cancel": False,
            "size_in_quote": False,
            "total_fees": "0",
            "size_inclusive_of_fees": False,
            "total_value_after_fees": "0",
            "trigger_status": "INVALID_ORDER_TYPE",
            "order_type": "LIMIT",
            "reject_reason": "",
            "settled": False,
            "product_type": "SPOT",
            "reject_message": "",
            "cancel_message": "",
            "order_placement_source": "RETAIL_ADVANCED",
            "outstanding_hold_amount": str(order.hold if order.status == "open" else 0),
            "is_liquidation": False,
            "last_fill_time": None,
            "edit_history": [],
            "leverage": "",
            "margin_type": "UNKNOWN_MARGIN_TYPE",
            "retail_portfolio_id": key.uid,
        }
