"""Isolation: one owner tries every library call and every REST endpoint on another owner's ids.

The victim owns credentials in every state (VERIFIED with an ACTIVE and a DISABLED trading account and a staged
rotation, FAILED, REVOKED, PENDING), webhook endpoints with delivered and dead deliveries, and an audit trail.
The attacker, with ids of all of these, must get NotFound (404) everywhere, read nothing (no answer or error
message carries the victim's data), and change nothing: the whole database is compared before and after. Its own
lists never show the victim's rows, and storing the victim's API key for itself is not refused (a 409 would
tell it the key exists).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp
from reliability_support import WebhookReceiver, table_snapshot

from engine import CredentialEngine, Venue, errors
from engine.api import ROUTES, ApiConfig, ApiServer, auth
from engine.testing import FakeVenue, settle
from venues.base import Outcome

VICTIM, ATTACKER = "owner-victim", "owner-attacker"
MARK = "victim"  # every piece of the victim's data contains it (owner, keys, nicknames, webhook paths)

# Routes that take no id of anyone's (the attacker's own lists and creations, operations): covered separately.
NO_ID_ROUTES = {
    ("POST", "/api/v3/credential/create"),
    ("GET", "/api/v3/credential/list"),
    ("POST", "/api/v3/webhook/create"),
    ("GET", "/api/v3/webhook/list"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
}


class Victim:
    """The victim's objects, made through the public API of the engine."""

    credential_ids: dict[str, uuid.UUID]
    account_ids: dict[str, uuid.UUID]
    endpoint_ids: dict[str, uuid.UUID]
    delivery_ids: dict[str, uuid.UUID]


async def build_victim(eng: CredentialEngine, fake: FakeVenue, receiver: WebhookReceiver) -> Victim:
    fake.add_key(
        "victim-key-verified", "victim-secret-1", account_id="victim-uid-1", identities=("spot", "margin")
    )
    fake.add_key("victim-key-rotation", "victim-secret-2", account_id="victim-uid-1")
    fake.fail_key("victim-key-failed", Outcome.INVALID_SECRET, api_secret="victim-secret-3")
    fake.add_key("victim-key-revoked", "victim-secret-4", account_id="victim-uid-4")
    fake.add_key("victim-key-pending", "victim-secret-5", account_id="victim-uid-5")
    v = Victim()
    live = await eng.add_webhook_endpoint(VICTIM, receiver.url + "/victim-hooks", description="victim hooks")
    dead = await eng.add_webhook_endpoint(VICTIM, receiver.url + "/victim-dead", description="victim dead")
    v.endpoint_ids = {"live": live.endpoint_id, "dead": dead.endpoint_id}
    ids = {}
    for name in ("verified", "failed", "revoked"):
        key = f"victim-key-{name}"
        cred = await eng.create_credential(
            VICTIM,
            venue=Venue.BINANCE,
            api_key=key,
            api_secret=fake.keys[key].secret,
            nickname=f"victim {name}",
        )
        ids[name] = cred.credential_id
    await settle(eng)
    spot = await eng.connect_trading_account(
        VICTIM, credential_id=ids["verified"], account_type="spot", name="victim spot"
    )
    margin = await eng.connect_trading_account(VICTIM, credential_id=ids["verified"], account_type="margin")
    await eng.disconnect_trading_account(VICTIM, margin.trading_account_id)
    await eng.revoke_credential(VICTIM, ids["revoked"])
    await eng.reveal_keys(VICTIM, ids["verified"], purpose="victim trading")
    await settle(eng)
    # left unfinished on purpose: a staged rotation and a PENDING credential (their jobs stay queued)
    await eng.rotate_credential(
        VICTIM, ids["verified"], api_key="victim-key-rotation", api_secret="victim-secret-2"
    )
    pending = await eng.create_credential(
        VICTIM,
        venue=Venue.OKX,
        api_key="victim-key-pending",
        api_secret="victim-secret-5",
        api_passphrase="victim-pass",
    )
    ids["pending"] = pending.credential_id
    v.credential_ids = ids
    v.account_ids = {"active": spot.trading_account_id, "disabled": margin.trading_account_id}
    delivered = await eng.list_webhook_deliveries(VICTIM, live.endpoint_id, state="delivered")
    died = await eng.list_webhook_deliveries(VICTIM, dead.endpoint_id, state="dead")
    assert delivered.items and died.items, "the victim needs a delivered and a dead delivery"
    v.delivery_ids = {"delivered": delivered.items[0].delivery_id, "dead": died.items[0].delivery_id}
    return v


