"""The simulated Coinbase: Advanced Trade with CDP keys (docs/venues.md §4A), Exchange (4B), and the contract."""

from __future__ import annotations

import time
from typing import Any

import pytest

from venues.base import Venue
from venues.simulator import Simulator

PERMISSIONS = "/api/v3/brokerage/key_permissions"


@pytest.mark.parametrize("kind", ["cdp", "cdp_ed25519"])
async def test_key_permissions_reports_registered_permissions(sim: Simulator, client: Any, kind: str) -> None:
    """A valid JWT (ES256 or EdDSA) gets key_permissions with the key's flags and portfolio uuid."""
    key = sim.add_key(Venue.COINBASE, kind=kind, trade=True, withdraw=False)
    answer = await client.cdp(key, PERMISSIONS)
    assert answer.status == 200
    assert answer.body == {
        "can_view": True,
        "can_trade": True,
        "can_transfer": False,
        "portfolio_uuid": key.uid,
        "portfolio_type": "DEFAULT",
    }


async def test_coinbase_cloud_issuer_is_accepted(sim: Simulator, client: Any) -> None:
    """iss "coinbase-cloud" (coinbase-advanced-py, ccxt) passes as "cdp" does (docs/venues.md §4A.2)."""
    key = sim.add_key(Venue.COINBASE)
    assert (await client.cdp(key, PERMISSIONS, iss="coinbase-cloud")).status == 200
    assert (await client.cdp(key, PERMISSIONS, iss="someone")).status == 401


async def test_token_signed_by_another_key_is_refused(sim: Simulator, client: Any) -> None:
    """A JWT naming the key but signed with another private key answers 401."""
    key = sim.add_key(Venue.COINBASE)
    other = sim.add_key(Venue.COINBASE)
    answer = await client.cdp(key, PERMISSIONS, secret=other.api_secret)
    assert answer.status == 401
    assert answer.body["error"] == "unauthorized"


@pytest.mark.parametrize("kind", ["cdp", "cdp_ed25519"])
async def test_every_token_is_verified_after_the_key_was_parsed(
    sim: Simulator, client: Any, kind: str
) -> None:
    """The simulator keeps a key's parsed public key, never a verdict: after accepted requests (the key is
    parsed and kept), a token naming the key but signed by another key is still refused, every time."""
    key = sim.add_key(Venue.COINBASE, kind=kind)
    other = sim.add_key(Venue.COINBASE, kind=kind)
    for _ in range(2):
        assert (await client.cdp(key, PERMISSIONS)).status == 200
        forged = await client.cdp(key, PERMISSIONS, secret=other.api_secret)
        assert forged.status == 401
        assert forged.body["error_details"] == "invalid JWT signature"


async def test_unknown_key_is_refused(sim: Simulator, client: Any) -> None:
    """A JWT whose kid and sub name an unregistered key answers 401."""
    key = sim.add_key(Venue.COINBASE)
    name = "organizations/00000000-0000-0000-0000-000000000000/apiKeys/00000000-0000-0000-0000-000000000000"
    answer = await client.cdp(key, PERMISSIONS, kid=name, sub=name)
    assert answer.status == 401


async def test_expired_token_is_refused(sim: Simulator, client: Any) -> None:
    """A JWT whose exp has passed answers 401."""
    key = sim.add_key(Venue.COINBASE)
    now = int(time.time())
    assert (await client.cdp(key, PERMISSIONS, nbf=now - 200, exp=now - 80)).status == 401


async def test_token_not_yet_valid_is_refused(sim: Simulator, client: Any) -> None:
    """A JWT whose nbf is more than 5 s ahead answers 401."""
    key = sim.add_key(Venue.COINBASE)
    now = int(time.time())
    assert (await client.cdp(key, PERMISSIONS, nbf=now + 30, exp=now + 140)).status == 401


async def test_token_living_too_long_is_refused(sim: Simulator, client: Any) -> None:
    """A JWT whose exp - nbf exceeds 120 s answers 401."""
    key = sim.add_key(Venue.COINBASE)
    now = int(time.time())
    assert (await client.cdp(key, PERMISSIONS, nbf=now, exp=now + 600)).status == 401


async def test_wrong_uri_claim_is_refused(sim: Simulator, client: Any) -> None:
    """A JWT minted for another endpoint or for the production host answers 401."""
    key = sim.add_key(Venue.COINBASE)
    host = client.host(Venue.COINBASE)
    other_path = await client.cdp(key, PERMISSIONS, uri=f"GET {host}/api/v3/brokerage/accounts")
    assert other_path.status == 401
    assert "uri" in other_path.body["error_details"]
    production = await client.cdp(key, PERMISSIONS, uri=f"GET api.coinbase.com{PERMISSIONS}")
    assert production.status == 401


async def test_kid_and_sub_must_match(sim: Simulator, client: Any) -> None:
    """A JWT whose sub names another key than kid answers 401."""
    key = sim.add_key(Venue.COINBASE)
    other = sim.add_key(Venue.COINBASE)
    assert (await client.cdp(key, PERMISSIONS, sub=other.api_key)).status == 401


