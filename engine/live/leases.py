"""Key leases: the keys of one credential, held in memory by the trading backend's process, that follow the
credential's rotations and stop working once it is revoked.

A :class:`KeyLease` is what ``eng.lease_keys(...)`` yields. Reading ``lease.keys`` is an attribute read: no I/O,
no lock, no decryption. All leases of one credential in one process share one :class:`HeldKeys` (the decrypted
keys, their secret version, the credential's status); the process's :class:`engine.live.registry.LeaseRegistry`
updates it from the event bus: a rotation swaps the keys in place (fetched and decrypted once per credential, not
per lease), a revocation drops them and marks every lease revoked.

What "revoked" means here: once this process has read the ``credential.revoked`` event (or found the credential
REVOKED on a re-check), ``lease.keys`` raises :class:`errors.CredentialRevoked`. A request the backend signed
before that moment may still reach the venue; the engine cannot recall it. The material is dropped by removing
every reference the engine holds (Python strings cannot be wiped in place), so a copy the backend kept is its own.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine import errors
from engine.models import CredentialStatus
from venues.base import ApiKeys, Venue


class ChangeKind(enum.StrEnum):
    """What happened to a leased credential."""

    ROTATED = "rotated"  # new keys were swapped in (a promoted staged rotation, or an immediate one)
    VERIFIED = "verified"  # the keys swapped in by an immediate rotation verified
    REVOKED = "revoked"  # the credential was revoked: the lease hands out no keys any more
    # the keys reach another venue account than the credential's pinned one (FAILED, ACCOUNT_MISMATCH): withheld
    # until a rotation to keys of the pinned account
    WITHHELD = "withheld"


@dataclass(frozen=True, slots=True)
class LeaseChange:
    """One change of a leased credential, given to ``on_change`` callbacks. Holds no key material."""

    kind: ChangeKind
    credential_id: uuid.UUID
    old_version: int  # the secret version the lease held before the change
    new_version: int  # ... and after it (0 once revoked: no material left)


ChangeCallback = Callable[["KeyLease", LeaseChange], Awaitable[None]]


class LeaseOwner(Protocol):
    """What a lease needs from the registry that made it (a Protocol: no import of the registry here)."""

    def release(self, lease: KeyLease) -> None: ...


class HeldKeys:
    """The decrypted keys of one credential in this process, shared by all its leases.

    Written by the registry only (the event bus's listener and its refresh tasks); read by the leases.
    ``sequence`` is the credential's last event sequence number applied here: an event at or below it is old.
    """

    __slots__ = (
        "closed",
        "credential_id",
        "keys",
        "leases",
        "lock",
        "owner_id",
        "revoked",
        "secret_version",
        "sequence",
        "status",
        "venue",
        "venue_account_id",
        "withheld",
    )

    def __init__(self, credential_id: uuid.UUID, owner_id: str) -> None:
        self.credential_id = credential_id
        self.owner_id = owner_id
        self.venue: Venue | None = None
        self.keys: ApiKeys | None = None  # None: not loaded yet, revoked or closed
        self.secret_version = 0
        self.status = CredentialStatus.PENDING
        self.venue_account_id: str | None = None
        self.sequence = 0
        self.revoked = False
        self.withheld = False  # keys dropped: they reach another venue account than the pinned one
        self.closed = False
        self.leases: set[KeyLease] = set()
        self.lock = asyncio.Lock()  # one load or swap at a time per credential

    def wake_all(self) -> None:
        """Wake every lease's ``wait_revoked`` (after a revocation or the engine's close)."""
        for lease in list(self.leases):
            lease.wake()

    def __repr__(self) -> str:
        return (
            f"HeldKeys(credential_id={self.credential_id}, secret_version={self.secret_version}, "
            f"status={self.status.value}, revoked={self.revoked}, keys=<redacted>)"
        )

    def __reduce__(self) -> Any:
        raise TypeError("HeldKeys cannot be pickled")


class KeyLease:
    """The live keys of one credential for as long as the ``async with eng.lease_keys(...)`` block runs.

    ``keys`` raises :class:`errors.CredentialRevoked` once the credential is revoked (in any engine process
    on the database), :class:`errors.LeaseClosed` after the block ends or the engine closes, and
    :class:`errors.Conflict` while the keys reach another venue account than the credential's pinned one (as
    ``reveal_keys`` does). ``verified`` is
    False after an immediate rotation until the new keys verify. ``repr`` never shows key material.
    """

    __slots__ = ("_callbacks", "_closed", "_held", "_owner", "_wake", "purpose")

    def __init__(self, held: HeldKeys, owner: LeaseOwner, purpose: str | None) -> None:
        self._held = held
        self._owner = owner
        self._closed = False
        self._callbacks: list[ChangeCallback] = []
        self._wake: asyncio.Event | None = None  # made by the first wait_revoked()
        self.purpose = purpose

    # ---- reading: attribute reads only ------------------------------------------------------------------

    @property
    def keys(self) -> ApiKeys:
        """The current keys (memory only). Raises CredentialRevoked / LeaseClosed (see the class)."""
        if self._closed:
            raise errors.LeaseClosed("the key lease is closed", field="lease")
        keys = self._held.keys
        if keys is None:
            if self._held.closed:
                raise errors.LeaseClosed("the key lease is closed (the engine closed)", field="lease")
            if self._held.withheld:
                raise errors.Conflict(
                    "the credential's keys reach another venue account than the one it is pinned to; "
                    "rotate to keys of the pinned account",
                    field="credentialId",
                )
            raise errors.CredentialRevoked(
                f"credential {self._held.credential_id} is revoked", field="credentialId"
            )
        return keys

    @property
    def credential_id(self) -> uuid.UUID:
        return self._held.credential_id

    @property
    def owner_id(self) -> str:
        return self._held.owner_id

    @property
    def venue(self) -> Venue:
        venue = self._held.venue
        assert venue is not None  # set before the lease is handed out
        return venue

    @property
    def revoked(self) -> bool:
        return self._held.revoked

    @property
    def closed(self) -> bool:
        return self._closed or self._held.closed

    @property
    def secret_version(self) -> int:
        return self._held.secret_version

    @property
    def status(self) -> CredentialStatus:
        return self._held.status

    @property
    def verified(self) -> bool:
        """Whether the keys the lease holds are VERIFIED (False after an immediate rotation until they are)."""
        return self._held.status is CredentialStatus.VERIFIED

    @property
    def venue_account_id(self) -> str | None:
        return self._held.venue_account_id

    # ---- changes ------------------------------------------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``await callback(lease, change)`` after each rotation swap, verification of swapped-in keys and
        the revocation. Callbacks of one change run concurrently, changes one after the other, each callback
        bounded by ``EngineConfig.lease_callback_timeout``; a failing callback is logged and never stops the
        others."""
        if not callable(callback):
            raise errors.InvalidRequest("callback", "must be an async callable taking (lease, change)")
        self._callbacks.append(callback)

    @property
    def callbacks(self) -> tuple[ChangeCallback, ...]:
        return tuple(self._callbacks)

    async def wait_revoked(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the documented API
        """Return once the credential is revoked (at once if it is). Raises :class:`errors.LeaseClosed` when
        the lease closes first and :class:`errors.WaitTimeout` after ``timeout`` seconds (None: no limit; the
        lease's end or the engine's close still ends the wait)."""
        held = self._held
        if self._wake is None:
            self._wake = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                while not held.revoked:
                    if self.closed:
                        raise errors.LeaseClosed("the key lease closed before a revocation", field="lease")
                    await self._wake.wait()
        except TimeoutError:
            raise errors.WaitTimeout(
                f"credential {held.credential_id} was not revoked within {timeout:g}s", field="credentialId"
            ) from None

    def wake(self) -> None:
        """Wake this lease's ``wait_revoked`` (the registry calls it; the wait itself re-reads the state)."""
        if self._wake is not None:
            self._wake.set()

    # ---- closing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the lease: ``keys`` raises LeaseClosed from now on. Idempotent (leaving the block calls it)."""
        if self._closed:
            return
        self._closed = True
        self._callbacks.clear()
        self._owner.release(self)
        self.wake()

    def __repr__(self) -> str:
        held = self._held
        return (
            f"KeyLease(credential_id={held.credential_id}, venue={held.venue.value if held.venue else None}, "
            f"secret_version={held.secret_version}, status={held.status.value}, revoked={held.revoked}, "
            f"closed={self.closed}, keys=<redacted>)"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:  # pickling would copy the keys into places nobody audits
        raise TypeError("KeyLease cannot be pickled")
