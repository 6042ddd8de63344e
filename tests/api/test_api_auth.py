"""Bearer tokens: the HS256 JWT rules (auth.py) and the API's 401 answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest

from engine import auth, errors

SECRET = "s" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: str = SECRET) -> str:
    """A token signed here independently of auth.py (RFC 7515's JWS compact form)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_minted_token_verifies_to_its_owner() -> None:
    """mint then verify gives back the owner and the expiry."""
    token = auth.mint_token(SECRET, "owner-9", ttl=60, now=1_000_000)
    claims = auth.verify_token(SECRET, token, now=1_000_010)
    assert claims.owner_id == "owner-9"
    assert claims.expires_at == 1_000_060
    assert claims.issued_at == 1_000_000


def test_minted_token_is_a_standard_hs256_jwt() -> None:
    """The token's header says HS256/JWT and its signature is HMAC-SHA256 of header.payload."""
    token = auth.mint_token(SECRET, "owner-9", now=1_000_000)
    header, payload, _ = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(base64.urlsafe_b64decode(payload + "==="))["sub"] == "owner-9"
    expected = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert token.split(".")[2] == b64(expected)


def test_independently_signed_token_is_accepted() -> None:
    """A token made by another HS256 implementation (here: by hand) verifies."""
    token = forge({"alg": "HS256", "typ": "JWT"}, {"sub": "u-1", "exp": time.time() + 60})
    assert auth.verify_token(SECRET, token).owner_id == "u-1"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (forge({"alg": "HS256"}, {"sub": "u", "exp": 10}), "expired"),
        (forge({"alg": "HS256"}, {"sub": "u"}), "exp is required"),
        (forge({"alg": "HS256"}, {"sub": "u", "exp": "soon"}), "exp is not a number"),
        (forge({"alg": "HS256"}, {"sub": "u", "exp": True}), "exp is not a number"),
        (forge({"alg": "HS256"}, {"exp": 10**12}), "sub must be an owner id"),
        (forge({"alg": "HS256"}, {"sub": "has space", "exp": 10**12}), "sub must be an owner id"),
        (forge({"alg": "HS256"}, {"sub": "u", "exp": 10**12, "nbf": 10**11}), "not valid yet"),
        (forge({"alg": "none"}, {"sub": "u", "exp": 10**12}), "only HS256"),
        (forge({"alg": "HS512"}, {"sub": "u", "exp": 10**12}), "only HS256"),
        (forge({"alg": "HS256", "typ": "JWE"}, {"sub": "u", "exp": 10**12}), "typ must be JWT"),
        (forge({"alg": "HS256"}, {"sub": "u", "exp": 10**12}, secret="t" * 32), "bad signature"),
        ("a.b", "three dot-separated parts"),
        ("!!!.e30.e30", "header is not base64url JSON"),
        (b64(b"[1]") + ".e30.AAAA", "header is not a JSON object"),
        ("", "empty"),
        ("x" * 5000, "too long"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token: str, reason: str) -> None:
    """Each broken rule is Unauthorized, saying which rule without echoing the token."""
    with pytest.raises(errors.Unauthorized) as caught:
        auth.verify_token(SECRET, token, now=1_000_000)
    assert reason in caught.value.message
    if token:
        assert token[:20] not in caught.value.message


def test_alg_none_without_signature_is_refused() -> None:
    """The classic 'alg: none' token with an empty signature does not pass."""
    unsigned = f"{b64(json.dumps({'alg': 'none'}).encode())}.{b64(json.dumps({'sub': 'u', 'exp': 10**12}).encode())}."
    with pytest.raises(errors.Unauthorized):
        auth.verify_token(SECRET, unsigned)


def test_tampered_payload_is_refused() -> None:
    """Changing the payload (another owner) breaks the signature."""
    token = auth.mint_token(SECRET, "owner-1")
    header, _, signature = token.split(".")
    other = b64(json.dumps({"sub": "owner-2", "exp": time.time() + 60}).encode())
    with pytest.raises(errors.Unauthorized, match="bad signature"):
        auth.verify_token(SECRET, f"{header}.{other}.{signature}")


def test_leeway_tolerates_small_clock_skew() -> None:
    """A token expired by less than the leeway still passes; beyond it, it does not."""
    token = auth.mint_token(SECRET, "o", ttl=10, now=1000)
    assert auth.verify_token(SECRET, token, now=1010 + auth.LEEWAY_SECONDS - 1).owner_id == "o"
    with pytest.raises(errors.Unauthorized, match="expired"):
        auth.verify_token(SECRET, token, now=1010 + auth.LEEWAY_SECONDS)


def test_short_secret_is_a_configuration_error() -> None:
    """HS256 keys shorter than 32 bytes are refused (RFC 7518 3.2), naming the variable."""
    with pytest.raises(errors.ConfigurationError, match="ENGINE_API_JWT_SECRET"):
        auth.mint_token("short", "o")


def test_bearer_header_parsing() -> None:
    """Only 'Bearer <token>' (any case) yields a token; anything else is Unauthorized."""
    assert auth.bearer_token("Bearer abc") == "abc"
    assert auth.bearer_token("bearer  abc ") == "abc"
    for header in (None, "", "Basic abc", "Bearer", "Bearer   "):
        with pytest.raises(errors.Unauthorized):
            auth.bearer_token(header)


# ---- over HTTP -------------------------------------------------------------------------------------------


async def test_missing_token_is_401_in_the_envelope(api: Any) -> None:
    """No Authorization header: 401, errno -110001, a WWW-Authenticate challenge."""
    reply = await api.get("/api/v3/credential/list", token=None)
    assert reply.status == 401
    assert reply.body["errno"] == -110001 and reply.body["success"] is False and reply.body["data"] is None
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


async def test_expired_malformed_and_foreign_tokens_are_401(api: Any, jwt_secret: str) -> None:
    """Expired, malformed, wrongly signed and non-Bearer credentials all answer 401."""
    expired = auth.mint_token(jwt_secret, "owner-1", ttl=1, now=time.time() - 3600)
    foreign = auth.mint_token(auth.generate_secret(), "owner-1")
    for token in (expired, "garbage", foreign, "e30.e30.e30"):
        reply = await api.post("/api/v3/credential/create", {"venue": "BINANCE"}, token=token)
        assert reply.status == 401, token
        assert reply.body["errno"] == -110001
    basic = await api.get("/api/v3/credential/list", token=None, headers={"Authorization": "Basic dTpw"})
    assert basic.status == 401


async def test_operator_routes_need_no_token(api: Any) -> None:
    """/healthz, /readyz, /metrics and /openapi.json answer without a token."""
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await api.get(path, token=None)).status == 200, path