def library_attacks(eng: CredentialEngine, v: Victim) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every library call that takes an id, aimed at the victim's ids (one entry per call and id kind)."""
    a = ATTACKER
    attacks: dict[str, Callable[[], Awaitable[Any]]] = {}
    for name, cid in v.credential_ids.items():
        attacks |= {
            f"get_credential({name})": partial(eng.get_credential, a, cid),
            f"verify_credential({name})": partial(eng.verify_credential, a, cid),
            f"rotate_credential({name})": partial(
                eng.rotate_credential, a, cid, api_key="attacker-key", api_secret="attacker-secret"
            ),
            f"rotate_credential({name}, immediate)": partial(
                eng.rotate_credential,
                a,
                cid,
                api_key="attacker-key",
                api_secret="attacker-secret",
                immediate=True,
            ),
            f"revoke_credential({name})": partial(eng.revoke_credential, a, cid),
            f"revoke_credential({name}, cascade=False)": partial(
                eng.revoke_credential, a, cid, cascade=False
            ),
            f"wait_for_status({name})": partial(eng.wait_for_status, a, cid, {"VERIFIED"}, timeout=0.2),
            f"reveal_keys({name})": partial(eng.reveal_keys, a, cid, purpose="attack"),
            f"list_events({name})": partial(eng.list_events, a, cid),
            f"connect_trading_account({name})": partial(eng.connect_trading_account, a, credential_id=cid),
            f"rotate_credential({name}, automatic)": partial(eng.rotate_credential, a, cid, automatic=True),
            f"mint_credential({name})": partial(eng.mint_credential, a, cid, sub_account="sub-1"),
        }
    for name, aid in v.account_ids.items():
        attacks[f"get_trading_account({name})"] = partial(eng.get_trading_account, a, aid)
        attacks[f"disconnect_trading_account({name})"] = partial(eng.disconnect_trading_account, a, aid)
    for name, eid in v.endpoint_ids.items():
        attacks |= {
            f"get_webhook_endpoint({name})": partial(eng.get_webhook_endpoint, a, eid),
            f"update_webhook_endpoint({name})": partial(eng.update_webhook_endpoint, a, eid, enabled=False),
            f"update_webhook_endpoint({name}, url)": partial(
                eng.update_webhook_endpoint, a, eid, url="http://127.0.0.1:9/attacker"
            ),
            f"remove_webhook_endpoint({name})": partial(eng.remove_webhook_endpoint, a, eid),
            f"rotate_webhook_secret({name})": partial(eng.rotate_webhook_secret, a, eid),
            f"list_webhook_deliveries({name})": partial(eng.list_webhook_deliveries, a, eid),
        }
    for name, did in v.delivery_ids.items():
        attacks[f"retry_webhook_delivery({name})"] = partial(eng.retry_webhook_delivery, a, did)
    return attacks


