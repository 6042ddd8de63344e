"""Tokens from an identity provider: a JWKS served on loopback by the test (aiohttp), RSA, EC and Ed25519 keys
made with ``cryptography``, tokens signed with PyJWT; the JWKS cache (rotation by ``kid``, a flood of unknown
kids, an IdP down at start and later, bounded size and time) and the server answering 2xx / 401 / 403 / 503."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from engine import CredentialEngine, errors
from engine.api import ApiConfig, auth, jwks

ISSUER = "https://idp.example.test/"
AUDIENCE = "credential-engine"


class Key:
    """A signing key of the test IdP and its public JWK."""

    def __init__(self, alg: str, kid: str | None = None, *, rsa_bits: int = 2048) -> None:
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        private: Any
        if alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
            jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        else:
            private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
        self.private = private
        self.jwk: dict[str, Any] = {**jwk, "kid": self.kid, "use": "sig", "alg": alg}

    def sign(self, claims: dict[str, Any] | None = None, *, alg: str | None = None, kid: str | None = None,
             **extra: Any) -> str:  # fmt: skip
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "owner-1", "iat": now, "exp": now + 600,
                   "scope": "credentials:read credentials:write", **(claims or {}), **extra}  # fmt: skip
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.private, algorithm=alg or self.alg, headers={"kid": kid or self.kid})


class Idp:
    """A JWKS endpoint on loopback: the keys it publishes, how often it was asked, and how it misbehaves."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        self.down = False  # answer 503
        self.hang = False  # never answer
        self.body: bytes | None = None  # answer this instead
        self.chunked = False  # send the body in small chunks, without Content-Length
        self.url = ""
        self._runner: web.AppRunner | None = None

    def publish(self, *keys: Key) -> None:
        self.keys = [key.jwk for key in keys]

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.down:
            return web.Response(status=503, text="down")
        body = self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()
        if not self.chunked:
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()  # no Content-Length: the reader must count
        await response.prepare(request)
        for start in range(0, len(body), 4096):
            await response.write(body[start : start + 4096])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/jwks.json"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key() -> Key:
    return Key("RS256", "rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> Key:
    return Key("ES256", "ec-1")


@pytest.fixture(scope="module")
def ed_key() -> Key:
    return Key("EdDSA", "ed-1")


@pytest.fixture
async def idp(rsa_key: Key, ec_key: Key, ed_key: Key) -> AsyncIterator[Idp]:
    server = Idp()
    server.publish(rsa_key, ec_key, ed_key)
    await server.start()
    yield server
    await server.close()


def authenticator(keys: jwks.JwksKeys, **kwargs: Any) -> auth.Authenticator:
    settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, **kwargs}
    return auth.Authenticator(auth.TokenVerifier(algorithms=keys.algorithms, async_keys=keys.key, **settings))


@pytest.fixture
async def keyset(idp: Idp) -> AsyncIterator[tuple[jwks.JwksKeys, Clock]]:
    clock = Clock()
    keys = jwks.JwksKeys(idp.url, cache_ttl=300, min_refetch_interval=30, timeout=2, clock=clock)
    await keys.start()
    yield keys, clock
    await keys.close()


# ---- the verifier and the cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa_key", "ec_key", "ed_key"])
async def test_rs256_es256_and_eddsa_tokens_verify(
    which: str, request: pytest.FixtureRequest, keyset: tuple[jwks.JwksKeys, Clock]
) -> None:
    """A token signed by each published key type verifies, with its owner and scopes."""
    key: Key = request.getfixturevalue(which)
    claims = await authenticator(keyset[0]).verify(key.sign())
    assert claims.owner_id == "owner-1"
    assert claims.scopes == {"credentials:read", "credentials:write"}


