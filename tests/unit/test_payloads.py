"""Job payloads and dedupe keys are typed values built in one place (engine/payloads.py)."""

from __future__ import annotations

import uuid

import pytest

from engine import db as dbmod
from engine import errors, payloads, queue


def test_each_lifecycle_job_round_trips_its_payload() -> None:
    cid = uuid.uuid4()
    jobs: list[
        payloads.Verify | payloads.RotationVerify | payloads.RevokeCascade | payloads.ExpiryWarning
    ] = [
        payloads.Verify(cid, 3),
        payloads.RotationVerify(cid, 4),
        payloads.RevokeCascade.of(cid, 4),
        payloads.ExpiryWarning(cid, 1_732_180_000_123),
    ]
    for job in jobs:
        assert type(job).from_payload(job.to_payload()) == job
    assert payloads.Verify(cid, 3).to_payload() == {
        "credentialId": str(cid),
        "version": 3,
    }  # queued jobs' format


def test_dedupe_keys_keep_one_queued_job_where_one_is_enough() -> None:
    cid = uuid.uuid4()
    assert payloads.Verify(cid, 1).dedupe_key == payloads.Verify(cid, 2).dedupe_key == f"verify:{cid}"
    assert payloads.RotationVerify(cid, 2).dedupe_key != payloads.RotationVerify(cid, 3).dedupe_key
    assert payloads.RevokeCascade.of(cid, None).dedupe_key is None
    assert payloads.ExpiryWarning(cid, 5).dedupe_key == f"expiry:{cid}:5"


def test_the_revoke_cascade_names_the_staged_check_only_when_one_is_staged() -> None:
    cid = uuid.uuid4()
    assert payloads.RevokeCascade.of(cid, None).cancel_keys == (payloads.verify_key(cid),)
    assert payloads.RevokeCascade.of(cid, 7).cancel_keys == (
        payloads.verify_key(cid),
        payloads.rotation_key(cid, 7),
    )


async def _handler(job: queue.Job) -> None:
    return None


def test_handlers_are_registered_after_the_queue_exists() -> None:
    """JobQueue.register: a kind's own timeout unless the settings override it; a kind once; a bad timeout is a
    configuration error. Construction and registration do no I/O."""
    settings = queue.QueueSettings(handler_timeout=50.0, handler_timeouts={"b": 5.0})
    q = queue.JobQueue(dbmod.Database(None, owns_pool=False), settings=settings)
    q.register("a", _handler, timeout=7.0)
    q.register("b", _handler, timeout=9.0)
    q.register("c", _handler)
    assert q.kinds == {"a", "b", "c"}
    assert (q.timeout_for("a"), q.timeout_for("b"), q.timeout_for("c")) == (7.0, 5.0, 50.0)
    with pytest.raises(errors.ConfigurationError, match="'a'"):
        q.register("a", _handler)
    with pytest.raises(errors.ConfigurationError, match="timeout"):
        q.register("d", _handler, timeout=0)
    q.every("a", 60.0)  # a registered kind may be periodic
