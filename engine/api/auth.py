"""Bearer tokens for the REST API: JWTs (RFC 7519) in JWS compact form (RFC 7515), checked with PyJWT.

    token = auth.mint_token(secret, "owner-1", ttl=3600)     # development tokens (`credential-engine token`)
    verifier = auth.TokenVerifier.hs256(secret)              # one family of algorithms and its keys
    claims = verifier.verify(token)                          # Claims(owner_id="owner-1", scopes=..., ...)
    claims = auth.verify_token(secret, token)                # the same, in one call
    authenticator = auth.Authenticator(hs256_verifier, jwks_verifier)   # what the server holds
    claims = await authenticator.verify(token)               # the token's alg picks the verifier

:meth:`TokenVerifier.verify` checks a token in four layers; anything that fails is
:class:`errors.Unauthorized`, whose message names the rule without echoing the token:

1. **Strict form**, before any cryptography: at most ``MAX_TOKEN_LENGTH`` characters; three parts, each
   unpadded base64url (RFC 7515 section 2) in its one canonical form: re-encoding the bytes it decodes to
   gives it back, so junk characters, padding or non-zero spare bits cannot ride along on a valid
   signature. Header and payload are UTF-8 JSON objects with no duplicate member names and no
   ``NaN``/``Infinity``, so every reader of the token reads the same claims.
2. **Header policy**: ``alg`` is in the verifier's allow-list (``none`` and every other algorithm are
   refused, so a token cannot choose how it is checked); ``typ``, if present, is ``JWT`` (or ``at+jwt``,
   RFC 9068's access-token type); ``crit`` is refused (RFC 7515 section 4.1.11: we implement no extension,
   so a token that needs one is not understood), and so are ``b64`` (RFC 7797) and the headers that would let
   a token name its own key (``jku``, ``jwk``, ``x5u``, ``x5c``).
3. **Signature and required claims**: PyJWT (https://pyjwt.readthedocs.io/en/stable/api.html) verifies the
   signature with the token's one algorithm as ``algorithms`` and the key the verifier's resolver gives for
   it, and requires ``exp`` and the owner claim.
4. **Claims**, with the engine's clock (``now`` in tests): ``exp`` a finite number in the future,
   ``LEEWAY_SECONDS`` of clock skew tolerated; ``nbf`` and ``iat``, when present, finite numbers not in the
   future; ``iss`` equal to the verifier's issuer and ``aud`` (a string or a list of strings) naming its
   audience, when the verifier has them; the owner claim (``sub`` unless configured otherwise) a string that
   is an owner id exactly as given (never trimmed): 1-128 letters, digits and ``._:@|+-``, so no empty,
   padded, over-long or control-character subject names an owner; the scopes of ``scope``/``scp``
   (:func:`engine.api.scopes.parse_claims`).

A :class:`TokenVerifier` holds one family of algorithms: HMAC (``HS256``, a shared secret) or public keys
(``RS256``, ``ES256``, ``EdDSA``, keys from a JWKS, :mod:`engine.api.jwks`), never both, so a token whose
``alg`` is HS256 is never checked with a public key (the classic algorithm-confusion attack: the public key
used as an HMAC secret). :class:`Authenticator` holds up to one verifier per family and hands each token to
the one whose allow-list has the token's ``alg``.

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
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from engine import errors, validation
from engine.api import scopes as scopesmod

MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key is at least as long as the SHA-256 output
MAX_TOKEN_LENGTH = 4096  # a header, a short payload and a signature fit in far less
LEEWAY_SECONDS = 30  # clock skew tolerated on exp, nbf and iat
DEFAULT_TTL = 3600.0
SECRET_ENV = "ENGINE_API_JWT_SECRET"  # noqa: S105 - the variable's name, not a secret
HMAC_ALGORITHMS = frozenset({"HS256"})
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})  # for JWKS-backed verifiers
DEFAULT_OWNER_CLAIM = "sub"
TOKEN_TYPES = ("JWT", "at+jwt")  # typ values accepted (RFC 7519 5.1, RFC 9068 2.1), compared ignoring case
MAX_AUDIENCES = 32  # entries of an aud list
# header parameters refused whatever their value: extensions we do not implement, keys a token brings along
REFUSED_HEADERS = ("crit", "b64", "jku", "jwk", "x5u", "x5c")

_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")

VerificationKey = bytes | jwt.PyJWK
KeyResolver = Callable[[str, Mapping[str, Any]], VerificationKey]
AsyncKeyResolver = Callable[[str, Mapping[str, Any]], Awaitable[VerificationKey]]


@dataclass(frozen=True, slots=True)
class Claims:
    """What a checked token says: whose requests these are, until when, and what they may do."""

    owner_id: str
    expires_at: float
    issued_at: float | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)


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
    secret: str | bytes,
    owner_id: str,
    *,
    ttl: float = DEFAULT_TTL,
    now: float | None = None,
    scopes: Collection[str] | None = None,
) -> str:
    """An HS256 token for ``owner_id`` valid for ``ttl`` seconds (development and tests), made by PyJWT.

    It grants every scope of :data:`engine.api.scopes.ALL_SCOPES` unless ``scopes`` narrows them.
    """
    check_secret(secret)
    owner = validation.owner(owner_id)
    if ttl <= 0:
        raise errors.InvalidRequest("ttl", "must be positive")
    granted = scopesmod.check_names(scopesmod.ALL_SCOPES if scopes is None else scopes)
    issued = int(now if now is not None else time.time())
    payload = {"sub": owner, "iat": issued, "exp": issued + int(ttl), "scope": " ".join(granted)}
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


def _subject(claims: Mapping[str, Any], name: str = DEFAULT_OWNER_CLAIM) -> str:
    subject = claims.get(name)
    try:
        owner = validation.owner(subject)
    except errors.InvalidRequest:
        owner = None
    if owner is None or owner != subject:  # validation.owner trims: a token's subject is taken as given
        raise _unauthorized(
            f"{name} must be an owner id as given: 1-{validation.MAX_OWNER} letters, digits and ._:@|+- "
            "(no spaces or control characters)"
        )
    return owner


def _check_issuer(claims: Mapping[str, Any], issuer: str | None) -> None:
    if issuer is None:
        return
    if "iss" not in claims:
        raise _unauthorized("iss is required")
    if claims["iss"] != issuer:
        raise _unauthorized("wrong issuer")


def _check_audience(claims: Mapping[str, Any], audience: str | None) -> None:
    """RFC 7519 4.1.3: ``aud`` is a string or an array of strings, one of which must name us."""
    if audience is None:
        return
    if "aud" not in claims:
        raise _unauthorized("aud is required")
    value = claims["aud"]
    given = [value] if isinstance(value, str) else value
    if not isinstance(given, list) or not all(isinstance(item, str) for item in given):
        raise _unauthorized("aud must be a string or a list of strings")
    if len(given) > MAX_AUDIENCES:
        raise _unauthorized(f"aud lists more than {MAX_AUDIENCES} audiences")
    if audience not in given:
        raise _unauthorized("wrong audience")


def _check_name(value: str | None, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip() or value != value.strip()):
        raise errors.ConfigurationError(
            f"{what} must be a non-empty string without surrounding spaces", field=what
        )
    return value


@dataclass(frozen=True, slots=True)
class _Parsed:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]


def _parse(token: str) -> _Parsed:
    """Layer 1 (module docstring): the strict form of a token, before any cryptography."""
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
    return _Parsed(header, claims)


class TokenVerifier:
    """Checks bearer tokens against one family of algorithms and its keys (module docstring).

    ``keys(alg, header)`` (or, for keys fetched from an identity provider, the coroutine ``async_keys``)
    returns the key for a token whose header passed the policy. ``issuer`` and ``audience``, when given, must
    be the token's ``iss`` and one of its ``aud``; ``owner_claim`` names the claim that holds the owner id.
    Its ``repr`` names the algorithms only.
    """

    __slots__ = ("_algorithms", "_async_keys", "_audience", "_issuer", "_keys", "_leeway", "_owner_claim")

    def __init__(
        self,
        *,
        algorithms: Collection[str],
        keys: KeyResolver | None = None,
        async_keys: AsyncKeyResolver | None = None,
        leeway: float = LEEWAY_SECONDS,
        issuer: str | None = None,
        audience: str | None = None,
        owner_claim: str = DEFAULT_OWNER_CLAIM,
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
        if (keys is None) == (async_keys is None):
            raise errors.ConfigurationError("give keys or async_keys (one of them)", field="keys")
        if leeway < 0:
            raise errors.ConfigurationError("leeway must be >= 0", field="leeway")
        self._algorithms = allowed
        self._keys = keys
        self._async_keys = async_keys
        self._leeway = leeway
        self._issuer = _check_name(issuer, "issuer")
        self._audience = _check_name(audience, "audience")
        claim = _check_name(owner_claim, "owner_claim")
        self._owner_claim = claim if claim is not None else DEFAULT_OWNER_CLAIM

    @classmethod
    def hs256(cls, secret: str | bytes) -> TokenVerifier:
        """The development verifier: HS256 tokens signed with ``secret`` (at least 32 bytes)."""
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
        """Check ``token``; :class:`errors.Unauthorized` naming the failed rule when it does not pass.

        Only for a verifier with synchronous ``keys``; one with ``async_keys`` is checked by
        :meth:`verify_async`.
        """
        if self._keys is None:
            raise errors.ConfigurationError("this verifier fetches its keys: use verify_async", field="keys")
        parsed = _parse(token)
        alg = self._check_header(parsed.header)
        self._check_signature(token, alg, self._keys(alg, parsed.header))
        return self._check_claims(parsed.claims, now)

    async def verify_async(self, token: str, *, now: float | None = None) -> Claims:
        """:meth:`verify`, with keys that may have to be fetched first (``async_keys``)."""
        parsed = _parse(token)
        alg = self._check_header(parsed.header)
        if self._async_keys is not None:
            self._check_signature(token, alg, await self._async_keys(alg, parsed.header))
        else:
            assert self._keys is not None
            self._check_signature(token, alg, self._keys(alg, parsed.header))
        return self._check_claims(parsed.claims, now)

    def _check_claims(self, claims: Mapping[str, Any], now: float | None) -> Claims:
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
        _check_issuer(claims, self._issuer)
        _check_audience(claims, self._audience)
        return Claims(
            owner_id=_subject(claims, self._owner_claim),
            expires_at=expires,
            issued_at=issued,
            scopes=scopesmod.parse_claims(claims),
        )

    def _check_header(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _unauthorized(f"only {', '.join(sorted(self._algorithms))} tokens are accepted")
        typ = header.get("typ", "JWT")
        if not isinstance(typ, str) or typ.lower() not in {t.lower() for t in TOKEN_TYPES}:
            raise _unauthorized("typ must be JWT or at+jwt")
        refused = [name for name in REFUSED_HEADERS if name in header]
        if refused:
            raise _unauthorized(f"header parameter {refused[0]} is not supported")
        return alg

    def _check_signature(self, token: str, alg: str, key: VerificationKey) -> None:
        """PyJWT verifies the signature, with the token's one algorithm, and the presence of the required
        claims (tracebacks never render this frame's locals: the API logs them as text)."""
        if isinstance(key, jwt.PyJWK) and key.algorithm_name != alg:
            raise _unauthorized("the key named by kid is not for this alg")
        try:
            jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={
                    "require": ["exp", self._owner_claim],
                    # times are checked by verify() with one clock, after their finiteness
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # iss, aud and sub are checked by _check_claims, stricter
                    "verify_aud": False,
                    "verify_iss": False,
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


class Authenticator:
    """The server's token check: up to one :class:`TokenVerifier` per family (HMAC, public keys).

    A token goes to the verifier whose allow-list holds its ``alg``, and only to that one: with only a JWKS
    configured an HS256 token is refused, whatever it is signed with.
    """

    __slots__ = ("_verifiers",)

    def __init__(self, *verifiers: TokenVerifier) -> None:
        if not verifiers:
            raise errors.ConfigurationError(
                "the API needs a way to check tokens: ENGINE_API_JWKS_URL or ENGINE_API_JWT_SECRET",
                field="ENGINE_API_JWKS_URL",
            )
        seen: set[str] = set()
        for verifier in verifiers:
            if seen & verifier.algorithms:
                raise errors.ConfigurationError("two verifiers allow the same algorithm", field="algorithms")
            seen |= verifier.algorithms
        self._verifiers = verifiers

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset().union(*(v.algorithms for v in self._verifiers))

    def __repr__(self) -> str:
        return f"Authenticator(algorithms={sorted(self.algorithms)})"

    def __reduce__(self) -> Any:
        raise TypeError("Authenticator cannot be pickled")

    async def verify(self, token: str, *, now: float | None = None) -> Claims:
        """The claims of ``token`` as its family's verifier reads them; :class:`errors.Unauthorized`."""
        alg = _parse(token).header.get("alg")
        for verifier in self._verifiers:
            if isinstance(alg, str) and alg in verifier.algorithms:
                return await verifier.verify_async(token, now=now)
        raise _unauthorized(f"only {', '.join(sorted(self.algorithms))} tokens are accepted")


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
