"""ccxt trades a little against the simulator: one test per API the simulator imitates.

ccxt (``ccxt.async_support``) is the independent client: it signs every request with its own code and
parses every answer, so a wrong signature check, a wrong shape or a wrong error code in the simulator
shows as a ccxt failure. Each test points every URL group of the ccxt exchange at the simulator, then:
load markets, fetch the balance, place a limit buy (the quote currency is reserved), see it among the
open orders, cancel it (the reservation comes back), see an unaffordable order refused with
``InsufficientFunds``, and find the key in the simulator's signing log. Skipped when ccxt is missing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from venues.base import Venue
from venues.simulator import Simulator, TestKey

ccxt = pytest.importorskip("ccxt.async_support")
ccxt_errors = pytest.importorskip("ccxt.base.errors")


def point_at(exchange: Any, base_url: str) -> None:
    """Every URL group of ``exchange.urls['api']`` on ``base_url``, keeping each group's path."""

    def retarget(url: Any) -> Any:
        if isinstance(url, dict):
            return {name: retarget(value) for name, value in url.items()}
        if not isinstance(url, str):
            return url
        path = urlsplit(url.replace("{hostname}", "example.invalid")).path
        return base_url + path

    exchange.urls["api"] = retarget(exchange.urls["api"])


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=7) as simulator:
        yield simulator


@pytest.fixture
async def make_exchange() -> AsyncIterator[Callable[..., Any]]:
    made: list[Any] = []

    def factory(name: str, base_url: str, key: TestKey, **options: Any) -> Any:
        # ccxt's client-side throttle off: the simulator enforces the venue's limits itself.
        config: dict[str, Any] = {
            "apiKey": key.api_key,
            "secret": key.api_secret,
            "options": options,
            "enableRateLimit": False,
        }
        if key.api_passphrase:
            config["password"] = key.api_passphrase
        exchange = getattr(ccxt, name)(config)
        point_at(exchange, base_url)
        made.append(exchange)
        return exchange

    yield factory
    for exchange in made:
        await exchange.close()


async def trade_a_little(
    sim: Simulator,
    exchange: Any,
    key: TestKey,
    *,
    wallet: str,
    symbol: str,
    hold: str,
    price: float,
    amount: float,
    order_path: str,
    refusal: str | None = None,
    parses_open_price: bool = True,
    params: dict[str, Any] | None = None,
) -> None:
    """The scenario every API passes (see the module docstring).

    ``refusal``: the venue's error code when ccxt cannot map it to InsufficientFunds on a loopback URL
    (ccxt picks Binance's per-product error tables by host name). ``parses_open_price`` False: ccxt
    leaves the price of an open order unset (its krakenfutures parser ignores ``limitPrice``). ``params``
    go with every order call (Binance cross margin: ``marginMode``).
    """
    started = time.time()
    markets = await exchange.load_markets()
    assert symbol in markets
    before = await exchange.fetch_balance()
    free_before = before[hold]["free"]
    assert free_before > 0

    extra = params or {}
    order = await exchange.create_order(symbol, "limit", "buy", amount, price, extra)
    assert order["id"]
    held = await exchange.fetch_balance()
    assert held[hold]["free"] == pytest.approx(free_before - price * amount)
    assert held[hold]["used"] == pytest.approx(price * amount)

    open_orders = await exchange.fetch_open_orders(symbol, params=extra)
    assert [o["id"] for o in open_orders] == [order["id"]]
    if parses_open_price:
        assert open_orders[0]["price"] == pytest.approx(price)
    else:
        assert open_orders[0]["info"]["limitPrice"] == pytest.approx(price)
    assert open_orders[0]["amount"] == pytest.approx(amount)
    assert open_orders[0]["side"] == "buy"

    await exchange.cancel_order(order["id"], symbol, extra)
    assert await exchange.fetch_open_orders(symbol, params=extra) == []
    after = await exchange.fetch_balance()
    assert after[hold]["free"] == pytest.approx(free_before)

    expected = ccxt_errors.InsufficientFunds if refusal is None else ccxt_errors.ExchangeError
    with pytest.raises(expected) as refused:
        await exchange.create_order(symbol, "limit", "buy", amount * 1_000_000, price, extra)
    assert refusal is None or refusal in str(refused.value)
    assert (await exchange.fetch_balance())[hold]["free"] == pytest.approx(free_before)

    uid_orders = sim.orders(key.venue, key.uid, wallet)
    assert [o.status for o in uid_orders] == ["canceled"]
    signed = sim.signed_requests(key.venue, api_key=key.api_key, since=started)
    assert signed and all(entry.authenticated for entry in signed)
    assert any(entry.path == order_path for entry in signed)
    assert all(entry.at >= started for entry in signed)


async def test_binance_spot(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.BINANCE)
    exchange = make_exchange("binance", sim.urls[Venue.BINANCE], key)
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="spot",
        symbol="BTC/USDT",
        hold="USDT",
        price=20000.0,
        amount=0.01,
        order_path="/api/v3/order",
    )


async def test_binance_usdm(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.BINANCE)
    exchange = make_exchange("binanceusdm", sim.urls[Venue.BINANCE], key)
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="futures",
        symbol="BTC/USDT:USDT",
        hold="USDT",
        price=20000.0,
        amount=0.01,
        order_path="/fapi/v1/order",
        refusal='"code":-2019',
    )


async def test_okx(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.OKX)
    exchange = make_exchange("okx", sim.urls[Venue.OKX], key)
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="trading",
        symbol="BTC/USDT",
        hold="USDT",
        price=20000.0,
        amount=0.01,
        order_path="/api/v5/trade/batch-orders",
    )


