"""Requests without (or with garbage) credentials get each venue's documented refusal."""

from __future__ import annotations

from typing import Any

import pytest

from venues.base import Venue
from venues.simulator import Simulator

# (venue, method, path, headers, expected HTTP status, expected body subset)
CASES = [
    (Venue.BINANCE, "GET", "/sapi/v1/account/apiRestrictions?timestamp=1", {}, 401, {"code": -2014}),
    (Venue.OKX, "GET", "/api/v5/account/config", {}, 401, {"code": "50103"}),
    (Venue.BYBIT, "GET", "/v5/user/query-api", {}, 401, {"retCode": 10003}),
    (Venue.COINBASE, "GET", "/api/v3/brokerage/key_permissions", {}, 401, {"error": "unauthorized"}),
    (
        Venue.COINBASE,
        "GET",
        "/api/v3/brokerage/key_permissions",
        {"Authorization": "Bearer not.a.jwt"},
        401,
        {"error": "unauthorized", "error_details": "malformed JWT"},
    ),
    (Venue.COINBASE, "GET", "/accounts", {}, 400, {"message": "CB-ACCESS-KEY header is required"}),
    (Venue.KRAKEN, "POST", "/0/private/GetApiKeyInfo", {}, 200, {"error": ["EAPI:Invalid key"]}),
    (Venue.KRAKEN, "GET", "/api/auth/v1/api-keys/v3/check", {}, 401, {"error": "authenticationError"}),
]


@pytest.mark.parametrize(("venue", "method", "path", "headers", "status", "subset"), CASES)
async def test_missing_credentials(
    sim: Simulator,
    client: Any,
    venue: Venue,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    subset: dict[str, Any],
) -> None:
    """An unauthenticated private call is refused in the venue's shape and counted as an auth failure."""
    answer = await client.send(method, client.base(venue) + path, headers)
    assert answer.status == status
    assert {name: answer.body.get(name) for name in subset} == subset
    assert sim.stats(venue).auth_failures == 1


async def test_expired_exchange_and_futures_keys(sim: Simulator, client: Any) -> None:
    """Expired Coinbase Exchange keys answer "Invalid API Key"; expired Kraken Futures keys 401."""
    exchange = sim.add_key(Venue.COINBASE, kind="exchange", expires_at_ms=1)
    assert (await client.exchange(exchange, "/accounts")).body == {"message": "Invalid API Key"}
    futures = sim.add_key(Venue.KRAKEN, kind="futures", expires_at_ms=1)
    answer = await client.futures(futures, "/api/auth/v1/api-keys/v3/check")
    assert (answer.status, answer.body["error"]) == (401, "authenticationError")


async def test_update_key_can_expire_a_working_key(sim: Simulator, client: Any) -> None:
    """A key that worked answers as expired once update_key sets a past expiry (Bybit 33004)."""
    key = sim.add_key(Venue.BYBIT)
    assert (await client.bybit(key, "/v5/user/query-api")).body["retCode"] == 0
    sim.update_key(key.api_key, expires_at_ms=1)
    assert (await client.bybit(key, "/v5/user/query-api")).body["retCode"] == 33004
