"""The lifecycle's job kinds, their payloads and dedupe keys: typed values, built here and nowhere else.

Each job is a frozen dataclass with ``KIND``, ``to_payload()`` (the JSON stored in ``queue_jobs.payload``),
``from_payload()`` (what its handler reads back) and, where at most one may be queued, ``dedupe_key``.
:func:`enqueue` puts one on a :class:`engine.queue.JobQueue`. The webhook delivery job is
:class:`engine.webhooks.delivery.DeliveryJob`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

from engine import db as dbmod
from engine.queue import JobQueue

VERIFY = "verify"
ROTATION_VERIFY = "rotation_verify"
REVOKE_CASCADE = "revoke_cascade"
REVERIFY_SWEEP = "reverify_sweep"
PURGE_JOBS = "purge_jobs"
EXPIRY_WARNING = "expiry_warning"


def verify_key(credential_id: uuid.UUID) -> str:
    """Dedupe key: at most one queued verification per credential."""
    return f"verify:{credential_id}"


def rotation_key(credential_id: uuid.UUID, version: int) -> str:
    """Dedupe key of the verification of staged version ``version`` (per version: a check left queued by an
    immediate rotation must never swallow the check of a later staging)."""
    return f"rotate:{credential_id}:{version}"


@dataclass(frozen=True, slots=True)
class Verify:
    """Verify secret version ``version`` of a credential (its current keys when enqueued)."""

    KIND: ClassVar[str] = VERIFY
    credential_id: uuid.UUID
    version: int

    @property
    def dedupe_key(self) -> str | None:
        return verify_key(self.credential_id)

    def to_payload(self) -> dict[str, Any]:
        return {"credentialId": str(self.credential_id), "version": self.version}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Verify:
        return cls(uuid.UUID(str(payload["credentialId"])), int(payload["version"]))


@dataclass(frozen=True, slots=True)
class RotationVerify:
    """Verify staged secret version ``version`` of a credential and promote or reject it."""

    KIND: ClassVar[str] = ROTATION_VERIFY
    credential_id: uuid.UUID
    version: int

    @property
    def dedupe_key(self) -> str | None:
        return rotation_key(self.credential_id, self.version)

    def to_payload(self) -> dict[str, Any]:
        return {"credentialId": str(self.credential_id), "version": self.version}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RotationVerify:
        return cls(uuid.UUID(str(payload["credentialId"])), int(payload["version"]))


@dataclass(frozen=True, slots=True)
class RevokeCascade:
    """After a revoke: cancel the credential's queued jobs holding these dedupe keys."""

    KIND: ClassVar[str] = REVOKE_CASCADE
    credential_id: uuid.UUID
    cancel_keys: tuple[str, ...]

    @classmethod
    def of(cls, credential_id: uuid.UUID, pending_version: int | None) -> RevokeCascade:
        """The cascade of a credential revoked with staged version ``pending_version`` (None: none staged)."""
        keys = [verify_key(credential_id)]
        if pending_version is not None:
            keys.append(rotation_key(credential_id, pending_version))
        return cls(credential_id, tuple(keys))

    @property
    def dedupe_key(self) -> str | None:
        return None

    def to_payload(self) -> dict[str, Any]:
        return {"credentialId": str(self.credential_id), "cancelKeys": list(self.cancel_keys)}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RevokeCascade:
        return cls(
            uuid.UUID(str(payload["credentialId"])), tuple(str(k) for k in payload.get("cancelKeys", ()))
        )


@dataclass(frozen=True, slots=True)
class ExpiryWarning:
    """Announce once that the key of a credential expires at ``expires_at_ms``."""

    KIND: ClassVar[str] = EXPIRY_WARNING
    credential_id: uuid.UUID
    expires_at_ms: int

    @property
    def dedupe_key(self) -> str | None:
        return f"expiry:{self.credential_id}:{self.expires_at_ms}"

    def to_payload(self) -> dict[str, Any]:
        return {"credentialId": str(self.credential_id), "expiresAt": self.expires_at_ms}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ExpiryWarning:
        return cls(uuid.UUID(str(payload["credentialId"])), int(payload["expiresAt"]))


class JobValue(Protocol):
    """What :func:`enqueue` takes: a job kind, its payload and its dedupe key."""

    @property
    def KIND(self) -> str: ...

    @property
    def dedupe_key(self) -> str | None: ...

    def to_payload(self) -> dict[str, Any]: ...


async def enqueue(
    queue: JobQueue,
    job: JobValue,
    *,
    conn: dbmod.Conn | None = None,
    fair_key: str | None = None,
    run_at: datetime | None = None,
) -> int | None:
    """Put ``job`` on ``queue`` (in ``conn``'s transaction when given); None when its dedupe key is queued."""
    return await queue.enqueue(
        job.KIND, job.to_payload(), conn=conn, dedupe_key=job.dedupe_key, fair_key=fair_key, run_at=run_at
    )
