"""venues.base.release_frames: a probe failure's frames let go of the keys; nobody else's frames are touched."""

from __future__ import annotations

import asyncio
import re
from types import FrameType

from venues import base


async def test_another_librarys_suspended_coroutine_is_left_alone() -> None:
    """A coroutine outside ``venues`` that kept the exception and went on must not be closed by the release
    (clearing a suspended coroutine's frame would finalize it)."""
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


def _frames(error: BaseException) -> list[FrameType]:
    found = []
    trace = error.__traceback__
    while trace is not None:
        found.append(trace.tb_frame)
        trace = trace.tb_next
    return found


def test_frames_of_the_cause_are_cleared_and_loops_end() -> None:
    """The cause's venue frames lose their locals (the value that was checked); a cause/context loop ends."""
    try:
        try:
            base.check_token("apiKey", "CANARY-VALUE!", re.compile("[A-Z]+"), "is not letters")
        except base.KeyFormatProblem as problem:
            raise base.ProbeFailure(base.Outcome.INVALID_KEY, "malformed") from problem
    except base.ProbeFailure as caught:
        failure = caught
    cause = failure.__cause__
    assert cause is not None
    venue_frame = next(f for f in _frames(cause) if f.f_code.co_filename == base.__file__)
    assert venue_frame.f_locals["value"] == "CANARY-VALUE!"
    cause.__context__ = failure  # a loop must not hang the walk
    base.release_frames(failure)
    assert venue_frame.f_locals == {}