def hs256_with(secret: bytes, claims: dict[str, Any], kid: str) -> str:
    """An HS256 token made by hand (PyJWT refuses to use a public key as an HMAC secret)."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{part(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def test_wrong_issuer_audience_algorithm_key_and_expired_are_401(
    keyset: tuple[jwks.JwksKeys, Clock], rsa_key: Key, ec_key: Key
) -> None:
    """Each wrong claim or key is Unauthorized, naming the rule."""
    check = authenticator(keyset[0])
    impostor = Key("RS256", rsa_key.kid)  # same kid, another key
    public_pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    cases = {
        "wrong issuer": rsa_key.sign(iss="https://evil.example/"),
        "iss is required": rsa_key.sign(iss=None),
        "wrong audience": rsa_key.sign(aud="another-service"),
        "aud is required": rsa_key.sign(aud=None),
        "bad signature": impostor.sign(),
        "expired": rsa_key.sign(exp=now - 3600, iat=now - 7200),
        "not for this alg": rsa_key.sign(kid=ec_key.kid),  # RS256 token naming the EC key
        "only ES256, EdDSA, RS256 tokens": hs256_with(
            public_pem, {"sub": "owner-1", "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE}, rsa_key.kid
        ),
        "sub must be an owner id": rsa_key.sign(sub=" owner-1"),
    }
    for reason, token in cases.items():
        with pytest.raises(errors.Unauthorized, match=reason):
            await check.verify(token)
    assert (await check.verify(rsa_key.sign(aud=["other", AUDIENCE]))).owner_id == "owner-1"


async def test_hs256_token_is_refused_when_only_a_jwks_is_configured(
    keyset: tuple[jwks.JwksKeys, Clock],
) -> None:
    """An HS256 token never reaches a public-key verifier, whatever it is signed with."""
    secret = auth.generate_secret()
    token = auth.mint_token(secret, "owner-1")
    with pytest.raises(errors.Unauthorized, match="only ES256, EdDSA, RS256 tokens are accepted"):
        await authenticator(keyset[0]).verify(token)
    both = auth.Authenticator(
        auth.TokenVerifier(
            algorithms=keyset[0].algorithms, async_keys=keyset[0].key, issuer=ISSUER, audience=AUDIENCE
        ),
        auth.TokenVerifier.hs256(secret),
    )
    assert (await both.verify(token)).owner_id == "owner-1"  # with the secret configured too, it passes


async def test_owner_claim_is_configurable(keyset: tuple[jwks.JwksKeys, Clock], rsa_key: Key) -> None:
    """ENGINE_API_OWNER_CLAIM names the claim holding the owner; a token without it is 401."""
    check = authenticator(keyset[0], owner_claim="tenant")
    assert (await check.verify(rsa_key.sign(tenant="desk-9"))).owner_id == "desk-9"
    with pytest.raises(errors.Unauthorized, match="tenant is required"):
        await check.verify(rsa_key.sign())


async def test_scp_list_and_scope_string_are_read(keyset: tuple[jwks.JwksKeys, Clock], rsa_key: Key) -> None:
    """scope (space-separated) and scp (list) both grant; unknown scopes are ignored; malformed is 401."""
    check = authenticator(keyset[0])
    got = await check.verify(rsa_key.sign(scope=None, scp=["webhooks:read", "openid"]))
    assert got.scopes == {"webhooks:read", "openid"}
    assert (await check.verify(rsa_key.sign(scope=None))).scopes == frozenset()
    for bad, reason in (
        ({"scope": ["a"]}, "scope must be a space-separated string"),
        ({"scope": None, "scp": "a b"}, "scp must be a list of strings"),
        ({"scope": "a", "scp": ["b"]}, "scope and scp disagree"),
    ):
        with pytest.raises(errors.Unauthorized, match=reason):
            await check.verify(rsa_key.sign(bad))


async def test_key_rotation_fetches_the_new_kid_once(
    idp: Idp, keyset: tuple[jwks.JwksKeys, Clock], rsa_key: Key
) -> None:
    """A token naming a kid published after the last fetch makes one refetch, then verifies; the old key,
    dropped from the JWKS, is refused after that fetch."""
    keys, clock = keyset
    check = authenticator(keys)
    assert idp.requests == 1
    rotated = Key("RS256", "rsa-2")
    idp.publish(rotated)
    clock.now += 31  # past the refetch interval
    assert (await check.verify(rotated.sign())).owner_id == "owner-1"
    assert idp.requests == 2
    for _ in range(5):
        await check.verify(rotated.sign())
    assert idp.requests == 2  # cached
    with pytest.raises(errors.Unauthorized, match="unknown kid"):
        await check.verify(rsa_key.sign())
    assert idp.requests == 2  # within the interval: no new fetch for the retired kid


async def test_a_flood_of_unknown_kids_refetches_at_most_once_per_interval(
    idp: Idp, keyset: tuple[jwks.JwksKeys, Clock], rsa_key: Key
) -> None:
    """200 tokens naming made-up kids, concurrently: 401 each, and at most one fetch per interval."""
    keys, clock = keyset
    check = authenticator(keys)
    clock.now += 31

    async def attempt(kid: str) -> BaseException | None:
        try:
            await check.verify(rsa_key.sign(kid=kid))
        except errors.Unauthorized as exc:
            return exc
        return None

    results = await asyncio.gather(*(attempt(f"made-up-{n}") for n in range(200)))
    assert all(isinstance(r, errors.Unauthorized) for r in results)
    assert idp.requests == 2  # the start's fetch and one shared refetch
    await asyncio.gather(*(attempt(f"again-{n}") for n in range(50)))
    assert idp.requests == 2  # same interval: nothing more
    clock.now += 31
    await asyncio.gather(*(attempt(f"later-{n}") for n in range(50)))
    assert idp.requests == 3


async def test_idp_down_at_start_then_up(idp: Idp, rsa_key: Key) -> None:
    """Down at start: start() returns within its timeout; tokens answer 503 (IdentityProviderUnavailable with
    retry_after), not 401; once the IdP is back and the interval passed, they verify."""
    idp.hang = True
    clock = Clock()
    keys = jwks.JwksKeys(idp.url, min_refetch_interval=10, timeout=0.5, clock=clock)
    started = time.monotonic()
    await keys.start()
    assert time.monotonic() - started < 10
    try:
        check = authenticator(keys)
        with pytest.raises(jwks.IdentityProviderUnavailable) as caught:
            await check.verify(rsa_key.sign())
        assert caught.value.http_status == 503 and 1 <= caught.value.retry_after <= 10
        idp.hang = False
        clock.now += 11
        assert (await check.verify(rsa_key.sign())).owner_id == "owner-1"
    finally:
        await keys.close()


async def test_idp_down_later_keeps_the_last_good_keys(
    idp: Idp, keyset: tuple[jwks.JwksKeys, Clock], rsa_key: Key
) -> None:
    """Stale-while-error: past the TTL with the IdP down, known kids still verify; an unknown kid is 503."""
    keys, clock = keyset
    check = authenticator(keys)
    idp.down = True
    clock.now += 301  # past the TTL: a background refetch starts and fails
    assert (await check.verify(rsa_key.sign())).owner_id == "owner-1"
    await asyncio.sleep(0.2)
    for _ in range(20):  # the refetch finishes on its own
        if idp.requests >= 2 and keys._inflight is None:
            break
        await asyncio.sleep(0.1)
    assert (await check.verify(rsa_key.sign())).owner_id == "owner-1"
    with pytest.raises(jwks.IdentityProviderUnavailable):
        await check.verify(rsa_key.sign(kid="rotated-while-down"))


@pytest.mark.parametrize(
    "body",
    [
        b'{"keys": [' + b",".join([b'{"kty":"oct","k":"AAAA","kid":"x"}'] * 20000) + b"]}",  # > max_bytes
        b"not json",
        b'{"keys": {}}',
        b'{"keys": [], "keys": []}',
    ],
    ids=["oversized", "not-json", "keys-not-a-list", "duplicate-member"],
)
async def test_bad_jwks_documents_are_fetch_failures(idp: Idp, rsa_key: Key, body: bytes) -> None:
    """An oversized or malformed JWKS gives no keys (a logged fetch failure): tokens are 503, nothing crashes."""
    idp.body = body
    keys = jwks.JwksKeys(idp.url, max_bytes=64 * 1024, timeout=2)
    await keys.start()
    try:
        assert keys.kids == frozenset()
        with pytest.raises(jwks.IdentityProviderUnavailable):
            await authenticator(keys).verify(rsa_key.sign())
    finally:
        await keys.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_size_bound_holds_with_and_without_content_length(
    idp: Idp, rsa_key: Key, chunked: bool
) -> None:
    """A large JWKS under the bound is read whole (in many chunks); one over it is refused, Content-Length
    or not."""
    idp.chunked = chunked
    padded = [{**rsa_key.jwk, "kid": f"k{n}", "x-note": "x" * 1500} for n in range(60)]  # ~120 KB
    idp.keys = [*padded, rsa_key.jwk]
    keys = jwks.JwksKeys(idp.url, timeout=5, max_bytes=200 * 1024)
    await keys.start()
    try:
        assert len(keys.kids) == 61
    finally:
        await keys.close()
    small = jwks.JwksKeys(idp.url, timeout=5, max_bytes=64 * 1024)
    await small.start()
    try:
        assert small.kids == frozenset()
    finally:
        await small.close()


async def test_unusable_keys_are_skipped(idp: Idp, rsa_key: Key) -> None:
    """Keys for encryption, with private members, short RSA, other curves or a contradicting alg are not used."""
    weak = Key("RS256", "weak", rsa_bits=1024)
    private = {**rsa_key.jwk, "kid": "private", "d": "AAAA"}
    idp.keys = [
        {**rsa_key.jwk, "kid": "enc", "use": "enc"},
        private,
        weak.jwk,
        {**rsa_key.jwk, "kid": "ps", "alg": "PS256"},
        {**rsa_key.jwk, "kid": "noverify", "key_ops": ["encrypt"]},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        rsa_key.jwk,
    ]
    keys = jwks.JwksKeys(idp.url, timeout=2)
    await keys.start()
    try:
        assert keys.kids == {rsa_key.kid}
    finally:
        await keys.close()


def test_jwks_url_must_be_https_unless_loopback() -> None:
    """Plain http is refused except to a loopback address; issuer and audience are required beside it."""
    for url in ("http://idp.example/jwks", "ftp://127.0.0.1/x", "not a url"):
        with pytest.raises(errors.ConfigurationError, match="ENGINE_API_JWKS_URL"):
            jwks.check_url(url)
    assert jwks.check_url("https://idp.example/jwks")
    assert jwks.check_url("http://[::1]:8000/jwks")
    with pytest.raises(errors.ConfigurationError, match="ENGINE_API_AUDIENCE is required"):
        ApiConfig(jwks_url="https://idp.example/jwks", issuer=ISSUER)
    with pytest.raises(errors.ConfigurationError, match="ENGINE_API_JWKS_URL"):
        ApiConfig.from_env({})
    config = ApiConfig.from_env(
        {
            "ENGINE_API_JWKS_URL": "https://idp.example/jwks",
            "ENGINE_API_ISSUER": ISSUER,
            "ENGINE_API_AUDIENCE": AUDIENCE,
            "ENGINE_API_OWNER_CLAIM": "tenant",
            "ENGINE_API_JWT_ALGORITHMS": "ES256",
        }
    )
    assert (
        config.jwt_secret is None and config.jwt_algorithms == ("ES256",) and config.owner_claim == "tenant"
    )
    with pytest.raises(errors.ConfigurationError, match="ENGINE_API_JWT_ALGORITHMS"):
        ApiConfig(
            jwks_url="https://idp.example/jwks", issuer=ISSUER, audience=AUDIENCE, jwt_algorithms=("HS256",)
        )


def test_bad_jwks_settings_name_the_variable() -> None:
    """A value that is no number, or out of range, is a ConfigurationError naming it."""
    base = {"ENGINE_API_JWKS_URL": "https://idp.example/jwks", "ENGINE_API_ISSUER": ISSUER,
            "ENGINE_API_AUDIENCE": AUDIENCE}  # fmt: skip
    for key, value, field in (
        ("ENGINE_API_JWKS_TIMEOUT", "soon", "ENGINE_API_JWKS_TIMEOUT"),
        ("ENGINE_API_JWKS_TIMEOUT", "nan", "ENGINE_API_JWKS_TIMEOUT"),
        ("ENGINE_API_JWKS_CACHE_TTL", "0", "ENGINE_API_JWKS_CACHE_TTL"),
        ("ENGINE_API_JWKS_REFETCH_INTERVAL", "-1", "ENGINE_API_JWKS_REFETCH_INTERVAL"),
        ("ENGINE_API_JWKS_URL", "http://idp.example/jwks", "ENGINE_API_JWKS_URL"),
    ):
        with pytest.raises(errors.ConfigurationError) as caught:
            ApiConfig.from_env({**base, key: value})
        assert caught.value.field == field, key


# ---- the server with an identity provider -------------------------------------------------------------------


@pytest.fixture
async def idp_api(eng: CredentialEngine, idp: Idp, make_api: Any) -> Any:
    """The API with only the IdP's keys configured (no shared secret)."""
    return await make_api(eng, jwt_secret=None, jwks_url=idp.url, issuer=ISSUER, audience=AUDIENCE)


