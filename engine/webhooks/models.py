"""Webhook value types: endpoints, deliveries and their attempts (frozen, built from rows), and the counters.

None of them shows a signing secret: :attr:`WebhookEndpoint.secret` is set only on the object
``add_webhook_endpoint`` returns (the one time the secret is shown) and is left out of ``repr``, equality
and :meth:`WebhookEndpoint.public_dict`.
"""

from __future__ import annotations

import enum
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from engine.config import Quotas

Record = Mapping[str, Any]  # a database row (engine.db.Record), without importing the driver here

__all__ = [
    "DeliveryState",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookMetrics",
    "WebhookSettings",
    "display_url",
]


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """The settings the webhook parts use (from ``EngineConfig``: ``allow_private_webhook_urls``,
    ``webhook_timeout``, ``webhook_retry_schedule``, ``webhook_disable_after``, ``webhook_secret_grace``, and
    the owners' quotas)."""

    quotas: Quotas
    allow_private: bool = False
    timeout: float = 15.0
    retry_schedule: tuple[float, ...] = (0.0,)
    disable_after: float = 5 * 86400.0
    secret_grace: float = 86400.0


class DeliveryState(enum.StrEnum):
    """Where a delivery is. ``waiting``: behind an earlier undelivered event of the same credential."""

    PENDING = "pending"
    WAITING = "waiting"
    DELIVERED = "delivered"
    DEAD = "dead"


def _ms(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


def display_url(url: str) -> str:
    """The URL without query, fragment or user info: what logs and events may show (a query can hold a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """A receiver of an owner's events. ``event_types`` None means every type."""

    endpoint_id: uuid.UUID
    owner_id: str
    url: str
    description: str | None
    event_types: tuple[str, ...] | None
    enabled: bool
    disabled_reason: str | None  # MANUAL, GONE (the receiver answered 410), FAILING (failed for days)
    failing_since_ms: int | None
    created_at_ms: int
    updated_at_ms: int
    # the signing secret, only on the object add_webhook_endpoint returns; never in repr or public_dict
    secret: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_row(cls, row: Record, *, secret: str | None = None) -> WebhookEndpoint:
        types = row["event_types"]
        return cls(
            endpoint_id=row["id"],
            owner_id=row["owner_id"],
            url=row["url"],
            description=row["description"],
            event_types=tuple(types) if types is not None else None,
            enabled=bool(row["enabled"]),
            disabled_reason=row["disabled_reason"],
            failing_since_ms=_ms(row["failing_since"]),
            created_at_ms=_ms(row["created_at"]) or 0,
            updated_at_ms=_ms(row["updated_at"]) or 0,
            secret=secret,
        )

    def public_dict(self) -> dict[str, Any]:
        """camelCase, ms timestamps; no secret."""
        return {
            "endpointId": str(self.endpoint_id),
            "userId": self.owner_id,
            "url": self.url,
            "description": self.description,
            "eventTypes": list(self.event_types) if self.event_types is not None else None,
            "enabled": self.enabled,
            "disabledReason": self.disabled_reason,
            "failingSince": self.failing_since_ms,
            "createdAt": self.created_at_ms,
            "updatedAt": self.updated_at_ms,
        }

    def event_dict(self) -> dict[str, Any]:
        """What events carry about the endpoint: :meth:`public_dict` with the URL cut to scheme, host and path."""
        return {**self.public_dict(), "url": display_url(self.url)}


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """One HTTP attempt. ``outcome``: delivered (2xx), failed, gone (410), refused (the SSRF guard said no)."""

    attempt: int
    outcome: str
    status_code: int | None
    latency_ms: float
    error: str | None
    at_ms: int

    @classmethod
    def from_row(cls, row: Record) -> WebhookAttempt:
        return cls(
            attempt=int(row["attempt"]),
            outcome=row["outcome"],
            status_code=row["status_code"],
            latency_ms=float(row["latency_ms"]),
            error=row["error"],
            at_ms=_ms(row["created_at"]) or 0,
        )

    def public_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "outcome": self.outcome,
            "statusCode": self.status_code,
            "latencyMs": round(self.latency_ms, 3),
            "error": self.error,
            "at": self.at_ms,
        }


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event to one endpoint, with every attempt made so far (oldest first)."""

    delivery_id: uuid.UUID
    endpoint_id: uuid.UUID
    owner_id: str
    event_id: uuid.UUID
    event_type: str
    credential_id: uuid.UUID | None
    sequence: int
    state: DeliveryState
    attempts: tuple[WebhookAttempt, ...]
    next_attempt_at_ms: int | None
    last_status_code: int | None
    last_error: str | None
    created_at_ms: int
    delivered_at_ms: int | None

    @classmethod
    def from_row(cls, row: Record, attempts: tuple[WebhookAttempt, ...] = ()) -> WebhookDelivery:
        return cls(
            delivery_id=row["id"],
            endpoint_id=row["endpoint_id"],
            owner_id=row["owner_id"],
            event_id=row["event_id"],
            event_type=row["event_type"],
            credential_id=row["credential_id"],
            sequence=int(row["sequence"]),
            state=DeliveryState(row["state"]),
            attempts=attempts,
            next_attempt_at_ms=_ms(row["next_attempt_at"]),
            last_status_code=row["last_status_code"],
            last_error=row["last_error"],
            created_at_ms=_ms(row["created_at"]) or 0,
            delivered_at_ms=_ms(row["delivered_at"]),
        )

    def public_dict(self) -> dict[str, Any]:
        return {
            "deliveryId": str(self.delivery_id),
            "endpointId": str(self.endpoint_id),
            "userId": self.owner_id,
            "eventId": str(self.event_id),
            "eventType": self.event_type,
            "credentialId": str(self.credential_id) if self.credential_id else None,
            "sequence": self.sequence,
            "state": self.state.value,
            "attempts": [a.public_dict() for a in self.attempts],
            "nextAttemptAt": self.next_attempt_at_ms,
            "lastStatusCode": self.last_status_code,
            "lastError": self.last_error,
            "createdAt": self.created_at_ms,
            "deliveredAt": self.delivered_at_ms,
        }


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)


@dataclass
class WebhookMetrics:
    """Counters since this engine opened, for ``/metrics``. Outcomes: delivered, failed, gone, refused
    (one per attempt); dead (a delivery given up), parked (waited behind an earlier event), disabled
    (an endpoint turned off automatically)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    by_endpoint: Counter[tuple[str, str]] = field(default_factory=Counter)  # (endpoint id, outcome)
    fanned_out: int = 0  # deliveries created
    latency_buckets: Counter[float] = field(default_factory=Counter)  # attempts that took <= bound seconds
    latency_sum: float = 0.0
    latency_count: int = 0

    def count(self, endpoint_id: uuid.UUID, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.by_endpoint[(str(endpoint_id), outcome)] += 1

    def as_dict(self) -> dict[str, Any]:
        """A plain snapshot for /metrics: outcome -> n, endpoint id -> outcome -> n, the latency histogram."""
        by_endpoint: dict[str, dict[str, int]] = {}
        for (endpoint, outcome), n in self.by_endpoint.items():
            by_endpoint.setdefault(endpoint, {})[outcome] = n
        return {
            "outcomes": dict(self.outcomes),
            "by_endpoint": by_endpoint,
            "fanned_out": self.fanned_out,
            "latency_seconds": {
                "buckets": {bound: self.latency_buckets[bound] for bound in LATENCY_BUCKETS},
                "sum": self.latency_sum,
                "count": self.latency_count,
            },
        }

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                self.latency_buckets[bound] += 1
