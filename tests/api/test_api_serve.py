"""``credential-engine serve`` and ``worker`` as real processes: they start, answer, and stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.api import auth

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def service_env(database_url: str, master_keys: str, tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ENGINE_MASTER_KEYS": master_keys,
        "ENGINE_DATA_DIR": str(tmp_path),
        "ENGINE_API_PORT": "0",
        "ENGINE_WORKERS": "2",
        "PYTHONPATH": str(ROOT),
    }
    env.pop(auth.SECRET_ENV, None)
    return env


async def start(env: dict[str, str], *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", *argv, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def first_line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_serve_answers_and_stops_on_sigterm(service_env: dict[str, str]) -> None:
    """serve prints its URL, answers an authenticated request, and exits 0 on SIGTERM without a traceback."""
    secret = auth.generate_secret()
    proc = await start({**service_env, auth.SECRET_ENV: secret}, "serve")
    try:
        line = await first_line(proc)
        assert "listening on http://127.0.0.1:" in line
        url = line.split("listening on ", 1)[1].split()[0]
        headers = {"Authorization": f"Bearer {auth.mint_token(secret, 'o-1')}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{url}/readyz") as resp:
                ready: Any = await resp.json()
            async with http.get(f"{url}/api/v3/credential/list") as resp:
                listed: Any = await resp.json()
        assert ready["data"]["checks"] == {"database": "up", "workers": "up"}
        assert listed["success"] is True and listed["data"] == []
    finally:
        code, err = await stop(proc)
    assert code == 0
    assert "Traceback" not in err


async def test_serve_without_a_token_secret_fails_in_one_line(service_env: dict[str, str]) -> None:
    """Without ENGINE_API_JWT_SECRET, serve refuses to start: exit 2 (configuration), one line naming the
    variable."""
    proc = await start(service_env, "serve")
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.startswith("credential-engine:")]
    assert len(lines) == 1 and "ENGINE_API_JWT_SECRET" in lines[0]
    assert "Traceback" not in err.decode()


async def test_worker_runs_until_sigterm(service_env: dict[str, str]) -> None:
    """worker starts its queue workers and exits 0 on SIGTERM."""
    proc = await start(service_env, "worker", "--workers", "3")
    try:
        assert "worker running 3 job(s)" in await first_line(proc)
    finally:
        code, err = await stop(proc)
    assert code == 0
    assert "Traceback" not in err
