"""Credential, secret and trading-account persistence on top of ``engine.db`` (named queries only).

The store owns every write to credentials, their secrets, their trading accounts and the reveal audit. Each
write method takes the caller's transaction (``conn``), so that the change, its outbox event and any job it
enqueues commit together, and returns what it wrote: the credential's public row after the write (a
:class:`Change`, with the event sequence number the change took), a trading account, or None when a guarded
update matched no row. Status changes are the guarded updates of ``queries.sql`` (allowed source statuses from
the lifecycle table, fenced on the secret version); what zero rows mean (a stale job, a refused call) the
caller decides. Key material enters and leaves only through :class:`crypto.Vault`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from engine import crypto, errors, lifecycle
from engine.db import Conn, Database, Record, UniqueViolation
from engine.models import (
    Credential,
    CredentialStatus,
    CredentialType,
    MintedFrom,
    Page,
    PendingRotation,
    TradingAccount,
    TradingAccountStatus,
)
from engine.readbatch import CredentialReads
from venues.base import ApiKeys, Permissions, ProbeResult, Venue, mask_api_key

FINGERPRINT_KEY = "fingerprint-hmac"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def ms(value: datetime | None) -> int | None:
    """Milliseconds since the epoch, floored, in exact integer arithmetic (a float timestamp can land one
    millisecond short): the same figure as SQL's ``floor(extract(epoch FROM t) * 1000)``."""
    return (value - _EPOCH) // _MS if value is not None else None


def credential_from_row(row: Record) -> Credential:
    pending = None
    if row.get("pending_version") is not None:
        pending = PendingRotation(
            secret_version=int(row["pending_version"]),
            masked_api_key=str(row["pending_masked_api_key"]),
            started_at_ms=ms(row["pending_started_at"]) or 0,
        )
    perms = row["permissions"]
    return Credential(
        credential_id=row["id"],
        owner_id=row["owner_id"],
        venue=Venue(row["venue"]),
        credential_type=CredentialType(row["credential_type"]),
        nickname=row["nickname"],
        masked_api_key=row["masked_api_key"],
        status=CredentialStatus(row["status"]),
        identities=tuple(row["identities"] or ()),
        permissions=Permissions.from_dict(perms) if perms is not None else None,
        venue_account_id=row["venue_account_id"],
        failure_reason=row["failure_reason"] or row.get("rotation_failure_reason"),
        secret_version=int(row["secret_version"]),
        created_at_ms=ms(row["created_at"]) or 0,
        updated_at_ms=ms(row["updated_at"]) or 0,
        verified_at_ms=ms(row["verified_at"]),
        revoked_at_ms=ms(row["revoked_at"]),
        pending_rotation=pending,
        warnings=tuple(row["warnings"] or ()),
        pinned_venue_account_id=row.get("pinned_venue_account_id"),
        minted_from=(
            MintedFrom(row["minted_from_id"], str(row["minted_sub_account"]))
            if row.get("minted_from_id") is not None
            else None
        ),
    )


def account_from_row(row: Record) -> TradingAccount:
    return TradingAccount(
        trading_account_id=row["id"],
        owner_id=row["owner_id"],
        credential_id=row["credential_id"],
        venue=Venue(row["venue"]),
        name=row["name"],
        account_type=row["account_type"],
        status=TradingAccountStatus(row["status"]),
        created_at_ms=ms(row["created_at"]) or 0,
        updated_at_ms=ms(row["updated_at"]) or 0,
    )


def _sealed(row: Record) -> crypto.Sealed:
    return crypto.Sealed(
        kek_version=int(row["kek_version"]),
        wrapped_dek=bytes(row["wrapped_dek"]),
        nonce=bytes(row["nonce"]),
        ciphertext=bytes(row["ciphertext"]),
    )


