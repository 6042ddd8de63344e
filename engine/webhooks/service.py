"""Webhook endpoints (add, list, update, rotate, remove), their secrets, and delivery records.

The service is built from the parts it uses: the webhook settings and a resolver at construction (no I/O),
then, when the engine opens, the database, the vault, the queue and the outbox (:meth:`WebhookService.open`,
which also opens the webhook HTTP session and builds the :class:`~engine.webhooks.delivery.Deliverer`). The
fan-out of events to deliveries is :class:`engine.webhooks.fanout.FanOut`, called by the outbox in each
event's transaction; the attempts themselves are :mod:`engine.webhooks.delivery`.

Secrets (:mod:`engine.webhooks.secrets`) are returned once, by :meth:`WebhookService.add_endpoint` and
:meth:`WebhookService.rotate_secret`. Rotation keeps the previous secrets signing for the grace period
(Standard Webhooks receivers accept any of several signatures), at most ``MAX_ACTIVE_SECRETS`` at a time;
expired ones are destroyed (at the next rotation of that endpoint, and by the hourly ``purge_jobs`` job for
every endpoint).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Any

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver

from engine import crypto, errors, events, validation
from engine import db as dbmod
from engine.bounds import quotas
from engine.models import Page
from engine.outbox import Outbox
from engine.queue import JobQueue
from engine.webhooks import delivery as deliverymod
from engine.webhooks import guard, secrets, signing
from engine.webhooks.models import (
    DeliveryState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookMetrics,
    WebhookSettings,
)

log = structlog.get_logger("engine.webhooks")

MAX_ACTIVE_SECRETS = 5  # a receiver may be sent this many signatures at once
MAX_DESCRIPTION = 256
CONNECTIONS = 100  # open connections of the webhook session, all endpoints together
CONNECTIONS_PER_HOST = 10


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
    """Webhook endpoints and deliveries. Construction does no I/O; :meth:`open` takes the parts and opens the
    HTTP session, :meth:`close` closes it. ``resolver`` replaces the DNS lookups (tests); every answer still
    passes the SSRF guard."""

    def __init__(self, settings: WebhookSettings, *, resolver: AbstractResolver | None = None) -> None:
        self.settings = settings
        self.metrics = WebhookMetrics()
        self.resolver = resolver
        self._parts: tuple[dbmod.Database, crypto.Vault, JobQueue] | None = None
        self._deliverer: deliverymod.Deliverer | None = None
        self._guard: guard.GuardedResolver | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def allow_private(self) -> bool:
        return self.settings.allow_private

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def open(self, *, db: dbmod.Database, vault: crypto.Vault, queue: JobQueue, outbox: Outbox) -> None:
        """Take the parts, open the HTTP session (through the SSRF guard) and build the deliverer."""
        self._guard = guard.GuardedResolver(allow_private=self.allow_private, base=self.resolver)
        connector = aiohttp.TCPConnector(
            resolver=self._guard,
            use_dns_cache=False,  # every new connection resolves, and the guard sees every answer
            limit=CONNECTIONS,
            limit_per_host=CONNECTIONS_PER_HOST,
        )
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False)
        self._parts = (db, vault, queue)
        self._deliverer = deliverymod.Deliverer(
            db=db,
            queue=queue,
            outbox=outbox,
            vault=vault,
            session=lambda: self.session,
            metrics=self.metrics,
            settings=self.settings,
        )

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
    def deliverer(self) -> deliverymod.Deliverer:
        """The ``webhook_delivery`` job handler (``deliverer.run``, time limit ``deliverer.timeout``)."""
        if self._deliverer is None:
            raise errors.EngineClosed("the engine is not open")
        return self._deliverer

    def _open_parts(self) -> tuple[dbmod.Database, crypto.Vault, JobQueue]:
        if self._parts is None:
            raise errors.EngineClosed("the engine is not open")
        return self._parts

    @property
    def guard_resolver(self) -> AbstractResolver:
        """What creation-time checks resolve with: the injected resolver, or the guard's own lookups."""
        if self._guard is None:
            raise errors.EngineClosed("the engine is not open")
        return self._guard.base

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
        db, vault, _ = self._open_parts()
        sealed = secrets.seal(vault, endpoint_id, 1, secret)
        async with db.transaction() as conn:
            # count and insert under the owner's lock: concurrent adds cannot pass the quota (engine/bounds/quotas.py)
            await quotas.check_webhook_endpoints(conn, owner, self.settings.quotas)
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
        db, _, _ = self._open_parts()
        rows = await db.fetch("list_webhook_endpoints", validation.owner(owner_id))
        return [WebhookEndpoint.from_row(r) for r in rows]

    async def get_endpoint(self, owner_id: str, endpoint_id: uuid.UUID | str) -> WebhookEndpoint:
        db, _, _ = self._open_parts()
        row = await db.fetchrow(
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
        db, _, _ = self._open_parts()
        if await db.fetchrow("delete_webhook_endpoint", eid, owner) is None:
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
        db, _, _ = self._open_parts()
        async with db.transaction() as conn:
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
        db, vault, _ = self._open_parts()
        async with db.transaction() as conn:
            if await conn.fetchrow("lock_webhook_endpoint", eid, owner) is None:
                raise errors.NotFound("no such webhook endpoint", field="endpointId")
            version = int(await conn.fetchval("next_webhook_secret_version", eid))
            sealed = secrets.seal(vault, eid, version, secret)
            await conn.execute("retire_webhook_secrets", eid, float(self.settings.secret_grace))
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
        db, _, _ = self._open_parts()
        purged = int(await db.fetchval("purge_expired_webhook_secrets"))
        if purged:
            log.info("webhook_secrets_purged", purged=purged)
        return purged

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
        db, _, _ = self._open_parts()
        rows = await db.fetch("list_webhook_deliveries", owner, eid, wanted, limit, offset)
        total = int(await db.fetchval("count_webhook_deliveries", owner, eid, wanted))
        attempts = await self._attempts([r["id"] for r in rows])
        items = [WebhookDelivery.from_row(r, attempts.get(r["id"], ())) for r in rows]
        return Page(items=items, offset=offset, limit=limit, total=total)

    async def get_delivery(self, owner_id: str, delivery_id: uuid.UUID | str) -> WebhookDelivery:
        owner = validation.owner(owner_id)
        did = validation.uuid_value(delivery_id, "deliveryId")
        db, _, _ = self._open_parts()
        row = await db.fetchrow("get_webhook_delivery", did, owner)
        if row is None:
            raise errors.NotFound("no such webhook delivery", field="deliveryId")
        attempts = await self._attempts([did])
        return WebhookDelivery.from_row(row, attempts.get(did, ()))

    async def _attempts(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[WebhookAttempt, ...]]:
        if not ids:
            return {}
        found: dict[uuid.UUID, list[WebhookAttempt]] = {}
        db, _, _ = self._open_parts()
        for row in await db.fetch("webhook_attempts_of", list(ids)):
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
        db, _, queue = self._open_parts()
        async with db.transaction() as conn:
            row = await conn.fetchrow("revive_webhook_delivery", did, owner)
            if row is None:
                raise errors.Conflict("only a dead delivery can be retried", field="deliveryId")
            job = deliverymod.DeliveryJob(row["id"], row["endpoint_id"], row["credential_id"])
            await deliverymod.enqueue_attempt(queue, conn, job)
        log.info("webhook_delivery_retried", delivery_id=str(did))
        return await self.get_delivery(owner, did)


def _state(value: DeliveryState | str | None) -> str | None:
    if value is None:  # "" is refused below like any unknown state, never read as "every state"
        return None
    try:
        return DeliveryState(str(value).strip().lower()).value
    except ValueError:
        raise errors.InvalidRequest("state", "must be pending, waiting, delivered or dead") from None
