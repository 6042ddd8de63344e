"""Webhook endpoints (add, list, update, rotate, remove), the fan-out of events to them, and delivery records.

**Fan-out happens in the event's own transaction.** ``CredentialEngine._emit`` calls :meth:`WebhookService.
fan_out` right after ``events.record``, in the same transaction: the outbox row, one delivery row per enabled
endpoint of the owner that wants the event's type, and one queue job per delivery commit together or not at
all. No event can exist without its deliveries, and no delivery without its event. The alternative, a durable
cursor tailing the outbox, needs a persisted position per consumer, one leader among the engine processes,
and careful crash recovery (the place events get lost or doubled), and it leaves a window in which an event
has committed but has no deliveries yet. The price of doing it in the transaction is one ``INSERT ... SELECT``
per event (an index probe that finds nothing for owners without endpoints) plus one ``INSERT`` of jobs when
some endpoint matches. An endpoint receives the events committed after it was added.

Secrets are ``whsec_`` strings (:func:`engine.webhooks.signing.generate_secret`) sealed with the vault
(``Vault.wrap_blob``, purpose ``webhook-secret:<endpoint>:<version>``, so a ciphertext copied to another row
does not open). The plaintext is returned once, by :meth:`WebhookService.add` and
:meth:`WebhookService.rotate_secret`, and otherwise exists only in memory while an attempt is signed.
Rotation keeps the previous secrets signing for ``webhook_secret_grace`` seconds (Standard Webhooks receivers
accept any of several signatures), at most ``MAX_ACTIVE_SECRETS`` at a time; expired ones are destroyed (at the
next rotation of that endpoint, and by the hourly ``purge_jobs`` job for every endpoint).

Delivery attempts themselves live in :mod:`engine.webhooks.delivery`.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver

from engine import crypto, errors, events, quotas, validation
from engine import db as dbmod
from engine.models import Event, Page
from engine.webhooks import delivery as deliverymod
from engine.webhooks import guard, signing
from engine.webhooks.models import (
    DeliveryState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMetrics,
)

if TYPE_CHECKING:
    from engine.engine import CredentialEngine

log = structlog.get_logger("engine.webhooks")

MAX_ACTIVE_SECRETS = 5  # a receiver may be sent this many signatures at once
MAX_DESCRIPTION = 256
SECRET_PURPOSE = "webhook-secret"  # noqa: S105 - a vault purpose label, not a secret
CONNECTIONS = 100  # open connections of the webhook session, all endpoints together
CONNECTIONS_PER_HOST = 10


def secret_purpose(endpoint_id: uuid.UUID, version: int) -> str:
    """The vault purpose binding a sealed secret to its endpoint and version."""
    return f"{SECRET_PURPOSE}:{endpoint_id}:{version}"


def _sealed(row: dbmod.Record, prefix: str = "") -> crypto.Sealed:
    return crypto.Sealed(
        kek_version=int(row[prefix + "kek_version"]),
        wrapped_dek=bytes(row[prefix + "wrapped_dek"]),
        nonce=bytes(row[prefix + "nonce"]),
        ciphertext=bytes(row[prefix + "ciphertext"]),
    )


def event_types(value: Any, *, field: str = "eventTypes") -> tuple[str, ...] | None:
    """A type filter: None or empty means every type; otherwise known types, deduplicated and sorted."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Collection):
        raise errors.InvalidRequest(field, "must be a list of event types")
    types = set()
    for item in value:
        if not isinstance(item, str) or item not in events.EVENT_TYPES:
            raise errors.InvalidRequest(field, f"unknown event type {str(item)[:80]!r}")
        types.add(item)
    return tuple(sorted(types)) or None


