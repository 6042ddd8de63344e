"""Fixtures shared by the venue modules' unit tests (the aioresponses fix for aiohttp 3.14 is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses

from venues import http


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with aioresponses() as m:
        yield m


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, str]]]:
    """Every request exactly as the probe handed it to aiohttp: (method, URL with its query, headers)."""
    record: list[tuple[str, str, dict[str, str]]] = []
    original = http.VenueProbe._call

    async def spy(self: http.VenueProbe, method: str, url: str, **kwargs: Any) -> http.Reply:
        record.append((method, url, dict(kwargs.get("headers") or {})))
        return await original(self, method, url, **kwargs)

    monkeypatch.setattr(http.VenueProbe, "_call", spy)
    return record
