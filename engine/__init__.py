"""credential-engine: keeps crypto-exchange API keys encrypted, verified, rotated and revoked.

from engine import CredentialEngine, EngineConfig, Venue, CredentialType, CredentialStatus

async with CredentialEngine(EngineConfig()) as eng:
    cred = await eng.create_credential("owner-1", venue=Venue.BINANCE, api_key=..., api_secret=...)
    cred = await eng.wait_for_status("owner-1", cred.credential_id, {CredentialStatus.VERIFIED})
"""

from typing import TYPE_CHECKING, Any

from engine import errors
from engine.config import EngineConfig, Quotas, VerificationPolicy
from engine.errors import (
    ActiveAccountsExist,
    Conflict,
    CredentialEngineError,
    CredentialRevoked,
    DuplicateCredential,
    ExchangeClosed,
    InvalidKeyFormat,
    InvalidRequest,
    InvalidTransition,
    LeaseClosed,
    NotFound,
    QuotaExceeded,
    RequestQuotaExceeded,
    RotationPending,
    VerificationFailed,
    WaitTimeout,
)
from engine.models import (
    ApiKeys,
    Credential,
    CredentialStatus,
    CredentialType,
    Event,
    Page,
    PendingRotation,
    Permissions,
    TradingAccount,
    TradingAccountStatus,
    Venue,
)

if TYPE_CHECKING:
    from engine.engine import CredentialEngine
    from engine.keys.rewrap import RewrapReport
    from engine.live.leases import KeyLease, LeaseChange

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # CredentialEngine pulls in aiohttp, the queue and every venue seam: load it on first use, so that
    # `import engine.db` (or a venue module's tests) stays light and cannot fail on an unrelated module
    if name == "CredentialEngine":
        from engine.engine import CredentialEngine

        return CredentialEngine
    if name in ("KeyLease", "LeaseChange"):
        from engine.live import leases

        return getattr(leases, name)
    if name == "RewrapReport":
        from engine.keys.rewrap import RewrapReport

        return RewrapReport
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "ActiveAccountsExist",
    "ApiKeys",
    "Conflict",
    "Credential",
    "CredentialEngine",
    "CredentialEngineError",
    "CredentialRevoked",
    "CredentialStatus",
    "CredentialType",
    "DuplicateCredential",
    "EngineConfig",
    "Event",
    "ExchangeClosed",
    "InvalidKeyFormat",
    "InvalidRequest",
    "InvalidTransition",
    "KeyLease",
    "LeaseChange",
    "LeaseClosed",
    "NotFound",
    "Page",
    "PendingRotation",
    "Permissions",
    "QuotaExceeded",
    "Quotas",
    "RequestQuotaExceeded",
    "RewrapReport",
    "RotationPending",
    "TradingAccount",
    "TradingAccountStatus",
    "Venue",
    "VerificationFailed",
    "VerificationPolicy",
    "WaitTimeout",
    "errors",
]