async def test_server_accepts_idp_tokens_and_answers_401_and_403(
    idp_api: Any, rsa_key: Key, ec_key: Key, ed_key: Key
) -> None:
    """Over HTTP: IdP tokens of each key type 2xx; a wrong audience or an HS256 token 401; a token without the
    route's scope 403 (errno -110005)."""
    for key in (rsa_key, ec_key, ed_key):
        reply = await idp_api.get("/api/v3/credential/list", token=key.sign())
        assert reply.status == 200, reply.text
    wrong = await idp_api.get("/api/v3/credential/list", token=rsa_key.sign(aud="other"))
    assert wrong.status == 401 and wrong.body["errno"] == -110001
    assert "wrong audience" in wrong.body["error"] and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    dev = await idp_api.get(
        "/api/v3/credential/list", token=auth.mint_token(auth.generate_secret(), "owner-1")
    )
    assert dev.status == 401
    narrow = await idp_api.get("/api/v3/webhook/list", token=rsa_key.sign())
    assert narrow.status == 403 and narrow.body["errno"] == -110005
    assert "webhooks:read" in narrow.body["error"]


async def test_server_starts_with_the_idp_down_and_answers_503(
    eng: CredentialEngine, idp: Idp, rsa_key: Key, make_api: Any
) -> None:
    """The IdP hanging at start: the server starts within the fetch timeout; a token answers 503 with
    Retry-After (the service cannot check it), and operator routes keep answering."""
    idp.hang = True
    started = time.monotonic()
    api = await make_api(
        eng, jwt_secret=None, jwks_url=idp.url, issuer=ISSUER, audience=AUDIENCE, jwks_timeout=1.0
    )
    assert time.monotonic() - started < 15
    reply = await api.get("/api/v3/credential/list", token=rsa_key.sign())
    assert reply.status == 503 and int(reply.headers["Retry-After"]) >= 1
    assert "service unavailable" in reply.body["error"]
    assert (await api.get("/healthz", token=None)).status == 200


async def test_nothing_the_idp_or_a_token_sends_is_logged_or_echoed(idp: Idp, rsa_key: Key) -> None:
    """Canary: a broken JWKS body and a token's kid and claims appear in no log event and no error message."""
    canary = "CANARY-7f3c2a"
    idp.body = ('{"keys": [{"kty": "RSA", "kid": "' + canary + '", "n": "' + canary + '"}], "x": ').encode()
    with structlog.testing.capture_logs() as logged:
        keys = jwks.JwksKeys(idp.url, timeout=2)
        await keys.start()
        try:
            with pytest.raises(errors.CredentialEngineError) as caught:
                await authenticator(keys).verify(rsa_key.sign(kid=canary, sub=canary))
        finally:
            await keys.close()
    assert any(event["event"] == "jwks_fetch_failed" for event in logged)
    assert canary not in repr(logged) and canary not in str(caught.value) and canary not in repr(keys)
