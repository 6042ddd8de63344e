"""The job queue's pure parts: backoff, settings, the job and decision types, its SQL file."""

from __future__ import annotations

import dataclasses
import importlib.resources
import random
from datetime import UTC, datetime

import pytest

from engine import db as dbmod
from engine import errors, queue

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_backoff_grows_then_caps_with_jitter() -> None:
    """Delay after try n lies in [c/2, c] with c = min(cap, base * 2**(n-1)): it grows, then stays at the cap."""
    rng = random.Random(7)
    for tries in range(1, 15):
        ceiling = min(60.0, 2.0 ** (tries - 1))
        for _ in range(50):
            delay = queue.backoff(tries, base=1.0, cap=60.0, rng=rng)
            assert ceiling / 2 <= delay <= ceiling
    assert queue.backoff(10_000, base=1.0, cap=60.0, rng=rng) <= 60.0  # no overflow far out
    assert queue.backoff(1, base=0.0, cap=0.0, rng=rng) == 0.0


def test_backoff_jitter_spreads_retries() -> None:
    """Two jobs failing on the same try do not retry at the same moment."""
    rng = random.Random(1)
    delays = {queue.backoff(5, base=1.0, cap=600.0, rng=rng) for _ in range(20)}
    assert len(delays) == 20


def test_default_settings_are_valid_and_frozen() -> None:
    """The defaults pass validation, and settings cannot be changed after construction."""
    settings = queue.QueueSettings()
    assert (settings.concurrency, settings.batch_size, settings.max_attempts) == (10, 50, 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.concurrency = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [
        {"concurrency": 0},
        {"batch_size": 0},
        {"lease_seconds": 0},
        {"lease_seconds": 5.0, "heartbeat_interval": 5.0},
        {"poll_interval": 0},
        {"max_attempts": 0},
        {"backoff_base": 10.0, "backoff_max": 1.0},
        {"shutdown_timeout": -1},
        {"channel": "Robert'); DROP TABLE queue_jobs;--"},
        {"handler_timeout": 0},
        {"handler_timeout": float("inf")},
        {"handler_timeouts": {"verify": -1.0}},
        {"handler_timeouts": {"verify": float("nan")}},
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object]) -> None:
    """Settings that cannot work (a heartbeat slower than the lease, a channel that is no identifier ...) fail early."""
    with pytest.raises(errors.ConfigurationError):
        queue.QueueSettings(**overrides)  # type: ignore[arg-type]


def test_job_tries_default_to_attempt_and_repr_hides_payload() -> None:
    """A Job built by hand counts tries like attempts; its repr never shows the payload."""
    job = queue.Job(
        id=1,
        kind="verify",
        payload={"apiSecret": "canary-3c1e"},
        attempt=3,
        max_attempts=5,
        dedupe_key=None,
        run_at=NOW,
        created_at=NOW,
    )
    assert job.tries == 3
    assert "canary" not in repr(job)
    assert dataclasses.replace(job, tries=1).tries == 1


def test_decisions_carry_their_values() -> None:
    """Retry carries its delay and reason, Abort its reason; a negative delay is a programming error."""
    retry = queue.Retry(after=2.5, reason="RATE_LIMITED")
    assert (retry.after, retry.reason) == (2.5, "RATE_LIMITED")
    assert queue.Retry().after is None
    assert queue.Abort("INVALID_KEY").reason == "INVALID_KEY"
    with pytest.raises(ValueError, match="0 or more"):
        queue.Retry(after=-1)


def test_stale_attempt_is_a_conflict() -> None:
    """StaleAttempt belongs to the engine's exception tree (a 409 Conflict) and names the job and attempt."""
    exc = queue.StaleAttempt(7, 2)
    assert isinstance(exc, errors.Conflict)
    assert (exc.job_id, exc.attempt) == (7, 2)


def test_error_text_is_type_and_message_truncated() -> None:
    """last_error is "Type: message", cut to a bounded length."""
    assert queue.error_text(KeyError("x")) == "KeyError: 'x'"
    assert len(queue.error_text(ValueError("y" * 10_000))) == queue.ERROR_TEXT_MAX


def test_queue_sql_blocks_are_named_and_described() -> None:
    """Every block of queue.sql has a one-line description, then SQL with $n placeholders, never Python braces."""
    text = importlib.resources.files("engine.queue").joinpath("queue.sql").read_text(encoding="utf-8")
    blocks = dbmod.parse_queries(text)
    expected = {
        "enqueue_job",
        "enqueue_many",
        "ensure_periodic",
        "claim_jobs",
        "finish_jobs",
        "complete_jobs",
        "complete_job",
        "extend_leases",
        "next_due",
        "has_ready",
        "list_jobs",
        "retry_dead",
        "count_jobs",
        "cancel_queued",
        "cancel_queued_keys",
        "purge_finished",
    }
    assert set(blocks) == expected
    for name, sql in blocks.items():
        first, _, body = sql.partition("\n")
        assert first.startswith("-- ") and len(first) > 10, name
        assert body.strip() and "{" not in body, name


def test_constructor_does_no_io() -> None:
    """A JobQueue can be built around a Database without touching it (the pool is not even there)."""
    database = dbmod.Database(None, owns_pool=False, queries={})
    q = queue.JobQueue(database, {"work": _noop})
    assert not q.running
    assert not q.listening
    assert q.counters == queue.Counters()


def test_every_needs_a_handler_and_a_positive_interval() -> None:
    """Periodic jobs must name a kind this queue handles and a positive interval."""
    q = queue.JobQueue(dbmod.Database(None, owns_pool=False, queries={}), {"tick": _noop})
    with pytest.raises(errors.ConfigurationError):
        q.every("tock", 60)
    with pytest.raises(errors.ConfigurationError):
        q.every("tick", 0)
    q.every("tick", 60)


async def _noop(job: queue.Job) -> None:
    return None


def test_timeouts_and_the_lease_cap_per_kind() -> None:
    """A kind's own timeout, else the default; the lease cap adds LEASE_CAP_LEASES leases to it; a claimed job
    waits for a runner at most half of what the lease leaves after a heartbeat."""
    settings = queue.QueueSettings(
        lease_seconds=30.0, heartbeat_interval=10.0, handler_timeout=120.0, handler_timeouts={"verify": 60.0}
    )
    assert (settings.timeout_for("verify"), settings.timeout_for("other")) == (60.0, 120.0)
    assert settings.lease_cap_for("verify") == 60.0 + queue.LEASE_CAP_LEASES * 30.0
    assert settings.hold_unstarted == 10.0
    assert settings.hold_unstarted + settings.heartbeat_interval < settings.lease_seconds  # extended in time
    assert settings.cancel_grace == 5.0
    assert queue.QueueSettings(lease_seconds=2.0, heartbeat_interval=0.5).cancel_grace == 0.5
