"""Webhook endpoints and Standard Webhooks delivery, end to end: real PostgreSQL, receivers on loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import pytest
import standardwebhooks
from test_webhooks_support import FAST_SCHEDULE, OWNER, Receiver, new_credential, settle_until

from engine import CredentialEngine, Event, errors, jobs, webhooks
from engine.testing import FakeVenue, settle
from engine.webhooks.models import DeliveryState
from venues.base import Outcome


async def webhook_engine(make_engine: Any, **overrides: Any) -> CredentialEngine:
    settings: dict[str, Any] = {"allow_private_webhook_urls": True, "webhook_retry_schedule": FAST_SCHEDULE}
    settings.update(overrides)
    eng: CredentialEngine = await make_engine(**settings)
    return eng


# ---- endpoints ------------------------------------------------------------------------------------------------


async def test_add_shows_the_secret_once_and_never_again(make_engine: Any) -> None:
    """add returns a whsec_ secret of 32 random bytes; get/list/repr/public_dict never show it."""
    eng = await webhook_engine(make_engine)
    added = await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/hooks", description=" risk service ")
    assert added.secret is not None and added.secret.startswith("whsec_")
    assert len(base64.b64decode(added.secret.removeprefix("whsec_"))) == 32
    assert added.description == "risk service" and added.enabled and added.event_types is None
    assert added.secret not in repr(added) and added.secret not in str(added.public_dict())
    again = await eng.get_webhook_endpoint(OWNER, added.endpoint_id)
    assert again.secret is None and again == added
    listed = await eng.list_webhook_endpoints(OWNER)
    assert [e.endpoint_id for e in listed] == [added.endpoint_id] and listed[0].secret is None
    other = await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/other")
    assert other.secret != added.secret


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": "ftp://127.0.0.1/x"}, "url"),
        ({"url": ""}, "url"),
        ({"url": "http://user:pw@127.0.0.1/x"}, "url"),
        ({"url": "http://127.0.0.1/x", "event_types": ["credential.nope"]}, "eventTypes"),
        ({"url": "http://127.0.0.1/x", "event_types": "credential.created"}, "eventTypes"),
        ({"url": "http://127.0.0.1/x", "description": "x" * 300}, "description"),
    ],
)
async def test_add_refuses_bad_input_naming_the_field(
    make_engine: Any, kwargs: dict[str, Any], field: str
) -> None:
    """Invalid input is errors.InvalidRequest whose field names the culprit; nothing is stored."""
    eng = await webhook_engine(make_engine)
    with pytest.raises(errors.InvalidRequest) as info:
        await eng.add_webhook_endpoint(OWNER, **kwargs)
    assert info.value.field == field
    assert await eng.list_webhook_endpoints(OWNER) == []


async def test_other_owners_endpoints_and_deliveries_are_not_found(make_engine: Any, fake: FakeVenue) -> None:
    """Every endpoint and delivery method answers NotFound for another owner's ids, and changes nothing."""
    eng = await webhook_engine(make_engine)
    async with Receiver() as rx:
        mine = await eng.add_webhook_endpoint(OWNER, rx.url)
        await new_credential(eng, fake, "iso")
        await settle(eng)
        delivery = (await eng.list_webhook_deliveries(OWNER)).items[0]
        intruder = "someone-else"
        for call in (
            eng.get_webhook_endpoint(intruder, mine.endpoint_id),
            eng.remove_webhook_endpoint(intruder, mine.endpoint_id),
            eng.rotate_webhook_secret(intruder, mine.endpoint_id),
            eng.update_webhook_endpoint(intruder, mine.endpoint_id, enabled=False),
            eng.list_webhook_deliveries(intruder, mine.endpoint_id),
            eng.retry_webhook_delivery(intruder, delivery.delivery_id),
            eng.get_webhook_endpoint(OWNER, uuid.uuid4()),
        ):
            with pytest.raises(errors.NotFound):
                await call
        assert (await eng.list_webhook_deliveries(intruder)).total == 0
        assert (await eng.get_webhook_endpoint(OWNER, mine.endpoint_id)).enabled
        with pytest.raises(errors.InvalidRequest) as info:
            await eng.get_webhook_endpoint(OWNER, "not-a-uuid")
        assert info.value.field == "endpointId"


