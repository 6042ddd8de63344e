"""Retired keys: keys of a minted credential that it no longer uses but that may still work at the venue.

Before the engine destroys a minted key's material (a promoted rotation's old key, a rejected staged key, every
key of a revoked or immediately rotated credential), it keeps the key itself sealed (``Vault.wrap_blob``) in
``broker_retired_keys`` with the time it is to be deleted at the venue: after ``rotation_grace`` for the key a
rotation replaced (signers still holding it finish), at once otherwise. The venues delete by the key (Binance
lists keys only masked), so the key is needed; never its secret. ``broker_cleanup`` and the reconciliation
delete due keys at the venue and then the rows (engine/broker/reconcile.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from engine import crypto, logs
from engine.broker.context import Context
from engine.broker.payloads import BrokerCleanup
from engine.broker.sealing import retired_purpose
from engine.db import Conn
from engine.payloads import enqueue
from venues.base import Venue


async def retire(
    ctx: Context, conn: Conn, credential_id: uuid.UUID, venue: Venue, versions: Iterable[int], delay: float
) -> datetime | None:
    """Retire secret ``versions`` of a minted credential (in ``conn``'s transaction, before their material is
    destroyed), to be deleted at the venue ``delay`` seconds from now; the latest deletion time (None: none)."""
    latest: datetime | None = None
    for version in versions:
        secret = await ctx.store.get_secret(credential_id, version, conn=conn)
        if secret is None:
            continue
        keys = ctx.store.open_secret(secret)
        with logs.secret_scope(keys):
            at = await retire_key(ctx, conn, credential_id, venue, keys.api_key, delay)
        latest = at if latest is None or at > latest else latest
    return latest


async def retire_key(
    ctx: Context, conn: Conn, credential_id: uuid.UUID, venue: Venue, api_key: str, delay: float
) -> datetime:
    """Retire one key of a minted credential by its public key; when it is to be deleted at the venue."""
    sealed = ctx.store.vault.wrap_blob(api_key.encode(), purpose=retired_purpose(credential_id))
    fingerprint = ctx.store.fingerprint(venue, api_key)
    at: datetime = await conn.fetchval(
        "broker_retire_key", credential_id, fingerprint, sealed.kek_version, sealed.wrapped_dek, sealed.nonce,
        sealed.ciphertext, float(delay),
    )  # fmt: skip
    return at


async def left_behind(ctx: Context, credential_id: uuid.UUID, venue: Venue, api_key: str) -> None:
    """A key the venue created for ``credential_id`` but the engine will not use (its creation failed halfway:
    :class:`venues.subaccounts.KeyLeftBehind`): retired for deletion now, and a ``broker_cleanup`` enqueued."""
    async with ctx.db.transaction() as conn:
        await retire_key(ctx, conn, credential_id, venue, api_key, 0.0)
        await enqueue(ctx.queue, BrokerCleanup(credential_id), conn=conn)


def open_retired(ctx: Context, row: Any) -> str:
    """The key a ``broker_due_retired`` row holds."""
    sealed = crypto.Sealed(
        kek_version=int(row["kek_version"]),
        wrapped_dek=bytes(row["wrapped_dek"]),
        nonce=bytes(row["nonce"]),
        ciphertext=bytes(row["ciphertext"]),
    )
    return ctx.store.vault.unwrap_blob(sealed, purpose=retired_purpose(row["credential_id"])).decode()
