"""Realistic key material and account ids in each venue's format (docs/venues.md §1-5).

Key material comes from :mod:`secrets` (never the seeded fault RNG), so two simulators never hand out the
same keys. Formats:

* BINANCE: 64 alphanumerics for both key and secret (HMAC keys).
* OKX: UUID key, 32 upper-case hex secret, a passphrase.
* BYBIT: 18-character key, 36-character secret (HMAC keys).
* COINBASE ``cdp``: key name ``organizations/{uuid}/apiKeys/{uuid}`` + EC P-256 private key as a SEC1 PEM
  (``-----BEGIN EC PRIVATE KEY-----``); ``cdp_ed25519``: UUID key id + base64 of seed || public key (64
  bytes); ``exchange``: 32 hex key + base64 of 64 random bytes + passphrase.
* KRAKEN ``spot`` and ``futures``: 56-character base64 key + base64 of a 64-byte secret.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
import uuid
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from venues.base import Venue

_ALNUM = string.ascii_letters + string.digits
_UPPER_ALNUM = string.ascii_uppercase + string.digits


@dataclass(frozen=True, slots=True)
class Material:
    """Freshly generated key material (not yet registered)."""

    api_key: str
    api_secret: str
    api_passphrase: str | None = None

    def __repr__(self) -> str:
        return "Material(<redacted>)"


def _chars(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def material(venue: Venue, kind: str | None, uid: str) -> Material:
    """New key material for ``venue`` (and Coinbase/Kraken ``kind``) belonging to account ``uid``."""
    if venue is Venue.BINANCE:
        return Material(_chars(_ALNUM, 64), _chars(_ALNUM, 64))
    if venue is Venue.OKX:
        # OKX passphrases: 8-32 characters mixing cases, digits and a symbol (chosen by the user).
        passphrase = "Sim" + _chars(_ALNUM, 12) + "!" + str(secrets.randbelow(10))
        return Material(str(uuid.uuid4()), secrets.token_hex(16).upper(), passphrase)
    if venue is Venue.BYBIT:
        return Material(_chars(_ALNUM, 18), _chars(_ALNUM, 36))
    if venue is Venue.COINBASE:
        return _coinbase(kind, uid)
    # KRAKEN spot and futures keys share one format; 42 bytes -> 56 base64 characters, no padding.
    return Material(_b64(secrets.token_bytes(42)), _b64(secrets.token_bytes(64)))


def _coinbase(kind: str | None, uid: str) -> Material:
    if kind == "cdp":
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # SEC1: "BEGIN EC PRIVATE KEY" (docs/venues.md §4A.2)
            serialization.NoEncryption(),
        ).decode("ascii")
        # Keys of one account share the organization id, as on the real portal.
        org = uuid.uuid5(uuid.NAMESPACE_URL, f"credential-engine-simulator:{uid}")
        return Material(f"organizations/{org}/apiKeys/{uuid.uuid4()}", pem)
    if kind == "cdp_ed25519":
        signer = ed25519.Ed25519PrivateKey.generate()
        seed = signer.private_bytes_raw()
        public = signer.public_key().public_bytes_raw()
        return Material(str(uuid.uuid4()), _b64(seed + public))  # docs/venues.md §4A.2: seed || public key
    passphrase = _chars(string.ascii_lowercase + string.digits, 11)
    return Material(secrets.token_hex(16), _b64(secrets.token_bytes(64)), passphrase)


def account_id(venue: Venue, kind: str | None) -> str:
    """A new account id in the form the venue reports it (contract: "Venue account id")."""
    if venue is Venue.BINANCE or venue is Venue.BYBIT:
        return str(100_000_000 + secrets.randbelow(900_000_000))  # numeric uid / userID
    if venue is Venue.OKX:
        return str(10**16 + secrets.randbelow(9 * 10**16))  # 17-digit uid
    if venue is Venue.KRAKEN and kind == "spot":
        return iiban(secrets.token_hex(8))
    return str(uuid.uuid4())  # Coinbase portfolio / profile id, Kraken futures accountUid


def iiban(seed: str) -> str:
    """A Kraken-style IIBAN (``AA88 N84G WOAK NMOI``, docs/venues.md §5A.3), stable for a given ``seed``."""
    digest = hashlib.sha256(seed.encode()).digest()
    chars = "".join(_UPPER_ALNUM[b % len(_UPPER_ALNUM)] for b in digest[:12])
    return f"AA{digest[12] % 90 + 10} {chars[0:4]} {chars[4:8]} {chars[8:12]}"