async def test_remove_deletes_endpoint_and_its_deliveries(make_engine: Any, fake: FakeVenue) -> None:
    """remove: the endpoint, its secrets and deliveries are gone, and later events are not sent to it."""
    eng = await webhook_engine(make_engine)
    async with Receiver() as rx:
        ep = await eng.add_webhook_endpoint(OWNER, rx.url)
        await new_credential(eng, fake, "rm-1")
        await settle(eng)
        sent = len(rx.requests)
        assert sent == 2
        await eng.remove_webhook_endpoint(OWNER, ep.endpoint_id)
        await new_credential(eng, fake, "rm-2")
        await settle(eng)
        assert len(rx.requests) == sent
        assert (await eng.list_webhook_deliveries(OWNER)).total == 0
        assert await eng.db.fetchval("next_webhook_secret_version", ep.endpoint_id) == 1  # no secret row left
        with pytest.raises(errors.NotFound):
            await eng.remove_webhook_endpoint(OWNER, ep.endpoint_id)


# ---- delivery ------------------------------------------------------------------------------------------------


async def test_deliveries_verify_with_standardwebhooks_and_our_verifier(
    make_engine: Any, fake: FakeVenue
) -> None:
    """Each lifecycle event arrives signed per Standard Webhooks: both verifiers accept it, id = event id."""
    eng = await webhook_engine(make_engine)
    async with Receiver() as rx:
        ep = await eng.add_webhook_endpoint(OWNER, rx.url)
        assert ep.secret is not None
        cid = await new_credential(eng, fake, "sw-1")
        await settle(eng)
        outbox = await eng.list_events(OWNER, cid)
        assert [e.type for e in outbox] == ["credential.created", "credential.verified"]
        assert [r.webhook_id for r in rx.requests] == [str(e.event_id) for e in outbox]
        ours = webhooks.Verifier(ep.secret)
        theirs = standardwebhooks.Webhook(ep.secret)
        for request, event in zip(rx.requests, outbox, strict=True):
            assert theirs.verify(request.body, request.headers) == event.payload()
            assert ours.verify(request.body, request.headers) == event.payload()
            assert ours.verify_event(request.body, request.headers) == event
            assert request.headers["content-type"] == "application/json"
            assert request.headers["webhook-signature"].startswith("v1,")
            assert abs(int(request.headers["webhook-timestamp"]) - request.at) < 5
        wrong = webhooks.Verifier(webhooks.generate_secret())
        with pytest.raises(webhooks.WebhookVerificationError):
            wrong.verify(rx.requests[0].body, rx.requests[0].headers)
        page = await eng.list_webhook_deliveries(OWNER, ep.endpoint_id)
        assert page.total == 2
        for delivery in page:
            assert delivery.state is DeliveryState.DELIVERED and delivery.delivered_at_ms is not None
            assert [(a.attempt, a.outcome, a.status_code) for a in delivery.attempts] == [
                (1, "delivered", 200)
            ]
            assert delivery.attempts[0].latency_ms > 0 and delivery.attempts[0].error is None
        assert {d.event_id for d in page} == {e.event_id for e in outbox}


