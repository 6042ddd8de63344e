"""The SSRF guard on a real engine: private targets refused at creation and again at delivery (DNS rebinding)."""

from __future__ import annotations

from typing import Any

import pytest
from test_webhooks_support import FAST_SCHEDULE, OWNER, FakeResolver, Receiver, new_credential

from engine import CredentialEngine, EngineConfig, errors
from engine.testing import FakeVenue, settle
from engine.webhooks.models import DeliveryState

PUBLIC = "93.184.215.14"  # a public address (never contacted: DNS is faked and the guard refuses first)


async def guarded_engine(
    database_url: str, master_keys: str, fake: FakeVenue, tmp_path: Any, resolver: FakeResolver
) -> CredentialEngine:
    """An engine with the guard on (allow_private_webhook_urls=False) and faked DNS."""
    config = EngineConfig(
        database_url=database_url,
        master_keys=master_keys,
        data_dir=tmp_path,
        workers=0,
        poll_interval=0.2,
        lease_seconds=5.0,
        webhook_retry_schedule=FAST_SCHEDULE[:2],
    )
    eng = CredentialEngine(config, probes=fake.probes(), webhook_resolver=resolver)
    await eng.open()
    return eng


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver(
        {
            "public.example": [PUBLIC],
            "internal.example": ["10.1.2.3"],
            "mixed.example": [PUBLIC, "127.0.0.1"],
            "metadata.example": ["169.254.169.254"],
            "v6-loopback.example": ["::1"],
            "site-local.example": [PUBLIC, "fec0::7"],
            "rebind.example": [PUBLIC],
        }
    )


@pytest.fixture
async def guarded(
    database_url: str, master_keys: str, fake: FakeVenue, tmp_path: Any, resolver: FakeResolver
) -> Any:
    eng = await guarded_engine(database_url, master_keys, fake, tmp_path, resolver)
    try:
        yield eng
    finally:
        await eng.close()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://public.example/hooks", "https"),
        ("https://127.0.0.1/hooks", "loopback"),
        ("https://[::1]/hooks", "loopback"),
        ("https://10.0.0.8/hooks", "private"),
        ("https://192.168.1.1:8443/hooks", "private"),
        ("https://169.254.169.254/latest/meta-data", "metadata"),
        ("https://[fd00:ec2::254]/latest", "metadata"),
        ("https://168.63.129.16/machine", "metadata"),
        ("https://[::ffff:127.0.0.1]/hooks", "loopback"),
        ("https://[fec0::1]/hooks", "site-local"),
        ("https://site-local.example/hooks", "site-local"),
        ("https://[64:ff9b::a9fe:a9fe]/latest", "metadata"),
        ("https://100.64.0.1/hooks", "not a public"),
        ("https://224.0.0.1/hooks", "multicast"),
        ("https://0.0.0.0/hooks", "unspecified"),
        ("https://internal.example/hooks", "private"),
        ("https://mixed.example/hooks", "loopback"),
        ("https://metadata.example/hooks", "metadata"),
        ("https://v6-loopback.example/hooks", "loopback"),
        ("https://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("https://nowhere.example/hooks", "does not resolve"),
    ],
)
async def test_creation_refuses_urls_that_reach_private_addresses(
    guarded: CredentialEngine, url: str, why: str
) -> None:
    """Without allow_private_webhook_urls: http, and hosts resolving to non-public addresses, are refused."""
    with pytest.raises(errors.InvalidRequest) as info:
        await guarded.add_webhook_endpoint(OWNER, url)
    assert info.value.field == "url"
    assert why in info.value.reason
    assert await guarded.list_webhook_endpoints(OWNER) == []


async def test_public_https_url_is_accepted_and_url_updates_are_checked_too(
    guarded: CredentialEngine,
) -> None:
    """A host resolving to public addresses only is accepted; changing the URL runs the same checks."""
    ep = await guarded.add_webhook_endpoint(OWNER, "https://public.example/hooks?x=1")
    assert ep.url == "https://public.example/hooks?x=1"
    with pytest.raises(errors.InvalidRequest) as info:
        await guarded.update_webhook_endpoint(OWNER, ep.endpoint_id, url="https://internal.example/x")
    assert info.value.field == "url"
    assert (await guarded.get_webhook_endpoint(OWNER, ep.endpoint_id)).url == ep.url


async def test_dns_rebinding_is_refused_at_delivery(
    guarded: CredentialEngine, resolver: FakeResolver, fake: FakeVenue
) -> None:
    """A name that was public at creation and points at 127.0.0.1 at delivery: no connection, attempt refused."""
    async with Receiver() as rx:
        url = f"https://rebind.example:{rx.port}/hooks"
        ep = await guarded.add_webhook_endpoint(OWNER, url, event_types=["credential.created"])
        resolver.answers["rebind.example"] = ["127.0.0.1"]
        resolver.asked.clear()
        await new_credential(guarded, fake, "rebind-1")
        await settle(guarded)
        assert rx.requests == []
    assert "rebind.example" in resolver.asked  # checked after DNS, at delivery time
    (delivery,) = (await guarded.list_webhook_deliveries(OWNER, ep.endpoint_id)).items
    assert delivery.state is DeliveryState.DEAD
    assert [a.outcome for a in delivery.attempts] == ["refused", "refused"]
    assert all("loopback" in (a.error or "") for a in delivery.attempts)
    assert guarded.webhooks.metrics.outcomes["refused"] == 2


async def test_redirects_are_not_followed(make_engine: Any, fake: FakeVenue) -> None:
    """A 3xx answer is a failed attempt; the Location is never requested."""
    eng: CredentialEngine = await make_engine(
        allow_private_webhook_urls=True, webhook_retry_schedule=FAST_SCHEDULE[:1]
    )
    async with Receiver(path="/elsewhere") as target, Receiver(statuses=[307]) as rx:
        rx.headers["Location"] = target.url
        await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        await new_credential(eng, fake, "redirect-1")
        await settle(eng)
        assert len(rx.requests) == 1 and target.requests == []
    (delivery,) = (await eng.list_webhook_deliveries(OWNER)).items
    assert delivery.state is DeliveryState.DEAD
    assert [(a.outcome, a.status_code) for a in delivery.attempts] == [("failed", 307)]
