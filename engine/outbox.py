"""The outbox: record an event in the caller's transaction, then fan it out to webhook deliveries.

Every change that reports an event goes through :class:`Outbox`: the outbox row (``events.record``, with its
NOTIFY) and, when some webhook endpoint of the owner wants the type, one delivery per such endpoint and its
queue job (the fan-out, :class:`engine.webhooks.fanout.FanOut`), all in the transaction of the change. No
event exists without its deliveries, and none is recorded for a change that rolls back. After the commit,
:meth:`Outbox.committed` tells this process's listeners to read now instead of waiting for the NOTIFY.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from engine import events
from engine.db import Conn
from engine.models import Credential, Event


class FanOut(Protocol):
    """Inside the event's transaction: the deliveries of ``event`` to the endpoints that want it."""

    async def __call__(self, conn: Conn, event: Event) -> int: ...


class Outbox:
    """Records events with their webhook deliveries; ``poke`` wakes this process's event bus."""

    def __init__(self, fan_out: FanOut, poke: Callable[[], None]) -> None:
        self._fan_out = fan_out
        self._poke = poke

    async def record(
        self,
        conn: Conn,
        *,
        type: str,
        owner_id: str,
        credential_id: uuid.UUID | None,
        sequence: int,
        data: Mapping[str, Any],
    ) -> Event:
        """Write one event in ``conn``'s transaction and the deliveries of every webhook endpoint wanting it."""
        recorded = await events.record(
            conn, type=type, owner_id=owner_id, credential_id=credential_id, sequence=sequence, data=data
        )
        if recorded.webhooks_wanted:  # one index probe said so, in the same statement as the insert
            await self._fan_out(conn, recorded.event)
        return recorded.event

    async def credential_event(
        self,
        conn: Conn,
        credential: Credential,
        type: str,
        *,
        sequence: int,
        extra: Mapping[str, Any] | None = None,
    ) -> Event:
        """An event of ``credential`` (its public fields as the change left them) with sequence number
        ``sequence`` (the one the change took) and ``extra`` fields."""
        data = {"credential": credential.public_dict(), **dict(extra or {})}
        return await self.record(
            conn,
            type=type,
            owner_id=credential.owner_id,
            credential_id=credential.credential_id,
            sequence=sequence,
            data=data,
        )

    def committed(self) -> None:
        """Events of this process just committed: its listeners read them now (NOTIFY tells the others)."""
        self._poke()