async def test_event_type_filter_and_enable_disable(make_engine: Any, fake: FakeVenue) -> None:
    """An endpoint gets only the types it asked for; a disabled one gets nothing until it is enabled again."""
    eng = await webhook_engine(make_engine)
    async with Receiver() as all_rx, Receiver() as verified_rx:
        everything = await eng.add_webhook_endpoint(OWNER, all_rx.url)
        await eng.add_webhook_endpoint(OWNER, verified_rx.url, event_types=["credential.verified"])
        await new_credential(eng, fake, "flt-1")
        await settle(eng)
        assert [r.payload["type"] for r in all_rx.requests] == ["credential.created", "credential.verified"]
        assert [r.payload["type"] for r in verified_rx.requests] == ["credential.verified"]
        off = await eng.update_webhook_endpoint(OWNER, everything.endpoint_id, enabled=False)
        assert not off.enabled and off.disabled_reason == "MANUAL"
        await new_credential(eng, fake, "flt-2")
        await settle(eng)
        assert len(all_rx.requests) == 2 and len(verified_rx.requests) == 2
        on = await eng.update_webhook_endpoint(OWNER, everything.endpoint_id, enabled=True, event_types=[])
        assert on.enabled and on.disabled_reason is None and on.event_types is None
        await new_credential(eng, fake, "flt-3")
        await settle(eng)
        assert [r.payload["type"] for r in all_rx.requests[2:]] == [
            "credential.created",
            "credential.verified",
        ]
        narrowed = await eng.update_webhook_endpoint(
            OWNER, everything.endpoint_id, event_types=["credential.revoked", "credential.created"]
        )
        assert narrowed.event_types == ("credential.created", "credential.revoked")


async def test_rotation_signs_with_old_and_new_secret_during_the_grace_period(
    make_engine: Any, fake: FakeVenue
) -> None:
    """After rotate, requests carry two signatures (either secret verifies); after the grace, only the new one."""
    eng = await webhook_engine(make_engine, webhook_secret_grace=1.0)
    async with Receiver() as rx:
        ep = await eng.add_webhook_endpoint(OWNER, rx.url)
        assert ep.secret is not None
        new = await eng.rotate_webhook_secret(OWNER, ep.endpoint_id)
        assert new.startswith("whsec_") and new != ep.secret
        await new_credential(eng, fake, "rot-1")
        await settle(eng)
        first = rx.requests[0]
        assert len(first.headers["webhook-signature"].split(" ")) == 2
        for secret in (ep.secret, new):
            standardwebhooks.Webhook(secret).verify(first.body, first.headers)
            webhooks.Verifier(secret).verify(first.body, first.headers)
        await asyncio.sleep(1.1)
        await new_credential(eng, fake, "rot-2")
        await settle(eng)
        last = rx.requests[-1]
        assert len(last.headers["webhook-signature"].split(" ")) == 1
        webhooks.Verifier(new).verify(last.body, last.headers)
        with pytest.raises(webhooks.WebhookVerificationError):
            webhooks.Verifier(ep.secret).verify(last.body, last.headers)
        third = await eng.rotate_webhook_secret(OWNER, ep.endpoint_id)  # the expired secret row is destroyed
        versions = await eng.db.fetchval("next_webhook_secret_version", ep.endpoint_id)
        assert versions == 4 and third != new


async def test_the_hourly_purge_destroys_secrets_past_their_grace_period(make_engine: Any) -> None:
    """The purge_jobs job destroys every endpoint's expired secrets (not only at that endpoint's next rotation);
    current secrets and those still in their grace period stay."""
    eng = await webhook_engine(make_engine, webhook_secret_grace=0.2)
    expired = await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/expired")
    in_grace = await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/in-grace")
    untouched = await eng.add_webhook_endpoint(OWNER, "http://127.0.0.1:9/untouched")
    for endpoint in (expired, in_grace):
        await eng.rotate_webhook_secret(OWNER, endpoint.endpoint_id)
    async with eng.db.connection() as conn:  # the second one was rotated a moment ago, with a day of grace
        await conn._conn.execute(
            "UPDATE webhook_secrets SET expires_at = now() + interval '1 day' WHERE endpoint_id = $1 AND version = 1",
            in_grace.endpoint_id,
        )
    await asyncio.sleep(0.3)  # the first one's grace is over

    async def versions() -> dict[uuid.UUID, list[int]]:
        async with eng.db.connection() as conn:
            rows = await conn._conn.fetch("SELECT endpoint_id, version FROM webhook_secrets ORDER BY 1, 2")
        found: dict[uuid.UUID, list[int]] = {}
        for row in rows:
            found.setdefault(row["endpoint_id"], []).append(row["version"])
        return found

    before = await versions()
    assert before[expired.endpoint_id] == [1, 2]
    await eng.queue.enqueue(jobs.PURGE_JOBS, {})
    await eng.run_until_idle()
    assert await versions() == {
        expired.endpoint_id: [2],
        in_grace.endpoint_id: [1, 2],
        untouched.endpoint_id: [1],
    }


