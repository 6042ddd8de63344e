"""Venue unit tests: the aioresponses fix, so these tests also run alone (``--confcutdir=tests/unit/venues``).

tests/conftest.py applies the same fix; applying it twice is harmless (each only fills a missing argument).
"""

from __future__ import annotations

import inspect
from typing import Any
from unittest import mock

import aiohttp
import aioresponses.core
import pytest


@pytest.fixture(autouse=True)
def _aioresponses_stream_writer_venues(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioresponses 0.7.9 builds ClientResponse without ``stream_writer``, which aiohttp >= 3.14 requires
    (upstream pnuckowski/aioresponses#289): pass a stand-in when the signature asks for it."""
    if "stream_writer" not in inspect.signature(aiohttp.ClientResponse.__init__).parameters:
        return

    class _Response(aiohttp.ClientResponse):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stream_writer", mock.Mock(output_size=0))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(aioresponses.core, "ClientResponse", _Response)
