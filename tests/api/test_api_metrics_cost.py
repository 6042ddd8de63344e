"""/metrics does not count the job table per scrape: concurrent scrapes share one count,
and later scrapes reuse it for JOB_COUNTS_TTL seconds (engine/metrics.py's SharedRead)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine import CredentialEngine, errors
from engine import metrics as api_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def jobs_done(text: str) -> int:
    (line,) = [ln for ln in text.splitlines() if ln.startswith('credential_engine_jobs{state="done"}')]
    return int(float(line.split()[-1]))


async def test_concurrent_scrapes_run_the_count_query_once(
    api: Any, eng: CredentialEngine, monkeypatch: pytest.MonkeyPatch, create_body: Any
) -> None:
    """30 concurrent scrapes run JobQueue.counts (the full-table GROUP BY) once, and all show its numbers;
    scrapes within the TTL reuse them; the first scrape after the TTL counts again and sees new jobs."""
    clock = Clock()
    eng.metrics.job_counts.clock = clock
    real = eng.queue.counts
    calls = 0

    async def counted() -> dict[str, int]:  # the seam: every count statement goes through here
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)  # a slow count, so that the scrapes overlap
        return await real()

    monkeypatch.setattr(eng.queue, "counts", counted)
    replies = await asyncio.gather(*(api.call("GET", "/metrics", token=None) for _ in range(30)))
    assert [r.status for r in replies] == [200] * 30
    assert calls == 1
    assert len({jobs_done(r.text) for r in replies}) == 1
    before = jobs_done(replies[0].text)

    await api.post("/api/v3/credential/create", create_body())
    await eng.run_until_idle()
    clock.now += api_metrics.JOB_COUNTS_TTL - 0.5
    assert jobs_done((await api.call("GET", "/metrics", token=None)).text) == before  # kept
    assert calls == 1
    clock.now += 1.0
    assert jobs_done((await api.call("GET", "/metrics", token=None)).text) > before  # counted again
    assert calls == 2


async def test_a_failed_count_is_not_kept() -> None:
    """A read that fails reaches every waiting caller and is not cached: the next call reads again."""
    shared: api_metrics.SharedRead[int] = api_metrics.SharedRead(60.0, Clock())
    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.05)
        if attempts == 1:
            raise errors.StorageError("database unreachable (OSError)")
        return 7

    results = await asyncio.gather(*(shared.get(flaky) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, errors.StorageError) for r in results) and attempts == 1
    assert await asyncio.gather(*(shared.get(flaky) for _ in range(5))) == [7] * 5
    assert attempts == 2


async def test_a_scrape_that_gives_up_does_not_cancel_the_shared_read() -> None:
    """The read runs as its own task: cancelling the caller that started it leaves it running for the others."""
    shared: api_metrics.SharedRead[int] = api_metrics.SharedRead(60.0, Clock())
    release = asyncio.Event()

    async def slow() -> int:
        await release.wait()
        return 3

    first = asyncio.create_task(shared.get(slow))
    await asyncio.sleep(0)
    second = asyncio.create_task(shared.get(slow))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await asyncio.wait_for(second, 5) == 3
    assert first.cancelled()
