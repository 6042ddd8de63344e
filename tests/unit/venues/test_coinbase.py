"""Coinbase probe: CDP JWTs (ES256, EdDSA), Exchange HMAC, key kinds, error tables, full probes, no leaks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from yarl import URL

from venues import base, coinbase, coinbase_auth

ADV = "https://api.coinbase.com"
EXC = "https://api.exchange.coinbase.com"
KEY_PERMISSIONS_URL = f"{ADV}/api/v3/brokerage/key_permissions"
ACCOUNTS_URL = f"{ADV}/api/v3/brokerage/accounts?limit=1"
PORTFOLIOS_URL = f"{ADV}/api/v3/brokerage/portfolios"
ADV_TIME_URL = f"{ADV}/api/v3/brokerage/time"
EXC_ACCOUNTS_URL = f"{EXC}/accounts"
EXC_PROFILES_URL = f"{EXC}/profiles"
EXC_TIME_URL = f"{EXC}/time"

CANARY = "CANARYc01nb4se"
KEY_NAME = "organizations/0f1e2d3c-aaaa-bbbb-cccc-123456789abc/apiKeys/9a8b7c6d-1111-2222-3333-444455556666"
ED_KEY_ID = "5b1f7e1c-2f2d-4e0a-9a38-8f3c2b7d9e10"
EXCHANGE_KEY = "c2ab0b5e9d7f4a3b8e1d6c0f9a2b3c4d"
PASSPHRASE = f"{CANARY}-passphrase"
PORTFOLIO = "7ed5a2a3-2b5f-4d8d-8d5c-5f2f4e6b0c11"

EC_KEY = ec.generate_private_key(ec.SECP256R1())
PEM = EC_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
).decode()
PEM_BODY_LINE = PEM.splitlines()[1]
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(CANARY.encode()).digest())
ED_SECRET = base64.b64encode(
    ED_KEY.private_bytes_raw() + ED_KEY.public_key().public_bytes_raw()
).decode()  # seed || public key, docs/venues.md §4A.2
EXCHANGE_SECRET = base64.b64encode((CANARY.encode() * 8)[:64]).decode()
OTHER_SECRET = base64.b64encode(b"x" * 40).decode()  # base64, not 64 bytes: only an Exchange secret

CDP_KEYS = base.ApiKeys(KEY_NAME, PEM)
ED_KEYS = base.ApiKeys(ED_KEY_ID, ED_SECRET)
EXCHANGE_KEYS = base.ApiKeys(EXCHANGE_KEY, EXCHANGE_SECRET, PASSPHRASE)

KEY_PERMISSIONS = {
    "can_view": True,
    "can_trade": True,
    "can_transfer": False,
    "portfolio_uuid": PORTFOLIO,
    "portfolio_type": "DEFAULT",
}
PORTFOLIOS = {"portfolios": [{"name": "Default", "uuid": PORTFOLIO, "type": "DEFAULT", "deleted": False}]}
CDP_ACCOUNTS = {
    "accounts": [{"uuid": "acc-1", "currency": "BTC"}],
    "has_next": False,
    "cursor": "",
    "size": 1,
}
PROFILES = [
    {"id": "prof-other", "user_id": "u1", "name": "trading", "active": True, "is_default": False},
    {"id": "prof-default", "user_id": "u1", "name": "default", "active": True, "is_default": True},
]
EXC_ACCOUNTS = [{"id": "a1", "currency": "USD", "balance": "1.0", "profile_id": "prof-from-account"}]


@pytest.fixture
async def probe(session: aiohttp.ClientSession) -> coinbase.CoinbaseProbe:
    return coinbase.CoinbaseProbe(session)


def calls(m: aioresponses, method: str, url: str) -> list[Any]:
    return list(m.requests.get((method, URL(url)), []))


def bearer(call: Any) -> str:
    value: str = call.kwargs["headers"]["Authorization"]
    assert value.startswith("Bearer ")
    return value.removeprefix("Bearer ")


def good_cdp(m: aioresponses, base_url: str = ADV) -> None:
    m.get(f"{base_url}/api/v3/brokerage/key_permissions", payload=KEY_PERMISSIONS)
    m.get(f"{base_url}/api/v3/brokerage/accounts?limit=1", payload=CDP_ACCOUNTS)
    m.get(f"{base_url}/api/v3/brokerage/portfolios", payload=PORTFOLIOS)


def good_exchange(m: aioresponses) -> None:
    m.get(EXC_ACCOUNTS_URL, payload=EXC_ACCOUNTS)
    m.get(EXC_PROFILES_URL, payload=PROFILES)


# -- an independent reading of the JWT (RFC 7515/7519 by hand, not the module's code) -----------------------


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def open_jwt(token: str, public_key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify ``token`` with ``public_key`` and return its header and payload."""
    head, body, signature = token.split(".")
    signing_input = f"{head}.{body}".encode()
    raw = b64url_decode(signature)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        assert len(raw) == 64, "ES256 signatures are raw r||s"
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        public_key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    else:
        public_key.verify(raw, signing_input)
    assert "=" not in token, "base64url without padding"
    return json.loads(b64url_decode(head)), json.loads(b64url_decode(body))


