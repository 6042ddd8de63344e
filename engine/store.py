"""Credential, secret and trading-account persistence on top of ``engine.db`` (named queries only).

Every method that changes state takes the caller's transaction (``conn``) so that the change, its outbox
event and any job it enqueues commit together. Status changes are the guarded updates of ``queries.sql``;
zero rows become typed errors here. Key material enters and leaves only through :class:`crypto.Vault`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from engine import crypto, errors, lifecycle
from engine.db import Conn, Database, Record, UniqueViolation
from engine.models import (
    Credential,
    CredentialStatus,
    CredentialType,
    Page,
    PendingRotation,
    TradingAccount,
    TradingAccountStatus,
)
from venues.base import ApiKeys, Permissions, Venue, mask_api_key

FINGERPRINT_KEY = "fingerprint-hmac"


def ms(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None


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
        self._fingerprint_key: bytes | None = None

    async def load_fingerprint_key(self) -> None:
        """Load (or create, once across all processes) the HMAC key used for duplicate detection."""
        async with self.db.transaction() as conn:
            row = await conn.fetchrow("get_engine_key", FINGERPRINT_KEY)
            if row is None:
                sealed = self.vault.wrap_blob(crypto.generate_fingerprint_key(), purpose=FINGERPRINT_KEY)
                await conn.execute(
                    "insert_engine_key",
                    FINGERPRINT_KEY,
                    sealed.kek_version,
                    sealed.wrapped_dek,
                    sealed.nonce,
                    sealed.ciphertext,
                )
                row = await conn.fetchrow("get_engine_key", FINGERPRINT_KEY)
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
    ) -> None:
        masked = mask_api_key(keys.api_key)
        await conn.execute(
            "insert_credential", credential_id, owner_id, venue.value, credential_type.value, nickname, masked
        )
        await self.insert_secret(
            conn,
            credential_id=credential_id,
            owner_id=owner_id,
            venue=venue,
            version=1,
            state="CURRENT",
            keys=keys,
        )

    async def insert_secret(
        self,
        conn: Conn,
        *,
        credential_id: uuid.UUID,
        owner_id: str,
        venue: Venue,
        version: int,
        state: str,
        keys: ApiKeys,
    ) -> None:
        sealed = self.vault.seal(keys, credential_id=credential_id, version=version)
        try:  # a unique violation aborts the transaction anyway: no savepoint needed to report it
            await conn.execute(
                "insert_secret",
                credential_id,
                version,
                state,
                owner_id,
                venue.value,
                sealed.kek_version,
                sealed.wrapped_dek,
                sealed.nonce,
                sealed.ciphertext,
                self.fingerprint(venue, keys.api_key),
                mask_api_key(keys.api_key),
            )
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
        row = await self.db.fetchrow("get_credential_with_secret", credential_id, version)
        if row is None:
            raise errors.NotFound(f"credential {credential_id} not found", field="credentialId")
        secret = None
        if row["secret_row_version"] is not None:
            secret = SecretRow(
                credential_id=credential_id,
                version=int(row["secret_row_version"]),
                state=row["secret_state"],
                masked_api_key=row["secret_masked_api_key"],
                sealed=crypto.Sealed(
                    kek_version=int(row["secret_kek_version"]),
                    wrapped_dek=bytes(row["secret_wrapped_dek"]),
                    nonce=bytes(row["secret_nonce"]),
                    ciphertext=bytes(row["secret_ciphertext"]),
                ),
            )
        return credential_from_row(row), secret

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


def fenced_sources(trigger: str) -> Sequence[str]:
    """The statuses the guarded UPDATE of ``trigger`` accepts (from the one lifecycle table)."""
    return lifecycle.sources(trigger)
