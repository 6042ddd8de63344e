"""Bearer tokens for the REST API: JWTs (RFC 7519) in JWS compact form (RFC 7515), checked with PyJWT.

    token = auth.mint_token(secret, "owner-1", ttl=3600)     # development tokens (`credential-engine token`)
    verifier = auth.TokenVerifier.hs256(secret)              # built once by the server
    claims = verifier.verify(token)                          # Claims(owner_id="owner-1", expires_at=...)
    claims = auth.verify_token(secret, token)                # the same, in one call

:meth:`TokenVerifier.verify` checks a token in four layers; anything that fails is
:class:`errors.Unauthorized`, whose message names the rule without echoing the token:

1. **Strict form**, before any cryptography: at most ``MAX_TOKEN_LENGTH`` characters; three parts, each
   unpadded base64url (RFC 7515 section 2) in its one canonical form: re-encoding the bytes it decodes to
   gives it back, so junk characters, padding or non-zero spare bits cannot ride along on a valid
   signature. Header and payload are UTF-8 JSON objects with no duplicate member names and no
   ``NaN``/``Infinity``, so every reader of the token reads the same claims.
2. **Header policy**: ``alg`` is in the verifier's allow-list (here ``HS256``: ``none`` and every other
   algorithm are refused, so a token cannot choose how it is checked); ``typ``, if present, is ``JWT``;
   ``crit`` is refused (RFC 7515 section 4.1.11: we implement no extension, so a token that needs one is
   not understood), and so are ``b64`` (RFC 7797) and the headers that would let a token name its own key
   (``jku``, ``jwk``, ``x5u``, ``x5c``).
3. **Signature and required claims**: PyJWT (https://pyjwt.readthedocs.io/en/stable/api.html) verifies the
   signature with the allow-list as ``algorithms`` and requires ``exp`` and ``sub``.
4. **Claims**, with the engine's clock (``now`` in tests): ``exp`` a finite number in the future,
   ``LEEWAY_SECONDS`` of clock skew tolerated; ``nbf`` and ``iat``, when present, finite numbers not in the
   future; ``sub`` a string that is an owner id exactly as given (never trimmed): 1-128 letters, digits and
   ``._:@|+-``, so no empty, padded, over-long or control-character subject names an owner.

The design is open to public-key tokens: a :class:`TokenVerifier` holds an allow-list and a key resolver
(``(alg, header) -> key``); an RS256/ES256/EdDSA verifier resolves ``kid`` from a JWKS to a ``jwt.PyJWK``.
HMAC and public-key algorithms are never allowed together (the classic algorithm-confusion attack).

The HS256 secret must be at least ``MIN_SECRET_BYTES`` long: RFC 7518 section 3.2 requires a key of at
least the hash size. ``ENGINE_API_JWT_SECRET`` holds it for the server and ``credential-engine token``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from engine import errors, validation

MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key is at least as long as the SHA-256 output
MAX_TOKEN_LENGTH = 4096  # a header, a short payload and a signature fit in far less
LEEWAY_SECONDS = 30  # clock skew tolerated on exp, nbf and iat
DEFAULT_TTL = 3600.0
SECRET_ENV = "ENGINE_API_JWT_SECRET"  # noqa: S105 - the variable's name, not a secret
HMAC_ALGORITHMS = frozenset({"HS256"})
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})  # for JWKS-backed verifiers
REQUIRED_CLAIMS = ("exp", "sub")
# header parameters refused whatever their value: extensions we do not implement, keys a token brings along
REFUSED_HEADERS = ("crit", "b64", "jku", "jwk", "x5u", "x5c")

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")

VerificationKey = bytes | jwt.PyJWK
KeyResolver = Callable[[str, Mapping[str, Any]], VerificationKey]


@dataclass(frozen=True, slots=True)
class Claims:
    """What a checked token says: whose requests these are, and until when."""

    owner_id: str
    expires_at: float
    issued_at: float | None = None


def generate_secret() -> str:
    """A fresh random signing secret (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def check_secret(secret: str | bytes) -> bytes:
    """The secret as bytes, or :class:`errors.ConfigurationError` when it is too short to sign with."""
    # the bytes are never bound to a local here: a traceback rendered with locals shows only ``secret``,
    # which the configuration holds as a masked SecretText
    if len(_secret_bytes(secret)) < MIN_SECRET_BYTES:
        raise errors.ConfigurationError(
            f"{SECRET_ENV} must be at least {MIN_SECRET_BYTES} bytes (generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            field=SECRET_ENV,
        )
    return _secret_bytes(secret)


def mint_token(
    secret: str | bytes, owner_id: str, *, ttl: float = DEFAULT_TTL, now: float | None = None
) -> str:
    """An HS256 token for ``owner_id`` valid for ``ttl`` seconds (development and tests), made by PyJWT."""
    check_secret(secret)
    owner = validation.owner(owner_id)
    if ttl <= 0:
        raise errors.InvalidRequest("ttl", "must be positive")
    issued = int(now if now is not None else time.time())
    payload = {"sub": owner, "iat": issued, "exp": issued + int(ttl)}
    return jwt.encode(payload, check_secret(secret), algorithm="HS256", headers={"typ": "JWT"})


def _unauthorized(reason: str) -> errors.Unauthorized:
    return errors.Unauthorized(f"invalid access token: {reason}")


def _strict_base64url(part: str) -> bytes:
    """The bytes of one unpadded, canonical base64url part; ValueError otherwise."""
    if not _BASE64URL.fullmatch(part) or len(part) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != part:
        raise ValueError("not the canonical encoding")  # non-zero spare bits in the last character
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate member name")
    return dict(pairs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_part(part: str, what: str) -> dict[str, Any]:
    try:
        text = _strict_base64url(part).decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _unauthorized(f"the {what} is not strict base64url JSON") from None
    if not isinstance(value, dict):
        raise _unauthorized(f"the {what} is not a JSON object")
    return value


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 section 2) as a finite number, or None when absent."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _unauthorized(f"{name} is not a number")
    if not math.isfinite(value):
        raise _unauthorized(f"{name} is not a finite number")
    return float(value)


def _subject(claims: Mapping[str, Any]) -> str:
    subject = claims.get("sub")
    try:
        owner = validation.owner(subject)
    except errors.InvalidRequest:
        owner = None
    if owner is None or owner != subject:  # validation.owner trims: a token's subject is taken as given
        raise _unauthorized(
            f"sub must be an owner id as given: 1-{validation.MAX_OWNER} letters, digits and ._:@|+- "
            "(no spaces or control characters)"
        )
    return owner


class TokenVerifier:
    """Checks bearer tokens against one allow-list of algorithms and one key resolver (module docstring).

    ``keys(alg, header)`` returns the key for a token whose header passed the policy. Its ``repr`` names
    the algorithms only.
    """

    __slots__ = ("_algorithms", "_keys", "_leeway")

    def __init__(
        self, *, algorithms: Collection[str], keys: KeyResolver, leeway: float = LEEWAY_SECONDS
    ) -> None:
        allowed = frozenset(algorithms)
        if not allowed or not allowed <= HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            raise errors.ConfigurationError(
                f"token algorithms must be some of {sorted(HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS)}",
                field="algorithms",
            )
        if allowed & HMAC_ALGORITHMS and allowed & PUBLIC_KEY_ALGORITHMS:
            raise errors.ConfigurationError(
                "HMAC and public-key token algorithms cannot be allowed together", field="algorithms"
            )
        if leeway < 0:
            raise errors.ConfigurationError("leeway must be >= 0", field="leeway")
        self._algorithms = allowed
        self._keys = keys
        self._leeway = leeway

    @classmethod
    def hs256(cls, secret: str | bytes) -> TokenVerifier:
        """The server's verifier: HS256 tokens signed with ``secret`` (at least 32 bytes)."""
        key = check_secret(secret)
        return cls(algorithms=("HS256",), keys=lambda alg, header: key)

    @property
    def algorithms(self) -> frozenset[str]:
        return self._algorithms

    def __repr__(self) -> str:
        return f"TokenVerifier(algorithms={sorted(self._algorithms)})"

    def __reduce__(self) -> Any:  # the resolver holds key material
        raise TypeError("TokenVerifier cannot be pickled")

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """Check ``token``; :class:`errors.Unauthorized` naming the failed rule when it does not pass."""
        if not isinstance(token, str) or not token:
            raise _unauthorized("empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized("too long")
        parts = token.split(".")
        if len(parts) != 3:
            raise _unauthorized("not a JWT (three dot-separated parts)")
        header = _json_part(parts[0], "header")
        claims = _json_part(parts[1], "payload")
        try:
            _strict_base64url(parts[2])
        except ValueError:
            raise _unauthorized("the signature is not strict base64url") from None
        alg = self._check_header(header)
        self._check_signature(token, alg, header)
        moment = now if now is not None else time.time()
        expires = _time_claim(claims, "exp")
        if expires is None:  # pragma: no cover - PyJWT's require covers it; kept for the type
            raise _unauthorized("exp is required")
        if moment >= expires + self._leeway:
            raise _unauthorized("expired")
        not_before = _time_claim(claims, "nbf")
        if not_before is not None and moment < not_before - self._leeway:
            raise _unauthorized("not valid yet")
        issued = _time_claim(claims, "iat")
        if issued is not None and moment < issued - self._leeway:
            raise _unauthorized("iat is in the future")
        return Claims(owner_id=_subject(claims), expires_at=expires, issued_at=issued)

    def _check_header(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _unauthorized(f"only {', '.join(sorted(self._algorithms))} tokens are accepted")
        if header.get("typ", "JWT") != "JWT":
            raise _unauthorized("typ must be JWT")
        refused = [name for name in REFUSED_HEADERS if name in header]
        if refused:
            raise _unauthorized(f"header parameter {refused[0]} is not supported")
        return alg

    def _check_signature(self, token: str, alg: str, header: Mapping[str, Any]) -> None:
        """PyJWT verifies the signature and the presence of the required claims (the key is never bound to
        a local of this frame, so a traceback rendered with locals cannot show it)."""
        try:
            jwt.decode(
                token,
                self._keys(alg, header),
                algorithms=sorted(self._algorithms),
                options={
                    "require": list(REQUIRED_CLAIMS),
                    # times are checked by verify() with one clock, after their finiteness
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    # sub is checked by verify(), stricter (PyJWT >= 2.10 checks its type; older ignore this)
                    "verify_sub": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise _unauthorized("bad signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized(f"{exc.claim} is required") from None
        except jwt.InvalidAlgorithmError:
            raise _unauthorized(f"only {', '.join(sorted(self._algorithms))} tokens are accepted") from None
        except jwt.PyJWTError as exc:
            raise _unauthorized(f"refused ({type(exc).__name__})") from None


def verify_token(secret: str | bytes, token: str, *, now: float | None = None) -> Claims:
    """Check an HS256 ``token`` signed with ``secret`` (see :class:`TokenVerifier`)."""
    return TokenVerifier.hs256(secret).verify(token, now=now)


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if header is None or not header.strip():
        raise errors.Unauthorized("authentication required: send Authorization: Bearer <token>")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("authentication required: the Authorization scheme must be Bearer")
    return token.strip()
