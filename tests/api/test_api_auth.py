"""Bearer tokens: the HS256 JWT rules (engine/api/auth.py) and the API's 401 answers.

PyJWT is the independent oracle here: it mints the well-formed tokens the verifier must accept, and it signs
the lax ones (NaN expiry, ``crit``, padded subjects, ...) correctly, so a refusal can only come from the rule
under test, never from a bad signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from engine import errors
from engine.api import auth

SECRET = "s" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], secret: str = SECRET) -> str:
    """A token signed here independently of engine/api/auth.py (RFC 7515's JWS compact form)."""
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
        (forge({"alg": "HS256"}, {"exp": 10**12}), "sub is required"),
        (forge({"alg": "HS256"}, {"sub": "has space", "exp": 10**12}), "sub must be an owner id"),
        (forge({"alg": "HS256"}, {"sub": "u", "exp": 10**12, "nbf": 10**11}), "not valid yet"),
        (forge({"alg": "none"}, {"sub": "u", "exp": 10**12}), "only HS256"),
        (forge({"alg": "HS512"}, {"sub": "u", "exp": 10**12}), "only HS256"),
        (forge({"alg": "HS256", "typ": "JWE"}, {"sub": "u", "exp": 10**12}), "typ must be JWT"),
        (forge({"alg": "HS256"}, {"sub": "u", "exp": 10**12}, secret="t" * 32), "bad signature"),
        ("a.b", "three dot-separated parts"),
        ("!!!.e30.e30", "header is not strict base64url JSON"),
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


def signed(payload: Any, headers: dict[str, Any] | None = None, secret: str = SECRET) -> str:
    """A correctly signed HS256 token made by PyJWT (it writes NaN/Infinity as JSON allows it to)."""
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


def signed_text(payload_json: str, header_json: str = '{"alg":"HS256","typ":"JWT"}') -> str:
    """A correctly signed token whose header and payload are exactly these JSON texts (duplicates, ...)."""
    signing_input = f"{b64(header_json.encode())}.{b64(payload_json.encode())}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


FUTURE = 4_000_000_000  # an exp far ahead of the tests' clock (1_000_000)
GOOD = signed({"sub": "u-1", "exp": FUTURE})


def with_last_char_bits(token: str) -> str:
    """The same signature bytes with the spare low bits of the last base64url character set (non-canonical)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    return token[:-1] + alphabet[last | 0b11]  # a 32-byte signature leaves 2 spare bits in its 43rd char


LAX_TOKENS = [
    pytest.param(GOOD + "!!", "signature is not strict base64url", id="junk-after-signature"),
    pytest.param(GOOD + "$", "signature is not strict base64url", id="junk-char-after-signature"),
    pytest.param(GOOD + "AA", "signature is not strict base64url", id="base64-junk-after-signature"),
    pytest.param(
        with_last_char_bits(GOOD), "signature is not strict base64url", id="non-canonical-signature"
    ),
    pytest.param(GOOD.replace(".", ".A", 1), "payload is not strict base64url", id="junk-in-payload"),
    pytest.param(signed({"sub": "u-1", "exp": float("nan")}), "payload is not strict", id="exp-NaN"),
    pytest.param(signed({"sub": "u-1", "exp": float("inf")}), "payload is not strict", id="exp-Infinity"),
    pytest.param(signed_text('{"sub":"u-1","exp":1e400}'), "exp is not a finite number", id="exp-1e400"),
    pytest.param(
        signed({"sub": "u-1", "exp": FUTURE, "nbf": float("-inf")}), "not strict", id="nbf-Infinity"
    ),
    pytest.param(
        signed_text('{"sub":"u-1","exp":4000000000,"iat":-1e999}'), "iat is not a finite", id="iat-inf"
    ),
    pytest.param(
        signed({"sub": "u-1", "exp": FUTURE, "iat": "yesterday"}), "iat is not a number", id="iat-text"
    ),
    pytest.param(
        signed({"sub": "u-1", "exp": FUTURE, "iat": 1_000_000 + 3600}),
        "iat is in the future",
        id="iat-future",
    ),
    pytest.param(signed({"sub": "u-1", "exp": FUTURE}, {"crit": ["exp"]}), "crit", id="crit"),
    pytest.param(signed({"sub": "u-1", "exp": FUTURE}, {"crit": []}), "crit", id="crit-empty"),
    pytest.param(
        signed_text('{"sub":"u-1","exp":4000000000}', '{"alg":"HS256","b64":true}'), "b64", id="b64"
    ),
    pytest.param(signed({"sub": "u-1", "exp": FUTURE}, {"jwk": {"kty": "oct", "k": "AA"}}), "jwk", id="jwk"),
    pytest.param(signed({"sub": "u-1", "exp": FUTURE}, {"jku": "https://x.example/jwks"}), "jku", id="jku"),
    pytest.param(signed({"sub": " u-1 ", "exp": FUTURE}), "sub must be an owner id", id="sub-padded"),
    pytest.param(signed({"sub": "u-1\n", "exp": FUTURE}), "sub must be an owner id", id="sub-newline"),
    pytest.param(signed({"sub": "\tu-1", "exp": FUTURE}), "sub must be an owner id", id="sub-tab"),
    pytest.param(signed({"sub": "u\x00-1", "exp": FUTURE}), "sub must be an owner id", id="sub-NUL"),
    pytest.param(signed({"sub": "", "exp": FUTURE}), "sub must be an owner id", id="sub-empty"),
    pytest.param(signed({"sub": "   ", "exp": FUTURE}), "sub must be an owner id", id="sub-blank"),
    pytest.param(signed({"sub": "u" * 129, "exp": FUTURE}), "sub must be an owner id", id="sub-too-long"),
    pytest.param(signed({"sub": 42, "exp": FUTURE}), "sub must be an owner id", id="sub-number"),
    pytest.param(
        signed_text('{"sub":"u-1","sub":"u-2","exp":4000000000}'), "payload is not strict", id="duplicate-sub"
    ),
    pytest.param(
        signed_text('{"sub":"u-1","exp":4000000000}', '{"alg":"HS256","alg":"none"}'),
        "header is not strict",
        id="duplicate-alg",
    ),
]


@pytest.mark.parametrize(("token", "reason"), LAX_TOKENS)
def test_lax_tokens_are_refused(token: str, reason: str) -> None:
    """Each case was accepted by the hand-written parser (or trimmed its way through); all are 401 now."""
    with pytest.raises(errors.Unauthorized) as caught:
        auth.verify_token(SECRET, token, now=1_000_000)
    assert reason in caught.value.message


def test_the_good_token_of_the_lax_cases_passes() -> None:
    """The control: the token every lax case is built from verifies, so each refusal is the rule's doing."""
    assert auth.verify_token(SECRET, GOOD, now=1_000_000).owner_id == "u-1"
    assert auth.verify_token(SECRET, signed_text('{"sub":"u-1","exp":4000000000}'), now=1_000_000)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "desk-7", "exp": FUTURE},
        {"sub": "desk-7", "exp": FUTURE, "iat": 999_000, "nbf": 999_000},
        {"sub": "a.b_c:d@e|f+g-h", "exp": FUTURE + 0.5, "jti": "x", "aud": "anything"},
        {"sub": "u" * 128, "exp": FUTURE},
    ],
)
def test_tokens_minted_by_pyjwt_are_accepted(claims: dict[str, Any]) -> None:
    """The oracle's well-formed HS256 tokens verify, with the claims read back."""
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    got = auth.verify_token(SECRET, token, now=1_000_000)
    assert got.owner_id == claims["sub"] and got.expires_at == claims["exp"]


