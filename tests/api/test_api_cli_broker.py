"""The command line's BROKER commands against the simulator: mint, rotate --automatic, reconcile-keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_api_cli import _restore_logging, env, run, secret_file, sim  # noqa: F401 - fixtures and helpers

from venues.base import Venue
from venues.simulator import Simulator


@pytest.mark.usefixtures("env")
async def test_mint_rotate_automatically_and_reconcile_from_the_command_line(
    capsys: pytest.CaptureFixture[str],
    sim: Simulator,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    master = sim.add_master_account(Venue.BYBIT, sub_accounts=1)
    sub = master.sub_accounts[0]
    code, out, err = await run(
        capsys, "create", "--venue", "BYBIT", "--type", "BROKER", "--api-key", master.key.api_key,
        "--api-secret-file", secret_file(tmp_path, master.key), "--wait", "--json",
    )  # fmt: skip
    assert code == 0, err
    parent = json.loads(out)
    assert f"sub:{sub.sub_id}" in parent["identities"] and parent["permissions"]["subAccountKeys"]

    code, out, err = await run(
        capsys, "mint", parent["credentialId"], "--sub-account", sub.sub_id, "--ip", "127.0.0.1",
        "--name", "bot", "--wait", "--json",
    )  # fmt: skip
    assert code == 0, err
    minted = json.loads(out)
    assert minted["status"] == "VERIFIED" and minted["venueAccountId"] == sub.uid
    assert len(sim.sub_account_keys(Venue.BYBIT, master.key.uid, sub.sub_id)) == 1

    code, out, err = await run(capsys, "rotate", minted["credentialId"], "--automatic", "--json")
    assert code == 0, err
    code, _, err = await run(capsys, "rotate", minted["credentialId"], "--automatic", "--api-key", "x")
    assert code == 2 and "automatic" in err
    code, _, err = await run(capsys, "mint", parent["credentialId"], "--sub-account", "nobody")
    assert code == 1 and "sub-account is not one of" in err
    code, _, err = await run(capsys, "reconcile-keys")
    assert code == 0 and "1 sub-account" in err
