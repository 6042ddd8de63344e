"""Coinbase Exchange's trading endpoints: enough for a ccxt client to load markets and trade a little.

Public (docs/venues.md §4B.9): ``GET /products`` (BTC-USD, ETH-USD) and ``GET /currencies``. Signed as every
Exchange call: ``GET /accounts`` (the profile's ``exchange`` wallet: balance, hold, available),
``POST /orders`` (limit), ``DELETE /orders/{id}`` (or ``/orders/client:{client_oid}``), ``GET /orders``
(filtered by ``status`` and ``product_id``).

Errors are ``{"message": ...}``: HTTP 400 "Insufficient funds" for an unaffordable order, 404 "NotFound" for
a cancel of an order that is not open, 400 "Product not found" for an unknown product, 400 "Invalid
<field>" for a malformed field, 403 "Forbidden" for a key without the trade permission.
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
    "BTC-USD": trading.Market("BTC-USD", "BTC", "USD", Decimal("0.01"), Decimal("0.00000001")),
    "ETH-USD": trading.Market("ETH-USD", "ETH", "USD", Decimal("0.01"), Decimal("0.00000001")),
}
PUBLIC_PATHS = ("/time", "/products", "/currencies")
PRIVATE_PATHS = ("/accounts", "/profiles", "/orders")
OPEN_STATUSES = ("open", "pending", "active")


def _message(message: str, status: int) -> common.Reject:
    return common.Reject(common.answer({"message": message}, status), auth=False)


def is_exchange_path(path: str) -> bool:
    """True for the paths Coinbase Exchange serves here (the rest of the port is Advanced Trade)."""
    return path in PUBLIC_PATHS or path in PRIVATE_PATHS or path.startswith("/orders/")


class CoinbaseExchangeTrading(common.VenueServer):
    """The trading half of Coinbase Exchange (see :mod:`venues.simulator.coinbase_exchange`)."""

    async def exchange_authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # CoinbaseExchange's

    def exchange_trading_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/products", self.exchange_products),
            web.get("/currencies", self.exchange_currencies),
            web.post("/orders", self.exchange_place),
            web.get("/orders", self.exchange_orders),
            web.delete("/orders/{order_id}", self.exchange_cancel),
        ]

    def exchange_wallet_accounts(self, key: TestKey) -> list[dict[str, Any]]:
        """GET /accounts: one account per currency of the key's profile."""
        accounts = []
        for currency, (free, locked) in self.state.book.balances(self.wallet(key, "exchange")).items():
            account_id = common.stable_uuid(f"credential-engine-simulator:{key.uid}:{currency}")
            accounts.append(
                {
                    "id": str(account_id),
                    "currency": currency,
                    "balance": trading.fmt(free + locked, 16),
                    "hold": trading.fmt(locked, 16),
                    "available": trading.fmt(free, 16),
                    "profile_id": key.uid,
                    "trading_enabled": key.trade,
                    "pending_deposit": "0",
                    "display_name": currency,
                }
            )
        return accounts

    async def exchange_products(self, request: web.Request) -> web.Response:
        return common.answer(
            [
                {
                    "id": m.symbol,
                    "base_currency": m.base,
                    "quote_currency": m.quote,
                    "quote_increment": str(m.tick),
                    "base_increment": str(m.step),
                    "display_name": f"{m.base}/{m.quote}",
                    "min_market_funds": "1",
                    "margin_enabled": False,
                    "post_only": False,
                    "limit_only": False,
                    "cancel_only": False,
                    "status": "online",
                    "status_message": "",
                    "trading_disabled": False,
                    "fx_stablecoin": False,
                    "max_slippage_percentage": "0.03000000",
                    "auction_mode": False,
                    "high_bid_limit_percentage": "",
                }
                for m in MARKETS.values()
            ]
        )

    async def exchange_currencies(self, request: web.Request) -> web.Response:
        listed = []
        for code, kind, precision in (
            ("BTC", "crypto", "0.00000001"),
            ("ETH", "crypto", "0.00000001"),
            ("USD", "fiat", "0.01"),
        ):
            listed.append(
                {
                    "id": code,
                    "name": code,
                    "min_size": precision,
                    "status": "online",
                    "message": "",
                    "max_precision": precision,
                    "convertible_to": [],
                    "details": {
                        "type": kind,
                        "symbol": "$" if kind == "fiat" else "",
                        "network_confirmations": 0,
                        "sort_order": 0,
                        "crypto_address_link": "",
                        "crypto_transaction_link": "",
                        "push_payment_methods": [],
                        "group_types": [],
                        "display_name": "",
                        "processing_time_seconds": 0,
                        "min_withdrawal_amount": 0,
                        "max_withdrawal_amount": 0,
                    },
                    "default_network": "",
                    "supported_networks": [],
                }
            )
        return common.answer(listed)

    async def _exchange_trader(self, request: web.Request) -> TestKey:
        key = await self.exchange_authenticate(request)
        if not key.trade or "default" not in key.identities:
            raise _message("Forbidden", 403)
        return key

    def _exchange_order(
        self, order: trading.Order, key: TestKey, status: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": order.order_id,
            "price": trading.fmt(order.price),
            "size": trading.fmt(order.amount),
            "product_id": order.symbol,
            "profile_id": key.uid,
            "side": order.side,
            "type": "limit",
            "time_in_force": order.extra.get("time_in_force", "GTC"),
            "post_only": False,
            "created_at": common.iso_ms(order.created_ms),
            "fill_fees": "0.0000000000000000",
            "filled_size": "0.00000000",
            "executed_value": "0.0000000000000000",
            "status": status or ("open" if order.status == "open" else "done"),
            "settled": False,
            **({"client_oid": order.client_id} if order.client_id else {}),
        }

    async def exchange_place(self, request: web.Request) -> web.Response:
        key = await self._exchange_trader(request)
        try:
            data = json.loads(await request.text() or "{}")
        except ValueError:
            raise _message("Invalid JSON", 400) from None
        if not isinstance(data, dict):
            raise _message("Invalid JSON", 400)
        market = MARKETS.get(str(data.get("product_id", "")))
        if market is None:
            raise _message("Product not found", 400)
        side = data.get("side")
        if side not in ("buy", "sell"):
            raise _message("Invalid side", 400)
        if data.get("type", "limit") != "limit":
            raise _message("Invalid order type", 400)  # simulator: limit orders only
        price, size = trading.decimal(data.get("price")), trading.decimal(data.get("size"))
        if price is None:
            raise _message("Invalid price", 400)
        if size is None:
            raise _message("Invalid size", 400)
        try:
            order = self.state.book.place(
                self.wallet(key, "exchange"),
                market,
                order_id=str(uuid.uuid4()),
                client_id=str(data["client_oid"]) if data.get("client_oid") else None,
                side=side,
                price=price,
                amount=size,
                now_ms=self.now_ms(),
                extra={"time_in_force": str(data.get("time_in_force") or "GTC")},
            )
        except trading.InsufficientBalance:
            raise _message("Insufficient funds", 400) from None
        except trading.TooManyOrders:
            raise _message("Too many open orders", 400) from None
        return common.answer(self._exchange_order(order, key, "pending"))

    async def exchange_cancel(self, request: web.Request) -> web.Response:
        key = await self._exchange_trader(request)
        ref = request.match_info["order_id"]
        by_client = ref.startswith("client:")
        try:
            order = self.state.book.cancel(
                self.wallet(key, "exchange"),
                order_id=None if by_client else ref,
                client_id=ref[len("client:") :] if by_client else None,
                now_ms=self.now_ms(),
            )
        except trading.UnknownOrder:
            raise _message("NotFound", 404) from None
        return common.answer(order.order_id)

    async def exchange_orders(self, request: web.Request) -> web.Response:
        key = await self.exchange_authenticate(request)
        if not key.read or "default" not in key.identities:
            raise _message("Forbidden", 403)
        statuses = request.query.getall("status", list(OPEN_STATUSES))
        product = request.query.get("product_id") or None
        if product is not None and product not in MARKETS:
            raise _message("Product not found", 400)
        wallet = self.wallet(key, "exchange")
        listed = [
            self._exchange_order(o, key)
            for o in reversed(self.state.book.orders(wallet))  # newest first
            if (product is None or o.symbol == product)
            and ("all" in statuses or ("open" if o.status == "open" else "done") in statuses)
        ]
        return common.answer(listed)
