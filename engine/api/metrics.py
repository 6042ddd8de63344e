"""``GET /metrics``: the engine's numbers in the Prometheus text exposition format (version 0.0.4).

Families (label values are bounded: states, venues, outcomes, route patterns, HTTP statuses)::

    credential_engine_jobs{state}                                gauge      jobs in the queue by state
    credential_engine_job_attempts_total{result}                 counter    attempts run by this process
    credential_engine_verifications_total{venue,reason}          counter    probe outcomes (OK or the reason)
    credential_engine_probe_duration_seconds{venue}              histogram  probe latency
    credential_engine_events_total{result}                       counter    outbox events read / delivered
    credential_engine_webhook_deliveries_total{result}           counter    webhook attempts and decisions
    credential_engine_webhook_duration_seconds                   histogram  webhook attempt latency
    credential_engine_http_requests_total{route,method,status}   counter    REST requests answered

Counters count since this process started (Prometheus handles restarts); ``jobs`` is read from the database,
so every process reports the same queue. Counting the jobs reads every row of the queue table (done and
cancelled jobs are kept for days), so it is not done per scrape: :class:`SharedRead` keeps the counts for
``JOB_COUNTS_TTL`` seconds, and concurrent scrapes share one query, so however often and however many
scrapers ask, a process runs the count at most once per TTL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aiohttp import web

from engine import jobs
from engine.webhooks import models as webhooks_models

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_COUNTS_TTL = 5.0  # seconds the job counts of /metrics are reused (Prometheus scrapes every 15 s or more)

T = TypeVar("T")


class SharedRead(Generic[T]):
    """A value read at most once per ``ttl`` seconds, however many callers ask at once.

    The first caller after the value expired starts the read, as a task of its own (a scrape that gives up
    does not cancel it for the others), and every caller meanwhile awaits that same read. A failed read is
    not kept: its callers get the error, the next caller reads again. ``clock`` is injectable (tests).
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._kept: tuple[float, T] | None = None  # (when read, value)
        self._pending: asyncio.Task[T] | None = None

    async def get(self, read: Callable[[], Awaitable[T]]) -> T:
        if self._kept is not None and self.clock() - self._kept[0] < self.ttl:
            return self._kept[1]
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read(read))
            self._pending.add_done_callback(_retrieve)
        return await asyncio.shield(self._pending)

    async def _read(self, read: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await read()
            self._kept = (self.clock(), value)
            return value
        finally:
            self._pending = None


def _retrieve(task: asyncio.Task[T]) -> None:
    """Mark a failed read's error as seen when every caller gave up on it (no "never retrieved" warning)."""
    if not task.cancelled():
        task.exception()


JOB_COUNTS: web.AppKey[SharedRead[dict[str, int]]] = web.AppKey("job_counts", SharedRead)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs.items()) + "}"


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


@dataclass
class Exposition:
    """Families written in order, each with its HELP and TYPE lines once."""

    lines: list[str] = field(default_factory=list)

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """Everything /metrics shows, gathered by the handler (no I/O here)."""

    job_counts: Mapping[str, int]
    job_attempts: Mapping[str, int]
    probes: jobs.ProbeMetrics
    events: Mapping[str, int]
    webhooks: webhooks_models.WebhookMetrics
    http_requests: Iterable[tuple[tuple[str, str, int], int]]


def render(snap: Snapshot) -> str:
    out = Exposition()
    out.family("credential_engine_jobs", "gauge", "Jobs in the queue by state.")
    for state, count in sorted(snap.job_counts.items()):
        out.sample("credential_engine_jobs", {"state": state}, count)
    out.family("credential_engine_job_attempts_total", "counter", "Job attempts by result, this process.")
    for result, count in sorted(snap.job_attempts.items()):
        out.sample("credential_engine_job_attempts_total", {"result": result}, count)
    _probes(out, snap.probes)
    out.family("credential_engine_events_total", "counter", "Outbox events read and delivered to listeners.")
    for result, count in sorted(snap.events.items()):
        out.sample("credential_engine_events_total", {"result": result}, count)
    _webhooks(out, snap.webhooks)
    out.family("credential_engine_http_requests_total", "counter", "REST requests answered.")
    for (route, method, status), count in sorted(snap.http_requests):
        labels = {"route": route, "method": method, "status": str(status)}
        out.sample("credential_engine_http_requests_total", labels, count)
    return out.text()


def _webhooks(out: Exposition, hooks: webhooks_models.WebhookMetrics) -> None:
    name = "credential_engine_webhook_deliveries_total"
    out.family(name, "counter", "Webhook delivery attempts and decisions by result, this process.")
    for result, count in sorted(hooks.outcomes.items()):
        out.sample(name, {"result": result}, count)
    name = "credential_engine_webhook_duration_seconds"
    out.family(name, "histogram", "Latency of webhook delivery attempts, seconds.")
    for bound in webhooks_models.LATENCY_BUCKETS:  # counted in every bucket at or above: cumulative
        out.sample(f"{name}_bucket", {"le": repr(bound)}, hooks.latency_buckets[bound])
    out.sample(f"{name}_bucket", {"le": "+Inf"}, hooks.latency_count)
    out.sample(f"{name}_sum", {}, hooks.latency_sum)
    out.sample(f"{name}_count", {}, hooks.latency_count)


def _probes(out: Exposition, probes: jobs.ProbeMetrics) -> None:
    out.family(
        "credential_engine_verifications_total",
        "counter",
        "Verification probes by venue and outcome or reason.",
    )
    for (venue, reason), count in sorted(probes.outcomes.items()):
        out.sample("credential_engine_verifications_total", {"venue": venue, "reason": reason}, count)
    name = "credential_engine_probe_duration_seconds"
    out.family(name, "histogram", "Latency of verification probes, seconds.")
    for venue in sorted(probes.latency_count):
        # ProbeMetrics counts an observation in every bucket at or above it: already cumulative
        for bound in jobs.LATENCY_BUCKETS:
            out.sample(
                f"{name}_bucket", {"venue": venue, "le": repr(bound)}, probes.latency_buckets[(venue, bound)]
            )
        out.sample(f"{name}_bucket", {"venue": venue, "le": "+Inf"}, probes.latency_count[venue])
        out.sample(f"{name}_sum", {"venue": venue}, probes.latency_sum[venue])
        out.sample(f"{name}_count", {"venue": venue}, probes.latency_count[venue])
