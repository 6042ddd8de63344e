"""Per-owner quotas, checked inside the caller's transaction under one per-owner lock.

What an owner may hold and do is set by :class:`engine.config.Quotas` (``EngineConfig.quotas``):

* ``credentials``: credentials that are not REVOKED (a revoked credential holds no key material, so it does
  not count); the next ``create_credential`` answers :class:`errors.QuotaExceeded` (409);
* ``webhook_endpoints``: the next ``add_webhook_endpoint`` answers :class:`errors.QuotaExceeded` (409);
* ``verify_requests_per_hour``: ``verify_credential`` calls in any rolling hour (a sliding window over a log of
  requests, not hourly buckets, so no burst of twice the quota across an hour boundary); the next one answers
  :class:`errors.RequestQuotaExceeded` (429) with ``retry_after`` = when the oldest request leaves the window.

Counting and inserting must be one step, or two concurrent calls both see "one below the quota" and both
insert (300 concurrent endpoint creates gave 56 of 50). Each check therefore starts with
``pg_advisory_xact_lock`` keyed by the owner (``tenants.sql``), held until the caller's transaction commits
or rolls back, and counts only then: every process on the database serializes on the same lock. The lock
is taken first in its transaction, before any row lock, so it cannot take part in a lock cycle; waiting for
it is bounded by ``LOCK_TIMEOUT`` (a ``StorageError``, 503, past it). A quota of 0 skips the check and the
lock altogether.

These run in the engine (``engine.py``, ``webhooks/service.py``), so the library API, the command line and the
REST API enforce the same quotas.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from engine import errors

if TYPE_CHECKING:
    from engine.config import Quotas
    from engine.db import Conn

VERIFY_WINDOW_SECONDS = 3600.0
LOCK_TIMEOUT = "10s"  # the longest a quota check waits for the owner's lock (PostgreSQL lock_timeout syntax)


async def lock_owner(conn: Conn, owner_id: str) -> None:
    """Hold owner ``owner_id``'s quota lock until ``conn``'s transaction ends."""
    await conn.execute("lock_owner", owner_id, LOCK_TIMEOUT)


async def lock_for_credential(conn: Conn, owner_id: str, quotas: Quotas) -> int | None:
    """Before inserting a credential: take the owner's lock and return the credential quota to pass to
    ``Store.insert_credential`` (None: no quota, no lock). The insert counts the owner's live credentials in
    its own statement, whose snapshot is taken after the lock, and inserts nothing when the quota is reached:
    then raise :func:`credentials_full`."""
    limit = quotas.credentials
    if not limit:
        return None
    await lock_owner(conn, owner_id)
    return limit


def credentials_full(limit: int) -> errors.QuotaExceeded:
    """The error of a credential insert refused by the quota."""
    return errors.QuotaExceeded(
        f"credentials: this owner holds {limit} credentials that are not revoked, its quota; "
        "revoke one to make room",
        quota="credentials",
        limit=limit,
    )


async def check_webhook_endpoints(conn: Conn, owner_id: str, quotas: Quotas) -> None:
    """Before inserting a webhook endpoint: :class:`errors.QuotaExceeded` when the owner has its quota."""
    limit = quotas.webhook_endpoints
    if not limit:
        return
    await lock_owner(conn, owner_id)
    if int(await conn.fetchval("count_webhook_endpoints", owner_id)) >= limit:
        raise errors.QuotaExceeded(
            f"webhook_endpoints: an owner may have at most {limit} webhook endpoints; remove one to make room",
            quota="webhook_endpoints",
            limit=limit,
        )


async def take_verify_request(conn: Conn, owner_id: str, quotas: Quotas) -> None:
    """Count one verify request of the owner (rolled back with the caller's transaction if it fails), or raise
    :class:`errors.RequestQuotaExceeded` when the last hour holds the quota already."""
    limit = quotas.verify_requests_per_hour
    if not limit:
        return
    await lock_owner(conn, owner_id)
    used = int(await conn.fetchval("verify_requests_in_window", owner_id, VERIFY_WINDOW_SECONDS))
    if used >= limit:
        frees_in = await conn.fetchval(
            "verify_window_frees_in", owner_id, VERIFY_WINDOW_SECONDS, used - limit
        )
        retry_after = max(1, math.ceil(float(frees_in or 1.0)))
        raise errors.RequestQuotaExceeded(
            f"verify_requests_per_hour: this owner made {limit} verify requests in the last hour, its quota; "
            f"retry after {retry_after} s",
            quota="verify_requests_per_hour",
            limit=limit,
            retry_after=retry_after,
        )
    await conn.execute("record_verify_request", owner_id, VERIFY_WINDOW_SECONDS)
