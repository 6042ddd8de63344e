"""Closing an engine whose database has gone away: it ends, bounded, with nothing left running."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from engine import Venue
from engine.queue import worker
from engine.testing import FakeVenue


@pytest.mark.slow
async def test_close_after_the_database_vanished_returns_promptly(
    make_engine: Any, fake: FakeVenue, database_url: str, drop_db: Any
) -> None:
    """Dropping the database under a running engine: close() returns (no CancelledError), bounded, no stray task."""
    eng = await make_engine(workers=2, shutdown_timeout=1.0, poll_interval=0.1)
    fake.add_key("gone", "s", delay=0.2)
    await eng.create_credential("o", venue=Venue.BINANCE, api_key="gone", api_secret="s")
    await asyncio.sleep(0.05)  # the job is claimed and in its probe
    await drop_db(urlsplit(database_url).path.lstrip("/"))  # its sessions ended first, as a CREATEDB role may
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    started = time.monotonic()
    await eng.close()
    # the last outcomes are retried for FINAL_FLUSH_TIMEOUT (the database may only be restarting), then dropped
    assert time.monotonic() - started < worker.FINAL_FLUSH_TIMEOUT + 10
    await asyncio.sleep(0.1)
    left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} & before
    assert not [t.get_name() for t in left if not t.done()]
