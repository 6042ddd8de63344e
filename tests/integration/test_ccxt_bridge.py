"""The ccxt bridge (engine/live/ccxt.py) against the simulator over loopback HTTP.

One test per venue API and key kind: the engine stores and verifies a simulator key, connects a trading
account, and ``eng.ccxt_exchange`` gives a ccxt exchange that loads markets, reads the balance, places and
cancels a limit order; a staged rotation promoted by the engine's jobs makes the SAME exchange object sign its
next order with the new key (the simulator's signing log says which key signed what); a revocation closes it
and the next call raises ``ExchangeClosed``. No key material is left on the exchange object between requests.
Then: revocation from another engine process on the same database, disconnection, closing by the holder,
and the refusals. Skipped when ccxt is missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from engine import CredentialEngine, CredentialStatus, errors
from engine.live import ccxt as bridge
from venues.base import Venue
from venues.simulator import Faults, Simulator, TestKey

pytest.importorskip("ccxt.async_support")
ccxt_errors = pytest.importorskip("ccxt.base.errors")

OWNER = "desk-7"
NO_THROTTLE = {"enableRateLimit": False}  # ccxt's client-side throttle off: the simulator limits itself


@dataclass(frozen=True)
class Case:
    """One venue API and key kind, and what to trade there (the simulator's markets and wallets)."""

    name: str
    venue: Venue
    kind: str | None
    account_type: str
    symbol: str
    hold: str
    order_path: str
    identities: tuple[str, ...] | None = None  # the simulator key's (None: the venue's full set)


CASES = [
    Case("binance-spot", Venue.BINANCE, None, "spot", "BTC/USDT", "USDT", "/api/v3/order"),
    # no marginMode in the calls: the bridge's options send a margin account's orders to the margin wallet
    Case("binance-margin", Venue.BINANCE, None, "margin", "BTC/USDT", "USDT", "/sapi/v1/margin/order"),
    Case("binance-usdm", Venue.BINANCE, None, "futures", "BTC/USDT:USDT", "USDT", "/fapi/v1/order"),
    Case("okx", Venue.OKX, None, "trading", "BTC/USDT", "USDT", "/api/v5/trade/batch-orders"),
    Case("bybit", Venue.BYBIT, None, "unified", "BTC/USDT", "USDT", "/v5/order/create"),
    Case(
        "bybit-classic-spot",
        Venue.BYBIT,
        None,
        "spot",
        "BTC/USDT",
        "USDT",
        "/v5/order/create",
        identities=("spot", "contract"),
    ),
    Case("kraken-spot", Venue.KRAKEN, None, "spot", "BTC/USD", "USD", "/0/private/AddOrder"),
    Case(
        "kraken-futures",
        Venue.KRAKEN,
        "futures",
        "futures",
        "BTC/USD:USD",
        "USD",
        "/derivatives/api/v3/sendorder",
    ),
    Case("coinbase-exchange", Venue.COINBASE, "exchange", "default", "BTC/USD", "USD", "/orders"),
    Case("coinbase-cdp", Venue.COINBASE, "cdp", "default", "BTC/USD", "USD", "/api/v3/brokerage/orders"),
    Case(
        "coinbase-cdp-ed25519",
        Venue.COINBASE,
        "cdp_ed25519",
        "default",
        "BTC/USD",
        "USD",
        "/api/v3/brokerage/orders",
    ),
]
CASE = {case.name: case for case in CASES}
PRICE, AMOUNT = 20000.0, 0.01


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=11) as simulator:
        yield simulator


@pytest.fixture
async def live(make_engine: Callable[..., Any], sim: Simulator) -> CredentialEngine:
    """An engine whose probes and ccxt exchanges talk to the simulator (its ``venue_urls``)."""
    engine: CredentialEngine = await make_engine(probes={}, venue_urls=sim.urls, venue_rate_limits=False)
    return engine