# -- CDP JWTs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "public_key", "alg"),
    [(CDP_KEYS, EC_KEY.public_key(), "ES256"), (ED_KEYS, ED_KEY.public_key(), "EdDSA")],
    ids=["ES256", "EdDSA"],
)
async def test_cdp_jwt_verifies_and_carries_documented_claims(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, keys: base.ApiKeys, public_key: Any, alg: str
) -> None:
    """Each request's JWT verifies with the public key and carries the documented header and claims."""
    good_cdp(mocked)
    before = int(time.time())
    await probe.probe(keys)
    after = int(time.time())
    tokens = []
    for url, uri in (
        (KEY_PERMISSIONS_URL, "GET api.coinbase.com/api/v3/brokerage/key_permissions"),
        (ACCOUNTS_URL, "GET api.coinbase.com/api/v3/brokerage/accounts"),  # no query in the uri
        (PORTFOLIOS_URL, "GET api.coinbase.com/api/v3/brokerage/portfolios"),
    ):
        (call,) = calls(mocked, "GET", url)
        token = bearer(call)
        header, claims = open_jwt(token, public_key)
        assert header["alg"] == alg
        assert header["kid"] == keys.api_key
        assert header["typ"] == "JWT"
        assert isinstance(header["nonce"], str)
        assert len(header["nonce"]) >= 16
        assert claims["sub"] == keys.api_key
        assert claims["iss"] == "cdp"
        assert claims["uri"] == uri
        assert before <= claims["nbf"] <= after
        assert claims["exp"] - claims["nbf"] == 120
        tokens.append((token, header["nonce"]))
    assert len({t for t, _ in tokens}) == 3, "a fresh JWT per request"
    assert len({n for _, n in tokens}) == 3, "a fresh nonce per JWT"


async def test_cdp_jwt_uri_names_the_host_and_port_called(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """Against a base_url the uri claim is "<METHOD> <host:port><path>": what the Host header says."""
    probe = coinbase.CoinbaseProbe(session, base_url="http://127.0.0.1:45123/")
    good_cdp(mocked, "http://127.0.0.1:45123")
    await probe.probe(CDP_KEYS)
    (call,) = calls(mocked, "GET", "http://127.0.0.1:45123/api/v3/brokerage/key_permissions")
    _, claims = open_jwt(bearer(call), EC_KEY.public_key())
    assert claims["uri"] == "GET 127.0.0.1:45123/api/v3/brokerage/key_permissions"


@pytest.mark.parametrize(
    ("url", "uri"),
    [
        (
            f"{ADV}/api/v3/brokerage/accounts?limit=1&cursor=a",
            "GET api.coinbase.com/api/v3/brokerage/accounts",
        ),
        ("https://api.coinbase.com:443/api/v3/brokerage/time", "GET api.coinbase.com/api/v3/brokerage/time"),
        ("http://[::1]:8080/api/v3/brokerage/time", "GET [::1]:8080/api/v3/brokerage/time"),
    ],
)
def test_jwt_uri_drops_scheme_query_and_default_port(url: str, uri: str) -> None:
    """The uri claim never carries a scheme or a query, and names the host as the Host header does."""
    assert coinbase_auth.jwt_uri("get", url) == uri


def test_two_tokens_for_one_request_differ() -> None:
    """Signing the same request twice in the same second still gives two different JWTs."""
    signer = coinbase_auth.signer_for(CDP_KEYS)
    assert isinstance(signer, coinbase_auth.CdpSigner)
    assert signer.token("GET", KEY_PERMISSIONS_URL, 1_700_000_000) != signer.token(
        "GET", KEY_PERMISSIONS_URL, 1_700_000_000
    )


# -- key kinds and formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "kind", "alg"),
    [
        (CDP_KEYS, coinbase_auth.CdpSigner, "ES256"),
        (base.ApiKeys(KEY_NAME, PEM.replace("\n", "\\n")), coinbase_auth.CdpSigner, "ES256"),  # JSON-escaped
        (ED_KEYS, coinbase_auth.CdpSigner, "EdDSA"),
        (EXCHANGE_KEYS, coinbase_auth.ExchangeSigner, None),
        (base.ApiKeys(EXCHANGE_KEY, OTHER_SECRET, "pp"), coinbase_auth.ExchangeSigner, None),
    ],
)
def test_key_kind_is_told_from_the_secret(keys: base.ApiKeys, kind: type, alg: str | None) -> None:
    """PEM -> CDP ES256; 64-byte base64 without passphrase -> CDP EdDSA; base64 + passphrase -> Exchange."""
    signer = coinbase_auth.signer_for(keys)
    assert isinstance(signer, kind)
    if alg is not None:
        assert isinstance(signer, coinbase_auth.CdpSigner)
        assert signer.algorithm == alg


