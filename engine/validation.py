"""Input checks shared by the library API and the REST API: trimmed, bounded, typed errors naming the field.

Never echoes a value that might be secret: messages name the field and the rule only.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from engine import errors
from engine.models import CredentialStatus, CredentialType, TradingAccountStatus
from venues.base import ApiKeys, Venue

MAX_OWNER = 128
MAX_NICKNAME = 100
MAX_API_KEY = 512
MAX_SECRET = 8192  # PEM private keys are a few hundred bytes; generous, bounded
MAX_PASSPHRASE = 128
MAX_ACCOUNT_TYPE = 32
MAX_PAGE = 500

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# for str patterns exactly str.isspace() (both are Py_UNICODE_ISSPACE), without a loop per character
_SPACE = re.compile(r"\s")
_OWNER = re.compile(r"^[A-Za-z0-9._:@|+\-]+$")
_ACCOUNT_TYPE = re.compile(r"^[a-z][a-z0-9_]*$")
# venues whose "required fields" include a passphrase (docs/api-dialect.md §5); COINBASE depends on the key kind
PASSPHRASE_REQUIRED = frozenset({Venue.OKX})


def owner(value: Any) -> str:
    if not isinstance(value, str):
        raise errors.InvalidRequest("ownerId", "must be a string")
    text = value.strip()
    if not text:
        raise errors.InvalidRequest("ownerId", "is required")
    if len(text) > MAX_OWNER or not _OWNER.match(text):
        raise errors.InvalidRequest(
            "ownerId", f"must be 1-{MAX_OWNER} characters of letters, digits and ._:@|+-"
        )
    return text


def venue(value: Any, field: str = "venue") -> Venue:
    if isinstance(value, Venue):
        return value
    if not isinstance(value, str) or not value.strip():
        raise errors.InvalidRequest(field, "is required")
    try:
        return Venue(value.strip().upper())
    except ValueError:
        raise errors.InvalidRequest(field, f"must be one of {', '.join(v.value for v in Venue)}") from None


def credential_type(value: Any, field: str = "credentialType") -> CredentialType:
    if value is None:
        return CredentialType.EXCHANGE
    if isinstance(value, CredentialType):
        return value
    if not isinstance(value, str):
        raise errors.InvalidRequest(field, "must be a string")
    try:
        return CredentialType(value.strip().upper())
    except ValueError:
        raise errors.InvalidRequest(field, "must be EXCHANGE or BROKER") from None


def status(value: Any, field: str = "credentialStatus") -> CredentialStatus | None:
    """None (no filter) only for None: an empty or unknown text is refused, never read as "every status"."""
    if value is None:
        return None
    if isinstance(value, CredentialStatus):
        return value
    if not isinstance(value, str):
        raise errors.InvalidRequest(field, "must be a string")
    try:
        return CredentialStatus(value.strip().upper())
    except ValueError:
        raise errors.InvalidRequest(field, "must be PENDING, VERIFIED, FAILED or REVOKED") from None


def account_status(value: Any, field: str = "status") -> TradingAccountStatus | None:
    """None (no filter) only for None: an empty or unknown text is refused."""
    if value is None:
        return None
    if isinstance(value, TradingAccountStatus):
        return value
    if not isinstance(value, str):
        raise errors.InvalidRequest(field, "must be a string")
    try:
        return TradingAccountStatus(value.strip().upper())
    except ValueError:
        raise errors.InvalidRequest(field, "must be ACTIVE or DISABLED") from None


def nickname(value: Any, field: str = "nickname") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.InvalidRequest(field, "must be a string")
    text = value.strip()
    if not text:
        return None
    if len(text) > MAX_NICKNAME:
        raise errors.InvalidRequest(field, f"must be at most {MAX_NICKNAME} characters")
    if _CONTROL.search(text) or "\n" in text or "\r" in text:
        raise errors.InvalidRequest(field, "must not contain control characters")
    return text


def account_type(value: Any, field: str = "accountType") -> str | None:
    """None (the default account type) only for None: an empty text is refused like any bad name."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.InvalidRequest(field, "must be a string")
    text = value.strip().lower()
    if len(text) > MAX_ACCOUNT_TYPE or not _ACCOUNT_TYPE.match(text):
        raise errors.InvalidRequest(field, "must be a short lower-case name such as spot, margin or futures")
    return text


def uuid_value(value: Any, field: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or not value.strip():
        raise errors.InvalidRequest(field, "is required")
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise errors.InvalidRequest(field, "must be a UUID") from None


def page(offset: Any, limit: Any) -> tuple[int, int]:
    for name, value in (("offset", offset), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.InvalidRequest(name, "must be an integer")
    if offset < 0:
        raise errors.InvalidRequest("offset", "must be >= 0")
    if offset > 10_000_000:
        raise errors.InvalidRequest("offset", "must be <= 10000000")
    if not 1 <= limit <= MAX_PAGE:
        raise errors.InvalidRequest("limit", f"must be between 1 and {MAX_PAGE}")
    return offset, limit


def _key_part(value: Any, field: str, limit: int, *, required: bool, multiline: bool) -> str | None:
    if value is None:
        if required:
            raise errors.InvalidRequest(field, "is required")
        return None
    if not isinstance(value, str):
        raise errors.InvalidRequest(field, "must be a string")
    text = value.strip()
    if not text:
        if required:
            raise errors.InvalidRequest(field, "is required")
        return None
    if len(text) > limit:
        raise errors.InvalidRequest(field, f"must be at most {limit} characters")
    if _CONTROL.search(text):
        raise errors.InvalidKeyFormat(field, "must not contain control characters")
    if not multiline and _SPACE.search(text):
        raise errors.InvalidKeyFormat(field, "must not contain whitespace")
    return text


def api_keys(the_venue: Venue, api_key: Any, api_secret: Any, api_passphrase: Any = None) -> ApiKeys:
    """Required fields per venue, trimmed and bounded. Formats per venue are the probes' ``check_keys``."""
    key = _key_part(api_key, "apiKey", MAX_API_KEY, required=True, multiline=False)
    # PEM secrets (Coinbase CDP keys) span lines; other secrets are single tokens, checked by the probe
    secret = _key_part(api_secret, "apiSecret", MAX_SECRET, required=True, multiline=True)
    passphrase = _key_part(api_passphrase, "apiPassphrase", MAX_PASSPHRASE, required=False, multiline=False)
    if the_venue in PASSPHRASE_REQUIRED and passphrase is None:
        raise errors.InvalidRequest("apiPassphrase", f"is required for {the_venue.value}")
    assert key is not None and secret is not None
    if secret.startswith("-----BEGIN") and not secret.endswith("\n"):
        secret += (
            "\n"  # PEM as issued ends with a newline; trimming must not change what the venue signs with
        )
    return ApiKeys(api_key=key, api_secret=secret, api_passphrase=passphrase)