async def connect(eng: CredentialEngine, sim: Simulator, case: Case) -> tuple[TestKey, Any, Any]:
    """A simulator key stored, verified and connected as ``case.account_type``: (key, credential, account)."""
    key = sim.add_key(case.venue, kind=case.kind, identities=case.identities)
    cred = await eng.create_credential(
        OWNER,
        venue=case.venue,
        api_key=key.api_key,
        api_secret=key.api_secret,
        api_passphrase=key.api_passphrase,
    )
    await eng.run_until_idle()
    cred = await eng.get_credential(OWNER, cred.credential_id)
    assert cred.status is CredentialStatus.VERIFIED, cred.failure_reason
    account = await eng.connect_trading_account(
        OWNER, credential_id=cred.credential_id, account_type=case.account_type
    )
    return key, cred, account


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within the bound"
        await asyncio.sleep(0.02)


def strings(value: Any, seen: set[int] | None = None) -> Iterator[str]:
    """Every string reachable from ``value`` through dicts, lists, tuples, sets and object ``__dict__``s."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k, seen)
            yield from strings(v, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from strings(item, seen)


def assert_no_key_material(exchange: Any, *keys: TestKey) -> None:
    """No API key, secret or passphrase of ``keys`` in the exchange's attributes (markets and all)."""
    state = {name: value for name, value in vars(exchange).items() if name != "_bridge_lease"}
    text = "\n".join(strings(state))
    for key in keys:
        for part in (key.api_key, key.api_secret.strip(), key.api_passphrase):
            if part:
                assert part not in text
    for name in ("apiKey", "secret", "password"):
        value = getattr(exchange, name)
        assert all(part not in value for key in keys for part in (key.api_key, key.api_secret.strip()))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_trade_rotate_revoke(live: CredentialEngine, sim: Simulator, case: Case) -> None:
    old, cred, account = await connect(live, sim, case)
    exchange = await live.ccxt_exchange(
        OWNER, account.trading_account_id, purpose="ccxt bridge test", config=NO_THROTTLE
    )
    try:
        markets = await exchange.load_markets()
        assert case.symbol in markets
        free = (await exchange.fetch_balance())[case.hold]["free"]
        assert free > 0
        first = await exchange.create_order(case.symbol, "limit", "buy", AMOUNT, PRICE)
        assert (await exchange.fetch_balance())[case.hold]["used"] == pytest.approx(PRICE * AMOUNT)
        await exchange.cancel_order(first["id"], case.symbol)
        assert (await exchange.fetch_balance())[case.hold]["free"] == pytest.approx(free)
        assert_no_key_material(exchange, old)

        # a staged rotation to another key of the same venue account, promoted by the engine's jobs
        new = sim.add_key(case.venue, uid=old.uid, kind=case.kind, identities=case.identities)
        staged = await live.rotate_credential(
            OWNER,
            cred.credential_id,
            api_key=new.api_key,
            api_secret=new.api_secret,
            api_passphrase=new.api_passphrase,
        )
        assert staged.pending_rotation is not None
        version = staged.pending_rotation.secret_version
        await live.run_until_idle()
        assert (await live.get_credential(OWNER, cred.credential_id)).secret_version == version
        await wait_until(lambda: exchange.secret_version == version)
        swapped_at = time.time()
        second = await exchange.create_order(case.symbol, "limit", "buy", AMOUNT, PRICE)
        orders = [e for e in sim.signed_requests(case.venue, since=swapped_at) if e.path == case.order_path]
        assert [(e.api_key, e.authenticated) for e in orders] == [(new.api_key, True)]
        assert sim.signed_requests(api_key=old.api_key, since=swapped_at) == []
        await exchange.cancel_order(second["id"], case.symbol)
        assert_no_key_material(exchange, old, new)

        await live.revoke_credential(OWNER, cred.credential_id)
        await exchange.wait_closed(timeout=10)
        assert live.leases.open_leases == 0
        closed_at = time.time()
        with pytest.raises(errors.ExchangeClosed) as refused:
            await exchange.fetch_balance()
        assert refused.value.reason == "CREDENTIAL_REVOKED"
        assert refused.value.errno == -100020
        with pytest.raises(errors.ExchangeClosed):
            await exchange.create_order(case.symbol, "limit", "buy", AMOUNT, PRICE)
        assert sim.signed_requests(api_key=new.api_key, since=closed_at) == []
    finally:
        await exchange.close()
    assert exchange.closed_reason == "CREDENTIAL_REVOKED"  # closing again keeps the first reason


