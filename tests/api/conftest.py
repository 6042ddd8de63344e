"""Fixtures of the REST API tests: an engine on the per-test database (FakeVenue as every venue, workers
running), the API on a real loopback port, and a client that checks every answer against the OpenAPI document.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from openapi_schema_validator import OAS31Validator

from engine import CredentialEngine
from engine.api import ApiConfig, ApiServer, auth, openapi
from engine.testing import FakeVenue

OWNER = "owner-1"
DOCUMENT = openapi.document()


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]
    text: str

    @property
    def data(self) -> Any:
        assert self.body["success"] is True, self.body
        return self.body["data"]


def documented_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    """The response schema the document gives for this answer (None: not JSON or not documented)."""
    operation = DOCUMENT["paths"].get(path, {}).get(method.lower())
    if operation is None:  # unknown route or method: the error envelope
        return {"$ref": "#/components/schemas/Error", "components": DOCUMENT["components"]}
    response = operation["responses"].get(str(status)) or operation["responses"].get("default")
    assert response is not None, f"{method} {path} answered {status}, which the document does not list"
    schema = response["content"].get("application/json", {}).get("schema")
    return None if schema is None else {**schema, "components": DOCUMENT["components"]}


def check_answer(path: str, method: str, status: int, text: str) -> Any:
    """Parse a JSON answer, refuse stack traces, and validate it against the OpenAPI document."""
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    body = json.loads(text) if text else None
    schema = documented_schema(path, method, status)
    if schema is not None:
        OAS31Validator(schema).validate(body)
    return body


class Api:
    """A client of the running server; tokens are minted per owner. ``token=None`` sends no header."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, secret: str) -> None:
        self.session = session
        self.url = base_url
        self.secret = secret

    def token(self, owner: str = OWNER) -> str:
        return auth.mint_token(self.secret, owner)

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        owner: str = OWNER,
        token: str | None = "<minted>",
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if token == "<minted>":
            sent["Authorization"] = f"Bearer {self.token(owner)}"
        elif token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            data = json.dumps(json_body)
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.url + path, data=data, params=params, headers=sent
        ) as resp:
            text = await resp.text()
            body = (
                check_answer(path, method, resp.status, text)
                if resp.content_type == "application/json"
                else None
            )
            return Reply(resp.status, body, CIMultiDict(resp.headers), text)

    async def post(self, path: str, body: Any, **kwargs: Any) -> Reply:
        return await self.call("POST", path, json_body=body, **kwargs)

    async def get(self, path: str, params: Mapping[str, str] | None = None, **kwargs: Any) -> Reply:
        return await self.call("GET", path, params=params, **kwargs)


@pytest.fixture
def fake() -> FakeVenue:
    fake = FakeVenue()
    fake.add_key(
        "binance-key-0001", "binance-secret-0001", account_id="uid-b1", identities=("spot", "margin")
    )
    fake.add_key(
        "binance-key-0002", "binance-secret-0002", account_id="uid-b1", identities=("spot", "margin")
    )
    fake.add_key("okx-key-0001", "okx-secret-0001", passphrase="okx-pass-1", account_id="uid-o1",
                 identities=("trading", "funding"))  # fmt: skip
    return fake


@pytest.fixture
def jwt_secret() -> str:
    return auth.generate_secret()


@pytest.fixture
def engine_defaults() -> dict[str, Any]:
    """Workers running (connect-with-keys waits for verification) and loopback webhook receivers allowed."""
    return {"workers": 4, "allow_private_webhook_urls": True}


@pytest.fixture
def api_config(jwt_secret: str) -> ApiConfig:
    return ApiConfig(jwt_secret=jwt_secret, port=0, connect_wait_timeout=5.0)


@pytest.fixture
async def server(eng: CredentialEngine, api_config: ApiConfig) -> AsyncIterator[ApiServer]:
    srv = ApiServer(eng, api_config)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def api(server: ApiServer, jwt_secret: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(session, server.url, jwt_secret)


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(jwt_secret: str) -> AsyncIterator[ApiFactory]:
    """Serve another engine (or the same with other settings) on its own port; closed after the test."""
    servers: list[ApiServer] = []
    async with aiohttp.ClientSession() as session:

        async def factory(engine: CredentialEngine, **settings: Any) -> Api:
            """``settings`` override ApiConfig's (``jwt_secret=None``: only an identity provider's keys)."""
            srv = ApiServer(engine, ApiConfig(**{"jwt_secret": jwt_secret, "port": 0, **settings}))
            await srv.start()
            servers.append(srv)
            return Api(session, srv.url, jwt_secret)

        yield factory
        for srv in servers:
            await srv.close()


@pytest.fixture
def create_body() -> Callable[..., dict[str, Any]]:
    """A valid create body for FakeVenue's first Binance key, with overrides."""

    def make(**overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "venue": "BINANCE",
            "credentialType": "EXCHANGE",
            "apiKey": "binance-key-0001",
            "apiSecret": "binance-secret-0001",
            "nickname": "My Binance API",
        }
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not None}

    return make
