"""The sub-account key seam: what the engine asks of a venue whose master key manages sub-account API keys.

A BROKER credential holds a master (parent) account key. Where the venue offers an API for it (Binance, OKX and
Bybit; docs/venues.md says which endpoints and what they require), the engine mints, lists and deletes the API
keys of the master's sub-accounts through an implementation of :class:`SubAccountKeys`. Coinbase and Kraken offer
no such API: :func:`build_sub_account_keys` raises :class:`SubAccountsUnsupported` for them.

Like :mod:`venues.base`, this module holds only the protocol and plain values: it imports no HTTP client. Errors
are :class:`venues.base.ProbeFailure` with a normalized :class:`~venues.base.Outcome` (transient outcomes are
retried by the engine's jobs; permanent ones are reported), so a venue module reuses its probe's error mapping.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from venues.base import ApiKeys, Outcome, ProbeFailure, Venue, mask_api_key

if TYPE_CHECKING:
    import aiohttp

    from venues.limits import IpBudgets


# The most requests one BROKER discovery (``list_sub_accounts``, then ``can_manage_keys``) makes one after another,
# each bounded by the request timeout: a verification of a BROKER key makes them after its probe's
# (venues.base.MAX_SEQUENTIAL_REQUESTS), and the engine bounds the job by both. Each venue module states its own
# count as ``DISCOVERY_REQUESTS`` (a test keeps this the largest): Binance lists up to 20 pages of the broker's
# sub-accounts, then reads the key's restrictions and a one-row listing; OKX lists up to 20 pages, then reads
# account/config; Bybit reads query-sub-members, then query-api. Every one of those requests may be refused for
# the clock, the clock resynced and the request sent again: 3 each. Binance: 3 x (20 + 2) = 66.
MAX_DISCOVERY_REQUESTS = 66


class GrantProblem(ValueError):
    """A :class:`KeyGrant` (or a sub-account id) the venue cannot accept, found before any request: names the field.

    The message never holds key material: ``field`` is the grant's field name, ``reason`` says what is wrong.
    """

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class KeyLeftBehind(ProbeFailure):
    """A key was created at the venue but a follow-up step failed and deleting it failed too.

    Raised where creating a key takes two calls (Binance Link: create, then bind the IP list). ``key_id`` is
    the public key id (shown masked in the message) the caller must record and delete later; the venue may
    list it only masked (docs/venues.md §1.10), so this is the one moment its full id is known.
    """

    def __init__(self, outcome: Outcome, message: str, *, sub_id: str, key_id: str) -> None:
        super().__init__(outcome, f"{message}; key {mask_api_key(key_id)} of {sub_id} is left at the venue")
        self.sub_id = sub_id
        self.key_id = key_id


class SubAccountsUnsupported(Exception):
    """The venue offers no API through which a master key manages its sub-accounts' API keys."""

    def __init__(self, venue: Venue) -> None:
        super().__init__(
            f"{venue.display_name} offers no API to manage sub-account API keys with a master key "
            "(docs/venues.md); BROKER operations are refused there"
        )
        self.venue = venue