async def test_revocation_in_another_process_closes_the_exchange(
    make_engine: Callable[..., Any], live: CredentialEngine, sim: Simulator
) -> None:
    """An engine on the same database (as another process would) revokes; this process's exchange closes."""
    other: CredentialEngine = await make_engine(probes={}, venue_urls=sim.urls, venue_rate_limits=False)
    _key, cred, account = await connect(live, sim, CASE["okx"])
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        await exchange.fetch_balance()
        await other.revoke_credential(OWNER, cred.credential_id)
        await exchange.wait_closed(timeout=10)
        with pytest.raises(errors.ExchangeClosed) as refused:
            await exchange.fetch_balance()
        assert refused.value.reason == "CREDENTIAL_REVOKED"
    finally:
        await exchange.close()


async def test_disconnecting_the_account_closes_the_exchange(live: CredentialEngine, sim: Simulator) -> None:
    case = CASE["binance-spot"]
    _key, cred, account = await connect(live, sim, case)
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        await exchange.fetch_balance()
        await live.disconnect_trading_account(OWNER, account.trading_account_id)
        await exchange.wait_closed(timeout=10)
        with pytest.raises(errors.ExchangeClosed) as refused:
            await exchange.fetch_balance()
        assert refused.value.reason == "DISCONNECTED"
        # the credential itself is untouched: another account of it still trades
        assert (await live.get_credential(OWNER, cred.credential_id)).status is CredentialStatus.VERIFIED
        again = await live.connect_trading_account(
            OWNER, credential_id=cred.credential_id, account_type="margin"
        )
        other = await live.ccxt_exchange(OWNER, again.trading_account_id, config=NO_THROTTLE)
        try:
            assert (await other.fetch_balance())["USDT"]["free"] > 0
        finally:
            await other.close()
    finally:
        await exchange.close()


async def test_closing_the_exchange_refuses_later_calls(live: CredentialEngine, sim: Simulator) -> None:
    _key, _cred, account = await connect(live, sim, CASE["okx"])
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    await exchange.fetch_balance()
    assert live.leases.open_leases == 1
    await exchange.close()
    await exchange.wait_closed(timeout=1)
    assert live.leases.open_leases == 0  # closing the exchange released its lease
    with pytest.raises(errors.ExchangeClosed) as refused:
        await exchange.fetch_balance()
    assert refused.value.reason == "CLOSED"
    # the credential goes on: a new exchange for the same account works (ccxt's `async with` closes it)
    async with await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE) as again:
        await again.fetch_balance()
    assert again.closed_reason == "CLOSED"
    assert live.leases.open_leases == 0


async def test_refusals(live: CredentialEngine, sim: Simulator) -> None:
    key, _cred, account = await connect(live, sim, CASE["okx"])
    with pytest.raises(errors.NotFound):
        await live.ccxt_exchange("someone-else", account.trading_account_id)
    with pytest.raises(errors.InvalidRequest) as bad:
        await live.ccxt_exchange(OWNER, account.trading_account_id, config={"secret": "x"})
    assert bad.value.field == "config.secret"
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        with pytest.raises(errors.InvalidRequest):
            exchange.secret = key.api_secret
        with pytest.raises(errors.InvalidRequest):
            exchange.verbose = True
    finally:
        await exchange.close()
    await live.disconnect_trading_account(OWNER, account.trading_account_id)
    with pytest.raises(errors.Conflict) as disabled:
        await live.ccxt_exchange(OWNER, account.trading_account_id)
    assert disabled.value.field == "tradingAccountId"


