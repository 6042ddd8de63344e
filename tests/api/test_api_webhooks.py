"""Webhook endpoints over HTTP: create (secret shown once), list, get, update, delete, rotate the secret,
deliveries with their attempts, and a real receiver on loopback checking the signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from engine import CredentialEngine, Event, webhooks

CREATE = "/api/v3/webhook/create"


class Receiver:
    """A consumer's endpoint on loopback, using the package's own receiver helper."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.secrets: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            checker = webhooks.aiohttp_handler(self.secrets, self.record)
            return await checker(request)

        app = web.Application()
        app.router.add_post("/hooks", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[-1][1]}/hooks"

    async def record(self, event: Event) -> None:
        self.events.append(event)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    await recv.start()
    yield recv
    await recv.close()


async def test_create_shows_the_secret_once(api: Any, receiver: Receiver) -> None:
    """Create answers the endpoint with its whsec_ secret; list and get never show it."""
    reply = await api.post(CREATE, {"url": receiver.url, "description": "risk service"})
    assert reply.status == 200
    data = reply.data
    assert data["secret"].startswith("whsec_")
    assert data["url"] == receiver.url and data["enabled"] is True and data["eventTypes"] is None
    listed = await api.get("/api/v3/webhook/list")
    assert [e["endpointId"] for e in listed.data] == [data["endpointId"]]
    assert listed.body["pagination"] == {"offset": 0, "limit": 50, "total": 1}
    got = await api.get("/api/v3/webhook/get", {"endpointId": data["endpointId"]})
    assert got.data["description"] == "risk service"
    for text in (listed.text, got.text):
        assert data["secret"] not in text and "whsec_" not in text


async def test_events_arrive_signed_and_deliveries_are_listed(
    api: Any, eng: CredentialEngine, receiver: Receiver, create_body: Callable[..., Any]
) -> None:
    """A credential's events reach the receiver, signed with the endpoint's secret; deliveries list them."""
    endpoint = (await api.post(CREATE, {"url": receiver.url})).data
    receiver.secrets.append(endpoint["secret"])
    created = (await api.post("/api/v3/credential/create", create_body())).data
    await eng.run_until_idle()
    types = [e.type for e in receiver.events]
    assert types[:2] == ["credential.created", "credential.verified"]
    assert all(str(e.credential_id) == created["credentialId"] for e in receiver.events)
    deliveries = await api.get("/api/v3/webhook/delivery/list", {"endpointId": endpoint["endpointId"]})
    assert deliveries.body["pagination"]["total"] == len(receiver.events)
    assert {d["state"] for d in deliveries.data} == {"delivered"}
    assert all(d["attempts"][0]["statusCode"] == 200 for d in deliveries.data)
    delivered = await api.get("/api/v3/webhook/delivery/list", {"state": "delivered", "limit": "1"})
    assert len(delivered.data) == 1
    metrics = (await api.call("GET", "/metrics", token=None)).text
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith('credential_engine_webhook_deliveries_total{result="delivered"}')
    )
    assert float(line.split()[-1]) == len(receiver.events)


async def test_event_type_filter_and_update(
    api: Any, eng: CredentialEngine, receiver: Receiver, create_body: Callable[..., Any]
) -> None:
    """eventTypes filters what is sent; update disables the endpoint and changes the filter."""
    endpoint = (await api.post(CREATE, {"url": receiver.url, "eventTypes": ["credential.revoked"]})).data
    receiver.secrets.append(endpoint["secret"])
    cid = (await api.post("/api/v3/credential/create", create_body())).data["credentialId"]
    await eng.run_until_idle()
    assert receiver.events == []
    await api.post("/api/v3/credential/revoke", {"credentialId": cid})
    await eng.run_until_idle()
    assert [e.type for e in receiver.events] == ["credential.revoked"]
    off = await api.post("/api/v3/webhook/update", {"endpointId": endpoint["endpointId"], "enabled": False})
    assert off.data["enabled"] is False and off.data["disabledReason"] == "MANUAL"
    every = await api.post("/api/v3/webhook/update", {"endpointId": endpoint["endpointId"], "eventTypes": []})
    assert every.data["eventTypes"] is None


