"""Live keys for the trading backend: key leases that follow rotations and die on revocation.

``leases`` holds the lease and its values, ``registry`` the one event-bus subscription per process that keeps
every lease current (``live.sql``: what it reads).
"""

from engine.live.leases import ChangeCallback, ChangeKind, HeldKeys, KeyLease, LeaseChange
from engine.live.registry import LeaseRegistry, LeaseStats

__all__ = [
    "ChangeCallback",
    "ChangeKind",
    "HeldKeys",
    "KeyLease",
    "LeaseChange",
    "LeaseRegistry",
    "LeaseStats",
]