async def test_failed_attempts_are_retried_and_each_is_recorded(make_engine: Any, fake: FakeVenue) -> None:
    """500, then a timeout-free 503, then 200: three attempts with the same webhook-id, every one recorded."""
    eng = await webhook_engine(make_engine)
    async with Receiver(statuses=[500, 503]) as rx:
        ep = await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        await new_credential(eng, fake, "retry-1")
        await settle(eng)
        assert len(rx.requests) == 3
        assert len({r.webhook_id for r in rx.requests}) == 1
        (delivery,) = (await eng.list_webhook_deliveries(OWNER, ep.endpoint_id)).items
        assert delivery.state is DeliveryState.DELIVERED
        assert [(a.attempt, a.outcome, a.status_code, a.error) for a in delivery.attempts] == [
            (1, "failed", 500, "HTTP 500"),
            (2, "failed", 503, "HTTP 503"),
            (3, "delivered", 200, None),
        ]
        metrics = eng.webhooks.metrics
        assert metrics.outcomes["failed"] == 2 and metrics.outcomes["delivered"] == 1
        assert metrics.by_endpoint[(str(ep.endpoint_id), "failed")] == 2
        assert metrics.latency_count == 3
        snapshot = metrics.as_dict()
        assert snapshot["by_endpoint"][str(ep.endpoint_id)] == {"failed": 2, "delivered": 1}
        assert snapshot["latency_seconds"]["count"] == 3 and snapshot["fanned_out"] == 1
        assert (await eng.get_webhook_endpoint(OWNER, ep.endpoint_id)).failing_since_ms is None


async def test_connection_refused_is_a_recorded_failure(make_engine: Any, fake: FakeVenue) -> None:
    """A receiver that is not listening: each attempt is recorded as failed with the connect error."""
    eng = await webhook_engine(make_engine, webhook_retry_schedule=(0.0, 0.01))
    async with Receiver() as rx:
        url = rx.url
    await eng.add_webhook_endpoint(OWNER, url, event_types=["credential.created"])  # nobody listens there now
    await new_credential(eng, fake, "refused-1")
    await settle(eng)
    (delivery,) = (await eng.list_webhook_deliveries(OWNER)).items
    assert delivery.state is DeliveryState.DEAD
    assert [a.outcome for a in delivery.attempts] == ["failed", "failed"]
    assert all(
        a.status_code is None and (a.error or "").startswith("connect failed") for a in delivery.attempts
    )


async def test_retry_after_is_honoured(make_engine: Any, fake: FakeVenue) -> None:
    """A 429 with Retry-After: 1 delays the next attempt by at least a second, though the schedule says 50 ms."""
    eng = await webhook_engine(make_engine)
    async with Receiver(statuses=[429], headers={"Retry-After": "1"}) as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        await new_credential(eng, fake, "ra-1")
        await settle_until(eng, lambda: len(rx.requests) >= 2)
        assert rx.requests[1].at - rx.requests[0].at >= 0.95
        (delivery,) = (await eng.list_webhook_deliveries(OWNER)).items
        assert [a.status_code for a in delivery.attempts] == [429, 200]