def api_attacks(v: Victim) -> list[tuple[str, str, dict[str, Any]]]:
    """Every REST endpoint that takes an id, aimed at the victim's ids: (method, path, query or body)."""
    calls: list[tuple[str, str, dict[str, Any]]] = []
    for cid in v.credential_ids.values():
        c = str(cid)
        calls += [
            ("POST", "/api/v3/credential/verify", {"credentialId": c}),
            ("GET", "/api/v3/credential/get", {"credentialId": c}),
            (
                "POST",
                "/api/v3/credential/rotate",
                {"credentialId": c, "apiKey": "attacker-key", "apiSecret": "x-y-z"},
            ),
            (
                "POST",
                "/api/v3/credential/rotate",
                {"credentialId": c, "apiKey": "attacker-key", "apiSecret": "x-y-z", "immediate": True},
            ),
            ("POST", "/api/v3/credential/rotate", {"credentialId": c, "automatic": True}),
            ("POST", "/api/v3/credential/mint", {"brokerCredentialId": c, "subAccount": "sub-1"}),
            ("POST", "/api/v3/credential/revoke", {"credentialId": c}),
            ("POST", "/api/v3/credential/revoke", {"credentialId": c, "cascade": False}),
            ("POST", "/api/v3/tradingAccount/connect", {"credentialId": c}),
            ("GET", "/api/v3/tradingAccount/list", {"credentialId": c}),
        ]
    for aid in v.account_ids.values():
        calls += [
            ("POST", "/api/v3/tradingAccount/disconnect", {"tradingAccountId": str(aid)}),
            ("GET", "/api/v3/tradingAccount/get", {"tradingAccountId": str(aid)}),
        ]
    for eid in v.endpoint_ids.values():
        e = str(eid)
        calls += [
            ("GET", "/api/v3/webhook/get", {"endpointId": e}),
            ("POST", "/api/v3/webhook/update", {"endpointId": e, "enabled": False}),
            ("POST", "/api/v3/webhook/delete", {"endpointId": e}),
            ("POST", "/api/v3/webhook/rotateSecret", {"endpointId": e}),
            ("GET", "/api/v3/webhook/delivery/list", {"endpointId": e}),
        ]
    for did in v.delivery_ids.values():
        calls.append(("POST", "/api/v3/webhook/delivery/retry", {"deliveryId": str(did)}))
    return calls


# The only answer a lookup of someone else's id may get besides 404: an empty list (a filter that matches nothing).
EMPTY_LIST_OK = {("GET", "/api/v3/tradingAccount/list")}


def victim_rows(v: Victim) -> dict[str, str]:
    """SQL conditions selecting the victim's rows of each table (the rest of each table is the attacker's)."""
    creds = ",".join(f"'{c}'" for c in v.credential_ids.values())
    hooks = ",".join(f"'{e}'" for e in v.endpoint_ids.values())
    mine = f"owner_id = '{VICTIM}'"
    return {
        "credentials": mine,
        "credential_secrets": mine,
        "trading_accounts": mine,
        "events": mine,
        "key_access_audit": mine,
        "credential_counts_created": mine,
        "credential_counts_gone": mine,
        "webhook_endpoints": mine,
        "webhook_deliveries": mine,
        "webhook_secrets": f"endpoint_id IN ({hooks})",
        "webhook_attempts": f"delivery_id IN (SELECT id FROM webhook_deliveries WHERE {mine})",
        "queue_jobs": f"payload->>'credentialId' IN ({creds}) OR payload->>'endpointId' IN ({hooks})",
    }


