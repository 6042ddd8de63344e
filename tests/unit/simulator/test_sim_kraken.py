"""The simulated Kraken: Spot (docs/venues.md §5A), Futures (5B) and the contract of venues/README.md."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from venues.base import Venue
from venues.simulator import Simulator, kraken, kraken_futures

CHECK = "/api/auth/v1/api-keys/v3/check"
ACCOUNTS = "/derivatives/api/v3/accounts"


def test_official_vector_is_accepted() -> None:
    """The docs/venues.md §5A.8 vector: the simulator's API-Sign for the documented inputs is the documented one."""
    secret = "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg=="
    payload = "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"
    expected = "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
    assert kraken.body_nonce(payload, "application/x-www-form-urlencoded") == "1616492376594"
    assert kraken.api_sign(secret, "/0/private/AddOrder", "1616492376594", payload) == expected
    assert kraken.api_sign(secret, "/0/private/Balance", "1616492376594", payload) != expected


def test_futures_endpoint_path_drops_derivatives() -> None:
    """The signed endpointPath has no /derivatives prefix; the auth service path is signed whole."""
    assert kraken_futures.endpoint_path("/derivatives/api/v3/accounts") == "/api/v3/accounts"
    assert kraken_futures.endpoint_path(CHECK) == CHECK


async def test_get_api_key_info_reports_registered_permissions(sim: Simulator, client: Any) -> None:
    """GetApiKeyInfo answers the documented result with permissions, iban, validUntil and allow-list."""
    key = sim.add_key(Venue.KRAKEN, trade=True, withdraw=True, ip_allowlist=["127.0.0.0/8"], label="bot")
    answer = await client.kraken(key, "GetApiKeyInfo")
    assert (answer.status, answer.body["error"]) == (200, [])
    result = answer.body["result"]
    assert result["permissions"] == ["query-funds", "query-open-trades", "modify-trades", "withdraw-funds"]
    assert result["iban"] == key.uid
    assert result["validUntil"] == "0"
    assert result["ipAllowlist"] == ["127.0.0.0/8"]
    assert result["apiKeyName"] == "bot"