def _pem(key: Any) -> str:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


BROKEN_PEM = f"-----BEGIN EC PRIVATE KEY-----\n{CANARY}\n-----END EC PRIVATE KEY-----\n"
ENCRYPTED_PEM = EC_KEY.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"pw"),
).decode()


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        (base.ApiKeys("", PEM), "apiKey"),
        (base.ApiKeys("name with spaces", PEM), "apiKey"),
        (base.ApiKeys(KEY_NAME, ""), "apiSecret"),
        (base.ApiKeys(KEY_NAME, BROKEN_PEM), "apiSecret"),
        (base.ApiKeys(KEY_NAME, _pem(ec.generate_private_key(ec.SECP384R1()))), "apiSecret"),
        (
            base.ApiKeys(KEY_NAME, _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))),
            "apiSecret",
        ),
        (base.ApiKeys(KEY_NAME, ENCRYPTED_PEM), "apiSecret"),
        (base.ApiKeys(KEY_NAME, f"not base64 {CANARY}!"), "apiSecret"),
        (base.ApiKeys(EXCHANGE_KEY, OTHER_SECRET), "apiPassphrase"),
        (base.ApiKeys(EXCHANGE_KEY, EXCHANGE_SECRET, f"{CANARY}\x00"), "apiPassphrase"),
    ],
)
async def test_check_keys_names_the_field(
    probe: coinbase.CoinbaseProbe, keys: base.ApiKeys, field: str
) -> None:
    """Malformed keys raise KeyFormatProblem naming the field, never echoing a value."""
    with pytest.raises(base.KeyFormatProblem) as caught:
        probe.check_keys(keys)
    assert caught.value.field == field
    for value in (CANARY, keys.api_secret, keys.api_passphrase or ""):
        assert not value or value not in str(caught.value)


