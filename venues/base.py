"""The probe seam: what the engine asks of an exchange module, and the values it gets back.

venues/README.md holds the conventions and the probe <-> simulator contract every venue module follows.

A probe takes one set of API keys, signs requests exactly as its venue documents (``docs/venues.md``), and
answers with one frozen :class:`ProbeResult` or raises :class:`ProbeFailure` carrying one normalized
:class:`Outcome`. Permanent outcomes fail verification; transient ones make the job retry, honouring
``retry_after`` when the venue gave one.

This module holds only the :class:`Probe` protocol, plain values and pure key-shape checks: it imports no HTTP
client, so the engine's core (models, config, crypto) loads without aiohttp. The HTTP machinery every probe
shares is in :mod:`venues.http`, the client-side rate limiters in :mod:`venues.limits`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class Venue(enum.StrEnum):
    """The exchanges the engine speaks to; values are the spelling of docs/api-dialect.md §5."""

    BINANCE = "BINANCE"
    OKX = "OKX"
    BYBIT = "BYBIT"
    COINBASE = "COINBASE"
    KRAKEN = "KRAKEN"

    @property
    def display_name(self) -> str:
        """How people write it: "Binance", "OKX", "Bybit", "Coinbase", "Kraken"."""
        return "OKX" if self is Venue.OKX else self.value.title()


class Outcome(enum.StrEnum):
    """One normalized answer for every venue reply (docs/design.md §8.2, docs/venues.md §0)."""

    OK = "OK"
    INVALID_KEY = "INVALID_KEY"
    INVALID_SECRET = "INVALID_SECRET"  # noqa: S105 - an outcome name, not a secret
    INVALID_PASSPHRASE = "INVALID_PASSPHRASE"  # noqa: S105 - an outcome name, not a secret
    IP_NOT_ALLOWED = "IP_NOT_ALLOWED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    KEY_EXPIRED = "KEY_EXPIRED"
    WRONG_ENVIRONMENT = "WRONG_ENVIRONMENT"
    ACCOUNT_RESTRICTED = "ACCOUNT_RESTRICTED"
    RATE_LIMITED = "RATE_LIMITED"
    CLOCK_SKEW = "CLOCK_SKEW"
    MAINTENANCE = "MAINTENANCE"
    SERVER_ERROR = "SERVER_ERROR"
    TIMEOUT = "TIMEOUT"
    NETWORK = "NETWORK"

    @property
    def transient(self) -> bool:
        """True when retrying later may succeed: never a reason to mark a credential FAILED."""
        return self in TRANSIENT_OUTCOMES


TRANSIENT_OUTCOMES = frozenset(
    {
        Outcome.RATE_LIMITED,
        Outcome.CLOCK_SKEW,
        Outcome.MAINTENANCE,
        Outcome.SERVER_ERROR,
        Outcome.TIMEOUT,
        Outcome.NETWORK,
    }
)
PERMANENT_OUTCOMES = frozenset(set(Outcome) - TRANSIENT_OUTCOMES - {Outcome.OK})


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Decrypted key material. Its ``repr``/``str`` never show the secret parts.

    ``api_key`` is the public half (for Coinbase CDP keys: the key *name*); ``api_secret`` is the HMAC
    secret or the PEM private key; ``api_passphrase`` is OKX's / Coinbase Exchange's passphrase.
    """

    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    api_passphrase: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"ApiKeys(api_key={mask_api_key(self.api_key)!r}, api_secret='***', api_passphrase='***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # pickling would copy secrets into places nobody audits
        raise TypeError("ApiKeys cannot be pickled")


