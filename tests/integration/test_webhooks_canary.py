"""Canary secrets through every webhook path: bodies, headers, delivery records, events, logs, reprs, the
database. Neither a credential's key material nor a webhook signing secret may appear anywhere."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from test_webhooks_support import FAST_SCHEDULE, Receiver

from engine import CredentialEngine, Event, Venue, errors
from engine import logs as logsmod
from engine.testing import FakeVenue, settle

OWNER = "owner-canary"
CANARY_KEY = "CANARYKEY0123456789abcdefWEBHOOK"
CANARY_SECRET = "CANARYSECRET-9e8d7c6b5a4f3e2d1c0b"
CANARY_PASS = "CANARYPASS-z9y8x7w6"
CANARY_NEW_SECRET = "CANARYNEWSECRET-1a2b3c4d5e6f"


def forms(secret: str) -> list[str]:
    """A secret as text, and for whsec_ secrets also its base64 part and the raw key in hex and base64url."""
    found = [secret, secret.encode().hex(), base64.b64encode(secret.encode()).decode()]
    if secret.startswith("whsec_"):
        raw = base64.b64decode(secret.removeprefix("whsec_"))
        found += [
            secret.removeprefix("whsec_"),
            raw.hex(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
        ]
    return found


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if any(form in text for form in forms(s))]


async def database_text(eng: CredentialEngine) -> str:
    """Every row of every table, as text (bytea as hex)."""
    async with eng.db.connection() as conn:
        tables = await conn._conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        chunks: list[str] = []
        for t in tables:
            rows = await conn._conn.fetch(f'SELECT t::text AS r FROM "{t["table_name"]}" t')
            chunks.extend(r["r"] for r in rows)
    return "\n".join(chunks)


async def test_no_secret_reaches_bodies_records_events_logs_or_the_database(
    make_engine: Any, fake: FakeVenue
) -> None:
    """Webhook traffic with canary keys, failures, rotation, a 410 and retries leaks no secret anywhere."""
    out = io.StringIO()
    logsmod.configure_logging("DEBUG", json=True, stream=out)
    eng: CredentialEngine = await make_engine(
        allow_private_webhook_urls=True, webhook_retry_schedule=FAST_SCHEDULE[:3]
    )
    heard: list[Event] = []

    async def listener(event: Event) -> None:
        heard.append(event)

    eng.subscribe(listener)
    texts: list[str] = []
    async with Receiver(statuses=[500]) as rx, Receiver(statuses=[410]) as gone_rx:
        ep = await eng.add_webhook_endpoint(OWNER, rx.url, description="canary")
        gone = await eng.add_webhook_endpoint(OWNER, gone_rx.url)
        assert ep.secret is not None and gone.secret is not None
        rotated = await eng.rotate_webhook_secret(OWNER, ep.endpoint_id)
        secrets = [CANARY_SECRET, CANARY_PASS, CANARY_NEW_SECRET, CANARY_KEY, ep.secret, gone.secret, rotated]
        fake.add_key(CANARY_KEY, CANARY_SECRET, passphrase=CANARY_PASS, account_id="uid-c")
        fake.add_key("canary-new", CANARY_NEW_SECRET, passphrase=CANARY_PASS, account_id="uid-c")
        cred = await eng.create_credential(
            OWNER, venue=Venue.OKX, api_key=CANARY_KEY, api_secret=CANARY_SECRET, api_passphrase=CANARY_PASS
        )
        await settle(eng)
        await eng.rotate_credential(
            OWNER,
            cred.credential_id,
            api_key="canary-new",
            api_secret=CANARY_NEW_SECRET,
            api_passphrase=CANARY_PASS,
        )
        await settle(eng)
        await eng.revoke_credential(OWNER, cred.credential_id)
        rx.down = True
        await settle(eng)
        dead = (await eng.list_webhook_deliveries(OWNER, ep.endpoint_id, state="dead")).items
        assert dead, "no dead delivery: the retry path was not exercised"
        rx.down = False
        await eng.retry_webhook_delivery(OWNER, dead[0].delivery_id)
        await settle(eng)
        for call in (
            eng.add_webhook_endpoint(OWNER, "ftp://" + ep.secret),
            eng.add_webhook_endpoint(OWNER, rx.url, description=rotated + "\x00"),
            eng.rotate_webhook_secret("intruder", ep.endpoint_id),
        ):
            try:
                await call
            except errors.CredentialEngineError as exc:
                texts += [str(exc), repr(exc), repr(exc.args)]
        texts += [r.body.decode() + json.dumps(r.headers) for r in rx.requests + gone_rx.requests]
        assert len(rx.requests) >= 5 and gone_rx.requests
    page = await eng.list_webhook_deliveries(OWNER, limit=500)
    texts += [repr(page), json.dumps([d.public_dict() for d in page])]
    texts += [repr(e) for e in await eng.list_webhook_endpoints(OWNER)]
    texts += [repr(ep), json.dumps(ep.public_dict()), repr(eng.webhooks.metrics)]
    texts += [json.dumps(e.payload()) for e in heard]
    texts.append(await database_text(eng))
    texts.append(out.getvalue())
    assert any(e.type == "webhook_endpoint.disabled" for e in heard)
    assert "webhook_attempt" in out.getvalue(), (
        "the delivery path logged nothing: the test would prove nothing"
    )
    for text in texts:
        assert leaks(text, secrets) == [], text[:400]