def description(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.InvalidRequest("description", "must be a string")
    text = value.strip()
    if len(text) > MAX_DESCRIPTION:
        raise errors.InvalidRequest("description", f"must be at most {MAX_DESCRIPTION} characters")
    if any(ord(c) < 32 and c not in "\n\t" for c in text) or "\x7f" in text:
        raise errors.InvalidRequest("description", "must not contain control characters")
    return text or None


class WebhookService:
    """One engine's webhooks. Construction does no I/O; :meth:`start` opens the HTTP session, :meth:`close`
    closes it. ``resolver`` replaces the DNS lookups (tests); every answer still passes the SSRF guard."""

    def __init__(self, engine: CredentialEngine, *, resolver: AbstractResolver | None = None) -> None:
        self.engine = engine
        self.metrics = WebhookMetrics()
        self.resolver = resolver
        self.deliverer = deliverymod.Deliverer(self)
        self._guard: guard.GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def allow_private(self) -> bool:
        return self.engine.config.allow_private_webhook_urls

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._guard = guard.GuardedResolver(allow_private=self.allow_private, base=self.resolver)
        connector = aiohttp.TCPConnector(
            resolver=self._guard,
            use_dns_cache=False,  # every new connection resolves, and the guard sees every answer
            limit=CONNECTIONS,
            limit_per_host=CONNECTIONS_PER_HOST,
        )
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._guard is not None:
            await self._guard.close()
            self._guard = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise errors.EngineClosed("the engine is not open")
        return self._session

    @property
    def guard_resolver(self) -> AbstractResolver:
        """What creation-time checks resolve with: the injected resolver, or the guard's own lookups."""
        if self._guard is None:
            raise errors.EngineClosed("the engine is not open")
        return self._guard.base

    def handlers(self) -> dict[str, Any]:
        return {deliverymod.DELIVER: self.deliverer.run}

    def handler_timeouts(self) -> dict[str, float]:
        """A delivery job is one HTTP attempt (``webhook_timeout``) plus its guard's lookups and database work."""
        return {deliverymod.DELIVER: self.engine.config.webhook_timeout + deliverymod.JOB_MARGIN}

    # ---- endpoints -----------------------------------------------------------------------------------------

    async def add_endpoint(
        self,
        owner_id: str,
        url: str,
        types: Collection[str] | None = None,
        about: str | None = None,
    ) -> WebhookEndpoint:
        owner = validation.owner(owner_id)
        checked = await guard.check_url(url, allow_private=self.allow_private, resolver=self.guard_resolver)
        wanted = event_types(types)
        text = description(about)
        endpoint_id = uuid.uuid4()
        secret = signing.generate_secret()
        vault = self.engine.store.vault
        sealed = vault.wrap_blob(signing.secret_key(secret), purpose=secret_purpose(endpoint_id, 1))
        async with self.engine.db.transaction() as conn:
            # count and insert under the owner's lock: concurrent adds cannot pass the quota (engine/quotas.py)
            await quotas.check_webhook_endpoints(conn, owner, self.engine.config.quotas)
            row = await conn.fetchrow(
                "insert_webhook_endpoint", endpoint_id, owner, checked, text, list(wanted) if wanted else None
            )
            assert row is not None
            await conn.execute(
                "insert_webhook_secret", endpoint_id, 1, sealed.kek_version, sealed.wrapped_dek, sealed.nonce,
                sealed.ciphertext,
            )  # fmt: skip
        log.info("webhook_endpoint_added", endpoint_id=str(endpoint_id), owner_id=owner)
        return WebhookEndpoint.from_row(row, secret=secret)

    async def list_endpoints(self, owner_id: str) -> list[WebhookEndpoint]:
        rows = await self.engine.db.fetch("list_webhook_endpoints", validation.owner(owner_id))
        return [WebhookEndpoint.from_row(r) for r in rows]

    async def get_endpoint(self, owner_id: str, endpoint_id: uuid.UUID | str) -> WebhookEndpoint:
        row = await self.engine.db.fetchrow(
            "get_webhook_endpoint",
            validation.uuid_value(endpoint_id, "endpointId"),
            validation.owner(owner_id),
        )
        if row is None:
            raise errors.NotFound("no such webhook endpoint", field="endpointId")
        return WebhookEndpoint.from_row(row)

    async def remove_endpoint(self, owner_id: str, endpoint_id: uuid.UUID | str) -> None:
        """Delete the endpoint, its secrets (key material destroyed), deliveries and attempts."""
        eid = validation.uuid_value(endpoint_id, "endpointId")
        owner = validation.owner(owner_id)
        if await self.engine.db.fetchrow("delete_webhook_endpoint", eid, owner) is None:
            raise errors.NotFound("no such webhook endpoint", field="endpointId")
        log.info("webhook_endpoint_removed", endpoint_id=str(eid), owner_id=owner)

    async def update_endpoint(
        self,
        owner_id: str,
        endpoint_id: uuid.UUID | str,
        *,
        enabled: bool | None = None,
        types: Collection[str] | None = None,
        url: str | None = None,
    ) -> WebhookEndpoint:
        """Change what is given. ``types`` empty means every type; disabling marks pending deliveries dead."""
        owner = validation.owner(owner_id)
        eid = validation.uuid_value(endpoint_id, "endpointId")
        if enabled is not None and not isinstance(enabled, bool):
            raise errors.InvalidRequest("enabled", "must be true or false")
        checked = None
        if url is not None:
            checked = await guard.check_url(
                url, allow_private=self.allow_private, resolver=self.guard_resolver
            )
        wanted = event_types(types)
        async with self.engine.db.transaction() as conn:
            row = await conn.fetchrow(
                "update_webhook_endpoint", eid, owner, checked, types is not None,
                list(wanted) if wanted else None, enabled,
            )  # fmt: skip
            if row is None:
                raise errors.NotFound("no such webhook endpoint", field="endpointId")
            if not row["enabled"]:
                await conn.execute("kill_webhook_deliveries", eid, "endpoint disabled")
        log.info("webhook_endpoint_updated", endpoint_id=str(eid), enabled=row["enabled"])
        return WebhookEndpoint.from_row(row)

    async def rotate_secret(self, owner_id: str, endpoint_id: uuid.UUID | str) -> str:
        """A new current secret (returned, once); the previous ones keep signing for the grace period."""
        owner = validation.owner(owner_id)
        eid = validation.uuid_value(endpoint_id, "endpointId")
        secret = signing.generate_secret()
        async with self.engine.db.transaction() as conn:
            if await conn.fetchrow("lock_webhook_endpoint", eid, owner) is None:
                raise errors.NotFound("no such webhook endpoint", field="endpointId")
            version = int(await conn.fetchval("next_webhook_secret_version", eid))
            sealed = self.engine.store.vault.wrap_blob(
                signing.secret_key(secret), purpose=secret_purpose(eid, version)
            )
            await conn.execute("retire_webhook_secrets", eid, float(self.engine.config.webhook_secret_grace))
            await conn.execute(
                "insert_webhook_secret", eid, version, sealed.kek_version, sealed.wrapped_dek, sealed.nonce,
                sealed.ciphertext,
            )  # fmt: skip
            await conn.execute("prune_webhook_secrets", eid, MAX_ACTIVE_SECRETS)
        log.info("webhook_secret_rotated", endpoint_id=str(eid), version=version)
        return secret

    async def purge_expired_secrets(self) -> int:
        """Destroy every secret past its grace period, of every endpoint (the hourly purge); returns how many.

        Rotation prunes the endpoint it rotates; this covers the endpoints never rotated again."""
        purged = int(await self.engine.db.fetchval("purge_expired_webhook_secrets"))
        if purged:
            log.info("webhook_secrets_purged", purged=purged)
        return purged

    def open_secrets(self, endpoint_id: uuid.UUID, row: dbmod.Record) -> list[bytes]:
        """The active HMAC keys of an endpoint from ``webhook_delivery_for_attempt``'s arrays, newest first."""
        vault = self.engine.store.vault
        keys = []
        for version, kek, wrapped, nonce, ciphertext in zip(
            row["secret_versions"] or (),
            row["secret_kek_versions"] or (),
            row["secret_wrapped_deks"] or (),
            row["secret_nonces"] or (),
            row["secret_ciphertexts"] or (),
            strict=True,
        ):
            sealed = crypto.Sealed(
                kek_version=int(kek),
                wrapped_dek=bytes(wrapped),
                nonce=bytes(nonce),
                ciphertext=bytes(ciphertext),
            )
            keys.append(vault.unwrap_blob(sealed, purpose=secret_purpose(endpoint_id, int(version))))
        return keys

    # ---- fan-out -------------------------------------------------------------------------------------------

    async def fan_out(self, conn: dbmod.Conn, event: Event) -> int:
        """Inside the event's transaction: one delivery per endpoint that wants ``event``, and a job for each
        one that is not behind an earlier undelivered event of the same credential (that one waits, parked).

        The stream locks taken here (released at commit) keep a concurrent end of the earlier delivery from
        missing the new waiting one; the key-share locks keep the endpoints from being removed meanwhile."""
        targets = await conn.fetch("webhook_fan_out_targets", event.owner_id, event.type, event.credential_id)
        if not targets:
            return 0  # the common case: one index probe, nothing else
        rows = await conn.fetch(
            "fan_out_event", event.event_id, event.owner_id, event.type, event.credential_id, event.sequence,
            [t["id"] for t in targets],
        )  # fmt: skip
        payloads = [
            deliverymod.job_payload(r["id"], r["endpoint_id"], r["credential_id"])
            for r in rows
            if r["state"] == "pending"
        ]
        if payloads:  # a waiting delivery gets its job when the earlier one ends
            await self.engine.queue.enqueue_many(
                deliverymod.DELIVER, payloads, conn=conn, fair_key=event.owner_id
            )
        self.metrics.fanned_out += len(rows)
        for row in rows:
            if row["state"] == "waiting":
                self.metrics.count(row["endpoint_id"], "parked")
        return len(rows)

    # ---- deliveries ----------------------------------------------------------------------------------------

    async def list_deliveries(
        self,
        owner_id: str,
        endpoint_id: uuid.UUID | str | None = None,
        *,
        state: DeliveryState | str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[WebhookDelivery]:
        """Deliveries, newest first, each with every attempt (status code, latency, error)."""
        owner = validation.owner(owner_id)
        offset, limit = validation.page(offset, limit)
        eid = None
        if endpoint_id is not None:
            eid = (await self.get_endpoint(owner, endpoint_id)).endpoint_id
        wanted = _state(state)
        db = self.engine.db
        rows = await db.fetch("list_webhook_deliveries", owner, eid, wanted, limit, offset)
        total = int(await db.fetchval("count_webhook_deliveries", owner, eid, wanted))
        attempts = await self._attempts([r["id"] for r in rows])
        items = [WebhookDelivery.from_row(r, attempts.get(r["id"], ())) for r in rows]
        return Page(items=items, offset=offset, limit=limit, total=total)

    async def get_delivery(self, owner_id: str, delivery_id: uuid.UUID | str) -> WebhookDelivery:
        owner = validation.owner(owner_id)
        did = validation.uuid_value(delivery_id, "deliveryId")
        row = await self.engine.db.fetchrow("get_webhook_delivery", did, owner)
        if row is None:
            raise errors.NotFound("no such webhook delivery", field="deliveryId")
        attempts = await self._attempts([did])
        return WebhookDelivery.from_row(row, attempts.get(did, ()))

    async def _attempts(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[WebhookAttempt, ...]]:
        if not ids:
            return {}
        found: dict[uuid.UUID, list[WebhookAttempt]] = {}
        for row in await self.engine.db.fetch("webhook_attempts_of", list(ids)):
            found.setdefault(row["delivery_id"], []).append(WebhookAttempt.from_row(row))
        return {k: tuple(v) for k, v in found.items()}

    async def retry_delivery(self, owner_id: str, delivery_id: uuid.UUID | str) -> WebhookDelivery:
        """Send a dead delivery again (the retry schedule starts over). Its endpoint must be enabled."""
        owner = validation.owner(owner_id)
        did = validation.uuid_value(delivery_id, "deliveryId")
        current = await self.get_delivery(owner, did)
        if current.state is not DeliveryState.DEAD:
            raise errors.Conflict(
                f"only a dead delivery can be retried (this one is {current.state})", field="deliveryId"
            )
        endpoint = await self.get_endpoint(owner, current.endpoint_id)
        if not endpoint.enabled:
            raise errors.Conflict("the endpoint is disabled; enable it first", field="endpointId")
        async with self.engine.db.transaction() as conn:
            row = await conn.fetchrow("revive_webhook_delivery", did, owner)
            if row is None:
                raise errors.Conflict("only a dead delivery can be retried", field="deliveryId")
            await self.deliverer.enqueue(conn, row["id"], row["endpoint_id"], row["credential_id"])
        log.info("webhook_delivery_retried", delivery_id=str(did))
        return await self.get_delivery(owner, did)

    # ---- automatic disabling -------------------------------------------------------------------------------

    async def disable(self, conn: dbmod.Conn, endpoint_id: uuid.UUID, reason: str) -> WebhookEndpoint | None:
        """Inside ``conn``: disable the endpoint (GONE, FAILING), kill its pending deliveries and emit
        ``webhook_endpoint.disabled`` (fanned out to the owner's other endpoints). None if already disabled."""
        row = await conn.fetchrow("disable_webhook_endpoint", endpoint_id, reason)
        if row is None:
            return None
        endpoint = WebhookEndpoint.from_row(row)
        await conn.execute("kill_webhook_deliveries", endpoint_id, f"endpoint disabled ({reason})")
        recorded = await events.record(
            conn,
            type="webhook_endpoint.disabled",
            owner_id=endpoint.owner_id,
            credential_id=None,
            sequence=int(row["event_seq"]),
            data={"endpoint": endpoint.event_dict(), "reason": reason},
        )
        if recorded.webhooks_wanted:
            await self.fan_out(conn, recorded.event)
        self.metrics.count(endpoint_id, "disabled")
        log.warning("webhook_endpoint_disabled", endpoint_id=str(endpoint_id), reason=reason)
        return endpoint


def _state(value: DeliveryState | str | None) -> str | None:
    if value is None:  # "" is refused below like any unknown state, never read as "every state"
        return None
    try:
        return DeliveryState(str(value).strip().lower()).value
    except ValueError:
        raise errors.InvalidRequest("state", "must be pending, waiting, delivered or dead") from None
