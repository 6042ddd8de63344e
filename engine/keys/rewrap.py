"""Master-key rotation: move every data key the master keyring wraps to the current version, until none is left.

Four tables hold data keys wrapped by a master key (``schema.sql``, each with a ``kek_version`` column):

    credential_secrets   every secret version of a credential: the CURRENT one and a staged (PENDING) one
    webhook_secrets      every signing secret of an endpoint: the current one and those in their grace period
    engine_keys          engine-internal keys (the fingerprint HMAC key), sealed with their name as purpose
    broker_retired_keys  keys of minted credentials waiting to be deleted at the venue (engine/broker/retirement.py)

Rewrapping unwraps a data key with the master key that wrapped it and wraps it with the current one; the
payload is never decrypted (:meth:`crypto.Vault.rewrap`, :meth:`crypto.Vault.rewrap_blob`).

:meth:`Rewrapper.run` walks each table in key order (keyset pagination), one batch per transaction:

1. passes with ``FOR UPDATE SKIP LOCKED``: rows that other transactions hold (a rotation, a revoke, a webhook
   secret being rotated) are skipped rather than waited for, so the rewrap never queues behind live work. A
   new pass starts while the previous one moved something (at most :data:`MAX_PASSES`);
2. when rows are still left, one last pass that waits for each remaining row's lock, one row per transaction,
   each wait bounded by ``lock_timeout`` (``SET LOCAL`` through ``set_config``) and all of them together by
   the same number of seconds;
3. a count, per kind, of what is still wrapped by another version than the current one.

The answer, :class:`RewrapReport`, names what is left (kind, count, master-key versions, how many rows were
still locked, how many do not open): never key material. Only a ``complete`` report means an old master key
version may be dropped. :func:`check_keyring` is the other half: at every start the engine refuses a keyring
that lacks a version the database still uses (a skip scan of the ``kek_version`` indexes: one index probe per
version in use, whatever the number of rows).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from engine import crypto, errors
from engine.broker.sealing import retired_purpose
from engine.db import Conn, Database, LockNotAvailable, Record
from engine.webhooks.secrets import secret_purpose

log = structlog.get_logger("engine.rewrap")

DEFAULT_BATCH_SIZE = 500
MAX_BATCH_SIZE = 10_000
DEFAULT_LOCK_TIMEOUT = 5.0  # seconds the last pass waits, in all, for rows other transactions hold
MAX_LOCK_TIMEOUT = 3600.0
MAX_PASSES = 20  # skip-locked passes; more only happen while writers keep adding rows under an old version

Progress = Callable[[int, int], Any]  # (re-wrapped so far, total to re-wrap as known now)


@dataclass(frozen=True, slots=True)
class _Kind:
    """One table of wrapped data keys and its named queries (``queries.sql``, ``webhooks/webhooks.sql``).

    Query arguments: batch and key listing ``(current, *after, limit)``; row lock ``(*key, current)``;
    update ``(*key, new kek_version, new wrapped_dek, old kek_version)``; left ``(current,)``.
    """

    name: str  # singular, for people: "credential secret"
    batch: str
    keys: str
    lock: str
    update: str
    left: str
    start: tuple[Any, ...]  # a key sorting before every real one
    key: Callable[[Record], tuple[Any, ...]]
    rewrap: Callable[[crypto.Vault, crypto.Sealed, Record], crypto.Sealed]


def _sealed(row: Record) -> crypto.Sealed:
    return crypto.Sealed(
        kek_version=int(row["kek_version"]),
        wrapped_dek=bytes(row["wrapped_dek"]),
        nonce=bytes(row["nonce"]),
        ciphertext=bytes(row["ciphertext"]),
    )


_NIL = uuid.UUID(int=0)

KINDS: tuple[_Kind, ...] = (
    _Kind(
        name="credential secret",
        batch="secrets_to_rewrap",
        keys="secret_keys_to_rewrap",
        lock="lock_secret_to_rewrap",
        update="update_wrapped_dek",
        left="secrets_left_to_rewrap",
        start=(_NIL, 0),
        key=lambda row: (row["credential_id"], int(row["version"])),
        rewrap=lambda vault, sealed, row: vault.rewrap(
            sealed, credential_id=row["credential_id"], version=int(row["version"])
        ),
    ),
    _Kind(
        name="webhook secret",
        batch="webhook_secrets_to_rewrap",
        keys="webhook_secret_keys_to_rewrap",
        lock="lock_webhook_secret_to_rewrap",
        update="rewrap_webhook_secret",
        left="webhook_secrets_left_to_rewrap",
        start=(_NIL, 0),
        key=lambda row: (row["endpoint_id"], int(row["version"])),
        rewrap=lambda vault, sealed, row: vault.rewrap_blob(
            sealed, purpose=secret_purpose(row["endpoint_id"], int(row["version"]))
        ),
    ),
    _Kind(
        name="engine key",
        batch="engine_keys_to_rewrap",
        keys="engine_key_names_to_rewrap",
        lock="lock_engine_key_to_rewrap",
        update="rewrap_engine_key",
        left="engine_keys_left_to_rewrap",
        start=("",),
        key=lambda row: (str(row["name"]),),
        rewrap=lambda vault, sealed, row: vault.rewrap_blob(sealed, purpose=str(row["name"])),
    ),
    _Kind(
        name="retired broker key",
        batch="broker_retired_to_rewrap",
        keys="broker_retired_keys_to_rewrap",
        lock="lock_broker_retired_to_rewrap",
        update="rewrap_broker_retired",
        left="broker_retired_left_to_rewrap",
        start=(_NIL, b""),
        key=lambda row: (row["credential_id"], bytes(row["key_fingerprint"])),
        rewrap=lambda vault, sealed, row: vault.rewrap_blob(
            sealed, purpose=retired_purpose(row["credential_id"])
        ),
    ),
)

# what check_keyring reads: kind (plural, for people) -> the query listing the master-key versions in use
VERSION_QUERIES: Mapping[str, str] = {
    "credential secrets": "kek_versions_of_secrets",
    "webhook secrets": "kek_versions_of_webhook_secrets",
    "engine keys": "kek_versions_of_engine_keys",
    "retired broker keys": "kek_versions_of_broker_retired",
}


@dataclass(frozen=True, slots=True)
class Leftover:
    """Rows of one kind still wrapped by another master key than the current one after a rewrap."""

    kind: str
    count: int
    kek_versions: tuple[int, ...]
    locked: int = 0  # still held by other transactions when the last pass gave up waiting
    unreadable: int = 0  # do not open with the keyring (tampered, or bytes of another row)

    def describe(self) -> str:
        versions = ", ".join(str(v) for v in self.kek_versions)
        text = f"{self.count} {self.kind}(s) under master key version(s) {versions}"
        why = []
        if self.locked:
            why.append(f"{self.locked} locked by other transactions")
        if self.unreadable:
            why.append(f"{self.unreadable} that do not open")
        return f"{text} ({', '.join(why)})" if why else text


@dataclass(frozen=True, slots=True)
class RewrapReport:
    """What a rewrap did and what it left. Only when ``complete`` may an old master key version be dropped."""

    current_version: int
    rewrapped: Mapping[str, int]  # per kind
    left: tuple[Leftover, ...]
    passes: int

    @property
    def total(self) -> int:
        """Data keys re-wrapped, all kinds together."""
        return sum(self.rewrapped.values())

    @property
    def complete(self) -> bool:
        """Nothing is left under another master key version than the current one."""
        return not self.left

    def describe_left(self) -> str:
        """One line naming what is left (kinds, counts, versions); empty when complete."""
        return "; ".join(item.describe() for item in self.left)


class Rewrapper:
    """One run of the rewrap (see the module docstring). Holds no connection between transactions."""

    def __init__(
        self,
        db: Database,
        vault: crypto.Vault,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        progress: Progress | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise errors.InvalidRequest("batchSize", "must be an integer")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise errors.InvalidRequest("batchSize", f"must be from 1 to {MAX_BATCH_SIZE}")
        if (
            isinstance(lock_timeout, bool)
            or not isinstance(lock_timeout, int | float)
            or not math.isfinite(lock_timeout)
            or not 0 < lock_timeout <= MAX_LOCK_TIMEOUT
        ):
            raise errors.InvalidRequest(
                "lockTimeout", f"must be a number of seconds above 0 and at most {MAX_LOCK_TIMEOUT:g}"
            )
        self.db = db
        self.vault = vault
        self.current = vault.keyring.current_version
        self.batch_size = batch_size
        self.lock_timeout = float(lock_timeout)
        self.progress = progress
        self.rewrapped: dict[str, int] = {kind.name: 0 for kind in KINDS}
        self.total = 0  # what was left at the start, plus what was re-wrapped beyond it

    async def run(self) -> RewrapReport:
        left = await self._left()
        self.total = sum(item.count for item in left)
        self._report_progress()
        passes = 0
        while left and passes < MAX_PASSES:
            passes += 1
            moved = 0
            for kind in KINDS:
                moved += await self._skip_locked_pass(kind)
            left = await self._left()
            if moved == 0:
                break
        if left:
            passes += 1
            stuck = await self._waiting_pass()
            left = [
                Leftover(
                    kind=item.kind,
                    count=item.count,
                    kek_versions=item.kek_versions,
                    locked=stuck.get(item.kind, (0, 0))[0],
                    unreadable=stuck.get(item.kind, (0, 0))[1],
                )
                for item in await self._left()
            ]
        report = RewrapReport(
            current_version=self.current, rewrapped=dict(self.rewrapped), left=tuple(left), passes=passes
        )
        if report.complete:
            log.info("rewrap_done", current_version=self.current, rewrapped=report.rewrapped, passes=passes)
        else:
            log.warning(
                "rewrap_incomplete",
                current_version=self.current,
                rewrapped=report.rewrapped,
                left=report.describe_left(),
                passes=passes,
            )
        return report

    # ---- the passes ----------------------------------------------------------------------------------------

    async def _skip_locked_pass(self, kind: _Kind) -> int:
        """Every row of ``kind`` under an old version that no other transaction holds; returns how many moved."""
        after = kind.start
        moved = 0
        while True:
            async with self.db.transaction() as conn:
                rows = await conn.fetch(kind.batch, self.current, *after, self.batch_size)
                for row in rows:
                    moved += await self._rewrap_row(conn, kind, row)
            if not rows:
                return moved
            after = kind.key(rows[-1])

    async def _waiting_pass(self) -> dict[str, tuple[int, int]]:
        """Every row still left, waiting for its lock; returns (locked, unreadable) per kind name."""
        deadline = time.monotonic() + self.lock_timeout
        stuck: dict[str, tuple[int, int]] = {}
        for kind in KINDS:
            locked = unreadable = 0
            after = kind.start
            while True:
                keys = await self.db.fetch(kind.keys, self.current, *after, self.batch_size)
                for key_row in keys:
                    wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
                    try:
                        async with self.db.transaction() as conn:
                            await conn.fetchval("set_lock_timeout", f"{wait_ms}ms")
                            row = await conn.fetchrow(kind.lock, *kind.key(key_row), self.current)
                            if row is not None and await self._rewrap_row(conn, kind, row) == 0:
                                unreadable += 1
                    except LockNotAvailable:
                        locked += 1
                if not keys:
                    break
                after = kind.key(keys[-1])
            if locked or unreadable:
                stuck[kind.name] = (locked, unreadable)
        return stuck

    async def _rewrap_row(self, conn: Conn, kind: _Kind, row: Record) -> int:
        """Re-wrap one locked row in ``conn``; 1 if it moved, 0 if its data key does not open."""
        sealed = _sealed(row)
        try:
            new = kind.rewrap(self.vault, sealed, row)
        except errors.DecryptionError:
            # the row stays as it is and is reported as left; the message names ids and versions only
            log.warning("rewrap_unreadable", kind=kind.name, kek_version=sealed.kek_version)
            return 0
        await conn.execute(kind.update, *kind.key(row), new.kek_version, new.wrapped_dek, sealed.kek_version)
        self.rewrapped[kind.name] += 1
        self._report_progress()
        return 1

    async def _left(self) -> list[Leftover]:
        left = []
        for kind in KINDS:
            row = await self.db.fetchrow(kind.left, self.current)  # an aggregate: always one row
            assert row is not None
            if int(row["left_count"]):
                versions = tuple(sorted(int(v) for v in row["kek_versions"]))
                left.append(Leftover(kind=kind.name, count=int(row["left_count"]), kek_versions=versions))
        return left

    def _report_progress(self) -> None:
        done = sum(self.rewrapped.values())
        self.total = max(self.total, done)
        if self.progress is not None:
            self.progress(done, self.total)


async def check_keyring(db: Database, keyring: crypto.MasterKeyring) -> None:
    """Refuse (:class:`errors.ConfigurationError`, naming the versions) a keyring lacking a version in use.

    Without it an engine starts and then fails one credential, one webhook delivery at a time, with a
    DecryptionError each. Four cheap queries: a skip scan of each ``kek_version`` index, the few engine keys
    and the few retired broker keys.
    """
    used: dict[int, list[str]] = {}
    for kind, query in VERSION_QUERIES.items():
        for row in await db.fetch(query):
            used.setdefault(int(row["kek_version"]), []).append(kind)
    missing = sorted(set(used) - set(keyring.versions))
    if not missing:
        return
    kinds = sorted({kind for version in missing for kind in used[version]})
    raise errors.ConfigurationError(
        f"the database holds data keys wrapped by master key version(s) "
        f"{', '.join(str(v) for v in missing)} ({', '.join(kinds)}), which the master keyring lacks "
        f"(it holds version(s) {', '.join(str(v) for v in keyring.versions)}): give "
        f"{crypto.MASTER_KEYS_SETTING} those versions again; drop a version only once "
        f"`credential-engine rewrap-keys` reports nothing left under it",
        field=crypto.MASTER_KEYS_SETTING,
    )
