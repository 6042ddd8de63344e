"""Sandbox mode (``make run``) and the demo (``make demo``): what they print works when pasted, end to end."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest

from engine import EngineConfig
from engine.api import auth
from engine.cli import sandbox

ROOT = Path(__file__).resolve().parents[2]


def curl_blocks(banner: str) -> list[str]:
    """The curl commands of the banner, each joined as the shell joins continued lines."""
    blocks: list[str] = []
    current: list[str] = []
    for line in banner.splitlines():
        if line.startswith("curl ") or current:
            current.append(line.rstrip("\\").rstrip())
            if not line.endswith("\\"):
                blocks.append(" ".join(current))
                current = []
    return blocks


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash"
)
async def test_sandbox_banner_curl_examples_work(database_url: str, master_keys: str, tmp_path: Path) -> None:
    """The banner's URL, token and copy-paste curl examples work against the sandbox, as printed."""
    config = EngineConfig(database_url=database_url, master_keys=master_keys, data_dir=tmp_path, workers=2)
    async with sandbox.running(config, port=0, jwt_secret=auth.generate_secret()) as live:
        text = sandbox.banner(live)
        assert live.url in text and live.token in text
        assert all(key.api_key in text for key in live.keys)
        token = re.search(r"export TOKEN=(\S+)", text)
        assert token is not None and token.group(1) == live.token
        info = sandbox.read_info(tmp_path)
        assert info is not None and info["url"] == live.url and info["token"] == live.token
        assert stat.S_IMODE((tmp_path / sandbox.INFO_FILE).stat().st_mode) == 0o600
        blocks = curl_blocks(text)
        assert len(blocks) == 4
        for command in blocks:
            proc = await asyncio.create_subprocess_exec(
                "bash", "-c", command, env={**os.environ, "TOKEN": live.token}, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            answer = json.loads(out)
            assert answer["success"] is True, (command, answer)
    assert not (tmp_path / sandbox.INFO_FILE).exists()


async def test_demo_runs_end_to_end(database_url: str, master_keys: str, tmp_path: Path) -> None:
    """`python -m engine.cli.demo` (what `make demo` runs) starts its sandbox and completes every step."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ENGINE_MASTER_KEYS": master_keys,
        "ENGINE_DATA_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("ENGINE_API_JWT_SECRET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli.demo", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=180)
    text = out.decode()
    assert proc.returncode == 0, (text[-2000:], err.decode()[-2000:])
    assert "demo finished: every step succeeded" in text
    for venue in ("BINANCE", "OKX", "BYBIT", "COINBASE", "KRAKEN"):
        assert re.search(rf"{venue}\s+\S+\s+VERIFIED", text), venue
    assert "reason=POLICY_WITHDRAW_ENABLED" in text
    for event in ("credential.created", "credential.verified", "credential.rotated", "credential.revoked",
                  "trading_account.connected", "trading_account.disconnected"):  # fmt: skip
        assert f"<- webhook {event}" in text, event
    assert "Traceback" not in text + err.decode()


def test_make_targets_run_the_sandbox_and_the_demo() -> None:
    """`make run` serves the sandbox and `make demo` runs the demo module."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(
        r"^run: \$\(STAMP\)\n\t\$\(BIN\)/credential-engine serve --sandbox", makefile, re.MULTILINE
    )
    assert re.search(r"^demo: \$\(STAMP\)\n\t\$\(BIN\)/python -m engine.cli.demo", makefile, re.MULTILINE)
