"""The engine's Prometheus metrics: collectors that read the engine's own counters when scraped.

    eng.metrics.registry     a ``prometheus_client.CollectorRegistry``: the engine's families, and the
                             process (``process_*``), platform (``python_info``) and GC (``python_gc_*``) ones
    eng.metrics.collector    the engine's families alone, for a host application's own registry:
                             ``prometheus_client.REGISTRY.register(eng.metrics.collector)``
    await eng.metrics.refresh()    reads the job counts (at most once per ``JOB_COUNTS_TTL`` seconds)
    await eng.metrics.exposition(accept)    (body, content type) for a ``/metrics`` answer

Families (label values are bounded: states, results, venues, reasons, route patterns, methods, statuses)::

    credential_engine_jobs{state}                                gauge      jobs in the queue by state
    credential_engine_job_attempts_total{result}                 counter    job attempts decided by this process
    credential_engine_verifications_total{venue,reason}          counter    probe outcomes (OK or the reason)
    credential_engine_probe_duration_seconds{venue}              histogram  probe latency
    credential_engine_events_total{result}                       counter    outbox events read / delivered / failed
    credential_engine_webhook_deliveries_total{result}           counter    webhook attempts and decisions
    credential_engine_webhook_duration_seconds                   histogram  webhook attempt latency
    credential_engine_http_requests_total{route,method,status}   counter    REST requests answered by this process
    credential_engine_key_leases                                 gauge      key leases open in this process
    credential_engine_key_lease_changes_total{result}            counter    leases opened, keys swapped, revoked ...

Nothing is counted twice: the collector reads, at scrape time, the counters the engine keeps anyway
(``queue.counters``, ``probe_metrics``, ``bus.stats``, ``webhooks.metrics``, :attr:`EngineMetrics.http_requests`,
``leases.stats``).
Counters count since the engine opened (Prometheus handles restarts). ``jobs`` is read from the database, so
every process reports the same queue; counting the jobs reads every row of the queue table (done and cancelled
jobs are kept for days), so it is not done per scrape: :class:`SharedRead` keeps the counts for
``JOB_COUNTS_TTL`` seconds and concurrent scrapes share one query, so however often and however many scrapers
ask, a process runs the count at most once per TTL. When the count fails (database down), the other families
are still answered and ``credential_engine_jobs`` has no samples until a count succeeds again.

A collector's ``collect()`` is synchronous. Called on the engine's event loop (a host's own aiohttp handler
calling ``generate_latest``) it cannot wait for the database: it answers the counts it holds and starts a
refresh for the next scrape (call ``await eng.metrics.refresh()`` first for fresh counts). Called from another
thread (``prometheus_client.start_http_server``), it asks the engine's loop for a refresh and waits at most
``FOREIGN_REFRESH_WAIT`` seconds. Names and units follow https://prometheus.io/docs/practices/naming/.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar

import structlog
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from engine import errors, events, jobs
from engine import queue as queuemod
from engine.live.registry import LeaseRegistry
from engine.webhooks import models as webhooks_models

__all__ = ["JOB_COUNTS_TTL", "EngineCollector", "EngineMetrics", "SharedRead"]

log = structlog.get_logger("engine.metrics")

JOB_COUNTS_TTL = 5.0  # seconds the job counts are reused (Prometheus scrapes every 15 s or more)
FOREIGN_REFRESH_WAIT = 5.0  # seconds a scrape from another thread waits for the engine's loop to count
JOB_STATES = ("queued", "running", "done", "dead", "cancelled")
ATTEMPT_RESULTS = ("processed", "retried", "failed", "dead", "handed_back", "timed_out")
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

    def fresh(self) -> bool:
        """True while the kept value is younger than ``ttl``."""
        return self._kept is not None and self.clock() - self._kept[0] < self.ttl

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


class WebhookCounters(Protocol):
    """The webhook service's counters (``eng.webhooks.metrics``)."""

    @property
    def metrics(self) -> webhooks_models.WebhookMetrics: ...


