"""The product's own examples (docs/api-dialect.md §2), run as written with only the host and the token changed.

Seeds 02 and 05 show Python ``requests`` code and ``curl`` commands against
``https://cadenza-api-uat.algo724.com``; here they run against the test server. FakeVenue knows the product examples'
placeholder keys (``your-api-key`` / ``your-api-secret``), so they verify as real keys would.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
from typing import Any

import pytest
import requests

from engine.testing import FakeVenue

SEED_HOST = "https://cadenza-api-uat.algo724.com"
SEED_TOKEN = "eyJhbGciOiJIUzI1NiIs..."

SEED_02_CURL = """curl -X POST https://cadenza-api-uat.algo724.com/api/v3/credential/create \\
-H "Authorization: Bearer eyJhbGciOiJIUzI1NiIs..." \\
-H "Content-Type: application/json" \\
-d '{
"venue": "BINANCE",
"apiKey": "your-api-key",
"apiSecret": "your-api-secret",
"name": "My API Key"
}'"""

SEED_05_CURL = """curl -X POST https://cadenza-api-uat.algo724.com/api/v3/tradingAccount/connect \\
-H "Authorization: Bearer eyJhbGciOiJIUzI1NiIs..." \\
-H "Content-Type: application/json" \\
-d '{
"venue": "BINANCE",
"apiKey": "your-api-key",
"apiSecret": "your-api-secret",
"name": "My Trading Account"
}'"""


@pytest.fixture(autouse=True)
def seed_keys(fake: FakeVenue) -> None:
    fake.add_key("your-api-key", "your-api-secret", account_id="uid-seed", identities=("spot",))


def seed_02_requests(base: str, access_token: str) -> str:
    """docs/api-dialect.md §4's Usage block, verbatim but for the host."""
    headers = {"Authorization": f"Bearer {access_token}"}
    response = requests.post(
        f"{base}/api/v3/credential/create",
        headers=headers,
        json={
            "venue": "BINANCE",
            "apiKey": "your-api-key",
            "apiSecret": "your-api-secret",
            "name": "My Binance API Key",
        },
        timeout=30,
    )
    credential = response.json()["data"]
    print(f"Credential ID: {credential['credentialId']}")
    return str(response.text)


def seed_05_requests(base: str, access_token: str) -> tuple[str, str]:
    """docs/api-dialect.md §8's Usage block, verbatim but for the host: a Binance account, then a Coinbase one."""
    headers = {"Authorization": f"Bearer {access_token}"}
    # Connect a Binance account
    response = requests.post(
        f"{base}/api/v3/tradingAccount/connect",
        headers=headers,
        json={
            "venue": "BINANCE",
            "apiKey": "your-api-key",
            "apiSecret": "your-api-secret",
            "name": "My Binance Account",
        },
        timeout=30,
    )
    account = response.json()["data"]
    trading_account_id = account["tradingAccountId"]
    print(f"Connected trading account: {trading_account_id}")
    binance = response.text
    # Connect a Coinbase account (requires passphrase)
    response = requests.post(
        f"{base}/api/v3/tradingAccount/connect",
        headers=headers,
        json={
            "venue": "COINBASE",
            "apiKey": "your-api-key",
            "apiSecret": "your-api-secret",
            "apiPassphrase": "your-passphrase",
            "name": "My Coinbase Account",
        },
        timeout=30,
    )
    return binance, response.text


async def test_seed_02_requests_example(api: Any) -> None:
    """docs/api-dialect.md §4's requests code creates the credential and reads credentialId from data."""
    text = await asyncio.to_thread(seed_02_requests, api.url, api.token("seed-user"))
    body = json.loads(text)
    assert body["success"] is True and body["errno"] == 0 and body["error"] is None
    data = body["data"]
    assert data["name"] == "My Binance API Key"
    assert data["type"] == "EXCHANGE"
    # masked as docs/api-dialect.md §4 shows it: a prefix then ***; short keys show less of themselves
    assert data["apiKey"].endswith("***") and "your-api-key".startswith(data["apiKey"][:-3])
    assert "your-api-secret" not in text


async def test_seed_05_requests_example(api: Any) -> None:
    """docs/api-dialect.md §8's requests code connects a Binance and a Coinbase (with passphrase) account."""
    binance, coinbase = await asyncio.to_thread(seed_05_requests, api.url, api.token("seed-user"))
    for text, venue, name in (
        (binance, "BINANCE", "My Binance Account"),
        (coinbase, "COINBASE", "My Coinbase Account"),
    ):
        body = json.loads(text)
        assert body["success"] is True, body
        assert body["data"]["venue"] == venue
        assert body["data"]["name"] == name
        assert body["data"]["status"] == "ACTIVE"
        assert body["data"]["accountType"] == "SPOT"
        assert "your-api-secret" not in text and "your-passphrase" not in text


async def run_curl(command: str, base: str, token: str) -> dict[str, Any]:
    """Run a product example's curl command with the host and token replaced (and -s to keep the output clean)."""
    shell_line = command.replace("\\\n", " ")  # line continuations, as the shell joins them
    argv = shlex.split(shell_line.replace(SEED_HOST, base).replace(SEED_TOKEN, token))
    proc = await asyncio.create_subprocess_exec(
        argv[0], "-s", *argv[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_seed_02_and_05_curl_examples(api: Any) -> None:
    """The curl commands of docs/api-dialect.md §4 and §8 succeed as written, with the host and token replaced."""
    created = await run_curl(SEED_02_CURL, api.url, api.token("curl-user-1"))
    assert created["success"] is True and created["data"]["name"] == "My API Key"
    connected = await run_curl(SEED_05_CURL, api.url, api.token("curl-user-2"))
    assert connected["success"] is True
    assert connected["data"]["name"] == "My Trading Account"
    assert connected["data"]["status"] == "ACTIVE"


async def test_seed_04_list_with_filter(api: Any) -> None:
    """docs/api-dialect.md §6's list and its credentialStatus filter answer its list response shape."""
    await asyncio.to_thread(seed_02_requests, api.url, api.token())
    await asyncio.to_thread(seed_05_requests, api.url, api.token())  # verifies the key on the way
    headers = {"Authorization": f"Bearer {api.token()}"}
    response = await asyncio.to_thread(
        requests.get,
        f"{api.url}/api/v3/credential/list",
        headers=headers,
        params={"credentialStatus": "VERIFIED"},
        timeout=30,
    )
    body = response.json()
    assert response.status_code == 200
    assert set(body) == {"data", "success", "errno", "error", "pagination"}
    assert body["pagination"] == {"offset": 0, "limit": 50, "total": 2}
    for credential in body["data"]:
        assert credential["status"] == "VERIFIED"
        assert credential["identities"] == ["spot"]
        assert {"credentialId", "venue", "credentialType", "nickname", "createdAt", "updatedAt"} <= set(
            credential
        )