async def test_exhausted_delivery_is_dead_and_can_be_retried(make_engine: Any, fake: FakeVenue) -> None:
    """After the last scheduled attempt the delivery is dead; retry_webhook_delivery sends it again."""
    eng = await webhook_engine(make_engine, webhook_retry_schedule=(0.0, 0.02, 0.02))
    async with Receiver(down=True) as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        await new_credential(eng, fake, "dead-1")
        await settle(eng)
        (dead,) = (await eng.list_webhook_deliveries(OWNER, state="dead")).items
        assert [a.status_code for a in dead.attempts] == [503, 503, 503]
        assert eng.webhooks.metrics.outcomes["dead"] == 1
        rx.down = False
        revived = await eng.retry_webhook_delivery(OWNER, dead.delivery_id)
        assert revived.state is DeliveryState.PENDING
        await settle(eng)
        done = await eng.webhooks.get_delivery(OWNER, dead.delivery_id)
        assert done.state is DeliveryState.DELIVERED
        assert [a.attempt for a in done.attempts] == [1, 2, 3, 4]
        assert len({r.webhook_id for r in rx.requests}) == 1
        with pytest.raises(errors.Conflict):
            await eng.retry_webhook_delivery(OWNER, dead.delivery_id)


async def test_gone_disables_the_endpoint_at_once_with_an_event(make_engine: Any, fake: FakeVenue) -> None:
    """410: the endpoint is disabled (GONE), its other deliveries die, webhook_endpoint.disabled is emitted."""
    eng = await webhook_engine(make_engine)
    heard: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    eng.subscribe(listener, types={"webhook_endpoint.disabled"})
    async with Receiver(statuses=[410]) as gone_rx, Receiver() as ops_rx:
        gone = await eng.add_webhook_endpoint(OWNER, gone_rx.url + "?token=abc")
        ops = await eng.add_webhook_endpoint(OWNER, ops_rx.url, event_types=["webhook_endpoint.disabled"])
        await new_credential(eng, fake, "gone-1")
        await settle(eng)
        assert len(gone_rx.requests) == 1
        endpoint = await eng.get_webhook_endpoint(OWNER, gone.endpoint_id)
        assert not endpoint.enabled and endpoint.disabled_reason == "GONE"
        deliveries = (await eng.list_webhook_deliveries(OWNER, gone.endpoint_id)).items
        assert {d.state for d in deliveries} == {DeliveryState.DEAD}
        assert [(e.type, e.credential_id, e.sequence) for e in heard] == [
            ("webhook_endpoint.disabled", None, 1)
        ]
        assert heard[0].data["reason"] == "GONE"
        assert heard[0].data["endpoint"]["endpointId"] == str(gone.endpoint_id)
        assert "token" not in str(heard[0].data)  # the query of the URL is not repeated in events
        assert [r.payload["type"] for r in ops_rx.requests] == ["webhook_endpoint.disabled"]
        assert ops.secret is not None
        webhooks.Verifier(ops.secret).verify(ops_rx.requests[0].body, ops_rx.requests[0].headers)
        assert eng.webhooks.metrics.outcomes["gone"] == 1 and eng.webhooks.metrics.outcomes["disabled"] == 1
        with pytest.raises(errors.Conflict):
            await eng.retry_webhook_delivery(OWNER, deliveries[0].delivery_id)


