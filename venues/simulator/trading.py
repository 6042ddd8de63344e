"""The simulator's little trading book: balances per account wallet and resting limit orders.

There is no matching engine: a limit order rests until it is cancelled. Placing one moves its hold (the quote
amount ``price x amount`` of a buy, the base amount of a sell; the collateral of a futures order, leverage 1)
from ``free`` to ``locked``; cancelling moves it back. An order whose hold exceeds the free balance is refused
with :class:`InsufficientBalance`, which each venue module turns into its own documented error.

An account wallet is named ``(venue, uid, wallet)``; the wallet is the identity the venue trades from
(Binance ``spot`` / ``futures``, OKX ``trading``, Bybit ``unified``, Coinbase ``default`` / ``exchange``,
Kraken ``spot`` / ``futures``). A wallet first touched gets :data:`STARTING_BALANCES` (a simulator choice),
unless a test set its balances before with :meth:`Book.set_balance`. No I/O; amounts are ``Decimal``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from venues.base import Venue

STARTING_BALANCES: Mapping[str, Decimal] = {
    "BTC": Decimal("1"),
    "ETH": Decimal("10"),
    "USDT": Decimal("10000"),
    "USD": Decimal("10000"),
}
MAX_ORDERS_PER_WALLET = 200  # open orders one wallet may hold (Binance's usual MAX_NUM_ORDERS per symbol)
MAX_CLOSED_PER_WALLET = 1000  # cancelled orders a wallet remembers (oldest forgotten first): bounded memory


@dataclass(frozen=True, slots=True)
class Market:
    """One tradable market as the simulator lists it (venue-independent view)."""

    symbol: str  # the venue's own symbol: BTCUSDT, BTC-USDT, XXBTZUSD, PF_XBTUSD ...
    base: str  # common names: BTC, ETH
    quote: str  # USDT, USD
    tick: Decimal = Decimal("0.01")  # price increment
    step: Decimal = Decimal("0.00001")  # amount increment
    min_amount: Decimal = Decimal("0.00001")
    futures: bool = False  # collateral is the quote currency, for either side


class InsufficientBalance(Exception):
    """The hold of an order exceeds the free balance of its asset."""

    def __init__(self, asset: str, needed: Decimal, free: Decimal) -> None:
        super().__init__(f"insufficient {asset}: needs {needed}, free {free}")
        self.asset = asset
        self.needed = needed
        self.free = free


class UnknownOrder(Exception):
    """No open order with that id (or client id) in the wallet."""


class TooManyOrders(Exception):
    """The wallet already holds :data:`MAX_ORDERS_PER_WALLET` open orders."""


@dataclass(slots=True)
class Order:
    """A resting (or cancelled) limit order."""

    order_id: str
    client_id: str | None
    symbol: str
    side: str  # "buy" | "sell"
    price: Decimal
    amount: Decimal
    hold_asset: str
    hold: Decimal
    created_ms: int
    status: str = "open"  # "open" | "canceled"
    updated_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # venue-specific echoes (OKX tdMode, ...)

    def as_dict(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "client_id": self.client_id,
            "symbol": self.symbol,
            "side": self.side,
            "price": str(self.price),
            "amount": str(self.amount),
            "hold_asset": self.hold_asset,
            "hold": str(self.hold),
            "created_ms": self.created_ms,
            "status": self.status,
        }


WalletId = tuple[Venue, str, str]


def hold_for(market: Market, side: str, price: Decimal, amount: Decimal) -> tuple[str, Decimal]:
    """(asset, amount) an order of ``market`` locks: the quote notional of a buy (or of any futures
    order, leverage 1), the base amount of a spot sell."""
    if side == "buy" or market.futures:
        return market.quote, price * amount
    return market.base, amount


class Book:
    """Balances and orders of every wallet of one simulator."""

    def __init__(self) -> None:
        self._free: dict[WalletId, dict[str, Decimal]] = {}
        self._locked: dict[WalletId, dict[str, Decimal]] = {}
        self._orders: dict[WalletId, dict[str, Order]] = {}
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        """A number unique within this simulator (venues format it as their order ids)."""
        return next(self._ids)

    def _wallet(self, wallet: WalletId) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        if wallet not in self._free:
            self._free[wallet] = dict(STARTING_BALANCES)
            self._locked[wallet] = {}
        return self._free[wallet], self._locked[wallet]

    def balances(self, wallet: WalletId) -> dict[str, tuple[Decimal, Decimal]]:
        """``{asset: (free, locked)}`` of the wallet, every asset it ever held."""
        free, locked = self._wallet(wallet)
        assets = sorted(set(free) | set(locked))
        return {a: (free.get(a, Decimal(0)), locked.get(a, Decimal(0))) for a in assets}

    def set_balance(self, wallet: WalletId, asset: str, free: Decimal) -> None:
        """Set the free amount of ``asset`` (locked amounts follow the open orders)."""
        if not free.is_finite() or free < 0:
            raise ValueError("a balance cannot be negative")
        self._wallet(wallet)[0][asset] = free

    def place(
        self,
        wallet: WalletId,
        market: Market,
        *,
        order_id: str,
        client_id: str | None,
        side: str,
        price: Decimal,
        amount: Decimal,
        now_ms: int,
        extra: Mapping[str, Any] | None = None,
    ) -> Order:
        """Rest a limit order, moving its hold from free to locked; raises :class:`InsufficientBalance`."""
        free, locked = self._wallet(wallet)
        orders = self._orders.setdefault(wallet, {})
        if sum(1 for o in orders.values() if o.status == "open") >= MAX_ORDERS_PER_WALLET:
            raise TooManyOrders
        asset, hold = hold_for(market, side, price, amount)
        available = free.get(asset, Decimal(0))
        if hold > available:
            raise InsufficientBalance(asset, hold, available)
        free[asset] = available - hold
        locked[asset] = locked.get(asset, Decimal(0)) + hold
        order = Order(
            order_id=order_id,
            client_id=client_id,
            symbol=market.symbol,
            side=side,
            price=price,
            amount=amount,
            hold_asset=asset,
            hold=hold,
            created_ms=now_ms,
            updated_ms=now_ms,
            extra=dict(extra or {}),
        )
        orders[order_id] = order
        return order

    def find(self, wallet: WalletId, *, order_id: str | None = None, client_id: str | None = None) -> Order:
        """The order (open or cancelled) by id or client id; raises :class:`UnknownOrder`."""
        for order in self._orders.get(wallet, {}).values():
            if (order_id is not None and order.order_id == order_id) or (
                client_id is not None and order.client_id == client_id
            ):
                return order
        raise UnknownOrder(order_id or client_id or "")

    def cancel(
        self, wallet: WalletId, *, order_id: str | None = None, client_id: str | None = None, now_ms: int
    ) -> Order:
        """Cancel an open order and release its hold; raises :class:`UnknownOrder` if none is open."""
        order = self.find(wallet, order_id=order_id, client_id=client_id)
        if order.status != "open":
            raise UnknownOrder(order.order_id)
        free, locked = self._wallet(wallet)
        locked[order.hold_asset] = locked.get(order.hold_asset, Decimal(0)) - order.hold
        free[order.hold_asset] = free.get(order.hold_asset, Decimal(0)) + order.hold
        order.status = "canceled"
        order.updated_ms = now_ms
        self._forget_old(wallet)
        return order

    def _forget_old(self, wallet: WalletId) -> None:
        orders = self._orders.get(wallet, {})
        closed = [order_id for order_id, o in orders.items() if o.status != "open"]
        for order_id in closed[: max(0, len(closed) - MAX_CLOSED_PER_WALLET)]:
            del orders[order_id]

    def open_orders(self, wallet: WalletId, symbol: str | None = None) -> list[Order]:
        """Open orders of the wallet (of ``symbol`` if given), oldest first."""
        return [
            o
            for o in self._orders.get(wallet, {}).values()
            if o.status == "open" and (symbol is None or o.symbol == symbol)
        ]

    def orders(self, wallet: WalletId) -> list[Order]:
        """The wallet's open orders and its latest cancelled ones, oldest first."""
        return list(self._orders.get(wallet, {}).values())


def decimal(text: object) -> Decimal | None:
    """A positive finite Decimal from a request field, or None when absent or malformed."""
    if text is None or isinstance(text, bool):
        return None
    try:
        value = Decimal(str(text))
    except ArithmeticError:
        return None
    if not value.is_finite() or value <= 0:
        return None
    return value


def fmt(value: Decimal, places: int = 8) -> str:
    """A fixed-point string with ``places`` decimals, as venues print amounts."""
    return f"{value:.{places}f}"
