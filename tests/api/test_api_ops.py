"""Operator routes: liveness, readiness, and the Prometheus metrics."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from engine import CredentialEngine

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """An independent reader of the text format: TYPE per family, and every sample."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match is not None, line
            labels = dict(LABEL.findall(match.group(3) or ""))
            samples.append((match.group(1), labels, float(match.group(4))))
    return types, samples


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    found = [v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def test_healthz_answers_ok(api: Any) -> None:
    """/healthz is the envelope with status ok."""
    reply = await api.get("/healthz", token=None)
    assert reply.status == 200
    assert reply.body == {"data": {"status": "ok"}, "success": True, "errno": 0, "error": None}


async def test_readyz_checks_database_and_workers(api: Any, eng: CredentialEngine) -> None:
    """/readyz is 200 while the database answers and workers run; 503 naming workers once they stop."""
    ready = await api.get("/readyz", token=None)
    assert ready.status == 200
    assert ready.data == {"status": "ready", "checks": {"database": "up", "workers": "up"}}
    await eng.queue.stop()
    down = await api.get("/readyz", token=None)
    assert down.status == 503
    assert down.body["success"] is False
    assert down.body["data"]["checks"] == {"database": "up", "workers": "down"}
    assert "workers" in down.body["error"]


async def test_readyz_without_workers_is_ready(make_engine: Any, make_api: Any) -> None:
    """An API-only process (workers=0) is ready when its database answers; workers show as disabled."""
    client = await make_api(await make_engine(workers=0))
    reply = await client.get("/readyz", token=None)
    assert reply.status == 200
    assert reply.data["checks"] == {"database": "up", "workers": "disabled"}


async def test_metrics_report_jobs_outcomes_latency_and_requests(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """After a good and a bad key: jobs by state, outcomes by venue/reason, a sane histogram, request counts."""
    await api.post("/api/v3/credential/create", create_body())
    await api.post(
        "/api/v3/credential/create", create_body(apiKey="unknown-key-9", apiSecret="s", nickname="x")
    )
    await eng.run_until_idle()
    reply = await api.call("GET", "/metrics", token=None)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    types, samples = parse_metrics(reply.text)
    assert types["credential_engine_jobs"] == "gauge"
    assert types["credential_engine_probe_duration_seconds"] == "histogram"
    assert types["credential_engine_verifications_total"] == "counter"
    assert types["credential_engine_webhook_deliveries_total"] == "counter"
    assert {ls["state"] for n, ls, _ in samples if n == "credential_engine_jobs"} == {
        "queued", "running", "done", "dead", "cancelled",
    }  # fmt: skip
    assert value(samples, "credential_engine_jobs", state="done") >= 2
    assert value(samples, "credential_engine_verifications_total", venue="BINANCE", reason="OK") == 1
    assert value(samples, "credential_engine_verifications_total", venue="BINANCE", reason="INVALID_KEY") == 1
    buckets = [
        (ls["le"], v) for n, ls, v in samples if n == "credential_engine_probe_duration_seconds_bucket"
    ]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert buckets[-1] == ("+Inf", 2)
    assert value(samples, "credential_engine_probe_duration_seconds_count", venue="BINANCE") == 2
    created = value(
        samples,
        "credential_engine_http_requests_total",
        route="/api/v3/credential/create",
        method="POST",
        status="200",
    )
    assert created == 2