@dataclass(frozen=True, slots=True)
class SubAccount:
    """One sub-account of a master account. ``sub_id`` is the venue's identifier (uid, sub-account name or email)."""

    sub_id: str
    label: str = ""


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What a minted key may do. Least privilege by default: read and trade, never withdraw."""

    read: bool = True
    trade: bool = True
    ip_allowlist: tuple[str, ...] = ()
    label: str = ""  # the venue's note/label for the key; the engine writes its credential id here


@dataclass(frozen=True, slots=True)
class SubKeyInfo:
    """A sub-account key as the venue lists it (never any secret part)."""

    key_id: str  # the public API key (the identifier the venue lists and deletes by)
    label: str = ""
    read: bool = False
    trade: bool = False
    withdraw: bool = False
    ip_allowlist: tuple[str, ...] = ()
    created_at_ms: int | None = None
    expires_at_ms: int | None = None
    # True when the venue lists the key only partly (Binance Link shows ``vmP*************``): ``key_id`` is then
    # that masked form, which :meth:`matches` compares with a full key; a masked key cannot be deleted by it
    masked: bool = False

    def matches(self, api_key: str) -> bool:
        """True when this listed key is ``api_key`` (masked: when ``api_key`` starts with the visible part)."""
        if not self.masked:
            return self.key_id == api_key
        visible = self.key_id.rstrip("*")
        return bool(visible) and api_key.startswith(visible)


@dataclass(frozen=True, slots=True)
class MintedKey:
    """A key just created for a sub-account: the only moment its secret is ever seen."""

    sub_id: str
    info: SubKeyInfo
    keys: ApiKeys = field(repr=False)


class SubAccountKeys(Protocol):
    """Sub-account key management through a master key. One instance per venue per engine; safe for concurrent use.

    Every method raises :class:`venues.base.ProbeFailure` on a refusal or a transport failure: a master key
    without the permission the venue requires is ``PERMISSION_DENIED`` (permanent), and so is a ``sub_id`` that
    is not a sub-account of the master. A grant the venue cannot accept raises :class:`GrantProblem` before any
    request; a create that needed a second call which failed, and whose key could not be deleted, raises
    :class:`KeyLeftBehind` (a ProbeFailure) with the key id the caller must record and delete. Every method
    needs the master key alone: each venue lets the master delete its sub-accounts' keys (Bybit too, naming
    the key in ``apikey``; docs/venues.md §3.10).
    """

    venue: Venue

    async def can_manage_keys(self, master: ApiKeys) -> bool:
        """One cheap read: may ``master`` create and delete its sub-accounts' keys? False when the venue says the
        key lacks the permission (or is not a master key); transport failures and bad keys raise."""
        ...

    async def list_sub_accounts(self, master: ApiKeys) -> tuple[SubAccount, ...]:
        """The master account's sub-accounts."""
        ...

    async def create_key(self, master: ApiKeys, sub_id: str, grant: KeyGrant) -> MintedKey:
        """Create one API key for ``sub_id`` with ``grant``; the answer carries its secret (and passphrase)."""
        ...

    async def list_keys(self, master: ApiKeys, sub_id: str) -> tuple[SubKeyInfo, ...]:
        """Every API key of ``sub_id``, as the venue lists it: the truth reconciliation compares with."""
        ...

    async def delete_key(self, master: ApiKeys, sub_id: str, key_id: str) -> bool:
        """Delete ``key_id`` of ``sub_id``. Idempotent: False when the venue no longer has it, True when deleted."""
        ...


# venue -> (module, class): imported on first use, like venues.build_probe
_MANAGERS: dict[Venue, tuple[str, str]] = {
    Venue.BINANCE: ("venues.binance_subaccounts", "BinanceSubAccountKeys"),
    Venue.OKX: ("venues.okx_subaccounts", "OkxSubAccountKeys"),
    Venue.BYBIT: ("venues.bybit_subaccounts", "BybitSubAccountKeys"),
}


def supports_sub_account_keys(venue: Venue) -> bool:
    """True for the venues whose master keys can manage sub-account API keys through the API."""
    return venue in _MANAGERS


def build_sub_account_keys(
    venue: Venue,
    session: aiohttp.ClientSession,
    *,
    base_url: str | None = None,
    timeout: float = 10.0,
    rate_limited: bool = True,
    budgets: IpBudgets | None = None,
) -> SubAccountKeys:
    """The sub-account key manager for ``venue`` (same arguments as :func:`venues.build_probe`).

    Raises :class:`SubAccountsUnsupported` for Coinbase and Kraken.
    """
    if venue not in _MANAGERS:
        raise SubAccountsUnsupported(venue)
    module_name, class_name = _MANAGERS[venue]
    cls = getattr(importlib.import_module(module_name), class_name)
    manager: SubAccountKeys = cls(
        session, base_url=base_url, timeout=timeout, rate_limited=rate_limited, budgets=budgets
    )
    return manager
