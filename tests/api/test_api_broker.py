"""BROKER credentials over the REST API: mint, automatic rotation, and the refusals with their errnos (every
answer is checked against the OpenAPI document by the client)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine import CredentialEngine, CredentialStatus, EngineConfig
from engine.broker.settings import BrokerSettings
from engine.testing import FakeSubAccounts, FakeVenue
from venues.base import Venue

OWNER = "owner-1"  # the owner of tests/api/conftest.py's tokens
ApiFactory = Any  # tests/api/conftest.py's make_api (not imported: another folder has a conftest module too)


@pytest.fixture
async def broker_eng(
    database_url: str, master_keys: str, fake: FakeVenue, tmp_path: Path
) -> AsyncIterator[tuple[CredentialEngine, FakeSubAccounts]]:
    subs = FakeSubAccounts(fake)
    subs.add_master("bybit-master-01", "bybit-master-secret-01", venue=Venue.BYBIT, subs=("7001", "7002"))
    config = EngineConfig(
        database_url=database_url, master_keys=master_keys, data_dir=tmp_path, workers=2, poll_interval=0.2,
        backoff_base=0.01, backoff_max=0.05, broker=BrokerSettings(rotation_grace=0.0, orphan_grace=0.0),
    )  # fmt: skip
    eng = CredentialEngine(config, probes=fake.probes(), sub_accounts=subs.managers())
    await eng.open()
    try:
        yield eng, subs
    finally:
        await eng.close()


async def until(check: Any, timeout: float = 20.0) -> None:  # noqa: ASYNC109 - a test helper's bound
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_mint_and_rotate_automatically_through_the_api(
    broker_eng: tuple[CredentialEngine, FakeSubAccounts], make_api: ApiFactory
) -> None:
    eng, subs = broker_eng
    api = await make_api(eng)
    created = await api.post(
        "/api/v3/credential/create",
        {
            "venue": "BYBIT",
            "type": "BROKER",
            "apiKey": "bybit-master-01",
            "apiSecret": "bybit-master-secret-01",
        },
    )
    parent = created.data["credentialId"]
    master = await eng.wait_for_status(OWNER, parent, {CredentialStatus.VERIFIED})
    assert "sub:7001" in master.identities
    got = await api.get("/api/v3/credential/get", {"credentialId": parent})
    assert got.data["permissions"]["subAccountKeys"] is True
    assert got.data["mintedFrom"] is None  # a credential not minted: the field is there, null

    minted = await api.post(
        "/api/v3/credential/mint",
        {"brokerCredentialId": parent, "subAccount": "7001", "permissions": {"read": True, "trade": True},
         "ipAllowlist": ["198.51.100.4"], "name": "bot-1"},
    )  # fmt: skip
    assert minted.status == 200 and minted.data["status"] == "PENDING"
    assert minted.data["credentialType"] == "EXCHANGE"
    link = {"parentCredentialId": parent, "subAccount": "7001"}
    assert minted.data["mintedFrom"] == link  # the credential object names its BROKER parent and sub-account
    cid = minted.data["credentialId"]
    cred = await eng.wait_for_status(OWNER, cid, {CredentialStatus.VERIFIED})
    got = await api.get("/api/v3/credential/get", {"credentialId": cid})
    assert got.data["mintedFrom"] == link and got.data["status"] == "VERIFIED"
    listed = await api.get("/api/v3/credential/list", {})
    assert {c["credentialId"]: c["mintedFrom"] for c in listed.data} == {parent: None, cid: link}
    assert cred.venue_account_id == "7001"
    assert [k.ip_allowlist for k in subs.live_keys(Venue.BYBIT, "7001")] == [("198.51.100.4",)]

    rotated = await api.post("/api/v3/credential/rotate", {"credentialId": cid, "automatic": True})
    assert rotated.status == 200

    async def swapped() -> bool:
        return (await eng.get_credential(OWNER, cid)).secret_version == 2 and len(
            subs.live_keys(Venue.BYBIT, "7001")
        ) == 1

    await until(swapped)
    events = await eng.list_events(OWNER, cid)
    assert events and all(
        e.data["credential"]["mintedFrom"] == link for e in events
    )  # events and webhooks too


async def test_the_api_refuses_what_cannot_be_minted_with_its_errnos(
    broker_eng: tuple[CredentialEngine, FakeSubAccounts], make_api: ApiFactory
) -> None:
    eng, _ = broker_eng
    api = await make_api(eng)
    created = await api.post(
        "/api/v3/credential/create",
        {
            "venue": "BYBIT",
            "type": "BROKER",
            "apiKey": "bybit-master-01",
            "apiSecret": "bybit-master-secret-01",
        },
    )
    parent = created.data["credentialId"]
    await eng.wait_for_status(OWNER, parent, {CredentialStatus.VERIFIED})
    withdraw = await api.post(
        "/api/v3/credential/mint",
        {"brokerCredentialId": parent, "subAccount": "7001", "permissions": {"withdraw": True}},
    )
    assert (withdraw.status, withdraw.body["errno"]) == (400, -100023)
    assert withdraw.body["error"].startswith("permissions.withdraw: ")
    stranger = await api.post("/api/v3/credential/mint", {"brokerCredentialId": parent, "subAccount": "9999"})
    assert (stranger.status, stranger.body["errno"]) == (409, -100022)
    bad_ip = await api.post(
        "/api/v3/credential/mint", {"brokerCredentialId": parent, "subAccount": "7001", "ipAllowlist": ["x"]}
    )
    assert (bad_ip.status, bad_ip.body["errno"]) == (400, -100001)
    not_minted = await api.post("/api/v3/credential/rotate", {"credentialId": parent, "automatic": True})
    assert (not_minted.status, not_minted.body["errno"]) == (409, -100021)
    both = await api.post(
        "/api/v3/credential/rotate", {"credentialId": parent, "automatic": True, "apiKey": "bybit-key-0009"}
    )
    assert (both.status, both.body["errno"]) == (400, -100001)
    other_owner = await api.post(
        "/api/v3/credential/mint", {"brokerCredentialId": parent, "subAccount": "7001"}, owner="owner-2"
    )
    assert other_owner.status == 404