async def test_rotate_secret_and_delete(api: Any, receiver: Receiver) -> None:
    """rotateSecret answers a new secret; delete removes the endpoint (then 404)."""
    endpoint = (await api.post(CREATE, {"url": receiver.url})).data
    rotated = await api.post("/api/v3/webhook/rotateSecret", {"endpointId": endpoint["endpointId"]})
    assert rotated.status == 200
    assert rotated.data["secret"].startswith("whsec_") and rotated.data["secret"] != endpoint["secret"]
    deleted = await api.post("/api/v3/webhook/delete", {"endpointId": endpoint["endpointId"]})
    assert deleted.data == {"endpointId": endpoint["endpointId"], "deleted": True}
    gone = await api.get("/api/v3/webhook/get", {"endpointId": endpoint["endpointId"]})
    assert gone.status == 404 and gone.body["errno"] == -100003


async def test_other_owners_endpoints_answer_404(api: Any, receiver: Receiver) -> None:
    """Another owner cannot see, change, rotate, delete or read the deliveries of an endpoint."""
    eid = (await api.post(CREATE, {"url": receiver.url})).data["endpointId"]
    other = "owner-2"
    assert (await api.get("/api/v3/webhook/get", {"endpointId": eid}, owner=other)).status == 404
    assert (await api.get("/api/v3/webhook/delivery/list", {"endpointId": eid}, owner=other)).status == 404
    for path, body in (
        ("/api/v3/webhook/update", {"endpointId": eid, "enabled": False}),
        ("/api/v3/webhook/rotateSecret", {"endpointId": eid}),
        ("/api/v3/webhook/delete", {"endpointId": eid}),
    ):
        assert (await api.post(path, body, owner=other)).status == 404, path
    assert (await api.get("/api/v3/webhook/list", owner=other)).data == []
    assert (await api.get("/api/v3/webhook/get", {"endpointId": eid})).data["enabled"] is True


async def test_bad_webhook_input_is_400_naming_the_field(api: Any, receiver: Receiver) -> None:
    """A URL that is not one, unknown event types, a non-boolean enabled: 400 naming the field."""
    for body, field in (
        ({"url": "not a url"}, "url"),
        ({"url": "ftp://example.com/x"}, "url"),
        ({}, "url"),
        ({"url": receiver.url, "eventTypes": ["credential.exploded"]}, "eventTypes"),
        ({"url": receiver.url, "eventTypes": "credential.created"}, "eventTypes"),
        ({"url": receiver.url, "description": 5}, "description"),
    ):
        reply = await api.post(CREATE, body)
        assert reply.status == 400, body
        assert reply.body["error"].startswith(field), reply.body["error"]
    eid = (await api.post(CREATE, {"url": receiver.url})).data["endpointId"]
    bad = await api.post("/api/v3/webhook/update", {"endpointId": eid, "enabled": "no"})
    assert bad.status == 400 and bad.body["error"].startswith("enabled")


async def test_retry_of_a_delivery_that_is_not_dead_is_409(
    api: Any, eng: CredentialEngine, receiver: Receiver, create_body: Callable[..., Any]
) -> None:
    """Retrying a delivered delivery is a conflict; an unknown delivery id is 404."""
    endpoint = (await api.post(CREATE, {"url": receiver.url})).data
    receiver.secrets.append(endpoint["secret"])
    assert (await api.post("/api/v3/credential/create", create_body())).status == 200
    await eng.run_until_idle()
    listed = await api.get("/api/v3/webhook/delivery/list")
    assert listed.data, (listed.body, receiver.events)
    delivery = listed.data[0]
    retry = await api.post("/api/v3/webhook/delivery/retry", {"deliveryId": delivery["deliveryId"]})
    assert retry.status == 409 and retry.body["errno"] == -100005
    unknown = await api.post(
        "/api/v3/webhook/delivery/retry", {"deliveryId": "00000000-0000-0000-0000-000000000000"}
    )
    assert unknown.status == 404