@dataclass(frozen=True, slots=True)
class Change:
    """A credential write: the public row after it, the event sequence number it took, and what came before
    (for the event; None where the write does not report it)."""

    credential: Credential
    sequence: int
    previous_status: str | None = None
    previous_permissions: dict[str, Any] | None = None


def _change(row: Record | None) -> Change | None:
    if row is None:
        return None
    return Change(
        credential=credential_from_row(row),
        sequence=int(row["event_seq"]),
        previous_status=row.get("previous_status"),
        previous_permissions=row.get("previous_permissions"),
    )


def _written(row: Record | None) -> Change:
    change = _change(row)
    assert change is not None  # the row is locked and its status was checked by the caller
    return change


class _Prefixed(Mapping[str, Any]):
    """The columns of ``row`` whose names start with ``prefix``, under their names without it."""

    __slots__ = ("_prefix", "_row")

    def __init__(self, row: Record, prefix: str) -> None:
        self._row = row
        self._prefix = prefix

    def __getitem__(self, key: str) -> Any:
        return self._row[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self._prefix)
        return (key[n:] for key in self._row if key.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _job_secret(row: Record, credential_id: uuid.UUID) -> SecretRow | None:
    """The secret version's ``secret_*`` columns of a job's read (None: that version is gone)."""
    version = row["secret_row_version"]
    if version is None:
        return None
    return SecretRow(
        credential_id=credential_id,
        version=version,
        state=row["secret_state"],
        masked_api_key=row["secret_masked_api_key"],
        sealed=crypto.Sealed(
            kek_version=row["secret_kek_version"],
            wrapped_dek=row["secret_wrapped_dek"],
            nonce=row["secret_nonce"],
            ciphertext=row["secret_ciphertext"],
        ),
    )


@dataclass(frozen=True, slots=True)
class SecretRow:
    credential_id: uuid.UUID
    version: int
    state: str
    masked_api_key: str
    sealed: crypto.Sealed


class Store:
    """The credential store. Holds the vault and the fingerprint key; no other state."""

    def __init__(self, db: Database, vault: crypto.Vault) -> None:
        self.db = db
        self.vault = vault
        self.reads = CredentialReads(db)  # the jobs' reads, coalesced (engine/readbatch.py)
        self._fingerprint_key: bytes | None = None

    async def load_fingerprint_key(self) -> None:
        """Load (or create, once across all processes) the HMAC key used for duplicate detection."""
        async with self.db.transaction() as conn:
            row = await conn.fetchrow("get_engine_key", FINGERPRINT_KEY)
            if row is None:
                key = crypto.generate_fingerprint_key()
                sealed = self.vault.wrap_blob(key, purpose=FINGERPRINT_KEY)
                stored = await conn.fetchrow(
                    "insert_engine_key",
                    FINGERPRINT_KEY,
                    sealed.kek_version,
                    sealed.wrapped_dek,
                    sealed.nonce,
                    sealed.ciphertext,
                )
                if stored is not None:  # ours is the key: nothing to read back
                    self._fingerprint_key = key
                    return
                row = await conn.fetchrow(
                    "get_engine_key", FINGERPRINT_KEY
                )  # another process stored one first
            assert row is not None
            self._fingerprint_key = self.vault.unwrap_blob(_sealed(row), purpose=FINGERPRINT_KEY)

    def fingerprint(self, venue: Venue, api_key: str) -> bytes:
        if self._fingerprint_key is None:
            raise errors.EngineClosed("the store is not open")
        return crypto.fingerprint(self._fingerprint_key, venue.value, api_key)

    # ---- credentials -------------------------------------------------------------------------------------

    async def insert_credential(
        self,
        conn: Conn,
        *,
        credential_id: uuid.UUID,
        owner_id: str,
        venue: Venue,
        credential_type: CredentialType,
        nickname: str | None,
        keys: ApiKeys,
        quota: int | None = None,
    ) -> Credential | None:
        """A new PENDING credential with its keys as secret version 1, in one statement; None when the owner
        already holds ``quota`` credentials that are not revoked (take the owner's quota lock first)."""
        sealed = self.vault.seal(keys, credential_id=credential_id, version=1)
        with refused_keys(venue):
            row = await conn.fetchrow(
                "insert_credential", credential_id, owner_id, venue.value, credential_type.value, nickname,
                mask_api_key(keys.api_key), sealed.kek_version, sealed.wrapped_dek, sealed.nonce,
                sealed.ciphertext, self.fingerprint(venue, keys.api_key), quota,
            )  # fmt: skip
        return credential_from_row(row) if row is not None else None

    def sealed_columns(
        self, credential_id: uuid.UUID, venue: Venue, keys: ApiKeys, version: int
    ) -> tuple[Any, ...]:
        """What a statement storing ``keys`` as secret ``version`` of a credential writes: the master key
        version, wrapped data key, nonce, ciphertext (:class:`crypto.Vault`), the key's fingerprint and its
        masked form."""
        sealed = self.vault.seal(keys, credential_id=credential_id, version=version)
        return (
            sealed.kek_version,
            sealed.wrapped_dek,
            sealed.nonce,
            sealed.ciphertext,
            self.fingerprint(venue, keys.api_key),
            mask_api_key(keys.api_key),
        )

    async def stage_rotation(self, conn: Conn, locked: Record, keys: ApiKeys) -> Change:
        """``rotate``: store ``keys`` as the next secret version, PENDING (``locked``: the row read under the
        lock). The credential's status and current keys stay; the staged version is its pending rotation."""
        cid: uuid.UUID = locked["id"]
        venue = Venue(locked["venue"])
        version = int(locked["last_secret_version"]) + 1
        sealed = self.vault.seal(keys, credential_id=cid, version=version)
        with refused_keys(venue):
            row = await conn.fetchrow(
                "stage_rotation", cid, lifecycle.sources("rotate"), int(locked["secret_version"]), version,
                locked["owner_id"], venue.value, sealed.kek_version, sealed.wrapped_dek, sealed.nonce,
                sealed.ciphertext, self.fingerprint(venue, keys.api_key), mask_api_key(keys.api_key),
            )  # fmt: skip
        return _written(row)

    async def rotate_immediately(self, conn: Conn, locked: Record, keys: ApiKeys) -> Change:
        """``rotate_immediately``: destroy the current and any staged material, make ``keys`` the current
        version at once, the credential PENDING until they verify."""
        cid: uuid.UUID = locked["id"]
        venue = Venue(locked["venue"])
        old_version = int(locked["secret_version"])
        version = int(locked["last_secret_version"]) + 1
        sealed = self.vault.seal(keys, credential_id=cid, version=version)
        await conn.execute("delete_secrets_for_immediate_rotation", cid, old_version)
        masked = mask_api_key(keys.api_key)
        with refused_keys(venue):
            row = await conn.fetchrow(
                "rotate_immediately", cid, lifecycle.sources("rotate_immediately"), old_version, version, masked,
                locked["owner_id"], venue.value, sealed.kek_version, sealed.wrapped_dek, sealed.nonce,
                sealed.ciphertext, self.fingerprint(venue, keys.api_key),
            )  # fmt: skip
        return _written(row)

    async def mark_verified(
        self, conn: Conn, cid: uuid.UUID, version: int, result: ProbeResult, warnings: Iterable[str]
    ) -> Change | None:
        """``verify_succeeded`` for secret version ``version``; None when fenced out (rotated, revoked, or
        another venue account than the pinned one)."""
        row = await conn.fetchrow(
            "mark_verified", cid, lifecycle.sources("verify_succeeded"), version, sorted(result.identities),
            result.permissions.as_dict(), result.venue_account_id, result.environment, list(warnings),
        )  # fmt: skip
        return _change(row)

    async def touch_verified(self, conn: Conn, cid: uuid.UUID, version: int) -> None:
        """A re-verification found nothing new: record when (no event)."""
        await conn.execute("touch_verified", cid, version)

    async def mark_failed(
        self, conn: Conn, cid: uuid.UUID, version: int, reason: str, message: str
    ) -> Change | None:
        """``verify_rejected`` for secret version ``version``; None when fenced out."""
        row = await conn.fetchrow(
            "mark_failed", cid, lifecycle.sources("verify_rejected"), version, reason, message
        )
        return _change(row)

    async def promote(
        self,
        conn: Conn,
        cred: Credential,
        version: int,
        masked: str,
        result: ProbeResult,
        warnings: Iterable[str],
    ) -> Change:
        """``rotation_succeeded``: destroy the old material, make staged ``version`` current and verified
        (``cred``: the credential read under the lock)."""
        cid = cred.credential_id
        await conn.execute("delete_secret", cid, cred.secret_version)  # old material destroyed
        await conn.execute("promote_secret", cid, version)
        row = await conn.fetchrow(
            "mark_rotated", cid, lifecycle.sources("rotation_succeeded"), cred.secret_version, version, masked,
            sorted(result.identities), result.permissions.as_dict(), result.venue_account_id, result.environment,
            list(warnings),
        )  # fmt: skip
        return _written(row)

    async def reject_rotation(self, conn: Conn, cid: uuid.UUID, version: int, reason: str) -> Change:
        """``rotation_rejected``: destroy staged ``version``; the current keys and status stay."""
        await conn.execute("delete_secret", cid, version)  # staged material destroyed
        row = await conn.fetchrow(
            "mark_rotation_rejected", cid, lifecycle.sources("rotation_rejected"), reason
        )
        return _written(row)

    async def revoke(self, conn: Conn, owner_id: str, cid: uuid.UUID) -> Change:
        """``revoke``: destroy every secret version; the credential is REVOKED for good (disconnect its
        accounts first: :meth:`disconnect_all_accounts`)."""
        await conn.execute("delete_all_secrets", cid)
        return _written(await conn.fetchrow("mark_revoked", cid, owner_id, lifecycle.sources("revoke")))

    async def next_event(self, conn: Conn, cid: uuid.UUID) -> Change:
        """The next event sequence number of a credential, for an event that changes no status."""
        return _written(await conn.fetchrow("bump_event_seq", cid))

    async def mark_expiry_warned(self, conn: Conn, cid: uuid.UUID, expires_at_ms: int) -> Change | None:
        """Take the expiry announcement of ``expires_at_ms`` (once); None when announced already or the
        credential is no longer VERIFIED."""
        return _change(await conn.fetchrow("mark_expiry_warned", cid, expires_at_ms))

    async def audit_reveal(
        self, conn: Conn, cid: uuid.UUID, owner_id: str, version: int, purpose: str | None
    ) -> None:
        """Record one reveal of decrypted keys."""
        await conn.execute("insert_key_access", cid, owner_id, version, purpose)

    async def audit_access(
        self,
        conn: Conn,
        cid: uuid.UUID,
        owner_id: str,
        version: int,
        purposes: Sequence[str | None],
        access: str,
    ) -> None:
        """Record hand-outs of decrypted keys of kind ``access`` (``lease_open``, ``lease_swap``), one row per
        purpose, in one statement."""
        await conn.execute("insert_key_accesses", cid, owner_id, version, list(purposes), access)

    async def due_for_reverify(self, interval: float, limit: int) -> tuple[Record, ...]:
        """VERIFIED credentials not verified for ``interval`` seconds: id, owner_id, secret_version."""
        return tuple(await self.db.fetch("due_for_reverify", interval, limit))

    async def get(self, owner_id: str, credential_id: uuid.UUID, *, conn: Conn | None = None) -> Credential:
        runner: Conn | Database = conn or self.db
        row = await runner.fetchrow("get_credential", credential_id, owner_id)
        if row is None:
            raise errors.NotFound(f"credential {credential_id} not found", field="credentialId")
        return credential_from_row(row)

    async def get_by_id(self, credential_id: uuid.UUID, *, conn: Conn | None = None) -> Credential | None:
        runner: Conn | Database = conn or self.db
        row = await runner.fetchrow("get_credential_by_id", credential_id)
        return credential_from_row(row) if row is not None else None

    async def lock(self, conn: Conn, owner_id: str, credential_id: uuid.UUID) -> Record:
        """Lock the row (the first write of every transaction that changes a credential, see events.py)."""
        row = await conn.fetchrow("lock_credential", credential_id, owner_id)
        if row is None:
            raise errors.NotFound(f"credential {credential_id} not found", field="credentialId")
        return row

    async def lock_get(self, conn: Conn, owner_id: str, credential_id: uuid.UUID) -> Credential:
        """:meth:`lock` and the credential as it is under the lock, in one round trip."""
        return credential_from_row(await self.lock(conn, owner_id, credential_id))

    async def get_with_secret(
        self, credential_id: uuid.UUID, version: int
    ) -> tuple[Credential, SecretRow | None]:
        """A credential (anyone's: workers) and its secret version ``version`` if that still exists."""
        cred, secret, _ = await self.read_for_job(credential_id, version)
        return cred, secret

    async def read_for_job(
        self, credential_id: uuid.UUID, version: int
    ) -> tuple[Credential, SecretRow | None, int]:
        """:meth:`get_with_secret` and the row's event sequence (what a write fenced on "unchanged since
        read" compares: engine/hotpath.py). Concurrent reads share a statement (engine/readbatch.py)."""
        row = await self.reads.read(credential_id, version)
        if row is None:
            raise errors.NotFound(f"credential {credential_id} not found", field="credentialId")
        return credential_from_row(row), _job_secret(row, credential_id), int(row["event_seq"])

    def read_with_claim(
        self, attached: Record | None, credential_id: uuid.UUID, version: int
    ) -> tuple[Credential, SecretRow | None, int] | None:
        """What :meth:`read_for_job` answers, from what the job's claim read (``Job.attached``: the row of
        ``claim_jobs_reading_credentials``); None when the claim read nothing for this credential and version
        (the caller reads it then)."""
        if attached is None or attached.get("cred_id") != credential_id:
            return None
        secret = _job_secret(attached, credential_id)
        if secret is not None and secret.version != version:
            return None  # not the version this job probes: never happens, the claim joined on it
        return credential_from_row(_Prefixed(attached, "cred_")), secret, int(attached["cred_event_seq"])

    async def list(
        self,
        owner_id: str,
        *,
        status: CredentialStatus | None,
        credential_type: CredentialType | None,
        venue: Venue | None,
        offset: int,
        limit: int,
    ) -> Page[Credential]:
        args: tuple[Any, ...] = (
            owner_id,
            status.value if status else None,
            credential_type.value if credential_type else None,
            venue.value if venue else None,
        )
        rows = await self.db.fetch("list_credentials", *args, offset, limit)
        total = int(await self.db.fetchval("count_credentials", *args))
        return Page(items=[credential_from_row(r) for r in rows], offset=offset, limit=limit, total=total)

    async def find_by_fingerprint(self, owner_id: str, venue: Venue, api_key: str) -> uuid.UUID | None:
        row = await self.db.fetchrow(
            "find_by_fingerprint", owner_id, venue.value, self.fingerprint(venue, api_key)
        )
        return row["credential_id"] if row is not None else None

    # ---- secrets ------------------------------------------------------------------------------------------

    async def get_secret(
        self, credential_id: uuid.UUID, version: int, *, conn: Conn | None = None
    ) -> SecretRow | None:
        runner: Conn | Database = conn or self.db
        row = await runner.fetchrow("get_secret", credential_id, version)
        if row is None:
            return None
        return SecretRow(
            credential_id=row["credential_id"],
            version=int(row["version"]),
            state=row["state"],
            masked_api_key=row["masked_api_key"],
            sealed=_sealed(row),
        )

    def open_secret(self, secret: SecretRow) -> ApiKeys:
        return self.vault.open(secret.sealed, credential_id=secret.credential_id, version=secret.version)

    async def count_to_rewrap(self) -> int:
        """How many credential secret versions are wrapped by another master key than the current one."""
        return int(await self.db.fetchval("count_secrets_to_rewrap", self.vault.keyring.current_version))

    # ---- trading accounts ---------------------------------------------------------------------------------

    async def get_account(
        self, owner_id: str, account_id: uuid.UUID, *, conn: Conn | None = None
    ) -> TradingAccount:
        runner: Conn | Database = conn or self.db
        row = await runner.fetchrow("get_trading_account", account_id, owner_id)
        if row is None:
            raise errors.NotFound(f"trading account {account_id} not found", field="tradingAccountId")
        return account_from_row(row)

    async def connect_account(
        self, conn: Conn, cred: Credential, *, name: str | None, account_type: str
    ) -> TradingAccount:
        """A new ACTIVE trading account of ``cred`` (locked by the caller); :class:`errors.Conflict` when an
        account of that type is connected already."""
        try:  # a unique violation aborts the transaction anyway: no savepoint needed to report it
            row = await conn.fetchrow(
                "insert_trading_account", uuid.uuid4(), cred.owner_id, cred.credential_id, cred.venue.value,
                name, account_type,
            )  # fmt: skip
        except UniqueViolation:
            raise errors.Conflict(
                f"a {account_type} account of this credential is already connected", field="accountType"
            ) from None
        assert row is not None
        return account_from_row(row)

    async def disconnect_account(
        self, conn: Conn, owner_id: str, account_id: uuid.UUID
    ) -> TradingAccount | None:
        """DISABLE an ACTIVE account; None when it is not ACTIVE (already disconnected)."""
        row = await conn.fetchrow("disable_trading_account", account_id, owner_id)
        return account_from_row(row) if row is not None else None

    async def disconnect_all_accounts(self, conn: Conn, cid: uuid.UUID) -> tuple[TradingAccount, ...]:
        """DISABLE every ACTIVE account of a credential (the revoke cascade); the accounts disabled."""
        return tuple(account_from_row(r) for r in await conn.fetch("disable_credential_accounts", cid))

    async def count_active_accounts(self, conn: Conn, cid: uuid.UUID) -> int:
        return int(await conn.fetchval("count_active_accounts", cid))

    async def list_accounts(
        self,
        owner_id: str,
        *,
        credential_id: uuid.UUID | None,
        status: TradingAccountStatus | None,
        venue: Venue | None,
        offset: int,
        limit: int,
    ) -> Page[TradingAccount]:
        args: tuple[Any, ...] = (
            owner_id,
            credential_id,
            status.value if status else None,
            venue.value if venue else None,
        )
        rows = await self.db.fetch("list_trading_accounts", *args, offset, limit)
        total = int(await self.db.fetchval("count_trading_accounts", *args))
        return Page(items=[account_from_row(r) for r in rows], offset=offset, limit=limit, total=total)


@contextlib.contextmanager
def refused_keys(venue: Venue) -> Iterator[None]:
    """A unique violation of the secrets table as the typed error it means."""
    try:
        yield
    except UniqueViolation as exc:
        if exc.constraint == "credential_secrets_fingerprint":
            raise errors.DuplicateCredential(
                f"a credential with this API key already exists for this owner on {venue.value}",
                field="apiKey",
            ) from None
        if exc.constraint == "credential_secrets_one_pending":
            raise errors.RotationPending(
                "a rotation is already waiting for verification", field="credentialId"
            ) from None
        raise