async def test_a_request_in_flight_at_revocation_comes_back(live: CredentialEngine, sim: Simulator) -> None:
    """Revocation refuses new requests at once; one already sent is waited for (up to DRAIN_TIMEOUT)."""
    case = CASE["okx"]
    _key, cred, account = await connect(live, sim, case)
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        await exchange.load_markets()
        sim.set_faults(case.venue, Faults(latency=2.0))
        in_flight = asyncio.create_task(exchange.create_order(case.symbol, "limit", "buy", AMOUNT, PRICE))
        await asyncio.sleep(0.2)  # on its way: the simulator holds it for 2 s
        await live.revoke_credential(OWNER, cred.credential_id)
        await wait_until(lambda: exchange.closed_reason is not None)
        assert not in_flight.done()
        with pytest.raises(errors.ExchangeClosed):  # refused before anything is signed or sent
            await exchange.fetch_balance()
        order = await asyncio.wait_for(in_flight, timeout=10)
        assert order["id"]  # the venue took it: revocation does not recall what was already sent
        await exchange.wait_closed(timeout=10)
    finally:
        sim.clear_faults()
        await exchange.close()


async def test_a_request_hanging_past_the_drain_is_cut(
    live: CredentialEngine, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain has a bound: a request still out after it is cut when ccxt's session closes."""
    monkeypatch.setattr(bridge, "DRAIN_TIMEOUT", 0.5)
    case = CASE["okx"]
    _key, cred, account = await connect(live, sim, case)
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        await exchange.load_markets()
        sim.set_faults(case.venue, Faults(latency=30.0))
        hanging = asyncio.create_task(exchange.fetch_balance())
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await live.revoke_credential(OWNER, cred.credential_id)
        await exchange.wait_closed(timeout=15)
        assert time.monotonic() - started < 15
        with pytest.raises(errors.ExchangeClosed) as cut:
            await asyncio.wait_for(hanging, timeout=5)
        assert cut.value.reason == "CREDENTIAL_REVOKED"
        assert "in flight" in cut.value.message
        assert isinstance(cut.value.__cause__, ccxt_errors.NetworkError)  # ccxt's view: the session went away
    finally:
        sim.clear_faults()
        await exchange.close()


async def test_an_immediate_rotation_signs_the_next_request_with_the_new_key(
    live: CredentialEngine, sim: Simulator
) -> None:
    case = CASE["binance-spot"]
    old, cred, account = await connect(live, sim, case)
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        await exchange.fetch_balance()
        new = sim.add_key(case.venue, uid=old.uid)
        rotated = await live.rotate_credential(
            OWNER, cred.credential_id, api_key=new.api_key, api_secret=new.api_secret, immediate=True
        )
        await wait_until(lambda: exchange.secret_version == rotated.secret_version)
        swapped_at = time.time()
        await exchange.fetch_balance()
        assert {e.api_key for e in sim.signed_requests(case.venue, since=swapped_at)} == {new.api_key}
    finally:
        await exchange.close()


async def test_no_key_material_in_logs(
    live: CredentialEngine,
    sim: Simulator,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Canary: with every logger at DEBUG (ccxt logs each request's headers there), a whole exchange life
    (trade, rotation, revocation, refusal) writes no API key, secret or passphrase to any log or output."""
    caplog.set_level(logging.DEBUG)
    case = CASE["coinbase-exchange"]  # Coinbase Exchange: key, passphrase and signature all travel in headers
    old, cred, account = await connect(live, sim, case)
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    new = sim.add_key(case.venue, uid=old.uid, kind=case.kind)
    try:
        order = await exchange.create_order(case.symbol, "limit", "buy", AMOUNT, PRICE)
        await exchange.cancel_order(order["id"], case.symbol)
        await live.rotate_credential(
            OWNER,
            cred.credential_id,
            api_key=new.api_key,
            api_secret=new.api_secret,
            api_passphrase=new.api_passphrase,
        )
        await live.run_until_idle()
        await wait_until(lambda: exchange.secret_version == 2)
        await exchange.fetch_balance()
        await live.revoke_credential(OWNER, cred.credential_id)
        await exchange.wait_closed(timeout=10)
        with pytest.raises(errors.ExchangeClosed) as refused:
            await exchange.fetch_balance()
    finally:
        await exchange.close()
    assert any("Response" in str(r.msg) for r in caplog.records)  # ccxt's debug lines were on
    written = caplog.text + capsys.readouterr().out + repr(refused.value) + str(refused.value)
    for key in (old, new):
        for part in (key.api_key, key.api_secret, key.api_passphrase):
            assert part and part not in written


async def test_closing_the_engine_closes_the_exchange(
    make_engine: Callable[..., Any], sim: Simulator
) -> None:
    """The lease ends with its engine: the exchange closes too, and says so."""
    engine: CredentialEngine = await make_engine(probes={}, venue_urls=sim.urls, venue_rate_limits=False)
    _key, _cred, account = await connect(engine, sim, CASE["okx"])
    exchange = await engine.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        await exchange.fetch_balance()
        await engine.close()
        await exchange.wait_closed(timeout=10)
        with pytest.raises(errors.ExchangeClosed) as refused:
            await exchange.fetch_balance()
        assert refused.value.reason == "ENGINE_CLOSED"
    finally:
        await exchange.close()


async def test_rotating_to_the_other_coinbase_api_closes_the_exchange(
    live: CredentialEngine, sim: Simulator
) -> None:
    """An Exchange (HMAC) key replaced by a CDP key cannot be signed by the same ccxt class: closed, said why."""
    case = CASE["coinbase-exchange"]
    old, cred, account = await connect(live, sim, case)
    exchange = await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE)
    try:
        await exchange.fetch_balance()
        cdp = sim.add_key(Venue.COINBASE, uid=old.uid, kind="cdp")
        rotated = await live.rotate_credential(
            OWNER, cred.credential_id, api_key=cdp.api_key, api_secret=cdp.api_secret, immediate=True
        )
        await wait_until(lambda: exchange.secret_version == rotated.secret_version)
        swapped_at = time.time()
        with pytest.raises(errors.ExchangeClosed) as refused:
            await exchange.fetch_balance()
        assert refused.value.reason == "KEY_KIND_CHANGED"
        await exchange.wait_closed(timeout=10)
        assert sim.signed_requests(Venue.COINBASE, since=swapped_at) == []
    finally:
        await exchange.close()


@pytest.mark.parametrize(
    ("venue", "account_type", "identities", "path", "wallet", "holds"),
    [
        # the simulator's funding wallet is empty
        (Venue.OKX, "funding", None, "/api/v5/asset/balances", "/asset/balances", set()),
        (
            Venue.BYBIT,
            "contract",
            ("spot", "contract"),
            "/v5/account/wallet-balance",
            "accountType=CONTRACT",
            {"USDT"},
        ),
    ],
    ids=["okx-funding", "bybit-classic-contract"],
)
async def test_balance_of_the_accounts_that_do_not_trade_here(
    live: CredentialEngine,
    sim: Simulator,
    venue: Venue,
    account_type: str,
    identities: tuple[str, ...] | None,
    path: str,
    wallet: str,
    holds: set[str],
) -> None:
    """OKX's funding account and a classic Bybit contract account: the balance comes from their own wallet."""
    case = Case(account_type, venue, None, account_type, "", "USDT", "", identities=identities)
    key, _cred, account = await connect(live, sim, case)
    async with await live.ccxt_exchange(OWNER, account.trading_account_id, config=NO_THROTTLE) as exchange:
        started = time.time()
        balance = await exchange.fetch_balance()
        last_url = exchange.last_request_url
    assert set(balance["total"]) >= holds
    assert wallet in last_url
    signed = [e for e in sim.signed_requests(venue, api_key=key.api_key, since=started) if e.path == path]
    assert signed and all(e.authenticated for e in signed)
