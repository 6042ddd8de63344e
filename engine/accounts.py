"""Trading accounts (docs/api-dialect.md §8): connect, disconnect, get and list, and connecting from keys.

An account belongs to a VERIFIED credential and names one of the identities its keys reach (``spot``,
``funding``, ...). Connecting and disconnecting lock the credential row first, write through the store and
record ``trading_account.connected`` / ``trading_account.disconnected`` through the outbox, in one transaction.
Connecting from keys (no credential id) stores and verifies the keys first, through the credential lifecycle
(:class:`CredentialLifecycle`, which ``CredentialEngine`` is), or reuses the owner's credential holding them.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Protocol

from engine import errors, validation
from engine.db import Database
from engine.models import Credential, CredentialStatus, Page, TradingAccount, TradingAccountStatus
from engine.outbox import Outbox
from engine.store import Store
from venues.base import Venue


class CredentialLifecycle(Protocol):
    """The credential operations connecting from keys needs."""

    async def create_credential(
        self,
        owner_id: str,
        *,
        venue: Venue | str,
        api_key: str,
        api_secret: str,
        api_passphrase: str | None = None,
    ) -> Credential: ...

    async def wait_for_status(
        self,
        owner_id: str,
        credential_id: uuid.UUID | str,
        statuses: Collection[CredentialStatus | str],
        timeout: float = 30.0,  # noqa: ASYNC109 - the engine's public signature
    ) -> Credential: ...

    async def revoke_credential(
        self, owner_id: str, credential_id: uuid.UUID | str, *, cascade: bool = True
    ) -> Credential: ...


class TradingAccounts:
    """Trading-account operations, built from the store, the database, the outbox and the credential lifecycle."""

    def __init__(
        self, *, store: Store, db: Database, outbox: Outbox, credentials: CredentialLifecycle
    ) -> None:
        self._store = store
        self._db = db
        self._outbox = outbox
        self._credentials = credentials

    async def connect(
        self,
        owner_id: str,
        *,
        credential_id: uuid.UUID | str | None = None,
        account_type: str | None = None,
        name: str | None = None,
        venue: Venue | str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
        api_passphrase: str | None = None,
        wait_timeout: float = 30.0,
    ) -> TradingAccount:
        """Connect an account of a VERIFIED credential, or create + verify + connect from keys (api-dialect §8)."""
        owner = validation.owner(owner_id)
        wanted_type = validation.account_type(account_type)
        account_name = validation.nickname(name, "name")
        if credential_id is None:
            cid = await self._credential_for_keys(
                owner, venue, api_key, api_secret, api_passphrase, wait_timeout
            )
        else:
            cid = validation.uuid_value(credential_id, "credentialId")
        async with self._db.transaction() as conn:
            cred = await self._store.lock_get(conn, owner, cid)
            if cred.status is not CredentialStatus.VERIFIED:
                raise errors.Conflict(
                    f"the credential must be VERIFIED to connect accounts (it is {cred.status.value})",
                    field="credentialId",
                )
            chosen = wanted_type or (cred.identities[0] if cred.identities else "default")
            if cred.identities and chosen not in cred.identities:
                raise errors.InvalidRequest(
                    "accountType", f"this credential reaches {', '.join(cred.identities)}, not {chosen}"
                )
            account = await self._store.connect_account(conn, cred, name=account_name, account_type=chosen)
            change = await self._store.next_event(conn, cid)
            await self._outbox.credential_event(
                conn,
                change.credential,
                "trading_account.connected",
                sequence=change.sequence,
                extra={"tradingAccount": account.public_dict()},
            )
        self._outbox.committed()
        return account

    async def _credential_for_keys(
        self,
        owner: str,
        venue: Venue | str | None,
        api_key: str | None,
        api_secret: str | None,
        api_passphrase: str | None,
        wait_timeout: float,
    ) -> uuid.UUID:
        the_venue = validation.venue(venue)
        keys = validation.api_keys(the_venue, api_key, api_secret, api_passphrase)
        existing = await self._store.find_by_fingerprint(owner, the_venue, keys.api_key)
        if existing is not None:
            cid = existing
        else:
            cred = await self._credentials.create_credential(
                owner,
                venue=the_venue,
                api_key=keys.api_key,
                api_secret=keys.api_secret,
                api_passphrase=keys.api_passphrase,
            )
            cid = cred.credential_id
        done = await self._credentials.wait_for_status(
            owner, cid, {CredentialStatus.VERIFIED, CredentialStatus.FAILED}, timeout=wait_timeout
        )
        if done.status is CredentialStatus.FAILED:
            if existing is None:  # do not keep keys that failed, created only for this call
                await self._credentials.revoke_credential(owner, cid)
            raise errors.VerificationFailed(
                f"Invalid API credentials for {the_venue.value}", reason=done.failure_reason
            )
        return cid

    async def disconnect(self, owner_id: str, trading_account_id: uuid.UUID | str) -> TradingAccount:
        owner = validation.owner(owner_id)
        aid = validation.uuid_value(trading_account_id, "tradingAccountId")
        current = await self._store.get_account(owner, aid)
        async with self._db.transaction() as conn:
            await self._store.lock(conn, owner, current.credential_id)
            account = await self._store.disconnect_account(conn, owner, aid)
            if (
                account is None
            ):  # already DISABLED: idempotent. Read on this transaction's connection: the pool
                return await self._store.get_account(owner, aid, conn=conn)  # refuses a task that holds one
            change = await self._store.next_event(conn, account.credential_id)
            await self._outbox.credential_event(
                conn,
                change.credential,
                "trading_account.disconnected",
                sequence=change.sequence,
                extra={"tradingAccount": account.public_dict(), "reason": "DISCONNECTED"},
            )
        self._outbox.committed()
        return account

    async def get(self, owner_id: str, trading_account_id: uuid.UUID | str) -> TradingAccount:
        return await self._store.get_account(
            validation.owner(owner_id), validation.uuid_value(trading_account_id, "tradingAccountId")
        )

    async def list(
        self,
        owner_id: str,
        *,
        credential_id: uuid.UUID | str | None = None,
        status: TradingAccountStatus | str | None = None,
        venue: Venue | str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[TradingAccount]:
        offset, limit = validation.page(offset, limit)
        return await self._store.list_accounts(
            validation.owner(owner_id),
            credential_id=None
            if credential_id is None
            else validation.uuid_value(credential_id, "credentialId"),
            status=validation.account_status(status),
            venue=validation.venue(venue) if venue is not None else None,
            offset=offset,
            limit=limit,
        )
