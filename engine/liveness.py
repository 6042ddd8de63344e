"""Liveness of LISTEN connections: a cheap query on an interval, so that a silently dead one is replaced.

A LISTEN connection only receives: when the peer stops forwarding without closing (a NAT or firewall that
dropped the mapping, a half-open TCP connection, a stuck pooler), no error ever arrives and NOTIFYs simply
stop. :func:`until_lost` runs ``SELECT 1`` on the connection every ``interval`` seconds (notifications arriving
meanwhile do not put the check off: a connection can deliver a late notification and be dead) and returns when
the connection closes, or when a check does not answer within ``check_timeout`` seconds. So a dead LISTEN
connection is noticed within ``interval + check_timeout`` seconds of its last answer, and its owner (the event
bus, the queue's worker) opens a new one and reads what was committed meanwhile from the tables (the outbox,
the queue), since NOTIFY is only a wake-up call. The cost: one round trip per interval per LISTEN connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Protocol

from engine import errors

DEFAULT_INTERVAL = 5.0  # seconds between checks of a LISTEN connection
DEFAULT_TIMEOUT = 5.0  # seconds a check may take before the connection counts as dead


class Pingable(Protocol):
    """A LISTEN connection: ``lost`` is set when it closes; ``ping`` runs a cheap query on it; ``terminate``
    drops it at once (no goodbye to a peer that no longer answers)."""

    lost: asyncio.Event

    async def ping(self) -> None: ...

    def terminate(self) -> None: ...


def check_bounds(interval: float, timeout: float) -> None:
    """Refuse an interval or timeout that is not a positive, finite number of seconds."""
    for name, value in (("listen_check_interval", interval), ("listen_check_timeout", timeout)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise errors.ConfigurationError(f"{name} must be a positive number of seconds", field=name)


async def until_lost(
    listener: Pingable, *, interval: float = DEFAULT_INTERVAL, check_timeout: float = DEFAULT_TIMEOUT
) -> str:
    """Return when ``listener`` is lost: ``"closed"`` (the driver saw it end) or ``"silent"`` (a check did not
    answer within ``check_timeout``, or failed; the connection is then terminated, so that closing it later
    does not wait for a peer that no longer answers)."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await listener.lost.wait()
        if listener.lost.is_set():
            return "closed"
        try:
            async with asyncio.timeout(check_timeout):
                await listener.ping()
        except (TimeoutError, errors.StorageError):
            if listener.lost.is_set():
                return "closed"
            listener.terminate()
            return "silent"