def mask_api_key(api_key: str) -> str:
    """The display form of an API key: a short prefix, then ``***`` (docs/api-dialect.md §4 shows ``your-api-***``).

    Short keys show less, so that the shown part is never most of the key.
    """
    visible = min(8, len(api_key) // 3)
    return api_key[:visible] + "***"


@dataclass(frozen=True, slots=True)
class Permissions:
    """What a key may do, as its venue reports it."""

    read: bool = False
    trade: bool = False
    withdraw: bool = False
    transfer: bool = False
    ip_restricted: bool = False
    ip_allowlist: tuple[str, ...] = ()
    expires_at_ms: int | None = None  # when the key (or its trading permission) expires, if the venue says
    # a BROKER (master) key that may create, list and delete its sub-accounts' API keys (venues/subaccounts.py)
    sub_account_keys: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The JSON form; ``subAccountKeys`` only where true (a BROKER master key that may mint), so that every
        other key's permissions keep their shape."""
        shown: dict[str, Any] = {
            "read": self.read,
            "trade": self.trade,
            "withdraw": self.withdraw,
            "transfer": self.transfer,
            "ipRestricted": self.ip_restricted,
            "ipAllowlist": list(self.ip_allowlist),
            "expiresAt": self.expires_at_ms,
        }
        if self.sub_account_keys:
            shown["subAccountKeys"] = True
        return shown

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Permissions:
        return cls(
            read=bool(data.get("read", False)),
            trade=bool(data.get("trade", False)),
            withdraw=bool(data.get("withdraw", False)),
            transfer=bool(data.get("transfer", False)),
            ip_restricted=bool(data.get("ipRestricted", False)),
            ip_allowlist=tuple(str(x) for x in data.get("ipAllowlist", ()) or ()),
            expires_at_ms=(int(data["expiresAt"]) if data.get("expiresAt") is not None else None),
            sub_account_keys=bool(data.get("subAccountKeys", False)),
        )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a successful probe found. ``identities`` use the account-type names of docs/api-dialect.md §5."""

    venue: Venue
    venue_account_id: str
    permissions: Permissions
    identities: tuple[str, ...]
    environment: str = "production"  # or "testnet" / "demo" where the probe found the key there
    details: Mapping[str, str] = field(default_factory=dict)  # venue-specific, non-secret (key label, mode)


class ProbeFailure(Exception):
    """A probe could not confirm the key. ``message`` is safe to store and show: it never holds key material."""

    def __init__(
        self,
        outcome: Outcome,
        message: str = "",
        *,
        retry_after: float | None = None,
        venue_code: str | None = None,
    ) -> None:
        super().__init__(f"{outcome.value}: {message}" if message else outcome.value)
        self.outcome = outcome
        self.message = message
        self.retry_after = retry_after
        self.venue_code = venue_code

    @property
    def transient(self) -> bool:
        return self.outcome.transient


def release_frames(error: BaseException) -> None:
    """Let go of the frames that ``error`` (with its cause and context) holds through its traceback.

    A call that fails keeps its frames alive through the exception's traceback, and with them the key pair
    and the signed headers in their locals; a frame that raised an exception it had stored in a local (a
    refused answer returned as a value, then raised) also forms a reference cycle that only the garbage
    collector frees, some time later. Probes' failures end here, so the keys go once the answer is read: the
    traceback is dropped (a probe failure is an outcome, its stack of no use), and the frames with it unless
    they are still running. Frames are not cleared in place: clearing a suspended coroutine's frame would close
    it (Python 3.11 and 3.12), and a frame's locals dict, once read, would keep the values anyway.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += (current.__cause__, current.__context__)


class KeyFormatProblem(ValueError):
    """Keys whose shape the venue cannot accept (empty secret, bad base64, bad PEM). Names the field."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


# The most requests one probe makes one after another, each bounded by the request timeout: the verify call, the
# clock resync it may need and its retry (3); OKX's demo-environment check after a 50101 refusal (3 more); then
# the concurrent identity calls, each with its own resync and retry, plus a wait for another call's resync (4).
# Kraken (spot, then futures), Bybit, Binance and Coinbase stay within it. The engine bounds a verification job
# by this many request timeouts plus a margin for the client-side rate limiters and its own database work.
MAX_SEQUENTIAL_REQUESTS = 10


class Probe(Protocol):
    """The protocol the engine calls. One instance per venue per engine; safe for concurrent use."""

    venue: Venue

    def check_keys(self, keys: ApiKeys) -> None:
        """Raise :class:`KeyFormatProblem` when the keys cannot be right for this venue (no I/O)."""

    async def probe(self, keys: ApiKeys) -> ProbeResult:
        """Verify the keys, read their permissions and discover their identities (concurrently)."""
        ...


MAX_FIELD_CHARS = 256  # no venue's key, secret or passphrase is longer (PEM secrets are checked separately)


def check_token(field_name: str, value: str, shape: re.Pattern[str], reason: str) -> None:
    """A key part that must be one printable token of ``shape``; :class:`KeyFormatProblem` names the field."""
    if not value:
        raise KeyFormatProblem(field_name, "is empty")
    if len(value) > MAX_FIELD_CHARS:
        raise KeyFormatProblem(field_name, f"is longer than {MAX_FIELD_CHARS} characters")
    if any(ch.isspace() for ch in value):
        raise KeyFormatProblem(field_name, "contains whitespace (a copy-paste slip?)")
    if not value.isprintable():
        raise KeyFormatProblem(field_name, "contains control characters")
    if not shape.fullmatch(value):
        raise KeyFormatProblem(field_name, reason)


def format_failure(venue: Venue, problem: KeyFormatProblem) -> ProbeFailure:
    """Keys that cannot be right, met at probe time: a permanent failure naming the field, never its value."""
    outcome = {
        "apiSecret": Outcome.INVALID_SECRET,
        "apiPassphrase": Outcome.INVALID_PASSPHRASE,
    }.get(problem.field, Outcome.INVALID_KEY)
    return ProbeFailure(outcome, f"{venue.display_name} keys are malformed: {problem}")