async def test_endpoint_failing_for_too_long_is_disabled(make_engine: Any, fake: FakeVenue) -> None:
    """An endpoint whose attempts all fail for webhook_disable_after is disabled (FAILING) with an event."""
    eng = await webhook_engine(
        make_engine, webhook_disable_after=0.3, webhook_retry_schedule=(0.0,) + (0.1,) * 20
    )
    heard: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    eng.subscribe(listener, types={"webhook_endpoint.disabled"})
    async with Receiver(down=True) as rx:
        ep = await eng.add_webhook_endpoint(OWNER, rx.url)
        await new_credential(eng, fake, "failing-1")
        await settle(eng)
        endpoint = await eng.get_webhook_endpoint(OWNER, ep.endpoint_id)
        assert not endpoint.enabled and endpoint.disabled_reason == "FAILING"
        assert endpoint.failing_since_ms is not None
        assert [e.data["reason"] for e in heard] == ["FAILING"]
        assert 3 <= len(rx.requests) <= 8
        again = await eng.update_webhook_endpoint(OWNER, ep.endpoint_id, enabled=True)
        assert again.enabled and again.failing_since_ms is None


async def test_revoked_event_is_delivered_despite_the_revoke_cascade(
    make_engine: Any, fake: FakeVenue
) -> None:
    """The revoke cascade cancels the credential's queued jobs, but not its webhook deliveries."""
    eng = await webhook_engine(make_engine)
    async with Receiver() as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url)
        cid = await new_credential(eng, fake, "rev-1")
        await settle(eng)
        await eng.connect_trading_account(OWNER, credential_id=cid)
        await eng.revoke_credential(OWNER, cid)
        await settle(eng)
        assert [r.payload["type"] for r in rx.requests] == [
            "credential.created",
            "credential.verified",
            "trading_account.connected",
            "trading_account.disconnected",
            "credential.revoked",
        ]
        assert [r.key[1] for r in rx.requests] == [1, 2, 3, 4, 5]


async def test_receiver_down_then_back_gets_every_event_in_order(make_engine: Any, fake: FakeVenue) -> None:
    """Receiver down while many events happen, concurrent workers: once back it has every event, each
    credential's in sequence order, none skipped; later events waited behind earlier undelivered ones."""
    schedule = (0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0)
    eng = await webhook_engine(make_engine, workers=6, webhook_retry_schedule=schedule)
    async with Receiver(down=True) as rx:
        ep = await eng.add_webhook_endpoint(OWNER, rx.url)
        creds = [await new_credential(eng, fake, f"order-{i}") for i in range(4)]
        for i, cid in enumerate(creds):
            fake.add_key(f"order-{i}-new", "s-new", account_id=f"uid-order-{i}")
            await eng.wait_for_status(OWNER, cid, {"VERIFIED"}, timeout=10)
            await eng.rotate_credential(OWNER, cid, api_key=f"order-{i}-new", api_secret="s-new")
        await asyncio.sleep(0.5)
        for cid in creds[:2]:
            await eng.revoke_credential(OWNER, cid)
        parked = await eng.list_webhook_deliveries(OWNER, ep.endpoint_id, state="waiting")
        assert parked.total > 0, "later events should wait behind the undelivered first ones"
        rx.down = False
        expected = {cid: [e.sequence for e in await eng.list_events(OWNER, cid)] for cid in creds}
        want = sum(len(v) for v in expected.values())

        def all_in() -> bool:
            return len(rx.unique()) >= want

        await settle_until(eng, all_in, within=20)
    got: dict[str, list[int]] = {}
    for request in rx.unique():
        cred_id, seq = request.key
        assert cred_id is not None
        got.setdefault(cred_id, []).append(seq)
    assert got == {str(cid): seqs for cid, seqs in expected.items()}
    for seqs in got.values():
        assert seqs == list(range(1, len(seqs) + 1))
    delivered = await eng.list_webhook_deliveries(OWNER, ep.endpoint_id, state="delivered", limit=500)
    assert delivered.total == want


