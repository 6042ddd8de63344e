"""venues.base.release_frames: a probe failure's frames let go of the keys; no running coroutine is touched."""

from __future__ import annotations

import asyncio
import gc
import weakref

from venues import base


async def test_a_suspended_coroutine_that_kept_the_failure_is_left_alone() -> None:
    """A coroutine that kept the exception and went on is not closed by the release (clearing a suspended
    coroutine's frame in place would finalize it, on Python 3.11 and 3.12)."""
    kept: list[BaseException] = []
    resume = asyncio.Event()

    async def keeper() -> str:
        local = "still here"
        try:
            raise base.ProbeFailure(base.Outcome.NETWORK, "kept")
        except base.ProbeFailure as failure:
            kept.append(failure)
        await resume.wait()  # suspended while the failure (whose traceback holds this frame) is released
        return local

    task = asyncio.create_task(keeper())
    await asyncio.sleep(0)
    base.release_frames(kept[0])
    resume.set()
    assert await asyncio.wait_for(task, timeout=5) == "still here"  # a closed coroutine never answers


class Held:
    """Stands for key material: something only a failed call's frame holds."""


def failing_call(held: Held) -> None:
    raise base.ProbeFailure(base.Outcome.INVALID_KEY, f"refused ({type(held).__name__})")


def test_the_frames_of_the_failure_and_its_cause_let_go_and_loops_end() -> None:
    """What only the frames of a failure's cause hold is freed by reference counting alone once the failure is
    released; a cause/context loop does not hang the walk."""
    held = Held()
    ref = weakref.ref(held)
    try:
        try:
            failing_call(held)
        except base.ProbeFailure as refused:
            raise base.ProbeFailure(base.Outcome.INVALID_KEY, "the key was refused") from refused
    except base.ProbeFailure as caught:
        failure = caught
    del held
    cause = failure.__cause__
    assert cause is not None
    cause.__context__ = failure  # a loop
    gc.disable()
    try:
        assert ref() is not None  # the cause's traceback holds failing_call's frame, and it the object
        base.release_frames(failure)
        assert ref() is None
        assert failure.__traceback__ is None and cause.__traceback__ is None
    finally:
        gc.enable()