async def test_json_body_is_accepted(sim: Simulator, client: Any) -> None:
    """A JSON body {"nonce": n} signed as sent passes (docs/venues.md §5A.2)."""
    expires = int(time.time() * 1000) + 86_400_000
    key = sim.add_key(Venue.KRAKEN, expires_at_ms=expires)
    answer = await client.kraken(key, "GetApiKeyInfo", as_json=True)
    assert answer.body["error"] == []
    assert answer.body["result"]["validUntil"] == str(expires // 1000)


async def test_wrong_secret_answers_invalid_signature(sim: Simulator, client: Any) -> None:
    """A signature made with another secret answers EAPI:Invalid signature."""
    key = sim.add_key(Venue.KRAKEN)
    other = sim.add_key(Venue.KRAKEN)
    answer = await client.kraken(key, "GetApiKeyInfo", secret=other.api_secret)
    assert (answer.status, answer.body) == (200, {"error": ["EAPI:Invalid signature"]})


async def test_unknown_key_answers_invalid_key(sim: Simulator, client: Any) -> None:
    """An unknown key answers EAPI:Invalid key."""
    key = sim.add_key(Venue.KRAKEN)
    answer = await client.kraken(key, "GetApiKeyInfo", api_key="A" * 56)
    assert answer.body == {"error": ["EAPI:Invalid key"]}


async def test_futures_key_is_unknown_to_spot(sim: Simulator, client: Any) -> None:
    """A futures key sent to a spot endpoint answers EAPI:Invalid key (the probe then tries futures)."""
    key = sim.add_key(Venue.KRAKEN, kind="futures")
    assert (await client.kraken(key, "GetApiKeyInfo")).body == {"error": ["EAPI:Invalid key"]}


async def test_expired_key_answers_invalid_key(sim: Simulator, client: Any) -> None:
    """An expired key answers EAPI:Invalid key (contract)."""
    key = sim.add_key(Venue.KRAKEN, expires_at_ms=1)
    assert (await client.kraken(key, "GetApiKeyInfo")).body == {"error": ["EAPI:Invalid key"]}


async def test_repeated_nonce_answers_invalid_nonce(sim: Simulator, client: Any) -> None:
    """A nonce not above the last one used with the key answers EAPI:Invalid nonce."""
    key = sim.add_key(Venue.KRAKEN)
    nonce = client.next_nonce()
    assert (await client.kraken(key, "GetApiKeyInfo", nonce=nonce)).body["error"] == []
    assert (await client.kraken(key, "GetApiKeyInfo", nonce=nonce)).body == {"error": ["EAPI:Invalid nonce"]}
    assert (await client.kraken(key, "GetApiKeyInfo", nonce=nonce - 1)).body == {
        "error": ["EAPI:Invalid nonce"]
    }
    assert (await client.kraken(key, "GetApiKeyInfo", nonce=nonce + 1)).body["error"] == []


async def test_concurrent_requests_with_one_nonce_let_one_pass(sim: Simulator, client: Any) -> None:
    """Two concurrent requests carrying the same nonce: exactly one passes."""
    key = sim.add_key(Venue.KRAKEN)
    nonce = client.next_nonce()
    answers = await asyncio.gather(
        client.kraken(key, "Balance", nonce=nonce), client.kraken(key, "TradeBalance", nonce=nonce)
    )
    assert sorted(a.body["error"] for a in answers) == [[], ["EAPI:Invalid nonce"]]


async def test_ip_not_allowed_answers_permission_denied(sim: Simulator, client: Any) -> None:
    """A key bound to another IP answers EGeneral:Permission denied on GetApiKeyInfo (contract)."""
    key = sim.add_key(Venue.KRAKEN, ip_allowlist=["10.1.2.3"])
    assert (await client.kraken(key, "GetApiKeyInfo")).body == {"error": ["EGeneral:Permission denied"]}


async def test_balance_needs_query_funds(sim: Simulator, client: Any) -> None:
    """Balance answers for a reading key and EGeneral:Permission denied without Query Funds."""
    key = sim.add_key(Venue.KRAKEN)
    assert (await client.kraken(key, "Balance")).body["error"] == []
    assert (await client.kraken(key, "TradeBalance")).body["result"]["eb"] == "0.0000"
    blind = sim.add_key(Venue.KRAKEN, read=False, trade=True)
    assert (await client.kraken(blind, "Balance")).body == {"error": ["EGeneral:Permission denied"]}
    assert (await client.kraken(blind, "GetApiKeyInfo")).body["result"]["permissions"] == ["modify-trades"]


async def test_public_time_follows_the_clock_offset(sim: Simulator, client: Any) -> None:
    """GET /0/public/Time answers unixtime shifted by the clock offset."""
    sim.set_clock_offset(Venue.KRAKEN, 100_000)
    body = (await client.get(Venue.KRAKEN, "/0/public/Time")).body
    assert body["error"] == []
    assert body["result"]["unixtime"] - int(time.time()) in range(95, 105)


# -- Futures -----------------------------------------------------------------------------------------


async def test_futures_check_reports_the_key(sim: Simulator, client: Any) -> None:
    """The auth service's check answers accountUid, permissions and allowed CIDR blocks."""
    key = sim.add_key(Venue.KRAKEN, kind="futures", trade=False, ip_allowlist=["127.0.0.1/32"])
    answer = await client.futures(key, CHECK)
    assert answer.status == 200
    assert answer.body["accountUid"] == key.uid
    assert answer.body["apiKey"] == key.api_key
    assert answer.body["permissions"] == {"general": "READ_ONLY", "withdrawal": "NO_ACCESS"}
    assert answer.body["allowedCidrBlocks"] == ["127.0.0.1/32"]


async def test_futures_accounts_with_nonce(sim: Simulator, client: Any) -> None:
    """/derivatives/api/v3/accounts answers with a Nonce header signed into Authent."""
    key = sim.add_key(Venue.KRAKEN, kind="futures")
    answer = await client.futures(key, ACCOUNTS, nonce=str(client.next_nonce()))
    assert answer.body["result"] == "success"
    assert answer.body["accounts"]["flex"]["type"] == "multiCollateralMarginAccount"


async def test_futures_wrong_secret_answers_authentication_error(sim: Simulator, client: Any) -> None:
    """A badly signed futures request answers 401 authenticationError."""
    key = sim.add_key(Venue.KRAKEN, kind="futures")
    other = sim.add_key(Venue.KRAKEN, kind="futures")
    answer = await client.futures(key, CHECK, secret=other.api_secret)
    assert (answer.status, answer.body["result"], answer.body["error"]) == (
        401,
        "error",
        "authenticationError",
    )


async def test_futures_ip_and_spot_keys_answer_authentication_error(sim: Simulator, client: Any) -> None:
    """IP-refused futures keys and spot keys both answer 401 authenticationError (contract)."""
    bound = sim.add_key(Venue.KRAKEN, kind="futures", ip_allowlist=["10.1.2.3"])
    spot = sim.add_key(Venue.KRAKEN)
    for key in (bound, spot):
        answer = await client.futures(key, CHECK)
        assert (answer.status, answer.body["error"]) == (401, "authenticationError")


async def test_futures_nonce_must_increase(sim: Simulator, client: Any) -> None:
    """A repeated Nonce answers nonceDuplicate, a lower one nonceBelowThreshold."""
    key = sim.add_key(Venue.KRAKEN, kind="futures")
    nonce = client.next_nonce()
    assert (await client.futures(key, ACCOUNTS, nonce=str(nonce))).body["result"] == "success"
    assert (await client.futures(key, ACCOUNTS, nonce=str(nonce))).body["error"] == "nonceDuplicate"
    assert (await client.futures(key, ACCOUNTS, nonce=str(nonce - 5))).body["error"] == "nonceBelowThreshold"