async def test_every_delivered_body_matches_its_json_schema(make_engine: Any, fake: FakeVenue) -> None:
    """Real bodies of every kind of event validate against the strict (closed) schema of their type."""
    jsonschema = pytest.importorskip("jsonschema")
    from engine.webhooks import schemas as webhooks_schemas

    eng = await webhook_engine(make_engine)
    async with Receiver() as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url)
        cid = await new_credential(eng, fake, "schema-1")
        await settle(eng)
        fake.keys["schema-1"].identities = ("futures", "spot")
        await eng.verify_credential(OWNER, cid)
        await settle(eng)
        fake.add_key("schema-1b", "s", account_id="uid-other")
        await eng.rotate_credential(OWNER, cid, api_key="schema-1b", api_secret="s")  # wrong account: fails
        await settle(eng)
        fake.add_key("schema-1c", "s", account_id="uid-schema-1")
        await eng.rotate_credential(OWNER, cid, api_key="schema-1c", api_secret="s")
        await settle(eng)
        fake.add_key("schema-1d", "s", account_id="uid-schema-1")
        await eng.rotate_credential(OWNER, cid, api_key="schema-1d", api_secret="s", immediate=True)
        await settle(eng)
        fake.keys["schema-1d"].failure = Outcome.INVALID_KEY
        await eng.verify_credential(OWNER, cid)
        await settle(eng)
        fake.keys["schema-1d"].failure = None
        await eng.verify_credential(OWNER, cid)
        await settle(eng)
        await eng.connect_trading_account(OWNER, credential_id=cid)
        await eng.revoke_credential(OWNER, cid)
        await settle(eng)
        async with Receiver(statuses=[410]) as gone_rx:
            gone = await eng.add_webhook_endpoint(OWNER, gone_rx.url, event_types=["credential.created"])
            await new_credential(eng, fake, "schema-2")
            await settle(eng)
        assert not (await eng.get_webhook_endpoint(OWNER, gone.endpoint_id)).enabled
    types = {r.payload["type"] for r in rx.requests}
    assert types >= {
        "credential.created",
        "credential.verified",
        "credential.permissions_changed",
        "credential.rotation_started",
        "credential.rotation_failed",
        "credential.rotated",
        "credential.verification_failed",
        "trading_account.connected",
        "trading_account.disconnected",
        "credential.revoked",
        "webhook_endpoint.disabled",
    }
    for request in rx.requests:
        payload = request.payload
        jsonschema.validate(payload, webhooks_schemas.schema(payload["type"], strict=True))


async def test_a_receiver_that_does_not_answer_times_out(make_engine: Any, fake: FakeVenue) -> None:
    """No answer within webhook_timeout: the attempt is recorded as a timeout failure and retried."""
    eng = await webhook_engine(make_engine, webhook_timeout=0.3, webhook_retry_schedule=(0.0, 0.05))
    async with Receiver(hang=asyncio.Event()) as rx:
        await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        await new_credential(eng, fake, "slow-1")
        await settle(eng)
        assert len(rx.requests) == 2
    (delivery,) = (await eng.list_webhook_deliveries(OWNER)).items
    assert delivery.state is DeliveryState.DEAD
    assert [(a.outcome, a.error) for a in delivery.attempts] == [("failed", "timeout after 0.3s")] * 2
    assert all(250 <= a.latency_ms < 5000 for a in delivery.attempts)


async def test_master_key_rotation_rewraps_webhook_secrets(make_engine: Any, fake: FakeVenue) -> None:
    """rewrap_keys moves webhook secrets to the new master key; an engine holding only that key still signs."""
    from engine.crypto import MasterKeyring

    old, new = MasterKeyring.generate_spec(1), MasterKeyring.generate_spec(2)
    first = await webhook_engine(make_engine, master_keys=old)
    async with Receiver() as rx:
        ep = await first.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
        assert ep.secret is not None
        both = await webhook_engine(make_engine, master_keys=f"{old},{new}")
        report = await both.rewrap_keys()
        assert report.complete and report.rewrapped["webhook secret"] == 1
        only_new = await webhook_engine(make_engine, master_keys=new)
        await new_credential(only_new, fake, "kek-1")
        await settle(only_new)
        (request,) = rx.requests
        webhooks.Verifier(ep.secret).verify(request.body, request.headers)
