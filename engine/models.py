"""The public value types: frozen dataclasses built from database rows. None of them holds key material."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from venues.base import ApiKeys, Permissions, Venue

__all__ = [
    "ApiKeys",
    "Credential",
    "CredentialStatus",
    "CredentialType",
    "Event",
    "Page",
    "PendingRotation",
    "Permissions",
    "TradingAccount",
    "TradingAccountStatus",
    "Venue",
]


class CredentialType(enum.StrEnum):
    EXCHANGE = "EXCHANGE"
    BROKER = "BROKER"


class CredentialStatus(enum.StrEnum):
    """The statuses of docs/api-dialect.md §5, exactly."""

    PENDING = "PENDING"
    VERIFIED = "VERIFIED"
    FAILED = "FAILED"
    REVOKED = "REVOKED"


class TradingAccountStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    DISABLED = "DISABLED"


@dataclass(frozen=True, slots=True)
class PendingRotation:
    """A staged rotation waiting for its keys to verify (AWSPENDING in AWS Secrets Manager's terms)."""

    secret_version: int
    masked_api_key: str
    started_at_ms: int


@dataclass(frozen=True, slots=True)
class MintedFrom:
    """Where a minted credential's keys come from: its BROKER parent credential and the parent's sub-account."""

    parent_credential_id: uuid.UUID
    sub_account: str

    def public_dict(self) -> dict[str, Any]:
        return {"parentCredentialId": str(self.parent_credential_id), "subAccount": self.sub_account}


@dataclass(frozen=True, slots=True)
class Credential:
    """A stored credential as callers see it: the fields of docs/api-dialect.md §4 plus what verification found."""

    credential_id: uuid.UUID
    owner_id: str
    venue: Venue
    credential_type: CredentialType
    nickname: str | None
    masked_api_key: str
    status: CredentialStatus
    identities: tuple[str, ...]
    permissions: Permissions | None
    venue_account_id: str | None
    failure_reason: str | None
    secret_version: int
    created_at_ms: int
    updated_at_ms: int
    verified_at_ms: int | None
    revoked_at_ms: int | None
    pending_rotation: PendingRotation | None
    warnings: tuple[str, ...] = ()
    # the venue account of the first successful verification, never changed: every later verification or
    # rotation must reach this account (ACCOUNT_MISMATCH otherwise). None until the first verification.
    pinned_venue_account_id: str | None = None
    # a credential minted through a BROKER credential (mint_credential): that parent and the sub-account
    minted_from: MintedFrom | None = None

    def public_dict(self) -> dict[str, Any]:
        """camelCase, ms timestamps: the shape events, webhooks and the REST API share."""
        return {
            "credentialId": str(self.credential_id),
            "userId": self.owner_id,
            "venue": self.venue.value,
            "credentialType": self.credential_type.value,
            "type": self.credential_type.value,
            "nickname": self.nickname,
            "name": self.nickname,
            "apiKey": self.masked_api_key,
            "status": self.status.value,
            "identities": list(self.identities),
            "permissions": self.permissions.as_dict() if self.permissions else None,
            "venueAccountId": self.venue_account_id,
            "failureReason": self.failure_reason,
            "warnings": list(self.warnings),
            "secretVersion": self.secret_version,
            "pendingRotation": (
                {
                    "secretVersion": self.pending_rotation.secret_version,
                    "apiKey": self.pending_rotation.masked_api_key,
                    "startedAt": self.pending_rotation.started_at_ms,
                }
                if self.pending_rotation
                else None
            ),
            "createdAt": self.created_at_ms,
            "updatedAt": self.updated_at_ms,
            "verifiedAt": self.verified_at_ms,
            "revokedAt": self.revoked_at_ms,
            "mintedFrom": self.minted_from.public_dict() if self.minted_from else None,
        }


@dataclass(frozen=True, slots=True)
class TradingAccount:
    """docs/api-dialect.md §8's trading account, pointing at the credential that drives it."""

    trading_account_id: uuid.UUID
    owner_id: str
    credential_id: uuid.UUID
    venue: Venue
    name: str | None
    account_type: str
    status: TradingAccountStatus
    created_at_ms: int
    updated_at_ms: int

    def public_dict(self) -> dict[str, Any]:
        return {
            "tradingAccountId": str(self.trading_account_id),
            "userId": self.owner_id,
            "credentialId": str(self.credential_id),
            "venue": self.venue.value,
            "name": self.name,
            "accountType": self.account_type.upper(),
            "status": self.status.value,
            "createdAt": self.created_at_ms,
            "updatedAt": self.updated_at_ms,
        }


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list, with the pagination fields of docs/api-dialect.md §6."""

    items: Sequence[T]
    offset: int
    limit: int
    total: int

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True, slots=True)
class Event:
    """A lifecycle event, written to the outbox in the transaction of the change it reports."""

    event_id: uuid.UUID
    type: str
    owner_id: str
    credential_id: uuid.UUID | None
    sequence: int  # per credential, gapless, from 1
    timestamp_ms: int
    data: Mapping[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The JSON body webhooks carry (Standard Webhooks: type, timestamp, data)."""
        return {
            "type": self.type,
            "timestamp": self.timestamp_ms,
            "data": {
                "eventId": str(self.event_id),
                "sequence": self.sequence,
                "ownerId": self.owner_id,
                **dict(self.data),
            },
        }
