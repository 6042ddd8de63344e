"""Checking the JWT bearer tokens of Coinbase CDP keys (docs/venues.md §4A.2 and the contract in venues/README.md).

A token is ``base64url(header).base64url(payload).base64url(signature)``; ES256 signatures are raw ``r || s``
(64 bytes) made with the key's EC P-256 private key, EdDSA signatures are Ed25519 made with the seed (the
first 32 bytes of the base64 secret). The simulator accepts a token when the signature verifies with the
registered key and: ``kid == sub == key name``, ``iss`` is ``cdp`` or ``coinbase-cloud`` (docs/venues.md §4A.2:
both are used by official code), ``nbf <= now + 5 s``, ``exp > now``, ``exp - nbf <= 120`` and ``uri`` (or,
as the CDP SDK sends for Ed25519 keys, one of ``uris``) equals ``"<METHOD> <Host header><path>"`` (over the
simulator's plain HTTP also ``"<METHOD> http://<Host header><path>"``, which is what ccxt signs there).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

NBF_LEEWAY = 5  # seconds a token's nbf may be ahead of the server (contract)
MAX_LIFETIME = 120  # seconds between nbf and exp (docs/venues.md §4A.2)
ISSUERS = ("cdp", "coinbase-cloud")
ALGORITHMS = {"cdp": "ES256", "cdp_ed25519": "EdDSA"}  # key kind -> JWT alg


class JwtError(Exception):
    """A token the simulator refuses; the message is the reason shown in ``error_details`` (no secrets)."""


@dataclass(frozen=True, slots=True)
class Token:
    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _b64url(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def decode(token: str) -> Token:
    """Split and decode a token without checking it."""
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("malformed JWT")
    try:
        header = json.loads(_b64url(parts[0]))
        payload = json.loads(_b64url(parts[1]))
        signature = _b64url(parts[2])
    except (ValueError, binascii.Error):
        raise JwtError("malformed JWT") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise JwtError("malformed JWT")
    return Token(header, payload, f"{parts[0]}.{parts[1]}".encode(), signature)


_ES256 = ec.ECDSA(hashes.SHA256())
PUBLIC_KEY_CACHE = 4096  # keys whose parsed public key is kept (parsing a PEM costs more than a verification)


@functools.lru_cache(maxsize=PUBLIC_KEY_CACHE)
def _public_key(kind: str, secret: str) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | None:
    """The public key of the private key ``secret`` of a key of ``kind``, parsed once per secret; None when
    ``secret`` is no such key (never verifies). Cached by the secret itself, so a key registered again with
    another secret is parsed afresh."""
    try:
        if kind == "cdp":
            private = serialization.load_pem_private_key(secret.encode(), password=None)
            return private.public_key() if isinstance(private, ec.EllipticCurvePrivateKey) else None
        seed = base64.b64decode(secret)[:32]
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
    except (ValueError, TypeError):
        return None


def signature_valid(kind: str, secret: str, token: Token) -> bool:
    """True when ``token`` is signed by the private key ``secret`` of a key of ``kind`` (verified every
    time; only the parsed key is cached)."""
    if token.header.get("alg") != ALGORITHMS.get(kind):
        return False
    public = _public_key(kind, secret)
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            if len(token.signature) != 64:
                return False
            r = int.from_bytes(token.signature[:32], "big")
            s = int.from_bytes(token.signature[32:], "big")
            public.verify(encode_dss_signature(r, s), token.signing_input, _ES256)
            return True
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(token.signature, token.signing_input)
            return True
        return False
    except (InvalidSignature, ValueError, TypeError):
        return False


def check_claims(token: Token, *, key_name: str, now: float, method: str, host: str, path: str) -> None:
    """Raise :class:`JwtError` unless the claims are right for this request at ``now`` (seconds)."""
    header, payload = token.header, token.payload
    if header.get("kid") != key_name or payload.get("sub") != key_name:
        raise JwtError("JWT kid and sub must both be the API key name")
    if payload.get("iss") not in ISSUERS:
        raise JwtError("JWT issuer is not accepted")
    nbf, exp = payload.get("nbf"), payload.get("exp")
    if not isinstance(nbf, int | float) or not isinstance(exp, int | float):
        raise JwtError("JWT must carry numeric nbf and exp claims")
    if nbf > now + NBF_LEEWAY:
        raise JwtError("JWT is not valid yet (nbf is in the future)")
    if exp <= now:
        raise JwtError("JWT has expired")
    if exp - nbf > MAX_LIFETIME:
        raise JwtError("JWT lifetime exceeds 120 seconds")
    expected = f"{method.upper()} {host}{path}"
    # Over the simulator's plain HTTP, a client that strips only "https://" from its URL (ccxt) signs
    # "<METHOD> http://<host><path>": accepted as the same request target (loopback contract).
    accepted = (expected, f"{method.upper()} http://{host}{path}")
    uris = payload.get("uris")
    if payload.get("uri") not in accepted and not (
        isinstance(uris, list) and any(u in uris for u in accepted)
    ):
        raise JwtError("JWT uri claim does not match the request")
