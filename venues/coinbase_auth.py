"""Coinbase key material and request signing: CDP keys (a JWT per request) and Coinbase Exchange keys (HMAC).

The key kind is told from the secret (venues/README.md, the probe <-> simulator contract):

* contains ``-----BEGIN``: a CDP key whose secret is a PEM: EC P-256 (``ES256``) or Ed25519 (``EdDSA``);
* base64 decoding to exactly 64 bytes and no passphrase: a CDP Ed25519 key (seed = first 32 bytes, 4A.2);
* any other base64 secret, with a passphrase: a Coinbase Exchange key (docs/venues.md §4B).

The JWT is built with ``cryptography`` alone: base64url without padding, ES256 signatures as raw ``r||s``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from yarl import URL

from venues import base

JWT_LIFETIME_S = 120  # "lifetime 2 minutes", docs/venues.md §4A.2
JWT_ISSUER = (
    "cdp"  # the CDP docs' and CDP SDK's value; the contract fixes it (docs/venues.md §4A.2 lists both)
)
PEM_MARKER = "-----BEGIN"
ED25519_SECRET_BYTES = 64  # 32-byte seed || 32-byte public key (docs/venues.md §4A.2)
P256_COORDINATE_BYTES = 32

# Public key halves: key names (organizations/{org}/apiKeys/{id}), UUIDs, hex Exchange keys. No spaces.
_KEY_RE = re.compile(r"[A-Za-z0-9._:/+=-]{8,256}")
_PASSPHRASE_MAX = 256


class CdpSigner:
    """Signs Advanced Trade requests with a fresh JWT each (docs/venues.md §4A.2). Holds a loaded private key."""

    __slots__ = ("_private_key", "algorithm", "key_name")

    def __init__(
        self, key_name: str, private_key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ) -> None:
        self.key_name = key_name
        self._private_key = private_key
        self.algorithm = "EdDSA" if isinstance(private_key, ed25519.Ed25519PrivateKey) else "ES256"

    def __repr__(self) -> str:
        return f"CdpSigner({self.algorithm}, {base.mask_api_key(self.key_name)!r})"

    def token(self, method: str, url: str, now_s: int) -> str:
        """The bearer JWT for one request to ``url`` (its query, if any, is not part of the ``uri`` claim)."""
        header = {"alg": self.algorithm, "kid": self.key_name, "nonce": secrets.token_hex(16), "typ": "JWT"}
        payload = {
            "sub": self.key_name,
            "iss": JWT_ISSUER,
            "nbf": now_s,
            "exp": now_s + JWT_LIFETIME_S,
            "uri": jwt_uri(method, url),
        }
        signing_input = f"{_b64url_json(header)}.{_b64url_json(payload)}"
        return f"{signing_input}.{b64url(self._sign(signing_input.encode('ascii')))}"

    def _sign(self, message: bytes) -> bytes:
        if isinstance(self._private_key, ed25519.Ed25519PrivateKey):
            return self._private_key.sign(message)
        der = self._private_key.sign(message, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)  # JWS wants raw r||s, not DER (RFC 7518 3.4)
        return r.to_bytes(P256_COORDINATE_BYTES, "big") + s.to_bytes(P256_COORDINATE_BYTES, "big")


class ExchangeSigner:
    """Signs Coinbase Exchange requests with the CB-ACCESS-* HMAC headers (docs/venues.md §4B)."""

    __slots__ = ("_passphrase", "_secret", "api_key")

    def __init__(self, api_key: str, secret: bytes, passphrase: str) -> None:
        self.api_key = api_key
        self._secret = secret
        self._passphrase = passphrase

    def __repr__(self) -> str:
        return f"ExchangeSigner({base.mask_api_key(self.api_key)!r})"

    def headers(self, method: str, request_path: str, body: str, timestamp_s: int) -> dict[str, str]:
        """Headers for one request; ``request_path`` includes the query string (ccxt; the contract)."""
        timestamp = str(timestamp_s)
        return {
            "CB-ACCESS-KEY": self.api_key,
            "CB-ACCESS-SIGN": exchange_signature(self._secret, timestamp, method, request_path, body),
            "CB-ACCESS-TIMESTAMP": timestamp,
            "CB-ACCESS-PASSPHRASE": self._passphrase,
            "Content-Type": "application/json",
        }


def exchange_signature(secret: bytes, timestamp: str, method: str, request_path: str, body: str) -> str:
    """base64(HMAC-SHA256(base64decode(secret), timestamp + METHOD + requestPath + body)) (docs/venues.md §4B)."""
    message = (timestamp + method.upper() + request_path + body).encode()
    return base64.b64encode(hmac.new(secret, message, hashlib.sha256).digest()).decode("ascii")


def jwt_uri(method: str, url: str) -> str:
    """``"<METHOD> <host><path>"``: no scheme, no query; the host as the Host header carries it."""
    parsed = URL(url, encoded=True)
    return f"{method.upper()} {parsed.host_port_subcomponent}{parsed.raw_path}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def signer_for(keys: base.ApiKeys) -> CdpSigner | ExchangeSigner:
    """The signer of the keys' kind, or :class:`base.KeyFormatProblem` naming the field."""
    if not _KEY_RE.fullmatch(keys.api_key):
        raise base.KeyFormatProblem("apiKey", "must be 8-256 characters: letters, digits and ._:/+=- only")
    secret = keys.api_secret.strip()
    if not secret:
        raise base.KeyFormatProblem("apiSecret", "is empty")
    if PEM_MARKER in secret:
        return CdpSigner(keys.api_key, _load_pem(secret))
    raw = _b64decode(secret)
    if raw is None:
        raise base.KeyFormatProblem(
            "apiSecret", "is neither a PEM private key (CDP key) nor base64 (Ed25519 CDP key, Exchange key)"
        )
    passphrase = keys.api_passphrase or ""
    if len(raw) == ED25519_SECRET_BYTES and not passphrase:
        return CdpSigner(keys.api_key, ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32]))
    if not passphrase:
        raise base.KeyFormatProblem("apiPassphrase", "is required for a Coinbase Exchange key")
    if len(passphrase) > _PASSPHRASE_MAX or not passphrase.isprintable():
        raise base.KeyFormatProblem(
            "apiPassphrase", f"must be at most {_PASSPHRASE_MAX} printable characters"
        )
    return ExchangeSigner(keys.api_key, raw, passphrase)


def _load_pem(secret: str) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    # A PEM copied out of Coinbase's JSON key file often keeps its "\n" escapes; PEM needs real newlines.
    text = secret.replace("\\n", "\n")
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise base.KeyFormatProblem("apiSecret", "PEM does not load as an unencrypted private key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise base.KeyFormatProblem("apiSecret", "PEM private key must be EC P-256 (ES256) or Ed25519")


def _b64decode(text: str) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw or None
