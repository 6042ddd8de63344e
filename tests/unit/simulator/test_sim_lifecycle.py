"""Lifecycle, logging and the standalone entry point of the simulator."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from venues.base import Venue
from venues.simulator import Simulator
from venues.simulator import __main__ as cli

ROOT = Path(__file__).resolve().parents[3]


def test_constructor_does_no_io() -> None:
    """A new simulator has no URLs yet: nothing listens before start()."""
    sim = Simulator(seed=1)
    with pytest.raises(RuntimeError):
        _ = sim.urls
    with pytest.raises(RuntimeError):
        _ = sim.admin_url


async def test_each_venue_gets_its_own_port() -> None:
    """start() serves five venues and the admin API on six distinct loopback ports."""
    async with Simulator() as sim:
        urls = [*sim.urls.values(), sim.admin_url]
        assert len(set(urls)) == 6
        assert all(url.startswith("http://127.0.0.1:") for url in urls)
        assert set(sim.urls) == set(Venue)


async def test_close_is_idempotent_and_final() -> None:
    """close() twice is fine; a closed simulator refuses to start again; so does a running one."""
    sim = Simulator()
    await sim.start()
    with pytest.raises(RuntimeError):
        await sim.start()
    await sim.close()
    await sim.close()
    with pytest.raises(RuntimeError):
        await sim.start()
    with pytest.raises(RuntimeError):
        _ = sim.urls


async def test_unknown_path_is_404(sim: Simulator, client: Any) -> None:
    """Paths the simulator does not serve answer 404 and count as requests."""
    assert (await client.get(Venue.BINANCE, "/api/v3/myTrades")).status == 404
    assert sim.stats(Venue.BINANCE).requests == 1


async def test_logs_carry_no_secrets(sim: Simulator, client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Debug logs name venue, path and a masked key, never secrets, signatures, passphrases or full keys."""
    caplog.set_level(logging.DEBUG, logger="venues.simulator")
    okx = sim.add_key(Venue.OKX)
    binance = sim.add_key(Venue.BINANCE)
    cdp = sim.add_key(Venue.COINBASE)
    await client.okx(okx, "/api/v5/account/config")
    answer = await client.binance(binance, "/sapi/v1/account/apiRestrictions", secret="w" * 64)
    await client.cdp(cdp, "/api/v3/brokerage/key_permissions")
    text = caplog.text
    assert "/api/v5/account/config" in text
    assert answer.body["code"] == -1022
    for key in (okx, binance, cdp):
        assert key.api_key not in text
        assert key.api_secret not in text
    assert str(okx.api_passphrase) not in text
    assert "signature=" not in text
    assert "Bearer" not in text


async def test_stats_count_auth_failures(sim: Simulator, client: Any) -> None:
    """Refused authentications count as auth failures; identity refusals do not."""
    key = sim.add_key(Venue.BINANCE, identities=["spot"])
    await client.binance(key, "/sapi/v1/account/apiRestrictions", secret="w" * 64)
    await client.binance(key, "/sapi/v1/margin/account")
    stats = sim.stats(Venue.BINANCE)
    assert (stats.requests, stats.auth_failures) == (2, 1)


def test_main_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """main() refuses an error rate above 1 with exit code 2 and a message."""
    assert cli.main(["--error-rate", "2"]) == 2
    assert "error_rate" in capsys.readouterr().err


def test_standalone_serves_until_sigterm() -> None:
    """`python -m venues.simulator --seed-demo` prints URLs and demo keys, serves, and exits 0 on SIGTERM."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "venues.simulator", "--seed-demo", "--seed", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("}"):
                break
        document = json.loads("".join(lines))
        assert set(document["venues"]) == {v.value for v in Venue}
        assert len(document["keys"]) == 17
        assert all(k["api_secret"] for k in document["keys"])
        url = document["venues"]["BINANCE"] + "/api/v3/time"
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback URL we just printed
            assert "serverTime" in json.loads(resp.read())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