async def test_probe_of_malformed_keys_sends_nothing(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """probe() of keys that cannot be right fails with the field's outcome and no request."""
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(base.ApiKeys(KEY_NAME, f"-----BEGIN garbage {CANARY}"))
    assert caught.value.outcome is base.Outcome.INVALID_SECRET
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(base.ApiKeys(EXCHANGE_KEY, OTHER_SECRET))
    assert caught.value.outcome is base.Outcome.INVALID_PASSPHRASE
    assert mocked.requests == {}


# -- Coinbase Exchange HMAC ----------------------------------------------------------------------------------


def documented_cb_access_sign(secret_b64: str, timestamp: str, method: str, path: str, body: str) -> str:
    """docs/venues.md §4B, written out again: base64(HMAC_SHA256(b64decode(secret), ts + METHOD + path + body))."""
    message = f"{timestamp}{method}{path}{body}".encode()
    return base64.b64encode(hmac.new(base64.b64decode(secret_b64), message, hashlib.sha256).digest()).decode()


async def test_exchange_requests_carry_documented_headers(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """CB-ACCESS-SIGN matches the documented formula; key, passphrase, integer-second timestamp are sent."""
    good_exchange(mocked)
    now = time.time()
    await probe.probe(EXCHANGE_KEYS)
    for url, path in ((EXC_ACCOUNTS_URL, "/accounts"), (EXC_PROFILES_URL, "/profiles")):
        (call,) = calls(mocked, "GET", url)
        headers = call.kwargs["headers"]
        timestamp = headers["CB-ACCESS-TIMESTAMP"]
        assert timestamp.isdigit()
        assert abs(int(timestamp) - now) <= 2
        assert headers["CB-ACCESS-KEY"] == EXCHANGE_KEY
        assert headers["CB-ACCESS-PASSPHRASE"] == PASSPHRASE
        assert headers["CB-ACCESS-SIGN"] == documented_cb_access_sign(
            EXCHANGE_SECRET, timestamp, "GET", path, ""
        )


# -- full probes: CDP --------------------------------------------------------------------------------------


async def test_cdp_probe_good_key(probe: coinbase.CoinbaseProbe, mocked: aioresponses) -> None:
    """A good CDP key: can_* flags as permissions, its portfolio as account id, the default identity."""
    good_cdp(mocked)
    result = await probe.probe(CDP_KEYS)
    assert result.venue is base.Venue.COINBASE
    assert result.venue_account_id == PORTFOLIO
    assert result.identities == ("default",)
    assert result.permissions == base.Permissions(read=True, trade=True)
    assert result.details == {"keyKind": "cdp", "algorithm": "ES256", "portfolioType": "DEFAULT"}


async def test_cdp_transfer_key(probe: coinbase.CoinbaseProbe, mocked: aioresponses) -> None:
    """can_transfer reads as withdraw and transfer."""
    mocked.get(KEY_PERMISSIONS_URL, payload={**KEY_PERMISSIONS, "can_trade": False, "can_transfer": True})
    mocked.get(ACCOUNTS_URL, payload=CDP_ACCOUNTS)
    mocked.get(PORTFOLIOS_URL, payload=PORTFOLIOS)
    result = await probe.probe(ED_KEYS)
    assert result.permissions == base.Permissions(read=True, withdraw=True, transfer=True)


async def test_cdp_identity_requests_in_flight_together(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """accounts and portfolios are both sent before either answers."""
    both = asyncio.Barrier(2)

    async def meet(url: URL, **kwargs: Any) -> None:
        await asyncio.wait_for(both.wait(), 2)

    mocked.get(KEY_PERMISSIONS_URL, payload=KEY_PERMISSIONS)
    mocked.get(ACCOUNTS_URL, payload=CDP_ACCOUNTS, callback=meet)
    mocked.get(PORTFOLIOS_URL, payload=PORTFOLIOS, callback=meet)
    assert (await probe.probe(CDP_KEYS)).identities == ("default",)


async def test_cdp_portfolios_alone_confirm_identity(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """When accounts is refused, a portfolios list naming the key's portfolio still confirms "default"."""
    mocked.get(KEY_PERMISSIONS_URL, payload=KEY_PERMISSIONS)
    mocked.get(ACCOUNTS_URL, status=403, payload={"error": "PERMISSION_DENIED"})
    mocked.get(PORTFOLIOS_URL, payload=PORTFOLIOS)
    assert (await probe.probe(CDP_KEYS)).identities == ("default",)


async def test_cdp_identity_not_reached_when_refused(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """A key that may not view reaches no identity, yet verifies."""
    mocked.get(KEY_PERMISSIONS_URL, payload={**KEY_PERMISSIONS, "can_view": False})
    mocked.get(ACCOUNTS_URL, status=403, payload={"error": "PERMISSION_DENIED"})
    mocked.get(PORTFOLIOS_URL, status=403, payload={"error": "PERMISSION_DENIED"})
    result = await probe.probe(CDP_KEYS)
    assert result.identities == ()
    assert not result.permissions.read


async def test_cdp_identity_transient_fails_probe(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """With no identity confirmed and one check failing transiently, the probe fails transiently."""
    mocked.get(KEY_PERMISSIONS_URL, payload=KEY_PERMISSIONS)
    mocked.get(ACCOUNTS_URL, status=503, body="unavailable")
    mocked.get(PORTFOLIOS_URL, status=403, payload={"error": "PERMISSION_DENIED"})
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(CDP_KEYS)
    assert caught.value.outcome is base.Outcome.SERVER_ERROR


async def test_cdp_401_resyncs_clock_and_retries(probe: coinbase.CoinbaseProbe, mocked: aioresponses) -> None:
    """A 401 fetches the server time and retries once with a JWT dated by the server's clock."""
    server_s = int(time.time()) + 600
    mocked.get(KEY_PERMISSIONS_URL, status=401, body="Unauthorized")
    mocked.get(
        ADV_TIME_URL, payload={"iso": "x", "epochSeconds": str(server_s), "epochMillis": str(server_s * 1000)}
    )
    good_cdp(mocked)
    result = await probe.probe(CDP_KEYS)
    assert result.venue_account_id == PORTFOLIO
    first, second = calls(mocked, "GET", KEY_PERMISSIONS_URL)
    _, early = open_jwt(bearer(first), EC_KEY.public_key())
    _, late = open_jwt(bearer(second), EC_KEY.public_key())
    assert late["nbf"] - early["nbf"] >= 595
    assert abs(probe.clock_offset_ms - 600_000) < 5_000


async def test_cdp_401_twice_is_invalid_key(probe: coinbase.CoinbaseProbe, mocked: aioresponses) -> None:
    """A 401 that survives one resync is INVALID_KEY (key and secret cannot be told apart, 4A.5)."""
    mocked.get(KEY_PERMISSIONS_URL, status=401, body="Unauthorized", repeat=True)
    mocked.get(ADV_TIME_URL, payload={"epochMillis": str(int(time.time() * 1000))}, repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(CDP_KEYS)
    assert caught.value.outcome is base.Outcome.INVALID_KEY
    assert len(calls(mocked, "GET", KEY_PERMISSIONS_URL)) == 2
    assert len(calls(mocked, "GET", ADV_TIME_URL)) == 1


async def test_cdp_401_naming_ip_is_ip_not_allowed(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """A 401 whose message names the IP allowlist is IP_NOT_ALLOWED at once (contract), no resync."""
    mocked.get(
        KEY_PERMISSIONS_URL,
        status=401,
        payload={
            "error": "unauthorized",
            "error_details": "IP address 127.0.0.1 is not in the API key's allowlist",
            "message": "unauthorized",
        },
    )
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(CDP_KEYS)
    assert caught.value.outcome is base.Outcome.IP_NOT_ALLOWED
    assert calls(mocked, "GET", ADV_TIME_URL) == []


# -- full probes: Exchange ---------------------------------------------------------------------------------


async def test_exchange_probe_good_key(probe: coinbase.CoinbaseProbe, mocked: aioresponses) -> None:
    """A good Exchange key: read only (no permission endpoint), the default profile as account id."""
    good_exchange(mocked)
    result = await probe.probe(EXCHANGE_KEYS)
    assert result.venue_account_id == "prof-default"
    assert result.identities == ("default",)
    assert result.permissions == base.Permissions(read=True)
    assert result.details == {"keyKind": "exchange", "permissions": "unknown"}


async def test_exchange_first_profile_when_none_default(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """Without an is_default profile the first one is the account id."""
    mocked.get(EXC_ACCOUNTS_URL, payload=EXC_ACCOUNTS)
    mocked.get(EXC_PROFILES_URL, payload=[{**p, "is_default": False} for p in PROFILES])
    assert (await probe.probe(EXCHANGE_KEYS)).venue_account_id == "prof-other"


async def test_exchange_profiles_refused_uses_account_profile(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """If /profiles is refused, the accounts' profile_id is the account id."""
    mocked.get(EXC_ACCOUNTS_URL, payload=EXC_ACCOUNTS)
    mocked.get(EXC_PROFILES_URL, status=403, payload={"message": "Forbidden"})
    assert (await probe.probe(EXCHANGE_KEYS)).venue_account_id == "prof-from-account"


async def test_exchange_requests_in_flight_together(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """/accounts and /profiles are both sent before either answers."""
    both = asyncio.Barrier(2)

    async def meet(url: URL, **kwargs: Any) -> None:
        await asyncio.wait_for(both.wait(), 2)

    mocked.get(EXC_ACCOUNTS_URL, payload=EXC_ACCOUNTS, callback=meet)
    mocked.get(EXC_PROFILES_URL, payload=PROFILES, callback=meet)
    assert (await probe.probe(EXCHANGE_KEYS)).venue_account_id == "prof-default"


async def test_exchange_clock_skew_resyncs_once_and_retries(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses
) -> None:
    """Both calls refused for skew (in flight together) share one /time fetch, then retry in server time."""
    server = time.time() + 120
    skew = {"message": "request timestamp expired"}
    both = asyncio.Barrier(2)

    async def meet(url: URL, **kwargs: Any) -> None:
        await asyncio.wait_for(both.wait(), 2)

    mocked.get(EXC_ACCOUNTS_URL, status=400, payload=skew, callback=meet)
    mocked.get(EXC_PROFILES_URL, status=400, payload=skew, callback=meet)
    mocked.get(EXC_TIME_URL, payload={"iso": "x", "epoch": server}, repeat=True)
    good_exchange(mocked)
    assert (await probe.probe(EXCHANGE_KEYS)).venue_account_id == "prof-default"
    assert len(calls(mocked, "GET", EXC_TIME_URL)) == 1
    retried = calls(mocked, "GET", EXC_ACCOUNTS_URL)[1].kwargs["headers"]["CB-ACCESS-TIMESTAMP"]
    assert abs(int(retried) - server) <= 2


async def test_exchange_clock_skew_twice(probe: coinbase.CoinbaseProbe, mocked: aioresponses) -> None:
    """A second skew answer is CLOCK_SKEW (transient)."""
    mocked.get(EXC_ACCOUNTS_URL, status=400, payload={"message": "request timestamp expired"}, repeat=True)
    mocked.get(EXC_PROFILES_URL, payload=PROFILES, repeat=True)
    mocked.get(EXC_TIME_URL, payload={"epoch": time.time()}, repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(EXCHANGE_KEYS)
    assert caught.value.outcome is base.Outcome.CLOCK_SKEW
    assert caught.value.transient


# -- transport-level failures (both kinds) -------------------------------------------------------------------

KINDS = [
    pytest.param(CDP_KEYS, KEY_PERMISSIONS_URL, id="cdp"),
    pytest.param(EXCHANGE_KEYS, EXC_ACCOUNTS_URL, id="exchange"),
]


def also_profiles(m: aioresponses) -> None:
    m.get(EXC_PROFILES_URL, payload=PROFILES, repeat=True)


@pytest.mark.parametrize(("keys", "url"), KINDS)
async def test_429_carries_retry_after(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, keys: base.ApiKeys, url: str
) -> None:
    """HTTP 429 is RATE_LIMITED with the Retry-After seconds."""
    also_profiles(mocked)
    mocked.get(url, status=429, payload={"error": "rate_limit_exceeded"}, headers={"Retry-After": "11"})
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(keys)
    assert caught.value.outcome is base.Outcome.RATE_LIMITED
    assert caught.value.retry_after == 11.0


@pytest.mark.parametrize(("keys", "url"), KINDS)
@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_server_error(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, keys: base.ApiKeys, url: str, status: int
) -> None:
    """A 5xx answer is a transient SERVER_ERROR."""
    also_profiles(mocked)
    mocked.get(url, status=status, body="<html>oops</html>")
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(keys)
    assert caught.value.outcome is base.Outcome.SERVER_ERROR


@pytest.mark.parametrize(("keys", "url"), KINDS)
@pytest.mark.parametrize("body", ["{not json", "", "[1, 2]"])
async def test_malformed_answer(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, keys: base.ApiKeys, url: str, body: str
) -> None:
    """An unreadable or wrongly shaped 200 answer is a transient SERVER_ERROR."""
    also_profiles(mocked)
    mocked.get(url, status=200, body=body)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(keys)
    assert caught.value.outcome is base.Outcome.SERVER_ERROR


@pytest.mark.parametrize(("keys", "url"), KINDS)
async def test_timeout(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, keys: base.ApiKeys, url: str
) -> None:
    """A request that times out is TIMEOUT."""
    also_profiles(mocked)
    mocked.get(url, exception=TimeoutError())
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(keys)
    assert caught.value.outcome is base.Outcome.TIMEOUT


# -- error tables ------------------------------------------------------------------------------------------


async def cdp_outcome(
    probe: coinbase.CoinbaseProbe, m: aioresponses, status: int, **answer: Any
) -> base.Outcome:
    m.get(KEY_PERMISSIONS_URL, status=status, repeat=True, **answer)
    m.get(ADV_TIME_URL, payload={"epochMillis": str(int(time.time() * 1000))}, repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(CDP_KEYS)
    return caught.value.outcome


@pytest.mark.parametrize("code", sorted(coinbase.CDP_ERROR_CODES))
async def test_cdp_error_code_table(probe: coinbase.CoinbaseProbe, mocked: aioresponses, code: str) -> None:
    """Every CDP error code of the module's table lands in its outcome, whatever the status."""
    outcome = await cdp_outcome(probe, mocked, 400, payload={"error": code, "message": "m"})
    assert outcome is coinbase.CDP_ERROR_CODES[code]


@pytest.mark.parametrize("status", sorted(coinbase.CDP_HTTP_STATUS))
async def test_cdp_status_table(probe: coinbase.CoinbaseProbe, mocked: aioresponses, status: int) -> None:
    """A CDP status without a known code lands in the status table's outcome."""
    assert await cdp_outcome(probe, mocked, status, body="") is coinbase.CDP_HTTP_STATUS[status]


# docs/venues.md §4A.5, copied: (status, body) -> documented class.
CDP_DOCUMENTED = [
    (401, {"body": "Unauthorized"}, base.Outcome.INVALID_KEY),
    (401, {"payload": {"error": "unauthorized", "message": "x"}}, base.Outcome.INVALID_KEY),
    (401, {"payload": {"error": "authentication_error"}}, base.Outcome.INVALID_KEY),
    (
        403,
        {"payload": {"error": "PERMISSION_DENIED", "message": "Missing scopes"}},
        base.Outcome.PERMISSION_DENIED,
    ),
    (403, {"payload": {"error": "invalid_scope"}}, base.Outcome.PERMISSION_DENIED),
    (
        403,
        {"payload": {"errors": [{"id": "PERMISSION_DENIED", "message": "x"}]}},
        base.Outcome.PERMISSION_DENIED,
    ),
    (429, {"payload": {"error": "rate_limit_exceeded"}}, base.Outcome.RATE_LIMITED),
    (429, {"payload": {"error": "resource_exhausted"}}, base.Outcome.RATE_LIMITED),
    (500, {"payload": {"error": "internal_server_error"}}, base.Outcome.SERVER_ERROR),
    (503, {"body": "Service Unavailable"}, base.Outcome.SERVER_ERROR),
]


@pytest.mark.parametrize(("status", "answer", "expected"), CDP_DOCUMENTED)
async def test_cdp_documented_errors(
    probe: coinbase.CoinbaseProbe,
    mocked: aioresponses,
    status: int,
    answer: dict[str, Any],
    expected: base.Outcome,
) -> None:
    """Each error docs/venues.md §4A.5 lists lands in the class it documents."""
    assert await cdp_outcome(probe, mocked, status, **answer) is expected


async def exchange_outcome(
    probe: coinbase.CoinbaseProbe, m: aioresponses, status: int, **answer: Any
) -> base.Outcome:
    m.get(EXC_ACCOUNTS_URL, status=status, repeat=True, **answer)
    m.get(EXC_PROFILES_URL, status=status, repeat=True, **answer)
    m.get(EXC_TIME_URL, payload={"epoch": time.time()}, repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(EXCHANGE_KEYS)
    return caught.value.outcome


@pytest.mark.parametrize("message", sorted(coinbase.EXCHANGE_MESSAGES))
async def test_exchange_message_table(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, message: str
) -> None:
    """Every Exchange message of the module's table lands in its outcome."""
    outcome = await exchange_outcome(probe, mocked, 400, payload={"message": message})
    assert outcome is coinbase.EXCHANGE_MESSAGES[message]


@pytest.mark.parametrize("status", sorted(coinbase.EXCHANGE_HTTP_STATUS))
async def test_exchange_status_table(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, status: int
) -> None:
    """An Exchange status with an unknown message lands in the status table's outcome."""
    outcome = await exchange_outcome(probe, mocked, status, payload={"message": "something else"})
    assert outcome is coinbase.EXCHANGE_HTTP_STATUS[status]


# docs/venues.md §4B, copied (+ the contract's IP answer).
EXCHANGE_DOCUMENTED = [
    (401, "Invalid API Key", base.Outcome.INVALID_KEY),
    (401, "invalid signature", base.Outcome.INVALID_SECRET),
    (401, "Invalid Passphrase", base.Outcome.INVALID_PASSPHRASE),
    (400, "request timestamp expired", base.Outcome.CLOCK_SKEW),
    (429, "Private rate limit exceeded", base.Outcome.RATE_LIMITED),
    (503, "Exchange is under maintenance", base.Outcome.MAINTENANCE),
    (400, "Cancel only mode", base.Outcome.MAINTENANCE),
    (401, "IP address not allowed", base.Outcome.IP_NOT_ALLOWED),
]


@pytest.mark.parametrize(("status", "message", "expected"), EXCHANGE_DOCUMENTED)
async def test_exchange_documented_errors(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, status: int, message: str, expected: base.Outcome
) -> None:
    """Each error docs/venues.md §4B lists lands in the class it documents."""
    assert await exchange_outcome(probe, mocked, status, payload={"message": message}) is expected


# -- no secrets anywhere -------------------------------------------------------------------------------------

Scenario = Callable[[aioresponses], None]
ALL_KEYS = [
    pytest.param(CDP_KEYS, id="cdp-es256"),
    pytest.param(ED_KEYS, id="cdp-eddsa"),
    pytest.param(EXCHANGE_KEYS, id="exchange"),
]


def _answers() -> list[tuple[str, int, dict[str, Any]]]:
    out: list[tuple[str, int, dict[str, Any]]] = []
    for code in coinbase.CDP_ERROR_CODES:
        out.append((f"cdp {code}", 400, {"payload": {"error": code, "message": "m"}}))
    for message in coinbase.EXCHANGE_MESSAGES:
        out.append((f"exchange {message}", 400, {"payload": {"message": message}}))
    for status in (401, 403, 429, 500, 502, 503):
        out.append((f"HTTP {status}", status, {"body": "", "headers": {"Retry-After": "2"}}))
    out.append(("malformed", 200, {"body": "{nope"}))
    out.append(("timeout", 200, {"exception": TimeoutError()}))
    out.append(("network", 200, {"exception": aiohttp.ClientConnectionError(f"{CANARY} {PEM_BODY_LINE}")}))
    return out


def secrets_of(keys: base.ApiKeys) -> list[str]:
    found = [CANARY, keys.api_secret, PEM_BODY_LINE, PASSPHRASE, EXCHANGE_SECRET, ED_SECRET]
    return [s for s in found if s]


def sent_signatures(m: aioresponses) -> list[str]:
    out = []
    for calls_ in m.requests.values():
        for call in calls_:
            headers = call.kwargs.get("headers") or {}
            for name in ("Authorization", "CB-ACCESS-SIGN"):
                if headers.get(name):
                    out.append(headers[name].removeprefix("Bearer "))
    return out


@pytest.mark.parametrize("keys", ALL_KEYS)
@pytest.mark.parametrize(("name", "status", "answer"), _answers())
async def test_canary_never_leaks(
    probe: coinbase.CoinbaseProbe,
    mocked: aioresponses,
    keys: base.ApiKeys,
    name: str,
    status: int,
    answer: dict[str, Any],
) -> None:
    """No failure path puts a secret, passphrase, PEM, JWT or signature into the raised ProbeFailure."""
    for url in (KEY_PERMISSIONS_URL, EXC_ACCOUNTS_URL, EXC_PROFILES_URL, ACCOUNTS_URL, PORTFOLIOS_URL):
        mocked.get(url, status=status, repeat=True, **answer)
    mocked.get(ADV_TIME_URL, payload={"epochMillis": str(int(time.time() * 1000))}, repeat=True)
    mocked.get(EXC_TIME_URL, payload={"epoch": time.time()}, repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(keys)
    failure = caught.value
    shown = [str(failure), repr(failure), failure.message, str(failure.venue_code), *map(repr, failure.args)]
    for secret in (*secrets_of(keys), *sent_signatures(mocked)):
        assert all(secret not in text for text in shown), name


@pytest.mark.parametrize("keys", ALL_KEYS)
async def test_canary_absent_from_result_and_signers(
    probe: coinbase.CoinbaseProbe, mocked: aioresponses, keys: base.ApiKeys
) -> None:
    """A successful ProbeResult, and the signers' reprs, hold no key material."""
    good_cdp(mocked)
    good_exchange(mocked)
    result = await probe.probe(keys)
    signer = coinbase_auth.signer_for(keys)
    for secret in (*secrets_of(keys), keys.api_key):
        assert secret not in repr(result)
        assert secret not in repr(signer)
