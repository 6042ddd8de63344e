"""The admin HTTP API: another process can register keys, change them, inject faults, read stats."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import aiohttp

from venues.base import Venue
from venues.simulator import Simulator, TestKey


async def admin(
    session: aiohttp.ClientSession, sim: Simulator, method: str, path: str, body: Any = None
) -> Any:
    async with session.request(method, sim.admin_url + path, json=body) as resp:
        text = await resp.text()
        return resp.status, (await resp.json() if text else None)


def key_from(data: dict[str, Any]) -> TestKey:
    """A TestKey rebuilt from POST /keys's answer, as a client in another process would hold it."""
    return TestKey(
        venue=Venue(data["venue"]),
        api_key=data["api_key"],
        api_secret=data["api_secret"],
        api_passphrase=data["api_passphrase"],
        uid=data["uid"],
        kind=data["kind"],
        identities=tuple(data["identities"]),
    )


async def test_key_added_over_http_is_usable(
    sim: Simulator, session: aiohttp.ClientSession, client: Any
) -> None:
    """POST /keys returns key material that signs a successful OKX call."""
    status, data = await admin(
        session, sim, "POST", "/keys", {"venue": "OKX", "trade": False, "label": "ext"}
    )
    assert status == 201
    assert data["api_passphrase"]
    assert data["api_secret"]
    answer = await client.okx(key_from(data), "/api/v5/account/config")
    assert answer.body["data"][0]["perm"] == "read_only"
    assert answer.body["data"][0]["label"] == "ext"


async def test_patch_changes_permissions(sim: Simulator, session: aiohttp.ClientSession, client: Any) -> None:
    """PATCH /keys/{key} flips withdraw; the venue answers the new permission and no secret comes back."""
    key = sim.add_key(Venue.BINANCE)
    status, data = await admin(session, sim, "PATCH", f"/keys/{key.api_key}", {"withdraw": True})
    assert status == 200
    assert data["withdraw"] is True
    assert "api_secret" not in data
    answer = await client.binance(key, "/sapi/v1/account/apiRestrictions")
    assert answer.body["enableWithdrawals"] is True


async def test_cdp_key_names_work_encoded_or_not(
    sim: Simulator, session: aiohttp.ClientSession, client: Any
) -> None:
    """A Coinbase key name with "/" can be addressed percent-encoded or raw."""
    key = sim.add_key(Venue.COINBASE)
    encoded = quote(key.api_key, safe="")
    status, data = await admin(session, sim, "PATCH", f"/keys/{encoded}", {"trade": False})
    assert (status, data["trade"]) == (200, False)
    status, data = await admin(session, sim, "PATCH", f"/keys/{key.api_key}", {"expires_at_ms": 1})
    assert (status, data["expires_at_ms"]) == (200, 1)
    assert (await client.cdp(key, "/api/v3/brokerage/key_permissions")).status == 401


async def test_delete_key_makes_it_unknown(
    sim: Simulator, session: aiohttp.ClientSession, client: Any
) -> None:
    """DELETE /keys/{key} answers 204; the venue then treats the key as unknown; a second delete is 404."""
    key = sim.add_key(Venue.BYBIT)
    assert (await admin(session, sim, "DELETE", f"/keys/{key.api_key}"))[0] == 204
    assert (await client.bybit(key, "/v5/user/query-api")).body["retCode"] == 10003
    assert (await admin(session, sim, "DELETE", f"/keys/{key.api_key}"))[0] == 404


async def test_bad_input_is_refused(sim: Simulator, session: aiohttp.ClientSession) -> None:
    """Unknown venue, unknown field, bad identity and bad JSON answer 4xx with an error message."""
    assert (await admin(session, sim, "POST", "/keys", {"venue": "MTGOX"}))[0] == 404
    status, data = await admin(session, sim, "POST", "/keys", {"venue": "OKX", "colour": "red"})
    assert status == 400
    assert "colour" in data["error"]
    status, data = await admin(session, sim, "POST", "/keys", {"venue": "OKX", "identities": ["moon"]})
    assert status == 400
    async with session.post(sim.admin_url + "/keys", data="{not json") as resp:
        assert resp.status == 400
    assert (await admin(session, sim, "PATCH", "/keys/nope", {"read": False}))[0] == 404


async def test_faults_clock_stats_and_urls(
    sim: Simulator, session: aiohttp.ClientSession, client: Any
) -> None:
    """PUT /faults, DELETE /faults, PUT /clock, GET /stats and GET /urls drive the running simulator."""
    body = {"error_rate": 1.0, "kinds": ["maintenance"]}
    status, data = await admin(session, sim, "PUT", "/faults/okx", body)
    assert (status, data["kinds"]) == (200, ["maintenance"])
    assert (await client.get(Venue.OKX, "/api/v5/public/time")).status == 503
    assert (await admin(session, sim, "DELETE", "/faults"))[0] == 204
    assert (await client.get(Venue.OKX, "/api/v5/public/time")).status == 200

    assert (await admin(session, sim, "PUT", "/clock/BINANCE", {"offset_ms": 7_200_000}))[0] == 204
    served = (await client.get(Venue.BINANCE, "/api/v3/time")).body["serverTime"]
    assert served - int(time.time() * 1000) > 7_000_000
    assert (await admin(session, sim, "PUT", "/clock/BINANCE", {"offset": 1}))[0] == 400

    status, stats = await admin(session, sim, "GET", "/stats")
    assert status == 200
    assert stats["OKX"]["faults"] == 1
    assert stats["OKX"]["requests"] == 2
    status, one = await admin(session, sim, "GET", "/stats?venue=okx")
    assert list(one) == ["OKX"]

    status, urls = await admin(session, sim, "GET", "/urls")
    assert urls == {"venues": {v.value: u for v, u in sim.urls.items()}, "admin": sim.admin_url}


async def test_list_keys_has_no_secrets(sim: Simulator, session: aiohttp.ClientSession) -> None:
    """GET /keys lists registered keys without secrets or passphrases."""
    key = sim.add_key(Venue.OKX)
    status, listed = await admin(session, sim, "GET", "/keys")
    assert status == 200
    assert [entry["api_key"] for entry in listed] == [key.api_key]
    assert key.api_secret not in str(listed)
    assert str(key.api_passphrase) not in str(listed)
