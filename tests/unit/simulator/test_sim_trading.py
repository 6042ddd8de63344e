"""The simulator's trading book, its signing log, and the admin routes over both.

The ccxt tests (tests/integration/test_sim_ccxt.py) drive the venue endpoints end to end; these pin the
book's arithmetic, the log's contents and filters, and that rate limits and fault injection cover the
new endpoints.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from venues.base import Venue
from venues.simulator import Faults, Simulator, signlog, trading

BTC_USDT = trading.Market("BTCUSDT", "BTC", "USDT")
PERP = trading.Market("PF_XBTUSD", "BTC", "USD", futures=True)
WALLET: trading.WalletId = (Venue.BINANCE, "1", "spot")


def place(book: trading.Book, side: str, price: str, amount: str, market: trading.Market = BTC_USDT) -> Any:
    return book.place(
        WALLET,
        market,
        order_id=str(book.next_id()),
        client_id=None,
        side=side,
        price=Decimal(price),
        amount=Decimal(amount),
        now_ms=1,
    )


def test_buy_reserves_quote_and_cancel_releases_it() -> None:
    book = trading.Book()
    order = place(book, "buy", "20000", "0.1")
    assert book.balances(WALLET)["USDT"] == (Decimal("8000"), Decimal("2000"))
    book.cancel(WALLET, order_id=order.order_id, now_ms=2)
    assert book.balances(WALLET)["USDT"] == (Decimal("10000"), Decimal("0"))
    assert book.open_orders(WALLET) == []
    assert [o.status for o in book.orders(WALLET)] == ["canceled"]


def test_spot_sell_reserves_base_and_futures_sell_reserves_collateral() -> None:
    book = trading.Book()
    place(book, "sell", "20000", "0.4")
    assert book.balances(WALLET)["BTC"] == (Decimal("0.6"), Decimal("0.4"))
    place(book, "sell", "20000", "0.25", PERP)
    assert book.balances(WALLET)["USD"] == (Decimal("5000"), Decimal("5000"))


def test_order_above_free_balance_is_refused_and_changes_nothing() -> None:
    book = trading.Book()
    book.set_balance(WALLET, "USDT", Decimal("100"))
    with pytest.raises(trading.InsufficientBalance) as refused:
        place(book, "buy", "20000", "0.01")
    assert refused.value.asset == "USDT"
    assert book.balances(WALLET)["USDT"] == (Decimal("100"), Decimal("0"))
    assert book.orders(WALLET) == []


def test_cancel_of_an_order_that_is_not_open_is_unknown() -> None:
    book = trading.Book()
    order = place(book, "buy", "1", "1")
    book.cancel(WALLET, order_id=order.order_id, now_ms=2)
    with pytest.raises(trading.UnknownOrder):
        book.cancel(WALLET, order_id=order.order_id, now_ms=3)
    with pytest.raises(trading.UnknownOrder):
        book.cancel(WALLET, order_id="nope", now_ms=3)
    assert book.balances(WALLET)["USDT"] == (Decimal("10000"), Decimal("0"))


@pytest.mark.parametrize("amount", ["-1", "NaN", "Infinity"])
def test_set_balance_refuses_negative_and_non_finite(amount: str) -> None:
    with pytest.raises(ValueError, match="negative"):
        trading.Book().set_balance(WALLET, "USDT", Decimal(amount))


def test_cancelled_orders_are_forgotten_beyond_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trading, "MAX_CLOSED_PER_WALLET", 2)
    book = trading.Book()
    placed = [place(book, "buy", "1", "1") for _ in range(4)]
    for order in placed[:3]:
        book.cancel(WALLET, order_id=order.order_id, now_ms=2)
    assert [o.order_id for o in book.orders(WALLET)] == [o.order_id for o in placed[1:]]
    assert book.balances(WALLET)["USDT"] == (Decimal("9999"), Decimal("1"))


def test_open_orders_cap() -> None:
    book = trading.Book()
    for _ in range(trading.MAX_ORDERS_PER_WALLET):
        place(book, "buy", "1", "0.001")
    with pytest.raises(trading.TooManyOrders):
        place(book, "buy", "1", "0.001")


# -- the signing log ----------------------------------------------------------------------------------


async def test_log_records_key_path_time_and_authentication(sim: Simulator, client: Any) -> None:
    good = sim.add_key(Venue.BINANCE)
    started = time.time()
    assert (await client.binance(good, "/api/v3/account")).status == 200
    assert (await client.binance(good, "/api/v3/account", secret="wrong")).status == 400
    assert (await client.get(Venue.BINANCE, "/api/v3/time")).status == 200  # no key: not logged

    entries = sim.signed_requests(Venue.BINANCE, api_key=good.api_key)
    assert [(e.method, e.path, e.status, e.authenticated) for e in entries] == [
        ("GET", "/api/v3/account", 200, True),
        ("GET", "/api/v3/account", 400, False),
    ]
    assert all(started <= e.at <= time.time() for e in entries)
    assert sim.signed_requests(Venue.BINANCE, authenticated=True) == entries[:1]
    assert sim.signed_requests(Venue.OKX) == []


async def test_no_request_signed_with_a_revoked_key_after_the_moment(sim: Simulator, client: Any) -> None:
    """The assertion a rotation test makes: after ``revoked_at`` the old key signs nothing (here it does
    once, and the log shows it, refused)."""
    old = sim.add_key(Venue.OKX)
    new = sim.add_key(Venue.OKX, uid=old.uid)
    assert (await client.okx(old, "/api/v5/account/balance")).status == 200
    revoked_at = time.time()
    sim.remove_key(old.api_key)
    assert sim.signed_requests(api_key=old.api_key, since=revoked_at) == []
    assert (await client.okx(new, "/api/v5/account/balance")).status == 200
    assert sim.signed_requests(api_key=old.api_key, since=revoked_at) == []
    late = await client.okx(old, "/api/v5/account/balance")
    assert late.status == 401
    [entry] = sim.signed_requests(api_key=old.api_key, since=revoked_at)
    assert (entry.status, entry.authenticated) == (401, False)


def test_log_keeps_the_latest_entries_only() -> None:
    log = signlog.SigningLog(max_entries=3)
    for n in range(5):
        log.record(signlog.SignedRequest(Venue.OKX, f"k{n}", "GET", "/p", float(n), 200, True))
    assert [e.api_key for e in log.query()] == ["k2", "k3", "k4"]
    assert [e.api_key for e in log.query(since=3.0)] == ["k3", "k4"]


async def test_log_cuts_an_oversized_claimed_key(sim: Simulator, client: Any) -> None:
    huge = "A" * 4000
    answer = await client.send("GET", sim.urls[Venue.BINANCE] + "/api/v3/account", {"X-MBX-APIKEY": huge})
    assert answer.status == 401
    [entry] = sim.signed_requests(Venue.BINANCE)
    assert entry.api_key == huge[: signlog.MAX_KEY_CHARS] and not entry.authenticated


async def test_log_never_holds_secrets(sim: Simulator, client: Any) -> None:
    key = sim.add_key(Venue.OKX)
    await client.okx(key, "/api/v5/account/balance")
    dumped = json.dumps([e.as_dict() for e in sim.signed_requests()])
    assert key.api_key in dumped
    assert key.api_secret not in dumped and (key.api_passphrase or "") not in dumped


# -- admin routes -------------------------------------------------------------------------------------


async def test_admin_requests_balances_and_orders(
    sim: Simulator, client: Any, session: aiohttp.ClientSession
) -> None:
    key = sim.add_key(Venue.BINANCE)
    await client.binance(key, "/api/v3/account")
    admin = sim.admin_url
    async with session.get(f"{admin}/requests", params={"venue": "binance", "api_key": key.api_key}) as resp:
        entries = await resp.json()
    assert [(e["path"], e["authenticated"], e["api_key"]) for e in entries] == [
        ("/api/v3/account", True, key.api_key)
    ]
    async with session.get(f"{admin}/requests", params={"since": str(time.time() + 60)}) as resp:
        assert await resp.json() == []
    async with session.get(f"{admin}/requests", params={"since": "soon"}) as resp:
        assert resp.status == 400

    url = f"{admin}/balances/BINANCE/{key.uid}/spot"
    async with session.put(url, json={"asset": "USDT", "free": "12.5"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["USDT"] == {"free": "12.5", "locked": "0"}
    async with session.put(url, json={"asset": "USDT", "free": "-1"}) as resp:
        assert resp.status == 400
    async with session.put(url, json={"asset": "USDT", "free": "lots"}) as resp:
        assert resp.status == 400
    async with session.get(url) as resp:
        assert (await resp.json())["USDT"]["free"] == "12.5"
    assert sim.balances(Venue.BINANCE, key.uid, "spot")["USDT"] == (Decimal("12.5"), Decimal(0))
    async with session.get(f"{admin}/orders/BINANCE/{key.uid}/spot") as resp:
        assert await resp.json() == []
    async with session.delete(f"{admin}/requests") as resp:
        assert resp.status == 204
    assert sim.signed_requests() == []


# -- rate limits and faults cover the trading endpoints ------------------------------------------------


async def test_public_trading_endpoint_is_rate_limited(sim: Simulator, client: Any) -> None:
    """Coinbase Exchange's public budget (burst 15) covers /products as it covers /time."""
    answers = [await client.get(Venue.COINBASE, "/products") for _ in range(16)]
    assert [a.status for a in answers[:15]] == [200] * 15
    assert answers[15].status == 429
    assert answers[15].body == {"message": "Public rate limit exceeded"}
    assert "Retry-After" in answers[15].headers