def test_minted_tokens_verify_with_pyjwt() -> None:
    """`credential-engine token`'s tokens are standard: PyJWT checks them with the same secret."""
    token = auth.mint_token(SECRET, "owner-9", ttl=60)
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp", "sub", "iat"]})
    assert decoded["sub"] == "owner-9" and decoded["exp"] - decoded["iat"] == 60
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS256", "none"])
def test_algorithms_outside_the_allow_list_are_refused(alg: str) -> None:
    """Whatever the token's alg says, only HS256 is checked; PyJWT signs the HS384/HS512 ones correctly."""
    if alg.startswith("HS"):
        token = jwt.encode({"sub": "u", "exp": FUTURE}, SECRET + "-longer-for-hs512-" * 3, algorithm=alg)
    else:
        token = forge({"alg": alg}, {"sub": "u", "exp": FUTURE})
    with pytest.raises(errors.Unauthorized, match="only HS256 tokens are accepted"):
        auth.verify_token(SECRET, token, now=1_000_000)


def test_verifier_allow_lists_are_checked() -> None:
    """Unknown algorithms, and HMAC mixed with public-key algorithms (algorithm confusion), are refused."""
    key: Any = lambda alg, header: b"k" * 32  # noqa: E731
    for algorithms in ((), ("HS256", "RS256"), ("none",), ("HS1",)):
        with pytest.raises(errors.ConfigurationError):
            auth.TokenVerifier(algorithms=algorithms, keys=key)
    verifier = auth.TokenVerifier.hs256(SECRET)
    assert repr(verifier) == "TokenVerifier(algorithms=['HS256'])" and SECRET not in repr(verifier)


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


async def test_lax_tokens_signed_with_the_servers_secret_are_401(api: Any, jwt_secret: str) -> None:
    """Correctly signed by PyJWT with the server's own secret, each lax token is still refused over HTTP."""
    exp = time.time() + 600
    good = jwt.encode(
        {"sub": "owner-1", "exp": exp, "scope": "credentials:read"}, jwt_secret, algorithm="HS256"
    )
    assert (await api.get("/api/v3/credential/list", token=good)).status == 200
    lax = [
        good + "!!",
        with_last_char_bits(good),
        jwt.encode({"sub": "owner-1", "exp": float("nan")}, jwt_secret, algorithm="HS256"),
        jwt.encode({"sub": "owner-1", "exp": float("inf")}, jwt_secret, algorithm="HS256"),
        jwt.encode({"sub": "owner-1", "exp": exp}, jwt_secret, algorithm="HS256", headers={"crit": ["exp"]}),
        jwt.encode({"sub": " owner-1 ", "exp": exp}, jwt_secret, algorithm="HS256"),
        jwt.encode({"sub": "owner-1\n", "exp": exp}, jwt_secret, algorithm="HS256"),
    ]
    for token in lax:
        reply = await api.get("/api/v3/credential/list", token=token)
        assert reply.status == 401 and reply.body["errno"] == -110001, reply.body


async def test_operator_routes_need_no_token(api: Any) -> None:
    """/healthz, /readyz, /metrics and /openapi.json answer without a token."""
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await api.get(path, token=None)).status == 200, path
