"""The simulator's master accounts and their sub-accounts (docs/venues.md §1.10, §2.10, §3.10).

A master account is an account (a ``uid``) registered with :meth:`SubAccounts.add_master`; its sub-accounts are
accounts of their own (their own ``uid``, what a probe of a sub-account key reports) that the venue names by a
``sub_id``: Binance Link's ``subaccountId``, OKX's sub-account name ``subAcct``, Bybit's sub UID (equal to the
uid). The keys themselves live in the key registry (:mod:`venues.simulator.registry`): a sub-account's keys are
the registered keys whose ``uid`` is the sub-account's uid, so a key minted through a venue endpoint verifies and
trades like any other key, and a deleted key is unknown at once.
"""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import dataclass

from venues.base import Venue
from venues.simulator import keygen
from venues.simulator.registry import TestKey

_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class SubAccount:
    """One sub-account: ``sub_id`` is how the venue's endpoints name it, ``uid`` its own account id."""

    venue: Venue
    master_uid: str
    sub_id: str
    uid: str
    label: str = ""
    email: str = ""  # Binance Link's generated sub-account email
    created_at_ms: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "venue": self.venue.value,
            "master_uid": self.master_uid,
            "sub_id": self.sub_id,
            "uid": self.uid,
            "label": self.label,
            "email": self.email,
            "created_at_ms": self.created_at_ms,
        }


@dataclass(frozen=True, slots=True)
class MasterAccount:
    """What ``Simulator.add_master_account`` returns: the master key and the sub-accounts it manages."""

    key: TestKey
    sub_accounts: tuple[SubAccount, ...]

    def as_dict(self, *, secrets: bool) -> dict[str, object]:
        return {
            "key": self.key.as_dict(secrets=secrets),
            "sub_accounts": [sub.as_dict() for sub in self.sub_accounts],
        }


def _sub_id(venue: Venue, uid: str) -> str:
    if venue is Venue.BYBIT:
        return uid  # Bybit names a sub-account by its UID (subuid, subMemberId)
    if venue is Venue.OKX:
        # OKX sub-account names: 6 to 20 letters and digits (docs/venues.md §2.10)
        return "sim" + "".join(secrets.choice(_ALNUM) for _ in range(9))
    return str(1_000_000_000 + secrets.randbelow(9_000_000_000))  # Binance Link subaccountId: digits


class SubAccounts:
    """Master accounts by (venue, uid) and their sub-accounts. Not shared between simulators."""

    VENUES = (Venue.BINANCE, Venue.OKX, Venue.BYBIT)

    def __init__(self) -> None:
        self._subs: dict[tuple[Venue, str], dict[str, SubAccount]] = {}

    def add_master(self, venue: Venue, uid: str) -> None:
        """Make account ``uid`` a master account (Binance: a Binance Link broker master). Idempotent."""
        if venue not in self.VENUES:
            raise ValueError(
                f"{venue.value} offers no sub-account key API (docs/venues.md); no master accounts"
            )
        self._subs.setdefault((venue, uid), {})

    def is_master(self, venue: Venue, uid: str) -> bool:
        return (venue, uid) in self._subs

    def add_sub(self, venue: Venue, master_uid: str, *, label: str = "") -> SubAccount:
        """A new sub-account of master ``master_uid`` (KeyError if that account is no master)."""
        subs = self._subs[(venue, master_uid)]
        uid = keygen.account_id(venue, None)
        sub_id = _sub_id(venue, uid)
        email = f"sim_{sub_id}_brokersubuser@sim.invalid" if venue is Venue.BINANCE else ""
        sub = SubAccount(
            venue=venue,
            master_uid=master_uid,
            sub_id=sub_id,
            uid=uid,
            label=label,
            email=email,
            created_at_ms=int(time.time() * 1000),
        )
        subs[sub_id] = sub
        return sub

    def subs(self, venue: Venue, master_uid: str) -> list[SubAccount]:
        """The master's sub-accounts, oldest first ([] for an account that is no master)."""
        return list(self._subs.get((venue, master_uid), {}).values())

    def find(self, venue: Venue, master_uid: str, sub_id: str) -> SubAccount | None:
        """Sub-account ``sub_id`` of this master, or None (also when it belongs to another master)."""
        return self._subs.get((venue, master_uid), {}).get(sub_id)

    def owner_of(self, venue: Venue, uid: str) -> SubAccount | None:
        """The sub-account whose own uid is ``uid`` (so a key of that uid is a sub-account key), or None."""
        for (sub_venue, _), subs in self._subs.items():
            if sub_venue is not venue:
                continue
            for sub in subs.values():
                if sub.uid == uid:
                    return sub
        return None
