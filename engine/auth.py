"""Bearer tokens for the REST API: HS256 JWTs (RFC 7519 / RFC 7515) signed and checked with the stdlib.

    token = auth.mint_token(secret, "owner-1", ttl=3600)
    claims = auth.verify_token(secret, token)          # Claims(owner_id="owner-1", expires_at=...)

What :func:`verify_token` insists on (anything else is :class:`errors.Unauthorized`, whose message says what
was wrong without echoing the token):

* three base64url parts, no padding, at most ``MAX_TOKEN_LENGTH`` characters;
* a header whose ``alg`` is exactly ``HS256`` (``none`` and every other algorithm are refused, so a token
  cannot choose how it is checked) and whose ``typ``, if present, is ``JWT``;
* a signature equal, in constant time, to HMAC-SHA256 of ``header.payload`` under the secret;
* a payload object with ``sub`` (the owner id, checked like every owner id) and a numeric ``exp`` in the
  future (``LEEWAY_SECONDS`` of clock skew tolerated); ``nbf``, when present, in the past.

The secret must be at least ``MIN_SECRET_BYTES`` long: RFC 7518 section 3.2 requires an HS256 key of at
least the hash size. ``ENGINE_API_JWT_SECRET`` holds it for the server and ``credential-engine token``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from engine import errors, validation

MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key is at least as long as the SHA-256 output
MAX_TOKEN_LENGTH = 4096  # a header, a short payload and a signature fit in far less
LEEWAY_SECONDS = 30  # clock skew tolerated on exp and nbf
DEFAULT_TTL = 3600.0
SECRET_ENV = "ENGINE_API_JWT_SECRET"  # noqa: S105 - the variable's name, not a secret
_HEADER = {"alg": "HS256", "typ": "JWT"}


@dataclass(frozen=True, slots=True)
class Claims:
    """What a checked token says: whose requests these are, and until when."""

    owner_id: str
    expires_at: float
    issued_at: float | None = None


def generate_secret() -> str:
    """A fresh random signing secret (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def check_secret(secret: str | bytes) -> bytes:
    """The secret as bytes, or :class:`errors.ConfigurationError` when it is too short to sign with."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise errors.ConfigurationError(
            f"{SECRET_ENV} must be at least {MIN_SECRET_BYTES} bytes (generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            field=SECRET_ENV,
        )
    return raw


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(part: str) -> bytes:
    if not part or "=" in part:
        raise ValueError("not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def _sign(key: bytes, signing_input: bytes) -> bytes:
    return hmac.new(key, signing_input, hashlib.sha256).digest()


def mint_token(
    secret: str | bytes, owner_id: str, *, ttl: float = DEFAULT_TTL, now: float | None = None
) -> str:
    """A token for ``owner_id`` valid for ``ttl`` seconds."""
    key = check_secret(secret)
    owner = validation.owner(owner_id)
    if ttl <= 0:
        raise errors.InvalidRequest("ttl", "must be positive")
    issued = int(now if now is not None else time.time())
    payload = {"sub": owner, "iat": issued, "exp": issued + int(ttl)}
    header_part = _b64encode(json.dumps(_HEADER, separators=(",", ":")).encode())
    payload_part = _b64encode(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{header_part}.{payload_part}".encode("ascii")
    return f"{header_part}.{payload_part}.{_b64encode(_sign(key, signing_input))}"


def _unauthorized(reason: str) -> errors.Unauthorized:
    return errors.Unauthorized(f"invalid access token: {reason}")


def _json_part(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(part))
    except (ValueError, RecursionError):
        raise _unauthorized(f"the {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise _unauthorized(f"the {what} is not a JSON object")
    return value


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _unauthorized(f"{name} is not a number")
    return float(value)


def verify_token(secret: str | bytes, token: str, *, now: float | None = None) -> Claims:
    """Check ``token`` (see the module docstring); :class:`errors.Unauthorized` when it does not pass."""
    key = check_secret(secret)
    if not isinstance(token, str) or not token:
        raise _unauthorized("empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _unauthorized("too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise _unauthorized("not a JWT (three dot-separated parts)")
    header = _json_part(parts[0], "header")
    if header.get("alg") != "HS256":
        raise _unauthorized("only HS256 tokens are accepted")
    if header.get("typ", "JWT") != "JWT":
        raise _unauthorized("typ must be JWT")
    try:
        signature = _b64decode(parts[2])
    except ValueError:
        raise _unauthorized("the signature is not base64url") from None
    expected = _sign(key, f"{parts[0]}.{parts[1]}".encode("ascii", errors="replace"))
    if not hmac.compare_digest(signature, expected):
        raise _unauthorized("bad signature")
    claims = _json_part(parts[1], "payload")
    moment = now if now is not None else time.time()
    expires = _number(claims, "exp")
    if expires is None:
        raise _unauthorized("exp is required")
    if moment >= expires + LEEWAY_SECONDS:
        raise _unauthorized("expired")
    not_before = _number(claims, "nbf")
    if not_before is not None and moment < not_before - LEEWAY_SECONDS:
        raise _unauthorized("not valid yet")
    subject = claims.get("sub")
    try:
        owner = validation.owner(subject)
    except errors.InvalidRequest:
        raise _unauthorized("sub must be an owner id") from None
    return Claims(owner_id=owner, expires_at=expires, issued_at=_number(claims, "iat"))


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value."""
    if header is None or not header.strip():
        raise errors.Unauthorized("authentication required: send Authorization: Bearer <token>")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("authentication required: the Authorization scheme must be Bearer")
    return token.strip()
