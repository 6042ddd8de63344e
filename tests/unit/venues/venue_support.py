"""Helpers shared by the venue modules' unit tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aioresponses import CallbackResult

from venues import base


async def failure_of(coro: Awaitable[object]) -> base.ProbeFailure:
    with pytest.raises(base.ProbeFailure) as caught:
        await coro
    return caught.value


class Gate:
    """Holds each request until ``expected`` of them are in flight together (or one second passes)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.in_flight = 0
        self.peak = 0
        self.all_in = asyncio.Event()

    def reply(self, payload: Any) -> Callable[..., Awaitable[CallbackResult]]:
        async def callback(url: Any, **kwargs: Any) -> CallbackResult:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.in_flight >= self.expected:
                self.all_in.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_in.wait(), 1.0)
            self.in_flight -= 1
            return CallbackResult(payload=payload)

        return callback
