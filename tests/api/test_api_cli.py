"""The ``credential-engine`` command line, run in-process (``cli.main`` in a thread) against the per-test
database and the exchange simulator: tables, JSON, exit codes, one-line errors, progress, secrets kept off argv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import structlog

from engine import cli
from engine.api import auth
from engine.crypto import MasterKeyring
from venues.base import Venue
from venues.simulator import Simulator, TestKey

OWNER = "cli-owner"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main configures logging for its process; put the test process's logging back afterwards."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h).__name__ == "_EngineHandler"]:
        root.removeHandler(handler)
    structlog.reset_defaults()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, database_url: str, master_keys: str, tmp_path: Path, sim: Simulator
) -> None:
    """The service's environment, as an operator's shell would have it."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("ENGINE_MASTER_KEYS", master_keys)
    monkeypatch.setenv("ENGINE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ENGINE_VENUE_URLS", ",".join(f"{v.value}={u}" for v, u in sim.urls.items()))
    monkeypatch.setenv("ENGINE_OWNER", OWNER)
    monkeypatch.setenv("ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS", "1")
    monkeypatch.delenv("ENGINE_CLI_API_SECRET", raising=False)
    monkeypatch.delenv("ENGINE_LOG_LEVEL", raising=False)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line as a shell would (its own event loop, in a thread); (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def secret_file(tmp_path: Path, key: TestKey, name: str = "secret") -> str:
    path = tmp_path / f"{name}.txt"
    path.write_text(key.api_secret, encoding="utf-8")
    return str(path)


def every_command(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from every_command(sub, (*prefix, name))


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """--help works for the program and every (sub)command, exiting 0."""
    commands = list(every_command(cli.build_parser()))
    expected = {"serve", "worker", "simulator", "token", "create", "list", "get", "verify", "rotate", "revoke",
                "connect", "disconnect", "webhooks", "jobs", "rewrap-keys", "migrate"}  # fmt: skip
    assert expected <= {c[0] for c in commands}
    assert ("webhooks", "deliveries") in commands and ("jobs", "retry") in commands
    assert cli.main(["--help"]) == 0
    for command in commands:
        assert cli.main([*command, "--help"]) == 0, command
        assert "usage:" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """No command, an unknown command, or a missing required option: exit 2."""
    assert cli.main([]) == 2
    assert cli.main(["explode"]) == 2
    assert cli.main(["token"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_token_is_verifiable(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """token --owner prints a JWT the server accepts for that owner; without a secret it fails in one line."""
    secret = auth.generate_secret()
    monkeypatch.setenv(auth.SECRET_ENV, secret)
    assert cli.main(["token", "--owner", "desk-7", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert auth.verify_token(secret, token).owner_id == "desk-7"
    monkeypatch.delenv(auth.SECRET_ENV)
    assert cli.main(["token", "--owner", "desk-7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ENGINE_API_JWT_SECRET" in err


@pytest.mark.usefixtures("env")
async def test_create_wait_list_get(
    capsys: pytest.CaptureFixture[str], sim: Simulator, tmp_path: Path
) -> None:
    """create --wait verifies against the simulator; list shows a table; get --json the public fields."""
    key = sim.add_key(Venue.BINANCE)
    code, out, _ = await run(
        capsys, "create", "--venue", "binance", "--api-key", key.api_key,
        "--api-secret-file", secret_file(tmp_path, key), "--name", "Desk 7", "--wait", "20", "--json",
    )  # fmt: skip
    assert code == 0
    created = json.loads(out)
    assert created["status"] == "VERIFIED"
    assert created["identities"] == ["futures", "margin", "spot"]
    assert key.api_secret not in out
    code, out, _ = await run(capsys, "list")
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["ID", "VENUE", "TYPE"]
    assert created["credentialId"] in row and "VERIFIED" in row and "Desk 7" in row
    code, out, _ = await run(capsys, "get", created["credentialId"], "--json")
    assert json.loads(out)["venueAccountId"] == key.uid
    code, out, _ = await run(capsys, "list", "--status", "FAILED", "--json")
    assert json.loads(out) == []


@pytest.mark.usefixtures("env")
async def test_failed_verification_exits_1(
    capsys: pytest.CaptureFixture[str], sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key the policy refuses (withdrawals enabled) ends FAILED with exit code 1; the secret comes from env."""
    key = sim.add_key(Venue.OKX, withdraw=True)
    monkeypatch.setenv("ENGINE_CLI_API_SECRET", key.api_secret)
    monkeypatch.setenv("ENGINE_CLI_API_PASSPHRASE", key.api_passphrase or "")
    code, out, _ = await run(capsys, "create", "--venue", "OKX", "--api-key", key.api_key, "--wait", "20")
    assert code == 1
    assert "FAILED" in out and "POLICY_WITHDRAW_ENABLED" in out


@pytest.mark.usefixtures("env")
async def test_errors_are_one_line_with_exit_codes(
    capsys: pytest.CaptureFixture[str], sim: Simulator, tmp_path: Path
) -> None:
    """Invalid input exits 2, a missing credential 1, both as one line on stderr; no secret echoed."""
    key = sim.add_key(Venue.BINANCE)
    code, _, err = await run(
        capsys,
        "create",
        "--venue",
        "MTGOX",
        "--api-key",
        key.api_key,
        "--api-secret-file",
        secret_file(tmp_path, key),
    )
    assert code == 2
    assert err.startswith("credential-engine: error: venue:") and err.count("\n") == 1
    code, _, err = await run(capsys, "get", "00000000-0000-0000-0000-000000000000")
    assert code == 1 and "not found" in err and err.count("\n") == 1
    code, _, err = await run(capsys, "create", "--venue", "BINANCE", "--api-key", key.api_key)
    assert code == 2 and "--api-secret-file" in err  # not a terminal: asks for a file or the variable
    code, _, err = await run(
        capsys, "create", "--venue", "BINANCE", "--api-key", "k", "--api-secret-file", "/nope"
    )
    assert code == 1 and "/nope" in err


@pytest.mark.usefixtures("env")
async def test_bulk_verify_rotate_connect_revoke(
    capsys: pytest.CaptureFixture[str], sim: Simulator, tmp_path: Path
) -> None:
    """verify --all --wait shows progress on stderr; rotate --wait promotes; connect, accounts, disconnect, revoke."""
    ids = []
    keys = [sim.add_key(Venue.BYBIT) for _ in range(3)]
    for n, key in enumerate(keys):
        code, out, _ = await run(
            capsys, "create", "--venue", "BYBIT", "--api-key", key.api_key,
            "--api-secret-file", secret_file(tmp_path, key, f"s{n}"), "--json",
        )  # fmt: skip
        assert code == 0
        ids.append(json.loads(out)["credentialId"])
    code, out, err = await run(capsys, "verify", "--all", "--wait", "30")
    assert code == 0
    assert out.count("VERIFIED") == 3
    assert "verify [" in err and "3/3" in err  # the progress bar's final line
    newer = sim.add_key(Venue.BYBIT, uid=keys[0].uid)
    code, out, _ = await run(
        capsys, "rotate", ids[0], "--api-key", newer.api_key, "--api-secret-file", secret_file(tmp_path, newer, "n"),
        "--wait", "30", "--json",
    )  # fmt: skip
    assert code == 0
    rotated = json.loads(out)
    assert rotated["secretVersion"] == 2 and rotated["pendingRotation"] is None
    code, out, _ = await run(capsys, "connect", "--credential", ids[0], "--account-type", "spot", "--json")
    assert code == 0
    account = json.loads(out)
    assert account["status"] == "ACTIVE" and account["accountType"] == "SPOT"
    code, out, _ = await run(capsys, "accounts")
    assert account["tradingAccountId"] in out
    code, out, _ = await run(capsys, "revoke", ids[1], "--json")
    assert json.loads(out)["status"] == "REVOKED"
    code, _, err = await run(capsys, "revoke", ids[0], "--no-cascade")
    assert code == 1 and "ACTIVE" in err
    code, out, _ = await run(capsys, "disconnect", account["tradingAccountId"], "--json")
    assert json.loads(out)["status"] == "DISABLED"


@pytest.mark.usefixtures("env")
async def test_rejected_rotation_exits_1(
    capsys: pytest.CaptureFixture[str], sim: Simulator, tmp_path: Path
) -> None:
    """Rotating to keys of another exchange account is rejected: the old keys stay, exit code 1."""
    key, stranger = sim.add_key(Venue.KRAKEN), sim.add_key(Venue.KRAKEN)
    code, out, _ = await run(
        capsys, "create", "--venue", "KRAKEN", "--api-key", key.api_key, "--api-secret-file",
        secret_file(tmp_path, key), "--wait", "20", "--json",
    )  # fmt: skip
    cid = json.loads(out)["credentialId"]
    code, _, err = await run(
        capsys, "rotate", cid, "--api-key", stranger.api_key, "--api-secret-file",
        secret_file(tmp_path, stranger, "x"), "--wait", "20",
    )  # fmt: skip
    assert code == 1
    assert "rotation rejected" in err


@pytest.mark.usefixtures("env")
async def test_webhooks_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """webhooks add prints the secret once; list, disable, rotate-secret, deliveries and remove work."""
    code, out, err = await run(capsys, "webhooks", "add", "http://127.0.0.1:9/hooks", "--events",
                               "credential.created,credential.revoked", "--json")  # fmt: skip
    assert code == 0, err
    endpoint = json.loads(out)
    assert endpoint["secret"].startswith("whsec_")
    assert endpoint["eventTypes"] == ["credential.created", "credential.revoked"]
    code, out, _ = await run(capsys, "webhooks", "list")
    assert endpoint["endpointId"] in out and "whsec_" not in out
    code, out, _ = await run(capsys, "webhooks", "disable", endpoint["endpointId"], "--json")
    assert json.loads(out)[0]["enabled"] is False
    code, out, _ = await run(capsys, "webhooks", "rotate-secret", endpoint["endpointId"])
    assert code == 0 and "whsec_" in out
    code, out, _ = await run(capsys, "webhooks", "deliveries", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = await run(capsys, "webhooks", "remove", endpoint["endpointId"])
    assert code == 0
    code, out, err = await run(capsys, "webhooks", "remove", endpoint["endpointId"])
    assert code == 1 and err.count("\n") == 1


@pytest.mark.usefixtures("env")
async def test_jobs_rewrap_and_migrate(
    capsys: pytest.CaptureFixture[str],
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    master_keys: str,
) -> None:
    """migrate applies the schema; jobs list/retry answer; rewrap-keys moves every data key to a new master key."""
    assert (await run(capsys, "migrate"))[0] == 0
    code, out, _ = await run(capsys, "jobs", "list")
    assert code == 0 and "no jobs" in out
    code, _, err = await run(capsys, "jobs", "retry", "424242")
    assert code == 1 and "not dead" in err
    key = sim.add_key(Venue.BINANCE)
    await run(capsys, "create", "--venue", "BINANCE", "--api-key", key.api_key,
              "--api-secret-file", secret_file(tmp_path, key))  # fmt: skip
    monkeypatch.setenv("ENGINE_MASTER_KEYS", f"{master_keys},{MasterKeyring.generate_spec(2)}")
    code, out, err = await run(capsys, "rewrap-keys", "--batch-size", "1")
    assert code == 0
    assert int(out.split()[0]) >= 1  # the credential's data key (and engine-internal blobs)
    assert "rewrap [" in err
    code, out, _ = await run(capsys, "rewrap-keys")
    assert code == 0 and out.startswith("0 ")  # nothing left under the old master key


@pytest.mark.usefixtures("env")
async def test_rewrap_keys_exits_1_naming_what_is_left(
    capsys: pytest.CaptureFixture[str],
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    master_keys: str,
    database_url: str,
) -> None:
    """A secret another client holds locked past --lock-timeout: exit 1, and stderr names the kind and count
    left (never key material); once released, a second run moves it and exits 0."""
    key = sim.add_key(Venue.BINANCE)
    code, _, _ = await run(capsys, "create", "--venue", "BINANCE", "--api-key", key.api_key,
                           "--api-secret-file", secret_file(tmp_path, key))  # fmt: skip
    assert code == 0
    monkeypatch.setenv("ENGINE_MASTER_KEYS", f"{master_keys},{MasterKeyring.generate_spec(2)}")
    locker = await asyncpg.connect(database_url)
    try:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM credential_secrets FOR UPDATE")
            code, out, err = await run(capsys, "rewrap-keys", "--lock-timeout", "0.2")
        assert code == 1
        assert out.startswith("1 data key(s) re-wrapped under master key version 2")  # the fingerprint key
        assert err.strip().endswith(
            "error: still under an old master key: 1 credential secret(s) under master key version(s) 1 "
            "(1 locked by other transactions); keep the old master key versions and run rewrap-keys again"
        )
        assert key.api_secret not in out + err and key.api_key not in out + err
        code, out, _ = await run(capsys, "rewrap-keys")
        assert code == 0 and out.startswith("1 data key(s)")
    finally:
        await locker.close()


async def test_simulator_command_delegates(capsys: pytest.CaptureFixture[str]) -> None:
    """`credential-engine simulator --help` is the simulator's own help."""
    code = await asyncio.to_thread(cli.main, ["simulator", "--help"])
    assert code == 0
    assert "--seed-demo" in capsys.readouterr().out


def test_module_docstring_lists_every_command() -> None:
    """The module docstring (the reference) names every top-level command."""
    doc = cli.__doc__ or ""
    for command in {c[0] for c in every_command(cli.build_parser())}:
        assert command in doc, command