async def test_ip_not_allowed_answers_the_contract_body(sim: Simulator, client: Any) -> None:
    """A key bound to another IP answers 401 with the contract's allowlist message."""
    key = sim.add_key(Venue.COINBASE, ip_allowlist=["10.1.2.3"])
    answer = await client.cdp(key, PERMISSIONS)
    assert answer.status == 401
    assert answer.body["error"] == "unauthorized"
    assert answer.body["error_details"] == "IP address 127.0.0.1 is not in the API key's allowlist"


async def test_expired_key_answers_401(sim: Simulator, client: Any) -> None:
    """An expired CDP key answers 401."""
    key = sim.add_key(Venue.COINBASE, expires_at_ms=1)
    assert (await client.cdp(key, PERMISSIONS)).status == 401


async def test_accounts_and_portfolios_reach_the_default_identity(sim: Simulator, client: Any) -> None:
    """accounts and portfolios answer for a key with view; without view they answer 403."""
    key = sim.add_key(Venue.COINBASE)
    accounts = await client.cdp(key, "/api/v3/brokerage/accounts")
    assert accounts.status == 200
    assert accounts.body["accounts"][0]["retail_portfolio_id"] == key.uid
    portfolios = await client.cdp(key, "/api/v3/brokerage/portfolios")
    assert portfolios.body["portfolios"][0]["uuid"] == key.uid
    blind = sim.add_key(Venue.COINBASE, read=False)
    denied = await client.cdp(blind, "/api/v3/brokerage/accounts")
    assert (denied.status, denied.body["error"]) == (403, "PERMISSION_DENIED")
    assert (await client.cdp(blind, PERMISSIONS)).body["can_view"] is False


async def test_advanced_time_follows_the_clock_offset(sim: Simulator, client: Any) -> None:
    """GET /api/v3/brokerage/time answers epochSeconds shifted by the clock offset."""
    sim.set_clock_offset(Venue.COINBASE, -30_000)
    body = (await client.get(Venue.COINBASE, "/api/v3/brokerage/time")).body
    assert int(time.time()) - int(body["epochSeconds"]) in range(25, 35)
    assert body["iso"].endswith("Z")


# -- Coinbase Exchange -------------------------------------------------------------------------------


async def test_exchange_accounts_and_default_profile(sim: Simulator, client: Any) -> None:
    """A signed Exchange key gets /accounts and a default /profiles entry whose id is the uid."""
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    accounts = await client.exchange(key, "/accounts")
    assert accounts.status == 200
    assert accounts.body[0]["profile_id"] == key.uid
    profiles = await client.exchange(key, "/profiles")
    assert [(p["id"], p["is_default"]) for p in profiles.body] == [(key.uid, True)]


async def test_exchange_signs_the_query_string(sim: Simulator, client: Any) -> None:
    """requestPath includes the query string (contract): signed with it, the call passes."""
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    assert (await client.exchange(key, "/profiles?active=true")).status == 200


async def test_exchange_wrong_secret(sim: Simulator, client: Any) -> None:
    """A signature made with another secret answers 401 "invalid signature"."""
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    other = sim.add_key(Venue.COINBASE, kind="exchange")
    answer = await client.exchange(key, "/accounts", secret=other.api_secret)
    assert (answer.status, answer.body) == (401, {"message": "invalid signature"})


async def test_exchange_unknown_key(sim: Simulator, client: Any) -> None:
    """An unknown key answers 401 "Invalid API Key"."""
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    answer = await client.exchange(key, "/accounts", api_key="0" * 32)
    assert (answer.status, answer.body) == (401, {"message": "Invalid API Key"})


async def test_exchange_wrong_passphrase(sim: Simulator, client: Any) -> None:
    """A wrong passphrase answers 401 "Invalid Passphrase"."""
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    answer = await client.exchange(key, "/accounts", passphrase="wrongwrong1")
    assert (answer.status, answer.body) == (401, {"message": "Invalid Passphrase"})


async def test_exchange_ip_not_allowed(sim: Simulator, client: Any) -> None:
    """A key bound to another IP answers 401 "IP address not allowed" (contract)."""
    key = sim.add_key(Venue.COINBASE, kind="exchange", ip_allowlist=["10.1.2.3"])
    answer = await client.exchange(key, "/accounts")
    assert (answer.status, answer.body) == (401, {"message": "IP address not allowed"})


async def test_exchange_stale_timestamp(sim: Simulator, client: Any) -> None:
    """A timestamp more than 30 s off answers "request timestamp expired"."""
    key = sim.add_key(Venue.COINBASE, kind="exchange")
    answer = await client.exchange(key, "/accounts", timestamp=int(time.time()) - 40)
    assert answer.body == {"message": "request timestamp expired"}


async def test_exchange_key_is_not_a_cdp_key(sim: Simulator, client: Any) -> None:
    """A CDP key name sent as CB-ACCESS-KEY is unknown to the Exchange API."""
    cdp = sim.add_key(Venue.COINBASE)
    answer = await client.exchange(cdp, "/accounts", secret="AAAA", passphrase="x")
    assert answer.body == {"message": "Invalid API Key"}


async def test_exchange_time(sim: Simulator, client: Any) -> None:
    """GET /time answers iso and epoch seconds."""
    body = (await client.get(Venue.COINBASE, "/time")).body
    assert abs(body["epoch"] - time.time()) < 5
