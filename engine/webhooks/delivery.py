"""Webhook delivery: one queue job per attempt of one delivery (one event to one endpoint).

A job (kind ``webhook_delivery``) makes one HTTP attempt and then, in one transaction, records it, marks
itself done (``queue.complete_in``, fenced) and enqueues what follows: the next attempt (delayed by the retry
schedule), or the next parked event of the same credential. A worker that dies mid-attempt leaves its job
leased; the lease expires, another worker takes the job and makes the same attempt again, with the same
``webhook-id`` (the event id), so receivers dedupe it. The job's payload is a :class:`DeliveryJob`; its dedupe
key (``webhook:<delivery>``) keeps one queued attempt per delivery.

Answers: 2xx delivered; 410 Gone disables the endpoint at once; anything else, a timeout
(``webhook_timeout``, 15 s) or a refused address is a failure, retried after the next delay of
``webhook_retry_schedule`` (immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight attempts), with
+-10 % jitter, and no sooner than the receiver's ``Retry-After``. A delivery whose attempts are exhausted is
dead (``retry_webhook_delivery`` revives it). An endpoint whose attempts have all failed for
``webhook_disable_after`` (5 days) is disabled. Both automatic disables emit ``webhook_endpoint.disabled`` and
mark the endpoint's pending deliveries dead. Redirects are not followed (a 3xx is a failure); at most
``MAX_RESPONSE_BYTES`` of a response are read; connections go only to addresses the SSRF guard checked.

**Order per credential.** The events of one credential reach one endpoint in sequence order: an attempt of
event n+1 is made only when no earlier event of that credential to that endpoint is still undelivered
(pending or waiting). Otherwise the delivery is parked (``waiting``, no job). When a delivery ends (delivered
or dead), the earliest waiting delivery of its (endpoint, credential) stream is woken, in the same
transaction. A dead delivery therefore does not block its successors forever: the receiver sees the gap in
``sequence``, and a manual retry delivers that event late (and holds back the stream's undelivered events
behind it again). Parking and waking run under a per-stream advisory lock, so no wake-up is lost.
Events without a credential (``webhook_endpoint.disabled``) are not ordered.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp
import structlog

from engine import crypto, errors
from engine import db as dbmod
from engine import queue as queuemod
from engine.models import Event
from engine.outbox import Outbox
from engine.webhooks import guard, secrets, signing
from engine.webhooks.models import WebhookEndpoint, WebhookMetrics, WebhookSettings

log = structlog.get_logger("engine.webhooks")

DELIVER = "webhook_delivery"
MAX_RESPONSE_BYTES = 64 * 1024  # read (and thrown away) per response; a longer body closes the connection
MAX_RETRY_AFTER = 86_400.0  # a receiver's Retry-After is honoured up to one day
JITTER = 0.1  # each retry delay is multiplied by a random factor in [1 - JITTER, 1 + JITTER]
ERROR_MAX = 500  # characters of an attempt's error kept
USER_AGENT = "credential-engine-webhooks/1"
JOB_MARGIN = 30.0  # seconds a delivery job gets on top of webhook_timeout (DNS checks, database work)

DELIVERED, FAILED, GONE, REFUSED = "delivered", "failed", "gone", "refused"


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """The next attempt of delivery ``delivery_id`` to ``endpoint_id``; ``stream_id`` is the event's credential
    (the delivery stream it is ordered in), None for events without one."""

    KIND: ClassVar[str] = DELIVER
    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    stream_id: uuid.UUID | None

    @property
    def dedupe_key(self) -> str | None:
        return f"webhook:{self.delivery_id}"

    def to_payload(self) -> dict[str, Any]:
        return {
            "deliveryId": str(self.delivery_id),
            "endpointId": str(self.endpoint_id),
            "streamId": str(self.stream_id) if self.stream_id is not None else None,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> DeliveryJob:
        stream = payload.get("streamId")
        return cls(
            uuid.UUID(str(payload["deliveryId"])),
            uuid.UUID(str(payload["endpointId"])),
            uuid.UUID(str(stream)) if stream is not None else None,
        )


async def enqueue_attempt(
    queue: queuemod.JobQueue, conn: dbmod.Conn, job: DeliveryJob, *, delay: float = 0.0
) -> None:
    """The job of a delivery's next attempt, inside ``conn``'s transaction."""
    await queue.enqueue(job.KIND, job.to_payload(), conn=conn, delay=delay, dedupe_key=job.dedupe_key)


@dataclass(frozen=True, slots=True)
class Answer:
    """How one attempt went."""

    outcome: str  # delivered, failed, gone, refused
    status: int | None
    latency_ms: float
    error: str | None
    retry_after: float | None = None


def retry_delay(
    schedule: tuple[float, ...], tries: int, retry_after: float | None, rng: random.Random | None = None
) -> float:
    """Seconds before the next attempt after ``tries`` failed ones (1-based) of this round: the schedule's next
    delay with jitter, and no sooner than ``retry_after`` (capped at a day)."""
    base = schedule[min(tries, len(schedule) - 1)]
    delay = base * (rng or random).uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def event_of(row: dbmod.Record) -> Event:
    """The event of a ``webhook_delivery_for_attempt`` row."""
    created: datetime = row["event_created_at"]
    return Event(
        event_id=row["event_id"],
        type=row["event_type"],
        owner_id=row["event_owner_id"],
        credential_id=row["event_credential_id"],
        sequence=int(row["event_sequence"]),
        timestamp_ms=int(created.timestamp() * 1000),
        data=row["event_data"],
    )


def body_of(event: Event) -> bytes:
    """The request body: ``Event.payload()`` as compact UTF-8 JSON (the same bytes on every attempt)."""
    return json.dumps(event.payload(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Deliverer:
    """The ``webhook_delivery`` job handler: built from the database, the queue, the outbox (for
    ``webhook_endpoint.disabled``), the vault (to open signing secrets), the webhook HTTP session, the counters
    and the settings."""

    def __init__(
        self,
        *,
        db: dbmod.Database,
        queue: queuemod.JobQueue,
        outbox: Outbox,
        vault: crypto.Vault,
        session: Callable[[], aiohttp.ClientSession],
        metrics: WebhookMetrics,
        settings: WebhookSettings,
    ) -> None:
        self._db = db
        self._queue = queue
        self._outbox = outbox
        self._vault = vault
        self._session = session
        self._metrics = metrics
        self._settings = settings
        self._rng = random.Random()

    @property
    def timeout(self) -> float:
        """The job's time limit: one HTTP attempt plus the guard's lookups and the database work."""
        return self._settings.timeout + JOB_MARGIN

    async def run(self, job: queuemod.Job) -> None:
        delivery_id = DeliveryJob.from_payload(job.payload).delivery_id
        db = self._db
        row = await db.fetchrow("webhook_delivery_for_attempt", delivery_id)
        if row is None or row["state"] != "pending":
            return  # removed, delivered, dead or parked meanwhile: nothing to do
        if not row["enabled"]:  # disabled after this delivery was created
            await db.execute("kill_webhook_delivery", delivery_id, "endpoint disabled")
            return
        if row["blocked"]:
            row = await self._park_or_go(job, row)
            if row is None:
                return
        answer = await self._attempt(row)
        await self._settle(job, row, answer)

    async def _park_or_go(self, job: queuemod.Job, seen: dbmod.Record) -> dbmod.Record | None:
        """Under the stream lock: park behind the earlier undelivered event, or go on if it has ended since."""
        delivery_id: uuid.UUID = seen["id"]
        async with self._db.transaction() as conn:
            await conn.fetchval("lock_webhook_stream", str(seen["endpoint_id"]), str(seen["credential_id"]))
            row = await conn.fetchrow("webhook_delivery_for_attempt", delivery_id)
            if row is None or row["state"] != "pending":
                return None
            if not row["blocked"]:
                return row
            await conn.fetchrow("park_webhook_delivery", delivery_id)
            await self._queue.complete_in(conn, job)
        self._metrics.count(row["endpoint_id"], "parked")
        return None

    async def _attempt(self, row: dbmod.Record) -> Answer:
        """One signed POST. Never raises for what the receiver or the network does."""
        cfg = self._settings
        event = event_of(row)
        body = body_of(event)
        try:
            target = guard.parse_url(row["url"], allow_private=cfg.allow_private)
        except errors.InvalidRequest as exc:
            return Answer(REFUSED, None, 0.0, f"refused: the URL {exc.reason}")
        if target.is_ip and not cfg.allow_private:
            why = guard.refusal(target.host, [target.host])
            if why is not None:
                return Answer(REFUSED, None, 0.0, f"refused: {why}")
        keys = secrets.open_all(self._vault, row["endpoint_id"], row)
        msg_id = str(event.event_id)
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signing.signature_header(keys, msg_id, timestamp, body),
        }
        started = time.monotonic()
        try:
            async with self._session().post(
                target.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=cfg.timeout),
            ) as response:
                await _read_capped(response)
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except guard.AddressRefused as exc:
            return Answer(REFUSED, None, _ms_since(started), f"refused: {exc}"[:ERROR_MAX])
        except TimeoutError:
            return Answer(FAILED, None, _ms_since(started), f"timeout after {cfg.timeout:g}s")
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            return Answer(FAILED, None, _ms_since(started), f"connect failed: {reason}"[:ERROR_MAX])
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(FAILED, None, _ms_since(started), f"request failed: {type(exc).__name__}")
        latency = _ms_since(started)
        if 200 <= status < 300:
            return Answer(DELIVERED, status, latency, None)
        if status == 410:
            return Answer(GONE, status, latency, "HTTP 410 Gone: the endpoint is disabled")
        return Answer(FAILED, status, latency, f"HTTP {status}", retry_after)

    async def _settle(self, job: queuemod.Job, row: dbmod.Record, answer: Answer) -> None:
        """Record the attempt and decide what follows, in one transaction (lock order: stream, endpoint, rows)."""
        cfg = self._settings
        metrics = self._metrics
        endpoint_id: uuid.UUID = row["endpoint_id"]
        credential_id: uuid.UUID | None = row["credential_id"]
        delivery_id: uuid.UUID = row["id"]
        attempt = int(row["attempts"]) + 1
        tries = attempt - int(row["retry_base"])
        schedule = tuple(cfg.retry_schedule)
        metrics.count(endpoint_id, answer.outcome)
        metrics.observe(answer.latency_ms / 1000)
        next_delay: float | None = None
        async with self._db.transaction() as conn:
            if credential_id is not None:
                await conn.fetchval("lock_webhook_stream", str(endpoint_id), str(credential_id))
            disable: str | None = None
            if answer.outcome == DELIVERED:
                await conn.execute("webhook_endpoint_succeeded", endpoint_id)
                state = "delivered"
            else:
                clock = await conn.fetchrow("webhook_endpoint_failed", endpoint_id, float(cfg.disable_after))
                if clock is not None and answer.outcome == GONE:
                    disable = "GONE"
                elif clock is not None and clock["overdue"]:
                    disable = "FAILING"
                if disable is not None or tries >= len(schedule):
                    state = "dead"
                else:
                    state = "pending"
                    next_delay = retry_delay(schedule, tries, answer.retry_after, self._rng)
            recorded = await conn.fetchrow(
                "record_webhook_attempt", delivery_id, attempt, answer.outcome, answer.status, answer.latency_ms,
                answer.error, state, next_delay,
            )  # fmt: skip
            await self._queue.complete_in(conn, job)
            if recorded is None:
                return  # the delivery ended meanwhile (endpoint disabled or removed)
            if disable is not None:
                await self._disable(conn, endpoint_id, disable)
            elif next_delay is not None:
                retry = DeliveryJob(delivery_id, endpoint_id, credential_id)
                await enqueue_attempt(self._queue, conn, retry, delay=next_delay)
            elif credential_id is not None:
                woken = await conn.fetchrow("wake_next_webhook_delivery", endpoint_id, credential_id)
                if woken is not None:
                    await enqueue_attempt(
                        self._queue, conn, DeliveryJob(woken["id"], endpoint_id, credential_id)
                    )
        if disable is not None:
            self._outbox.committed()  # webhook_endpoint.disabled committed: tell this process's listeners now
        if state == "dead":
            metrics.count(endpoint_id, "dead")
        log.log(
            20 if answer.outcome != DELIVERED else 10,
            "webhook_attempt",
            delivery_id=str(delivery_id),
            endpoint_id=str(endpoint_id),
            event_type=row["event_type"],
            attempt=attempt,
            outcome=answer.outcome,
            status=answer.status,
            latency_ms=round(answer.latency_ms, 1),
            error=answer.error,
            state=state,
            next_attempt_in=None if next_delay is None else round(next_delay, 3),
        )

    async def _disable(self, conn: dbmod.Conn, endpoint_id: uuid.UUID, reason: str) -> WebhookEndpoint | None:
        """Inside ``conn``: disable the endpoint (GONE, FAILING), kill its pending deliveries and emit
        ``webhook_endpoint.disabled`` (fanned out to the owner's other endpoints). None if already disabled."""
        row = await conn.fetchrow("disable_webhook_endpoint", endpoint_id, reason)
        if row is None:
            return None
        endpoint = WebhookEndpoint.from_row(row)
        await conn.execute("kill_webhook_deliveries", endpoint_id, f"endpoint disabled ({reason})")
        await self._outbox.record(
            conn,
            type="webhook_endpoint.disabled",
            owner_id=endpoint.owner_id,
            credential_id=None,
            sequence=int(row["event_seq"]),
            data={"endpoint": endpoint.event_dict(), "reason": reason},
        )
        self._metrics.count(endpoint_id, "disabled")
        log.warning("webhook_endpoint_disabled", endpoint_id=str(endpoint_id), reason=reason)
        return endpoint


async def _read_capped(response: aiohttp.ClientResponse) -> None:
    remaining = MAX_RESPONSE_BYTES
    while remaining > 0:
        chunk = await response.content.read(min(remaining, 16 * 1024))
        if not chunk:
            return
        remaining -= len(chunk)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000