async def test_public_instruments_of_okx_are_limited_per_ip(sim: Simulator, client: Any) -> None:
    """20 requests per 2 s (docs/venues.md §2.9); the 21st answers OKX's 429 / 50011."""
    path = "/api/v5/public/instruments?instType=SPOT"
    answers = [await client.get(Venue.OKX, path) for _ in range(21)]
    assert {a.status for a in answers[:20]} == {200}
    assert (answers[20].status, answers[20].body["code"]) == (429, "50011")


async def test_coinbase_v2_lists_share_the_public_budget(sim: Simulator, client: Any) -> None:
    """Advanced Trade's public budget (10/s per IP) covers the v2 lists ccxt loads with its markets."""
    answers = [await client.get(Venue.COINBASE, "/v2/currencies") for _ in range(11)]
    assert {a.status for a in answers[:10]} == {200}
    assert answers[10].status == 429 and answers[10].body["error"] == "rate_limit_exceeded"


async def test_private_trading_endpoint_draws_on_the_kraken_counter(sim: Simulator, client: Any) -> None:
    key = sim.add_key(Venue.KRAKEN)
    answers = [await client.kraken(key, "BalanceEx") for _ in range(16)]
    assert all(a.body["error"] == [] for a in answers[:15])
    assert answers[15].body == {"error": ["EAPI:Rate limit exceeded"]}


async def test_faults_are_injected_on_trading_endpoints(sim: Simulator, client: Any) -> None:
    sim.set_faults(Venue.BINANCE, Faults(error_rate=1.0, kinds=("server_error",)))
    answer = await client.get(Venue.BINANCE, "/api/v3/exchangeInfo")
    assert answer.status == 500 and answer.body["code"] == -1001
    sim.set_faults(Venue.KRAKEN, Faults(error_rate=1.0, kinds=("maintenance",)))
    assert (await client.get(Venue.KRAKEN, "/0/public/AssetPairs")).body == {
        "error": ["EService:Unavailable"]
    }
    assert sim.stats(Venue.BINANCE).faults == 1
