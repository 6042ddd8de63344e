"""Prometheus metrics read with prometheus_client's own parser: ``serve``'s ``/metrics`` route, a host
application's registry, and ``credential-engine worker --metrics-port`` as a real process (engine/metrics.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from engine import CredentialEngine, EngineConfig
from engine.api.metrics import MetricsServer
from venues.base import Venue
from venues.simulator import Simulator

ROOT = Path(__file__).resolve().parents[2]

# family name (as the parser names it: counters without _total) -> (type, label names of its samples)
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "credential_engine_jobs": ("gauge", {"state"}),
    "credential_engine_job_attempts": ("counter", {"result"}),
    "credential_engine_verifications": ("counter", {"venue", "reason"}),
    "credential_engine_probe_duration_seconds": ("histogram", {"venue"}),
    "credential_engine_events": ("counter", {"result"}),
    "credential_engine_webhook_deliveries": ("counter", {"result"}),
    "credential_engine_webhook_duration_seconds": ("histogram", set()),
    "credential_engine_http_requests": ("counter", {"route", "method", "status"}),
    "credential_engine_key_leases": ("gauge", set()),
    "credential_engine_key_lease_changes": ("counter", {"result"}),
}


class Scrape:
    """One scrape, parsed: families by name and every sample."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for family in self.families.values() for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and _has(s.labels, labels)]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and _has(s.labels, labels)]
        return found[0] if found else default


def _has(have: dict[str, str], want: dict[str, str]) -> bool:
    return all(have.get(k) == v for k, v in want.items())


def check_families(scrape: Scrape) -> None:
    """Every family of the engine, with its type and label names; process metrics too."""
    for name, (kind, labels) in FAMILIES.items():
        assert name in scrape.families, name
        assert scrape.families[name].type == kind, name
        for sample in scrape.families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info"):
        assert name in scrape.families, name
    for name in {s.name for s in scrape.samples if s.name.startswith("credential_engine_")}:
        family = next(f for f in scrape.families.values() if any(x.name == name for x in f.samples))
        if family.type == "counter":
            assert name.endswith("_total"), name
        if family.type == "histogram":
            assert name.endswith(("_seconds_bucket", "_seconds_sum", "_seconds_count")), name


async def test_serve_metrics_parse_and_move_after_a_verification(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """serve's /metrics parses with prometheus_client's parser: every family with its type and labels, the
    process metrics; a verification moves the verification counter, the probe histogram, the job attempts,
    the events and the job counts; requests are counted by route pattern, method and status."""
    before = Scrape((await api.call("GET", "/metrics", token=None)).text)
    check_families(before)
    assert before.get("credential_engine_verifications_total", venue="BINANCE", reason="OK") == 0
    assert before.value("credential_engine_job_attempts_total", result="processed") == 0
    assert {s.labels["state"] for s in before.families["credential_engine_jobs"].samples} == {
        "queued", "running", "done", "dead", "cancelled",
    }  # fmt: skip

    await api.post("/api/v3/credential/create", create_body())
    await api.post(
        "/api/v3/credential/create", create_body(apiKey="unknown-key-9", apiSecret="s", nickname="x")
    )
    await eng.run_until_idle()
    eng.metrics.job_counts.clock = lambda: float("inf")  # the 5 s shared count is due: count again now
    reply = await api.call("GET", "/metrics", token=None)
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    after = Scrape(reply.text)
    check_families(after)
    assert after.value("credential_engine_verifications_total", venue="BINANCE", reason="OK") == 1
    assert after.value("credential_engine_verifications_total", venue="BINANCE", reason="INVALID_KEY") == 1
    assert after.value("credential_engine_probe_duration_seconds_count", venue="BINANCE") == 2
    assert after.value("credential_engine_probe_duration_seconds_bucket", venue="BINANCE", le="+Inf") == 2
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in after.samples
        if s.name == "credential_engine_probe_duration_seconds_bucket"
    ]
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and [b for b, _ in buckets] == sorted(
        b for b, _ in buckets
    )
    assert after.value("credential_engine_job_attempts_total", result="processed") >= 2
    assert after.value("credential_engine_events_total", result="read") >= 3  # created x2, verified, failed
    assert after.value("credential_engine_jobs", state="done") >= 2
    created = after.value(
        "credential_engine_http_requests_total",
        route="/api/v3/credential/create",
        method="POST",
        status="200",
    )
    assert created == 2