async def test_bybit(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.BYBIT)
    exchange = make_exchange("bybit", sim.urls[Venue.BYBIT], key)
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="unified",
        symbol="BTC/USDT",
        hold="USDT",
        price=20000.0,
        amount=0.01,
        order_path="/v5/order/create",
    )


async def test_kraken_spot(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.KRAKEN)
    exchange = make_exchange("kraken", sim.urls[Venue.KRAKEN], key)
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="spot",
        symbol="BTC/USD",
        hold="USD",
        price=20000.0,
        amount=0.01,
        order_path="/0/private/AddOrder",
    )


async def test_kraken_futures(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.KRAKEN, kind="futures")
    exchange = make_exchange("krakenfutures", sim.urls[Venue.KRAKEN], key)
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="futures",
        symbol="BTC/USD:USD",
        hold="USD",
        price=20000.0,
        amount=0.01,
        order_path="/derivatives/api/v3/sendorder",
        parses_open_price=False,
    )


async def test_coinbase_exchange(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    exchange = make_exchange("coinbaseexchange", sim.urls[Venue.COINBASE], key)
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="exchange",
        symbol="BTC/USD",
        hold="USD",
        price=20000.0,
        amount=0.01,
        order_path="/orders",
    )


@pytest.mark.parametrize("kind", ["cdp", "cdp_ed25519"])
async def test_coinbase_advanced(sim: Simulator, make_exchange: Callable[..., Any], kind: str) -> None:
    key = sim.add_key(Venue.COINBASE, kind=kind)
    # ccxt's default balance call is the v2 retail API; Advanced Trade's own is v3 accounts.
    exchange = make_exchange(
        "coinbase", sim.urls[Venue.COINBASE], key, fetchBalance="v3PrivateGetBrokerageAccounts"
    )
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="default",
        symbol="BTC/USD",
        hold="USD",
        price=20000.0,
        amount=0.01,
        order_path="/api/v3/brokerage/orders",
    )


async def test_rotation_on_a_live_exchange_object_and_revocation(
    sim: Simulator, make_exchange: Callable[..., Any]
) -> None:
    """The signing log tells which key signed each order; a removed (revoked) key is refused and logged."""
    old = sim.add_key(Venue.OKX)
    new = sim.add_key(Venue.OKX, uid=old.uid)
    exchange = make_exchange("okx", sim.urls[Venue.OKX], old)
    await exchange.load_markets()
    first = await exchange.create_order("BTC/USDT", "limit", "buy", 0.01, 20000.0)
    exchange.apiKey, exchange.secret, exchange.password = new.api_key, new.api_secret, new.api_passphrase
    revoked_at = time.time()
    sim.remove_key(old.api_key)
    second = await exchange.create_order("BTC/USDT", "limit", "buy", 0.01, 20000.0)
    assert sim.signed_requests(api_key=old.api_key, since=revoked_at) == []
    orders = [entry for entry in sim.signed_requests(Venue.OKX) if entry.path == "/api/v5/trade/batch-orders"]
    assert [entry.api_key for entry in orders] == [old.api_key, new.api_key]
    # Both keys belong to one account: the new key sees (and cancels) the order the old one placed.
    assert {o["id"] for o in await exchange.fetch_open_orders("BTC/USDT")} == {first["id"], second["id"]}

    exchange.apiKey, exchange.secret, exchange.password = old.api_key, old.api_secret, old.api_passphrase
    with pytest.raises(ccxt_errors.AuthenticationError):
        await exchange.fetch_balance()
    [late] = sim.signed_requests(api_key=old.api_key, since=revoked_at)
    assert (late.path, late.status, late.authenticated) == ("/api/v5/account/balance", 401, False)


async def test_read_only_key_cannot_place_orders(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.BINANCE, trade=False)
    exchange = make_exchange("binance", sim.urls[Venue.BINANCE], key)
    await exchange.load_markets()
    with pytest.raises(ccxt_errors.AuthenticationError):  # Binance answers -2015 (HTTP 401)
        await exchange.create_order("BTC/USDT", "limit", "buy", 0.01, 20000.0)
    assert sim.orders(Venue.BINANCE, key.uid, "spot") == []
    assert (await exchange.fetch_balance())["USDT"]["used"] == 0


async def test_binance_cross_margin(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    key = sim.add_key(Venue.BINANCE)
    exchange = make_exchange(
        "binance", sim.urls[Venue.BINANCE], key, defaultType="margin", defaultMarginMode="cross"
    )
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="margin",
        symbol="BTC/USDT",
        hold="USDT",
        price=20000.0,
        amount=0.01,
        order_path="/sapi/v1/margin/order",
        params={"marginMode": "cross"},
    )
    assert sim.orders(Venue.BINANCE, key.uid, "spot") == []  # the spot wallet was never touched


async def test_okx_demo_key_with_sandbox_mode(sim: Simulator, make_exchange: Callable[..., Any]) -> None:
    """A demo key trades only with ccxt's sandbox flag (it sends ``x-simulated-trading: 1``)."""
    key = sim.add_key(Venue.OKX, environment="demo")
    exchange = make_exchange("okx", sim.urls[Venue.OKX], key)
    with pytest.raises(ccxt_errors.AuthenticationError):  # 50101: key and environment do not match
        await exchange.fetch_balance()
    exchange.set_sandbox_mode(True)
    point_at(exchange, sim.urls[Venue.OKX])
    await trade_a_little(
        sim,
        exchange,
        key,
        wallet="trading",
        symbol="ETH/USDT",
        hold="USDT",
        price=1500.0,
        amount=0.5,
        order_path="/api/v5/trade/batch-orders",
    )
