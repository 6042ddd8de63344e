"""The fan-out of one event to webhook deliveries, inside the event's transaction (:class:`engine.outbox.Outbox`
calls it right after writing the event).

The outbox row, one delivery row per enabled endpoint of the owner that wants the event's type, and one queue
job per delivery that may go now commit together or not at all: no event exists without its deliveries, and
no delivery without its event. The alternative, a durable cursor tailing the outbox, needs a persisted
position per consumer, one leader among the engine processes, and careful crash recovery (the place events
get lost or doubled), and it leaves a window in which an event has committed but has no deliveries yet. The
price of doing it in the transaction is one ``INSERT ... SELECT`` per event wanted by some endpoint (the
outbox insert says whether any is) plus one ``INSERT`` of jobs. An endpoint receives the events committed
after it was added.
"""

from __future__ import annotations

from engine import db as dbmod
from engine.models import Event
from engine.queue import JobQueue
from engine.webhooks.delivery import DELIVER, DeliveryJob
from engine.webhooks.models import WebhookMetrics


class FanOut:
    """Turns an event into deliveries and their jobs, on ``queue``; counts them in ``metrics``."""

    def __init__(self, queue: JobQueue, metrics: WebhookMetrics) -> None:
        self._queue = queue
        self._metrics = metrics

    async def __call__(self, conn: dbmod.Conn, event: Event) -> int:
        """Inside the event's transaction: one delivery per endpoint that wants ``event``, and a job for each
        one that is not behind an earlier undelivered event of the same credential (that one waits, parked).

        The stream locks taken here (released at commit) keep a concurrent end of the earlier delivery from
        missing the new waiting one; the key-share locks keep the endpoints from being removed meanwhile."""
        targets = await conn.fetch("webhook_fan_out_targets", event.owner_id, event.type, event.credential_id)
        if not targets:
            return 0
        rows = await conn.fetch(
            "fan_out_event", event.event_id, event.owner_id, event.type, event.credential_id, event.sequence,
            [t["id"] for t in targets],
        )  # fmt: skip
        payloads = [
            DeliveryJob(r["id"], r["endpoint_id"], r["credential_id"]).to_payload()
            for r in rows
            if r["state"] == "pending"
        ]
        if payloads:  # a waiting delivery gets its job when the earlier one ends
            await self._queue.enqueue_many(DELIVER, payloads, conn=conn, fair_key=event.owner_id)
        self._metrics.fanned_out += len(rows)
        for row in rows:
            if row["state"] == "waiting":
                self._metrics.count(row["endpoint_id"], "parked")
        return len(rows)
