"""The ccxt bridge's pure parts (engine/live/ccxt.py): which ccxt class for which account, the URL retargeting,
what a leased exchange shows outside signing, the log filter, and a missing ccxt. The exchange-level behaviour
(signing, rotation, revocation) is in tests/integration/test_ccxt_bridge.py, against the simulator."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from typing import Any

import pytest

from engine import errors
from engine.live import ccxt as bridge
from venues.base import ApiKeys, Venue
from venues.simulator import keygen

pytest.importorskip("ccxt.async_support")


def keys_of(venue: Venue, kind: str | None = None) -> ApiKeys:
    made = keygen.material(venue, kind, "uid-1")
    return ApiKeys(made.api_key, made.api_secret, made.api_passphrase)


@pytest.mark.parametrize(
    ("venue", "account_type", "kind", "exchange_id"),
    [
        (Venue.BINANCE, "spot", None, "binance"),
        (Venue.BINANCE, "margin", None, "binance"),
        (Venue.BINANCE, "futures", None, "binanceusdm"),
        (Venue.OKX, "trading", None, "okx"),
        (Venue.OKX, "funding", None, "okx"),
        (Venue.BYBIT, "unified", None, "bybit"),
        (Venue.BYBIT, "contract", None, "bybit"),
        (Venue.KRAKEN, "spot", None, "kraken"),
        (Venue.KRAKEN, "futures", "futures", "krakenfutures"),
        (Venue.COINBASE, "default", "cdp", "coinbase"),
        (Venue.COINBASE, "default", "cdp_ed25519", "coinbase"),
        (Venue.COINBASE, "default", "exchange", "coinbaseexchange"),
    ],
)
def test_client_spec(venue: Venue, account_type: str, kind: str | None, exchange_id: str) -> None:
    spec = bridge.client_spec(venue, account_type, keys_of(venue, kind))
    assert spec.exchange_id == exchange_id
    assert bridge.leased_class(spec.exchange_id).__name__ == f"Leased{exchange_id}"


def test_client_spec_options() -> None:
    margin = bridge.client_spec(Venue.BINANCE, "MARGIN", keys_of(Venue.BINANCE))  # the API's upper case too
    assert margin.options == {"defaultType": "margin", "defaultMarginMode": "cross"}
    assert margin.params == {"marginMode": "cross"}  # ccxt routes orders to /sapi on this param only
    cdp = bridge.client_spec(Venue.COINBASE, "default", keys_of(Venue.COINBASE, "cdp"))
    assert cdp.options == {"fetchBalance": "v3PrivateGetBrokerageAccounts"} and cdp.key_kind == "cdp"


def test_client_spec_refuses_an_unknown_account_type() -> None:
    with pytest.raises(errors.Conflict) as refused:
        bridge.client_spec(Venue.BINANCE, "options", keys_of(Venue.BINANCE))
    assert refused.value.field == "accountType"
    assert "futures, margin, spot" in refused.value.message


def test_coinbase_keys_of_neither_kind_are_a_key_format_error() -> None:
    with pytest.raises(errors.InvalidKeyFormat):
        bridge.coinbase_key_kind(ApiKeys("organizations/o/apiKeys/k", "not base64 !", None))


def test_retarget_urls_keeps_each_path() -> None:
    urls = {
        "public": "https://api.binance.com/api/v3",
        "rest": "https://{hostname}/x",
        "nested": {"fapi": "https://fapi.binance.com/fapi/v1"},
        "weight": 5,
    }
    assert bridge.retarget_urls(urls, "http://127.0.0.1:9001/") == {
        "public": "http://127.0.0.1:9001/api/v3",
        "rest": "http://127.0.0.1:9001/x",
        "nested": {"fapi": "http://127.0.0.1:9001/fapi/v1"},
        "weight": 5,
    }


class StubLease:
    """The lease seam: what the exchange reads from a ``KeyLease`` (the real one is in the integration tests)."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys
        self.revoked = False
        self.closed = False
        self.secret_version = 1

    async def wait_revoked(self) -> None:
        await asyncio.Event().wait()


async def test_outside_signing_the_exchange_holds_no_key() -> None:
    keys = keys_of(Venue.OKX)
    exchange: Any = bridge.leased_class("okx")({"enableRateLimit": False})
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    exchange._bridge_attach(lease=StubLease(keys), account_id=uuid.uuid4(), key_kind=None, release=release)
    try:
        assert (exchange.apiKey, exchange.secret, exchange.password) == (bridge.HELD,) * 3
        assert exchange.check_required_credentials(False)
        request = exchange.sign("account/balance", ["private"], "GET", {})
        assert request["headers"]["OK-ACCESS-KEY"] == keys.api_key  # signed with the lease's keys
        assert request["headers"]["OK-ACCESS-PASSPHRASE"] == keys.api_passphrase
        exchange.set_last_request(request)
        assert set(exchange.last_request_headers.values()) == {bridge.MASK}
        assert exchange.lastRequestHeaders == exchange.last_request_headers
        assert exchange.secret_version == exchange.secretVersion == 1
        for name in ("apiKey", "secret", "password"):
            with pytest.raises(errors.InvalidRequest) as refused:
                setattr(exchange, name, "a-key-of-my-own")
            assert refused.value.field == name
        with pytest.raises(errors.InvalidRequest):
            exchange.verbose = True
        exchange.verbose = False
    finally:
        await exchange.close()
    assert released == [True]
    assert exchange.closed_reason == exchange.closedReason == "CLOSED"


def test_the_request_header_log_line_is_dropped() -> None:
    logger = bridge._client_logger()
    request = logger.makeRecord(logger.name, logging.DEBUG, __file__, 1, "%s %s, Request: %s %s", (), None)
    response = logger.makeRecord(logger.name, logging.DEBUG, __file__, 1, "%s %s, Response: %s", (), None)
    assert not logger.filter(request)
    assert logger.filter(response)
    assert bridge._client_logger() is logger and len(logger.filters) == 1  # added once


def test_missing_ccxt_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ccxt", None)
    monkeypatch.setitem(sys.modules, "ccxt.async_support", None)
    with pytest.raises(errors.ConfigurationError) as missing:
        bridge.leased_class("okx")
    assert "credential-engine[ccxt]" in missing.value.message