async def test_openmetrics_when_the_scraper_asks(api: Any) -> None:
    """A scraper that accepts OpenMetrics gets it (prometheus_client's negotiation), and it parses."""
    reply = await api.call(
        "GET", "/metrics", token=None, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(reply.text)}
    assert "credential_engine_job_attempts" in names and "credential_engine_jobs" in names


async def test_a_host_registry_includes_the_engine_collector(eng: CredentialEngine) -> None:
    """A host application registers eng.metrics.collector in its own registry; a scrape from another thread
    (prometheus_client's own HTTP server does that) waits for the job count on the engine's loop."""
    host = CollectorRegistry()
    host.register(eng.metrics.collector)
    await eng.create_credential(
        "o-1", venue=Venue.BINANCE, api_key="binance-key-0001", api_secret="binance-secret-0001"
    )
    await eng.run_until_idle()
    text = await asyncio.to_thread(lambda: generate_latest(host).decode())
    scrape = Scrape(text)
    assert scrape.value("credential_engine_verifications_total", venue="BINANCE", reason="OK") == 1
    assert scrape.value("credential_engine_jobs", state="done") >= 1
    assert "process_cpu_seconds" not in scrape.families  # the host's registry has its own process metrics


async def test_a_scrape_on_the_engines_loop_never_waits(
    eng: CredentialEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate_latest called on the engine's loop (a host's own handler) cannot wait for the database: it
    answers the counts it holds and starts one count, whose numbers the next scrape shows."""
    await eng.metrics.refresh()
    real = eng.queue.counts
    calls = 0

    async def counted() -> dict[str, int]:
        nonlocal calls
        calls += 1
        counts = await real()
        return {**counts, "queued": counts["queued"] + 1000}  # recognisable

    monkeypatch.setattr(eng.queue, "counts", counted)
    eng.metrics.job_counts.clock = lambda: float("inf")  # the kept count is due
    first = Scrape(generate_latest(eng.metrics.registry).decode())
    assert first.value("credential_engine_jobs", state="queued") < 1000 and calls == 0  # kept, not waited for
    second = Scrape(generate_latest(eng.metrics.registry).decode())  # still running: no second count started
    assert second.value("credential_engine_jobs", state="queued") < 1000
    for _ in range(100):
        await asyncio.sleep(0.05)
        if calls:
            break
    await asyncio.sleep(0.1)
    eng.metrics.job_counts.clock = lambda: 0.0  # the new count is fresh now
    third = Scrape(generate_latest(eng.metrics.registry).decode())
    assert third.value("credential_engine_jobs", state="queued") >= 1000 and calls >= 1


async def test_the_job_count_failing_leaves_the_other_families(
    api: Any, eng: CredentialEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database failing the count: the scrape still answers 200 with every other family; the jobs
    family has no samples (not stale numbers), and comes back with the next good count."""
    from engine import errors

    async def down() -> dict[str, int]:
        raise errors.StorageError("database unreachable (OSError)")

    monkeypatch.setattr(eng.queue, "counts", down)
    reply = await api.call("GET", "/metrics", token=None)
    assert reply.status == 200
    scrape = Scrape(reply.text)
    assert scrape.families["credential_engine_jobs"].samples == []
    assert scrape.value("credential_engine_job_attempts_total", result="processed") == 0
    monkeypatch.undo()
    again = Scrape((await api.call("GET", "/metrics", token=None)).text)
    assert again.value("credential_engine_jobs", state="queued") >= 0


