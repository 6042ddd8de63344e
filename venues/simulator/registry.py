"""The simulator's test accounts: registered keys, their account ids, permissions and per-key nonces.

A :class:`TestKey` is what a test gets back from ``Simulator.add_key``: the key material (its ``repr`` never
shows the secret or the passphrase) plus everything the venue servers answer from (permissions, identities,
IP allow-list, expiry, environment). Several keys may share one ``uid``: they belong to one account.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from venues.base import ApiKeys, Venue, mask_api_key
from venues.simulator import keygen

# Identity names are those of docs/api-dialect.md §5 (contract: "Identities use the names of docs/api-dialect.md §5").
IDENTITIES: Mapping[tuple[Venue, str | None], tuple[str, ...]] = {
    (Venue.BINANCE, None): ("futures", "margin", "spot"),
    (Venue.OKX, None): ("funding", "trading"),
    (Venue.BYBIT, None): ("contract", "spot", "unified"),
    (Venue.COINBASE, "cdp"): ("default",),
    (Venue.COINBASE, "cdp_ed25519"): ("default",),
    (Venue.COINBASE, "exchange"): ("default",),
    (Venue.KRAKEN, "spot"): ("spot",),
    (Venue.KRAKEN, "futures"): ("futures",),
}
DEFAULT_KIND: Mapping[Venue, str | None] = {
    Venue.BINANCE: None,
    Venue.OKX: None,
    Venue.BYBIT: None,
    Venue.COINBASE: "cdp",
    Venue.KRAKEN: "spot",
}
ENVIRONMENTS = ("production", "testnet", "demo")
# Fields update_key may change; the key material, venue and kind are fixed at creation.
MUTABLE_FIELDS = frozenset(
    {
        "uid",
        "read",
        "trade",
        "withdraw",
        "identities",
        "ip_allowlist",
        "expires_at_ms",
        "environment",
        "label",
        "transfer",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TestKey:
    """One registered key. ``api_keys`` is what a probe is given."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    venue: Venue
    api_key: str
    api_secret: str = field(repr=False)
    api_passphrase: str | None = field(default=None, repr=False)
    uid: str
    kind: str | None = None
    read: bool = True
    trade: bool = True
    withdraw: bool = False
    identities: tuple[str, ...] = ()
    ip_allowlist: tuple[str, ...] = ()
    expires_at_ms: int | None = None
    environment: str = "production"
    label: str | None = None
    created_at_ms: int = 0
    # Bybit's wallet transfer permissions (AccountTransfer, SubMemberTransfer): what a master key needs, with
    # Withdraw, to manage its sub-accounts' keys (docs/venues.md §3.10); the other venues ignore it
    transfer: bool = True
    parent_uid: str | None = None  # the master account's uid, for a key of a sub-account

    def __repr__(self) -> str:
        return (
            f"TestKey(venue={self.venue.value}, api_key={mask_api_key(self.api_key)!r}, uid={self.uid!r}, "
            f"kind={self.kind!r}, read={self.read}, trade={self.trade}, withdraw={self.withdraw}, "
            f"identities={self.identities!r}, environment={self.environment!r}, label={self.label!r}, "
            f"parent_uid={self.parent_uid!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:  # same reason as ApiKeys: no secret copies nobody audits
        raise TypeError("TestKey cannot be pickled")

    @property
    def api_keys(self) -> ApiKeys:
        return ApiKeys(self.api_key, self.api_secret, self.api_passphrase)

    def expired(self, now_ms: int) -> bool:
        return self.expires_at_ms is not None and now_ms >= self.expires_at_ms

    def as_dict(self, *, secrets: bool) -> dict[str, Any]:
        """JSON form (admin API). With ``secrets=False`` the secret and passphrase are left out."""
        data: dict[str, Any] = {
            "venue": self.venue.value,
            "api_key": self.api_key,
            "uid": self.uid,
            "kind": self.kind,
            "read": self.read,
            "trade": self.trade,
            "withdraw": self.withdraw,
            "identities": list(self.identities),
            "ip_allowlist": list(self.ip_allowlist),
            "expires_at_ms": self.expires_at_ms,
            "environment": self.environment,
            "label": self.label,
            "created_at_ms": self.created_at_ms,
            "transfer": self.transfer,
            "parent_uid": self.parent_uid,
        }
        if secrets:
            data["api_secret"] = self.api_secret
            data["api_passphrase"] = self.api_passphrase
        return data


def _kind_for(venue: Venue, kind: str | None) -> str | None:
    chosen = kind if kind is not None else DEFAULT_KIND[venue]
    if (venue, chosen) not in IDENTITIES:
        allowed = sorted(str(k) for (v, k) in IDENTITIES if v is venue and k is not None)
        raise ValueError(f"{venue.value} keys have kind {allowed or 'None'}, not {kind!r}")
    return chosen


def _identities(venue: Venue, kind: str | None, identities: Iterable[str] | None) -> tuple[str, ...]:
    known = IDENTITIES[(venue, kind)]
    if identities is None:
        return known
    if isinstance(identities, str):
        raise ValueError("identities must be a collection of names, not one string")
    chosen = tuple(sorted(set(identities)))
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(f"unknown {venue.value} identities {unknown}; known: {list(known)}")
    return chosen


def _allowlist(entries: Iterable[str]) -> tuple[str, ...]:
    if isinstance(entries, str):
        raise ValueError("ip_allowlist must be a collection of addresses, not one string")
    checked = []
    for entry in entries:
        ipaddress.ip_network(entry, strict=False)  # ValueError on a bad address or CIDR
        checked.append(str(entry))
    return tuple(checked)


def _environment(environment: str) -> str:
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment must be one of {list(ENVIRONMENTS)}")
    return environment


MAX_REMOVED = 100_000  # removal times remembered (the oldest are forgotten first): bounded memory


class Registry:
    """Keys by API key, plus the per-key nonce memory Kraken needs and when each removed key was removed (the
    wall-clock time a venue started answering it as unknown). Not shared between simulators."""

    def __init__(self) -> None:
        self._keys: dict[str, TestKey] = {}
        self._nonces: dict[str, int] = {}
        self._removed: dict[str, float] = {}  # api key -> time.time() of its removal, oldest first

    def add(
        self,
        venue: Venue,
        *,
        uid: str | None = None,
        read: bool = True,
        trade: bool = True,
        withdraw: bool = False,
        identities: Iterable[str] | None = None,
        ip_allowlist: Iterable[str] = (),
        expires_at_ms: int | None = None,
        environment: str = "production",
        kind: str | None = None,
        label: str | None = None,
        transfer: bool = True,
        parent_uid: str | None = None,
    ) -> TestKey:
        venue = Venue(venue)
        kind = _kind_for(venue, kind)
        account = str(uid) if uid is not None else keygen.account_id(venue, kind)
        made = keygen.material(venue, kind, account)
        key = TestKey(
            venue=venue,
            api_key=made.api_key,
            api_secret=made.api_secret,
            api_passphrase=made.api_passphrase,
            uid=account,
            kind=kind,
            read=bool(read),
            trade=bool(trade),
            withdraw=bool(withdraw),
            identities=_identities(venue, kind, identities),
            ip_allowlist=_allowlist(ip_allowlist),
            expires_at_ms=int(expires_at_ms) if expires_at_ms is not None else None,
            environment=_environment(environment),
            label=label,
            created_at_ms=int(time.time() * 1000),
            transfer=bool(transfer),
            parent_uid=str(parent_uid) if parent_uid is not None else None,
        )
        self._keys[key.api_key] = key
        return key

    def get(self, api_key: str, venue: Venue) -> TestKey | None:
        """The key registered under ``api_key`` for ``venue`` (keys of other venues are unknown here)."""
        key = self._keys.get(api_key)
        return key if key is not None and key.venue is venue else None

    def require(self, api_key: str) -> TestKey:
        try:
            return self._keys[api_key]
        except KeyError:
            raise KeyError(f"no simulator key {mask_api_key(api_key)}") from None

    def remove(self, api_key: str) -> TestKey:
        key = self.require(api_key)
        del self._keys[api_key]
        self._nonces.pop(api_key, None)
        self._removed.pop(api_key, None)
        self._removed[api_key] = time.time()
        while len(self._removed) > MAX_REMOVED:
            del self._removed[next(iter(self._removed))]
        return key

    def removed_at(self, api_key: str) -> float | None:
        """When ``api_key`` was removed (wall-clock seconds, ``time.time()``); None if it never was (or the
        memory of the last :data:`MAX_REMOVED` removals no longer holds it)."""
        return self._removed.get(api_key)

    def update(self, api_key: str, **changes: Any) -> TestKey:
        key = self.require(api_key)
        unknown = set(changes) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}; changeable: {sorted(MUTABLE_FIELDS)}")
        if "identities" in changes:
            changes["identities"] = _identities(key.venue, key.kind, changes["identities"])
        if "ip_allowlist" in changes:
            changes["ip_allowlist"] = _allowlist(changes["ip_allowlist"] or ())
        if "environment" in changes:
            changes["environment"] = _environment(changes["environment"])
        if changes.get("expires_at_ms") is not None:
            changes["expires_at_ms"] = int(changes["expires_at_ms"])
        if "uid" in changes:
            changes["uid"] = str(changes["uid"])
        for flag in ("read", "trade", "withdraw", "transfer"):
            if flag in changes:
                changes[flag] = bool(changes[flag])
        updated = dataclasses.replace(key, **changes)
        self._keys[api_key] = updated
        return updated

    def with_passphrase(self, api_key: str, passphrase: str) -> TestKey:
        """Give an OKX key the passphrase its creator chose (OKX's create-sub-account-key call takes one)."""
        key = dataclasses.replace(self.require(api_key), api_passphrase=passphrase)
        self._keys[api_key] = key
        return key

    def keys(self) -> list[TestKey]:
        return list(self._keys.values())

    def keys_of(self, venue: Venue, uid: str) -> list[TestKey]:
        """The keys of one account (oldest first)."""
        return [key for key in self._keys.values() if key.venue is venue and key.uid == uid]

    def last_nonce(self, api_key: str) -> int | None:
        return self._nonces.get(api_key)

    def accept_nonce(self, api_key: str, nonce: int) -> bool:
        """Record ``nonce`` if it is above every nonce used before with this key (Kraken, docs/venues.md §5A.2).

        Check and record happen with no await in between, so concurrent requests cannot both pass.
        """
        last = self._nonces.get(api_key)
        if last is not None and nonce <= last:
            return False
        self._nonces[api_key] = nonce
        return True
