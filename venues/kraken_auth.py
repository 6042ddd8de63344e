"""Kraken key material, request signing (spot API-Sign, futures Authent) and per-key nonces."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Callable

from venues import base

SPOT_SECRET_BYTES = (
    64  # a spot secret decodes to 64 bytes (docs/venues.md §5A.8's vector); futures secrets may differ
)
MIN_SECRET_BYTES = 32
_KEY_RE = re.compile(r"[A-Za-z0-9+/=_-]{16,128}")  # Kraken public keys are base64-like, ~56 characters


class KrakenKeys:
    """A Kraken key pair, the secret already decoded. ``repr`` shows the masked key only."""

    __slots__ = ("api_key", "secret")

    def __init__(self, api_key: str, secret: bytes) -> None:
        self.api_key = api_key
        self.secret = secret

    def __repr__(self) -> str:
        return f"KrakenKeys({base.mask_api_key(self.api_key)!r})"

    @property
    def may_be_spot(self) -> bool:
        return len(self.secret) == SPOT_SECRET_BYTES


def parse_keys(keys: base.ApiKeys) -> KrakenKeys:
    """Decode the keys, or raise :class:`base.KeyFormatProblem` naming the field (never its value)."""
    if not _KEY_RE.fullmatch(keys.api_key):
        raise base.KeyFormatProblem("apiKey", "must be 16-128 characters of the base64 alphabet")
    try:
        secret = base64.b64decode(keys.api_secret.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise base.KeyFormatProblem("apiSecret", "is not valid base64") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise base.KeyFormatProblem("apiSecret", f"decodes to fewer than {MIN_SECRET_BYTES} bytes")
    return KrakenKeys(keys.api_key, secret)


def spot_signature(secret: bytes, path: str, nonce: str, post_data: str) -> str:
    """``base64(HMAC-SHA512(secret, path || SHA256(nonce + postdata)))`` (docs/venues.md §5A.2)."""
    inner = hashlib.sha256((nonce + post_data).encode()).digest()
    return base64.b64encode(hmac.new(secret, path.encode() + inner, hashlib.sha512).digest()).decode("ascii")


def futures_authent(secret: bytes, post_data: str, nonce: str, endpoint_path: str) -> str:
    """``base64(HMAC-SHA512(secret, SHA256(postData + Nonce + endpointPath)))`` (docs/venues.md §5B)."""
    inner = hashlib.sha256((post_data + nonce + endpoint_path).encode()).digest()
    return base64.b64encode(hmac.new(secret, inner, hashlib.sha512).digest()).decode("ascii")


class NonceBook:
    """Strictly increasing millisecond nonces, one counter per API key (docs/venues.md §5A.2).

    :meth:`next` never awaits, so under asyncio it is atomic: concurrent requests of one key each get a
    nonce above every nonce handed out before. Counters are keyed by a digest of the API key (the book holds
    no key) and bounded; a counter is only forgotten once the clock has passed it, so forgetting is harmless.
    """

    def __init__(self, clock_ms: Callable[[], int], *, max_keys: int = 10_000) -> None:
        self._clock_ms = clock_ms
        self._max_keys = max_keys
        self._last: OrderedDict[bytes, int] = OrderedDict()

    def next(self, api_key: str) -> int:
        slot = hashlib.sha256(api_key.encode()).digest()
        nonce = max(self._clock_ms(), self._last.get(slot, 0) + 1)
        self._last[slot] = nonce
        self._last.move_to_end(slot)
        if len(self._last) > self._max_keys:
            oldest, last = next(iter(self._last.items()))
            if last < self._clock_ms():
                del self._last[oldest]
        return nonce