class MeteredEngine(Protocol):
    """What the collector reads of a :class:`~engine.engine.CredentialEngine` (no import of it: no loop)."""

    @property
    def queue(self) -> queuemod.JobQueue: ...

    @property
    def probe_metrics(self) -> jobs.ProbeMetrics: ...

    @property
    def bus(self) -> events.EventBus: ...

    @property
    def webhooks(self) -> WebhookCounters: ...

    @property
    def leases(self) -> LeaseRegistry: ...


def _retrieve(task: asyncio.Task[T]) -> None:
    """Mark a failed read's error as seen when every caller gave up on it (no "never retrieved" warning)."""
    if not task.cancelled():
        task.exception()


class EngineMetrics:
    """The engine's metrics: its collector, a registry to serve, the shared job count. No I/O when made."""

    def __init__(self, engine: MeteredEngine) -> None:
        self._engine = engine
        self.http_requests: Counter[tuple[str, str, int]] = (
            Counter()
        )  # (route, method, status): the REST API's
        self.job_counts: SharedRead[dict[str, int]] = SharedRead(JOB_COUNTS_TTL)
        self._counts: dict[str, int] | None = None  # the last count, None while the last one failed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self.collector = EngineCollector(self)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The engine's event loop (set when the engine opens): scrapes from other threads count on it."""
        self._loop = loop

    async def refresh(self) -> None:
        """Count the jobs by state, or reuse a count younger than ``JOB_COUNTS_TTL`` (shared by callers).

        Never raises for the database: a failed count is logged and leaves the jobs family empty."""
        self._loop = asyncio.get_running_loop()
        try:
            queue = self._engine.queue
            self._counts = dict(await self.job_counts.get(queue.counts))
        except errors.EngineClosed:
            self._counts = None
        except errors.StorageError as exc:
            self._counts = None
            log.warning("metrics_job_count_failed", error=str(exc))

    async def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format ``accept`` asks for (Prometheus text 0.0.4 by default, or OpenMetrics):
        (body, content type)."""
        await self.refresh()
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def current_job_counts(self) -> dict[str, int] | None:
        """The job counts for a scrape happening now (see the module docstring: on the loop or elsewhere)."""
        loop = self._loop
        if loop is None or loop.is_closed() or self.job_counts.fresh():
            return self._counts
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # cannot wait here: the next scrape gets what this one starts
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = loop.create_task(self.refresh())
            return self._counts
        if not loop.is_running():
            return self._counts  # nobody would count
        future = asyncio.run_coroutine_threadsafe(self.refresh(), loop)
        try:
            future.result(timeout=FOREIGN_REFRESH_WAIT)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            log.warning("metrics_job_count_slow", waited=FOREIGN_REFRESH_WAIT)
        return self._counts


class EngineCollector:
    """The engine's families (module docstring), read from its counters at each ``collect()``."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        """The families without samples: a registry checks names with it, and it does no I/O."""
        yield from self._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        eng = self._metrics._engine
        jobs = GaugeMetricFamily("credential_engine_jobs", "Jobs in the queue by state.", labels=["state"])
        attempts = CounterMetricFamily(
            "credential_engine_job_attempts",
            "Job attempts by result, decided by this process.",
            labels=["result"],
        )
        verifications = CounterMetricFamily(
            "credential_engine_verifications",
            "Verification probes by venue and outcome (OK) or reason.",
            labels=["venue", "reason"],
        )
        probes = HistogramMetricFamily(
            "credential_engine_probe_duration_seconds", "Latency of verification probes.", labels=["venue"]
        )
        events = CounterMetricFamily(
            "credential_engine_events",
            "Outbox events read, delivered to listeners, and listener failures, this process.",
            labels=["result"],
        )
        webhooks = CounterMetricFamily(
            "credential_engine_webhook_deliveries",
            "Webhook delivery attempts and decisions by result, this process.",
            labels=["result"],
        )
        webhook_latency = HistogramMetricFamily(
            "credential_engine_webhook_duration_seconds", "Latency of webhook delivery attempts.", labels=[]
        )
        http = CounterMetricFamily(
            "credential_engine_http_requests",
            "REST requests answered by this process.",
            labels=["route", "method", "status"],
        )
        leases = GaugeMetricFamily(
            "credential_engine_key_leases", "Key leases open in this process.", labels=[]
        )
        lease_changes = CounterMetricFamily(
            "credential_engine_key_lease_changes",
            "Key leases opened, keys swapped after rotations, credentials seen revoked or withheld, re-checks, "
            "and failures (refreshes given up, callbacks), this process.",
            labels=["result"],
        )
        if with_samples:
            self._leases(leases, lease_changes)
            self._jobs(jobs)
            self._attempts(attempts)
            self._probes(verifications, probes)
            stats = eng.bus.stats
            for result, count in (
                ("read", stats.read),
                ("delivered", stats.delivered),
                ("listener_failed", stats.listener_failures),
            ):
                events.add_metric([result], count)
            self._webhooks(webhooks, webhook_latency)
            for (route, method, status), count in sorted(self._metrics.http_requests.items()):
                http.add_metric([route, method, str(status)], count)
        yield from (jobs, attempts, verifications, probes, events, webhooks, webhook_latency, http, leases)
        yield lease_changes

    def _leases(self, gauge: GaugeMetricFamily, changes: CounterMetricFamily) -> None:
        registry = self._metrics._engine.leases
        gauge.add_metric([], registry.open_leases)
        stats = registry.stats
        for result, count in (
            ("opened", stats.opened),
            ("swapped", stats.swaps),
            ("revoked", stats.revocations),
            ("withheld", stats.withheld),
            ("recheck", stats.rechecks),
            ("recheck_failed", stats.recheck_failures),
            ("refresh_failed", stats.refresh_failures),
            ("callback_failed", stats.callback_failures),
        ):
            changes.add_metric([result], count)

    def _jobs(self, family: GaugeMetricFamily) -> None:
        counts = self._metrics.current_job_counts()
        if counts is None:
            return
        for state in sorted({*JOB_STATES, *counts}):
            family.add_metric([state], counts.get(state, 0))

    def _attempts(self, family: CounterMetricFamily) -> None:
        try:
            counters = self._metrics._engine.queue.counters
        except errors.EngineClosed:
            return
        for result in ATTEMPT_RESULTS:
            family.add_metric([result], getattr(counters, result))

    def _probes(self, outcomes: CounterMetricFamily, latency: HistogramMetricFamily) -> None:
        try:
            probe = self._metrics._engine.probe_metrics
        except errors.EngineClosed:
            return
        for (venue, reason), count in sorted(probe.outcomes.items()):
            outcomes.add_metric([venue, reason], count)
        cumulative = probe.latency_buckets  # computed on each read: once per scrape
        for venue in sorted(probe.latency_count):
            buckets = [(_bound(b), float(cumulative[(venue, b)])) for b in jobs.LATENCY_BUCKETS]
            buckets.append(("+Inf", float(probe.latency_count[venue])))
            latency.add_metric([venue], buckets, float(probe.latency_sum[venue]))

    def _webhooks(self, outcomes: CounterMetricFamily, latency: HistogramMetricFamily) -> None:
        hooks = self._metrics._engine.webhooks.metrics
        for result, count in sorted(hooks.outcomes.items()):
            outcomes.add_metric([result], count)
        buckets = [
            (_bound(b), float(hooks.latency_buckets[b])) for b in webhooks_models.LATENCY_BUCKETS
        ]  # counted in every bucket at or above: cumulative
        buckets.append(("+Inf", float(hooks.latency_count)))
        latency.add_metric([], buckets, float(hooks.latency_sum))


def _bound(value: float) -> str:
    """A bucket bound as the ``le`` label: ``0.05``, ``1.0``, as the Go and Python clients write them."""
    return repr(float(value))
