"""A client generated from the OpenAPI document runs the seeds' flows (docs/api-dialect.md §3).

``openapi-python-client generate`` (https://github.com/openapi-generators/openapi-python-client) turns the
served document into a typed Python package, in a subprocess as an operator would run it; the test imports
that package and drives a real ApiServer with it: create, get, list with filters, verify, rotate, connect a
trading account (with a credential and with keys), disconnect, revoke, and a webhook endpoint created, listed
and deleted. Every answer is parsed by the generated models, so a field the document gets wrong (a missing
required member, a wrong type, a request the generator cannot model) fails here.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from engine import CredentialEngine
from engine.api import ApiServer, auth, openapi

PACKAGE = "generated_engine_client"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def client_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated package, imported from a temporary folder (and forgotten afterwards)."""
    root = tmp_path_factory.mktemp("client")
    document = root / "openapi.json"
    document.write_text(json.dumps(openapi.document()))
    done = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", str(document),
         "--output-path", str(root / PACKAGE), "--meta", "none"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr  # every schema was modelled
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def part(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


async def until(check: Callable[[], Awaitable[bool]], *, within: float = 15.0) -> None:
    """Poll ``check`` until it holds (bounded)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_generated_client_runs_the_seed_flows(
    client_package: ModuleType, eng: CredentialEngine, server: ApiServer, jwt_secret: str
) -> None:
    """The seeds' flows through the generated client, each answer parsed into its generated model."""
    models = part(client_package, "models")
    cred_api = {name: part(client_package, f"api.credential.{name}") for name in
                ("create_credential", "get_credential", "list_credentials", "verify_credential",
                 "rotate_credential", "revoke_credential")}  # fmt: skip
    account_api = {name: part(client_package, f"api.trading_account.{name}") for name in
                   ("connect_trading_account", "disconnect_trading_account", "list_trading_accounts")}  # fmt: skip
    hook_api = {name: part(client_package, f"api.webhook.{name}") for name in
                ("create_webhook", "list_webhooks", "delete_webhook")}  # fmt: skip
    client_type = part(client_package, "client").AuthenticatedClient
    client = client_type(base_url=server.url, token=auth.mint_token(jwt_secret, "owner-1"))

    async with client:
        # create (seed 02), then read it back once its verification ran
        created = await cred_api["create_credential"].asyncio_detailed(
            client=client,
            body=models.CreateCredentialRequest(
                venue=models.Venue.BINANCE,
                api_key="binance-key-0001",
                api_secret="binance-secret-0001",
                nickname="My Binance API",
            ),
        )
        assert created.status_code == 200, created.content
        cred = created.parsed.data
        assert isinstance(cred, models.Credential) and cred.status == models.CredentialStatus.PENDING
        assert (
            cred.nickname == cred.name == "My Binance API"
            and "binance-key-0001" not in created.content.decode()
        )

        async def verified() -> bool:
            got = await cred_api["get_credential"].asyncio(client=client, credential_id=cred.credential_id)
            return bool(got.data.status == models.CredentialStatus.VERIFIED)

        await until(verified)

        # list with filters (seed 04)
        listed = await cred_api["list_credentials"].asyncio(
            client=client,
            credential_status=models.CredentialStatus.VERIFIED,
            venue=models.Venue.BINANCE,
            limit=10,
        )
        assert [c.credential_id for c in listed.data] == [cred.credential_id]
        assert (listed.pagination.offset, listed.pagination.limit, listed.pagination.total) == (0, 10, 1)
        none = await cred_api["list_credentials"].asyncio(client=client, venue=models.Venue.OKX)
        assert none.data == [] and none.pagination.total == 0

        # verify again, then rotate to the second key of the same account (seed 04)
        again = await cred_api["verify_credential"].asyncio(
            client=client, body=models.CredentialIdRequest(credential_id=cred.credential_id)
        )
        assert again.data.credential_id == cred.credential_id
        await until(verified)
        rotated = await cred_api["rotate_credential"].asyncio(
            client=client,
            body=models.RotateCredentialRequest(
                credential_id=cred.credential_id, api_key="binance-key-0002", api_secret="binance-secret-0002"
            ),
        )
        assert isinstance(rotated.data.pending_rotation, models.PendingRotation)

        async def rotated_in() -> bool:
            got = await cred_api["get_credential"].asyncio(client=client, credential_id=cred.credential_id)
            return bool(got.data.secret_version == 2 and got.data.pending_rotation is None)

        await until(rotated_in)

        # connect a trading account with the credential, and one with keys (seed 05)
        account = (
            await account_api["connect_trading_account"].asyncio(
                client=client,
                body=models.ConnectWithCredential(credential_id=cred.credential_id, account_type="MARGIN"),
            )
        ).data
        assert (
            account.status == models.TradingAccountStatus.ACTIVE and account.account_type.lower() == "margin"
        )
        with_keys = await account_api["connect_trading_account"].asyncio_detailed(
            client=client,
            body=models.ConnectWithKeys(
                venue=models.Venue.OKX,
                api_key="okx-key-0001",
                api_secret="okx-secret-0001",
                api_passphrase="okx-pass-1",
                name="OKX trading",
            ),
        )
        assert with_keys.status_code == 200, with_keys.content
        assert with_keys.parsed.data.venue == models.Venue.OKX and with_keys.parsed.data.name == "OKX trading"
        mine = await account_api["list_trading_accounts"].asyncio(
            client=client, credential_id=cred.credential_id
        )
        assert [a.trading_account_id for a in mine.data] == [account.trading_account_id]

        # disconnect (seed 05's tradingAccount.disconnect), revoke (seed 04)
        off = await account_api["disconnect_trading_account"].asyncio(
            client=client, body=models.TradingAccountIdRequest(trading_account_id=account.trading_account_id)
        )
        assert off.data.status == models.TradingAccountStatus.DISABLED
        revoked = await cred_api["revoke_credential"].asyncio(
            client=client, body=models.RevokeCredentialRequest(credential_id=cred.credential_id)
        )
        assert revoked.data.status == models.CredentialStatus.REVOKED

        # an error is parsed as the error envelope
        missing = await cred_api["get_credential"].asyncio_detailed(client=client, credential_id=uuid.uuid4())
        assert missing.status_code == 404
        assert isinstance(missing.parsed, models.Error) and missing.parsed.errno == -100003

        # webhooks: create (the secret, once), list, delete
        hook = await hook_api["create_webhook"].asyncio_detailed(
            client=client,
            body=models.CreateWebhookRequest(
                url="http://127.0.0.1:9/hooks", event_types=[models.EventType("credential.verified")]
            ),
        )
        assert hook.status_code == 200, hook.content
        endpoint = hook.parsed.data
        assert endpoint.secret.startswith("whsec_")
        hooks = await hook_api["list_webhooks"].asyncio(client=client)
        assert [h.endpoint_id for h in hooks.data] == [endpoint.endpoint_id]
        assert "secret" not in hooks.data[0].additional_properties
        deleted = await hook_api["delete_webhook"].asyncio(
            client=client, body=models.EndpointIdRequest(endpoint_id=endpoint.endpoint_id)
        )
        assert deleted.data.deleted is True and deleted.data.endpoint_id == endpoint.endpoint_id
        assert (await hook_api["list_webhooks"].asyncio(client=client)).data == []
