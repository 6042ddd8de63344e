"""Fixtures of the simulator tests: a running simulator, a client session, and signed-request helpers.

The signers here are written from docs/venues.md's formulas, independently of the simulator's verifiers (and
never importing the probe modules), so each side checks the other.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from yarl import URL

from venues.base import Venue
from venues.simulator import Simulator, TestKey


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: Any
    text: str


def now_ms() -> int:
    return int(time.time() * 1000)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(
    key: TestKey,
    *,
    method: str,
    host: str,
    path: str,
    secret: str | None = None,
    kid: str | None = None,
    sub: str | None = None,
    iss: str = "cdp",
    nbf: float | None = None,
    exp: float | None = None,
    uri: str | None = None,
) -> str:
    """A CDP bearer token (docs/venues.md §4A.2): ES256 for "cdp" keys, EdDSA for "cdp_ed25519" keys."""
    now = int(time.time())
    alg = "ES256" if key.kind == "cdp" else "EdDSA"
    header = {"alg": alg, "kid": kid or key.api_key, "nonce": secrets.token_hex(16), "typ": "JWT"}
    payload = {
        "sub": sub or key.api_key,
        "iss": iss,
        "nbf": now if nbf is None else nbf,
        "exp": now + 120 if exp is None else exp,
        "uri": uri if uri is not None else f"{method} {host}{path}",
    }
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}".encode()
    material = secret or key.api_secret
    if alg == "ES256":
        private = serialization.load_pem_private_key(material.encode(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        seed = base64.b64decode(material)[:32]
        signature = ed25519.Ed25519PrivateKey.from_private_bytes(seed).sign(signing_input)
    return f"{signing_input.decode()}.{b64url(signature)}"


def okx_timestamp(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


class Client:
    """Signs requests as each venue documents and sends them to the simulator."""

    def __init__(self, session: aiohttp.ClientSession, sim: Simulator) -> None:
        self.session = session
        self.sim = sim
        self._nonce = now_ms() * 1000

    def base(self, venue: Venue) -> str:
        return self.sim.urls[venue]

    def host(self, venue: Venue) -> str:
        return URL(self.base(venue)).raw_authority

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        data: str | None = None,
        wait: float = 5.0,
    ) -> Answer:
        async with self.session.request(
            method,
            URL(url, encoded=True),
            headers=dict(headers or {}),
            data=data,
            timeout=aiohttp.ClientTimeout(total=wait),
        ) as resp:
            text = await resp.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            return Answer(resp.status, dict(resp.headers), body, text)

    async def get(self, venue: Venue, path: str, **kwargs: Any) -> Answer:
        return await self.send("GET", self.base(venue) + path, **kwargs)

    # -- BINANCE (docs/venues.md §1.2) ------------------------------------------------------------------

    async def binance(
        self,
        key: TestKey,
        path: str,
        *,
        params: str = "",
        secret: str | None = None,
        timestamp: int | None = None,
        recv_window: int | None = None,
        api_key: str | None = None,
    ) -> Answer:
        query = f"timestamp={now_ms() if timestamp is None else timestamp}"
        if recv_window is not None:
            query += f"&recvWindow={recv_window}"
        if params:
            query += "&" + params
        signature = hmac.new((secret or key.api_secret).encode(), query.encode(), hashlib.sha256).hexdigest()
        url = f"{self.base(Venue.BINANCE)}{path}?{query}&signature={signature}"
        return await self.send("GET", url, {"X-MBX-APIKEY": api_key or key.api_key})

    # -- OKX (docs/venues.md §2.2) ----------------------------------------------------------------------

    async def okx(
        self,
        key: TestKey,
        path: str,
        *,
        query: str = "",
        secret: str | None = None,
        passphrase: str | None = None,
        timestamp_ms: int | None = None,
        demo: bool = False,
        api_key: str | None = None,
    ) -> Answer:
        request_path = path + (f"?{query}" if query else "")
        stamp = okx_timestamp(now_ms() if timestamp_ms is None else timestamp_ms)
        mac = hmac.new(
            (secret or key.api_secret).encode(), f"{stamp}GET{request_path}".encode(), hashlib.sha256
        )
        headers = {
            "OK-ACCESS-KEY": api_key or key.api_key,
            "OK-ACCESS-SIGN": base64.b64encode(mac.digest()).decode(),
            "OK-ACCESS-TIMESTAMP": stamp,
            "OK-ACCESS-PASSPHRASE": passphrase if passphrase is not None else (key.api_passphrase or ""),
        }
        if demo:
            headers["x-simulated-trading"] = "1"
        return await self.send("GET", self.base(Venue.OKX) + request_path, headers)

    # -- BYBIT (docs/venues.md §3.2) --------------------------------------------------------------------

    async def bybit(
        self,
        key: TestKey,
        path: str,
        *,
        query: str = "",
        secret: str | None = None,
        timestamp: int | None = None,
        recv_window: str = "5000",
        api_key: str | None = None,
    ) -> Answer:
        stamp = str(now_ms() if timestamp is None else timestamp)
        name = api_key or key.api_key
        prehash = stamp + name + recv_window + query
        signature = hmac.new(
            (secret or key.api_secret).encode(), prehash.encode(), hashlib.sha256
        ).hexdigest()
        headers = {
            "X-BAPI-API-KEY": name,
            "X-BAPI-TIMESTAMP": stamp,
            "X-BAPI-SIGN": signature,
            "X-BAPI-RECV-WINDOW": recv_window,
        }
        url = self.base(Venue.BYBIT) + path + (f"?{query}" if query else "")
        return await self.send("GET", url, headers)

    # -- COINBASE Advanced (docs/venues.md §4A.2) and Exchange (4B) -------------------------------------

    async def cdp(self, key: TestKey, path: str, **claims: Any) -> Answer:
        token = make_jwt(key, method="GET", host=self.host(Venue.COINBASE), path=path, **claims)
        return await self.get(Venue.COINBASE, path, headers={"Authorization": f"Bearer {token}"})

    async def exchange(
        self,
        key: TestKey,
        request_path: str,
        *,
        secret: str | None = None,
        passphrase: str | None = None,
        timestamp: float | None = None,
        api_key: str | None = None,
    ) -> Answer:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        mac = hmac.new(
            base64.b64decode(secret or key.api_secret), f"{stamp}GET{request_path}".encode(), hashlib.sha256
        )
        headers = {
            "CB-ACCESS-KEY": api_key or key.api_key,
            "CB-ACCESS-SIGN": base64.b64encode(mac.digest()).decode(),
            "CB-ACCESS-TIMESTAMP": stamp,
            "CB-ACCESS-PASSPHRASE": passphrase if passphrase is not None else (key.api_passphrase or ""),
        }
        return await self.get(Venue.COINBASE, request_path, headers=headers)

    # -- KRAKEN Spot (docs/venues.md §5A.2) and Futures (5B) --------------------------------------------

    def next_nonce(self) -> int:
        self._nonce += 1
        return self._nonce

    async def kraken(
        self,
        key: TestKey,
        method: str,
        *,
        nonce: int | None = None,
        secret: str | None = None,
        as_json: bool = False,
        api_key: str | None = None,
    ) -> Answer:
        nonce_value = self.next_nonce() if nonce is None else nonce
        path = f"/0/private/{method}"
        if as_json:
            body = json.dumps({"nonce": nonce_value})
            content_type = "application/json"
        else:
            body = f"nonce={nonce_value}"
            content_type = "application/x-www-form-urlencoded"
        digest = hashlib.sha256((str(nonce_value) + body).encode()).digest()
        mac = hmac.new(base64.b64decode(secret or key.api_secret), path.encode() + digest, hashlib.sha512)
        headers = {
            "API-Key": api_key or key.api_key,
            "API-Sign": base64.b64encode(mac.digest()).decode(),
            "Content-Type": content_type,
        }
        return await self.send("POST", self.base(Venue.KRAKEN) + path, headers, data=body)

    async def futures(
        self,
        key: TestKey,
        path: str,
        *,
        query: str = "",
        nonce: str | None = None,
        secret: str | None = None,
    ) -> Answer:
        endpoint = path.removeprefix("/derivatives")
        digest = hashlib.sha256((query + (nonce or "") + endpoint).encode()).digest()
        mac = hmac.new(base64.b64decode(secret or key.api_secret), digest, hashlib.sha512)
        headers = {"APIKey": key.api_key, "Authent": base64.b64encode(mac.digest()).decode()}
        if nonce is not None:
            headers["Nonce"] = nonce
        url = self.base(Venue.KRAKEN) + path + (f"?{query}" if query else "")
        return await self.send("GET", url, headers)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=1234) as simulator:
        yield simulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def client(session: aiohttp.ClientSession, sim: Simulator) -> Client:
    return Client(session, sim)


@pytest.fixture
def make_client(session: aiohttp.ClientSession) -> Callable[[Simulator], Client]:
    """Signing helpers bound to another simulator than the ``sim`` fixture."""
    return lambda simulator: Client(session, simulator)
