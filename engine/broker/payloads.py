"""The BROKER job kinds, their payloads and dedupe keys (typed values, like :mod:`engine.payloads`).

``broker_mint``: create a minted credential's first key at the venue and store it. ``broker_rotate``: create a
new key and stage it as the credential's rotation. ``broker_cleanup``: delete the keys of one minted credential
that it no longer holds (after a rotation's grace, a rejected rotation, a revoke). ``broker_reconcile_sub``: the
same for every key the engine labelled on one sub-account. ``broker_sweep`` (periodic) applies the rotation
policy (``broker_rotate`` for each credential due) and enqueues a ``broker_reconcile_sub`` per sub-account.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

BROKER_MINT = "broker_mint"
BROKER_ROTATE = "broker_rotate"
BROKER_CLEANUP = "broker_cleanup"
BROKER_RECONCILE_SUB = "broker_reconcile_sub"
BROKER_SWEEP = "broker_sweep"


@dataclass(frozen=True, slots=True)
class BrokerMint:
    """Mint the first key of credential ``credential_id`` (its MINT intent ``intent_id``)."""

    KIND: ClassVar[str] = BROKER_MINT
    credential_id: uuid.UUID
    intent_id: uuid.UUID

    @property
    def dedupe_key(self) -> str | None:
        return f"broker-mint:{self.intent_id}"

    def to_payload(self) -> dict[str, Any]:
        return {"credentialId": str(self.credential_id), "intentId": str(self.intent_id)}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> BrokerMint:
        return cls(uuid.UUID(str(payload["credentialId"])), uuid.UUID(str(payload["intentId"])))


@dataclass(frozen=True, slots=True)
class BrokerRotate:
    """Mint a new key for credential ``credential_id`` and stage it (its ROTATE intent ``intent_id``)."""

    KIND: ClassVar[str] = BROKER_ROTATE
    credential_id: uuid.UUID
    intent_id: uuid.UUID

    @property
    def dedupe_key(self) -> str | None:
        return f"broker-rotate:{self.intent_id}"

    def to_payload(self) -> dict[str, Any]:
        return {"credentialId": str(self.credential_id), "intentId": str(self.intent_id)}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> BrokerRotate:
        return cls(uuid.UUID(str(payload["credentialId"])), uuid.UUID(str(payload["intentId"])))


@dataclass(frozen=True, slots=True)
class BrokerCleanup:
    """Delete at the venue the keys labelled with ``credential_id`` that the credential no longer holds."""

    KIND: ClassVar[str] = BROKER_CLEANUP
    credential_id: uuid.UUID

    @property
    def dedupe_key(self) -> str | None:
        return None  # one may wait for a grace to end while another runs now

    def to_payload(self) -> dict[str, Any]:
        return {"credentialId": str(self.credential_id)}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> BrokerCleanup:
        return cls(uuid.UUID(str(payload["credentialId"])))


@dataclass(frozen=True, slots=True)
class BrokerReconcileSub:
    """Reconcile sub-account ``sub_account`` of BROKER credential ``parent_id``: the venue's keys are the truth."""

    KIND: ClassVar[str] = BROKER_RECONCILE_SUB
    parent_id: uuid.UUID
    sub_account: str

    @property
    def dedupe_key(self) -> str | None:
        return f"broker-reconcile:{self.parent_id}:{self.sub_account}"

    def to_payload(self) -> dict[str, Any]:
        return {"parentId": str(self.parent_id), "subAccount": self.sub_account}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> BrokerReconcileSub:
        return cls(uuid.UUID(str(payload["parentId"])), str(payload["subAccount"]))
