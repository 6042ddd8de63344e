"""Engines on the real (embedded) PostgreSQL, with FakeVenue as every venue's probe."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from engine import CredentialEngine, EngineConfig
from engine.crypto import MasterKeyring
from engine.testing import FakeVenue

EngineFactory = Callable[..., Awaitable[CredentialEngine]]


@pytest.fixture
def master_keys() -> str:
    return MasterKeyring.generate_spec(1)


@pytest.fixture
def fake() -> FakeVenue:
    return FakeVenue()


@pytest.fixture
async def make_engine(
    database_url: str, master_keys: str, fake: FakeVenue, tmp_path: Path
) -> AsyncIterator[EngineFactory]:
    """Open engines on the per-test database (workers off by default: tests drive them with run_until_idle)."""
    opened: list[CredentialEngine] = []

    async def factory(**overrides: Any) -> CredentialEngine:
        probes = overrides.pop("probes", fake.probes())
        settings: dict[str, Any] = {
            "database_url": database_url,
            "master_keys": master_keys,
            "data_dir": tmp_path,
            "workers": 0,
            "poll_interval": 0.2,
            "lease_seconds": 5.0,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
        }
        settings.update(overrides)
        eng = CredentialEngine(EngineConfig(**settings), probes=probes)
        await eng.open()
        opened.append(eng)
        return eng

    yield factory
    for eng in opened:
        await eng.close()


@pytest.fixture
async def eng(make_engine: EngineFactory) -> CredentialEngine:
    return await make_engine()