async def test_metrics_server_answers_only_metrics(eng: CredentialEngine) -> None:
    """The standalone listener answers /metrics and /healthz, 404 for anything else."""
    server = MetricsServer(eng, port=0)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url) as resp:
                assert resp.status == 200
                check_families(Scrape(await resp.text()))
            async with http.get(server.url.replace("/metrics", "/api/v3/credential/list")) as resp:
                assert resp.status == 404
    finally:
        await server.close()


# ---- a worker process ------------------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=5, enforce_rate_limits=False) as simulator:
        yield simulator


async def test_worker_metrics_port_of_a_real_process(
    database_url: str, master_keys: str, tmp_path: Path, sim: Simulator
) -> None:
    """`credential-engine worker --metrics-port 0` (a real process, probing the simulator over loopback):
    its /metrics parses, and the verification it ran shows in its own counters and histogram."""
    urls = ",".join(f"{venue.value}={url}" for venue, url in sim.urls.items())
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ENGINE_MASTER_KEYS": master_keys,
        "ENGINE_DATA_DIR": str(tmp_path),
        "ENGINE_VENUE_URLS": urls,
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "worker", "--workers", "2", "--metrics-port", "0",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
        assert "metrics on http://127.0.0.1:" in line, line
        url = line.rsplit("metrics on ", 1)[1].strip()
        async with aiohttp.ClientSession() as http:

            async def scrape() -> Scrape:
                async with http.get(url) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    return Scrape(await resp.text())

            first = await scrape()
            check_families(first)
            assert first.get("credential_engine_verifications_total", venue="OKX", reason="OK") == 0
            key = sim.add_key(Venue.OKX)
            config = EngineConfig(
                database_url=database_url, master_keys=master_keys, data_dir=tmp_path, workers=0
            )
            async with CredentialEngine(config) as client:  # creates; the worker process verifies
                cred = await client.create_credential(
                    "o-1", venue=key.venue, api_key=key.api_key, api_secret=key.api_secret,
                    api_passphrase=key.api_passphrase,
                )  # fmt: skip
                done = await client.wait_for_status(
                    "o-1", cred.credential_id, ["VERIFIED", "FAILED"], timeout=60
                )
                assert done.status.value == "VERIFIED"
            for _ in range(100):  # the counters move when the attempt's outcome is written: shortly after
                later = await scrape()
                if later.get("credential_engine_job_attempts_total", result="processed") >= 1:
                    break
                await asyncio.sleep(0.1)
            check_families(later)
            assert later.value("credential_engine_verifications_total", venue="OKX", reason="OK") == 1
            assert later.value("credential_engine_probe_duration_seconds_count", venue="OKX") == 1
            assert later.value("credential_engine_job_attempts_total", result="processed") >= 1
            assert later.value("process_resident_memory_bytes") > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()


async def test_serve_metrics_route_and_metrics_port_of_a_real_process(
    database_url: str, master_keys: str, tmp_path: Path
) -> None:
    """`credential-engine serve --metrics-port 0` (a real process): the API's /metrics route and the metrics
    listener answer the same families; the listener counts the API's requests too (one registry)."""
    from engine.api import auth

    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ENGINE_MASTER_KEYS": master_keys,
        "ENGINE_DATA_DIR": str(tmp_path),
        "ENGINE_API_PORT": "0",
        "ENGINE_WORKERS": "1",
        auth.SECRET_ENV: auth.generate_secret(),
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "serve", "--metrics-port", "0",
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
        api_url = line.split("listening on ", 1)[1].split()[0]
        metrics_url = line.rsplit("metrics on ", 1)[1].strip()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{api_url}/metrics") as resp:
                assert resp.status == 200
                route = Scrape(await resp.text())
            async with http.get(metrics_url) as resp:
                assert resp.status == 200
                listener = Scrape(await resp.text())
        check_families(route)
        check_families(listener)
        assert (
            listener.value(
                "credential_engine_http_requests_total", route="/metrics", method="GET", status="200"
            )
            >= 1
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