async def test_an_owner_can_neither_read_nor_change_another_owners_objects(
    make_engine: Any, fake: FakeVenue, database_url: str, report: Any
) -> None:
    """Every library call and REST endpoint on another owner's ids: NotFound/404, nothing read, nothing changed."""
    receiver = WebhookReceiver(status=lambda path, _n: 500 if path == "/victim-dead" else 200)
    await receiver.start()
    eng: CredentialEngine = await make_engine(webhook_retry_schedule=(0.0, 0.01))
    try:
        v = await build_victim(eng, fake, receiver)
        fake.add_key("attacker-own", "attacker-secret", account_id="attacker-uid")
        mine = await eng.create_credential(
            ATTACKER, venue=Venue.BYBIT, api_key="attacker-own", api_secret="attacker-secret"
        )
        my_hook = await eng.add_webhook_endpoint(ATTACKER, receiver.url + "/attacker-hooks")
        before = await table_snapshot(database_url)
        victims_before = await table_snapshot(database_url, victim_rows(v))
        assert all(victims_before[t] for t in ("credentials", "events", "webhook_deliveries", "queue_jobs"))

        outcomes = {}
        for name, attack in library_attacks(eng, v).items():
            try:
                await attack()
                outcomes[name] = "succeeded"
            except errors.CredentialEngineError as exc:
                shown = MARK in f"{exc} {exc.args!r}"
                outcomes[name] = type(exc).__name__ + (" showing the victim's data" if shown else "")
        assert {name: got for name, got in outcomes.items() if got != "NotFound"} == {}
        refused = len(outcomes)
        foreign_filter = await eng.list_trading_accounts(ATTACKER, credential_id=v.credential_ids["verified"])
        assert (foreign_filter.items, foreign_filter.total) == ([], 0)
        assert [c.credential_id for c in (await eng.list_credentials(ATTACKER)).items] == [mine.credential_id]
        assert [e.endpoint_id for e in await eng.list_webhook_endpoints(ATTACKER)] == [my_hook.endpoint_id]
        assert all(d.owner_id == ATTACKER for d in (await eng.list_webhook_deliveries(ATTACKER)).items)
        assert (await eng.list_trading_accounts(ATTACKER)).items == []
        assert await table_snapshot(database_url) == before, "a refused call changed the database"

        jwt_secret = auth.generate_secret()
        server = ApiServer(eng, ApiConfig(jwt_secret=jwt_secret, port=0))
        await server.start()
        try:
            covered = {(method, path) for method, path, _ in api_attacks(v)}
            routes = {(method, path) for method, path, _ in ROUTES}
            assert routes - covered - NO_ID_ROUTES == set(), "an endpoint that takes ids is not attacked here"
            token = auth.mint_token(jwt_secret, ATTACKER)
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
                for method, path, fields in api_attacks(v):
                    status, body, text = await _call(http, server.url, method, path, fields)
                    assert MARK not in text, (method, path, text)
                    if (method, path) in EMPTY_LIST_OK and status == 200:
                        assert body["data"] == [] and body["pagination"]["total"] == 0, (path, body)
                        continue
                    assert status == 404 and body["success"] is False, (method, path, fields, status, text)
                    assert body["errno"] == errors.NotFound.errno, (method, path, body)
                    refused += 1
                for path in (
                    "/api/v3/credential/list",
                    "/api/v3/tradingAccount/list",
                    "/api/v3/webhook/list",
                    "/api/v3/webhook/delivery/list",
                ):
                    status, body, text = await _call(http, server.url, "GET", path, {})
                    assert status == 200 and MARK not in text, (path, text)
        finally:
            await server.close()
        assert await table_snapshot(database_url) == before, "a refused request changed the database"

        # the victim's API key is not "taken" for the attacker: a 409 here would tell it that someone has it
        theirs = await eng.create_credential(
            ATTACKER, venue=Venue.BINANCE, api_key="victim-key-verified", api_secret="victim-secret-1"
        )
        assert theirs.owner_id == ATTACKER
        assert await table_snapshot(database_url, victim_rows(v)) == victims_before
    finally:
        await receiver.close()
    report("isolation", calls_refused=refused, rows_changed=0, victim_fields_shown=0)


async def _call(
    http: aiohttp.ClientSession, base: str, method: str, path: str, fields: dict[str, Any]
) -> tuple[int, Any, str]:
    request = http.get(base + path, params=fields) if method == "GET" else http.post(base + path, json=fields)
    async with request as resp:
        text = await resp.text()
        return resp.status, await resp.json(content_type=None), text
