"""Every error the engine raises. One root; nothing from asyncpg or aiohttp leaks through the public API.

    CredentialEngineError                    root; ``http_status`` and a stable negative ``errno`` each
    ├── InvalidRequest            400  -100001  a field is missing, of the wrong type, too long ... (names it)
    │   ├── InvalidKeyFormat      422  -100002  the key material cannot be right for the venue
    │   └── WithdrawNotAllowed    400  -100023  a minted key was asked to withdraw: the engine never mints one
    ├── Unauthorized              401  -110001  missing, malformed or expired bearer token (REST API, api/auth.py)
    ├── Forbidden                 403  -110005  the token's scopes do not cover the route (REST API, api/scopes.py)
    ├── NotFound                  404  -100003  no such id for this owner (other owners' ids too)
    ├── Conflict                  409  -100005  the request fights the current state
    │   ├── DuplicateCredential   409  -100004  same API key already stored for this owner and venue
    │   ├── InvalidTransition     409  -100006  the lifecycle forbids it (e.g. rotate a REVOKED credential)
    │   ├── RotationPending       409  -100007  a staged rotation is already waiting for verification
    │   ├── ActiveAccountsExist   409  -100008  revoke(cascade=False) while ACTIVE trading accounts exist
    │   ├── CredentialRevoked     409  -100018  a key lease of a REVOKED credential (opened, or read after it)
    │   ├── LeaseClosed           409  -100019  a key lease read after its context ended or the engine closed
    │   ├── QuotaExceeded         409  -100015  the owner holds as many credentials / webhook endpoints as allowed
    │   ├── ExchangeClosed        409  -100020  a ccxt bridge exchange closed (revoked, disconnected, closed)
    │   ├── BrokerUnsupported     409  -100021  no sub-account key API at the venue, or the credential is not minted
    │   └── BrokerNotPermitted    409  -100022  the BROKER credential may not mint (not verified, no permission)
    ├── VerificationFailed        400  -120001  keys given to connect-with-keys did not verify (docs/api-dialect.md §9)
    ├── WaitTimeout               408  -100009  wait_for_status ran out of time
    ├── RateLimited               429  -100014  too many requests from this owner or address (``retry_after``)
    │   └── RequestQuotaExceeded  429  -100017  the owner's hourly quota of a request kind is spent (verify)
    ├── EngineClosed              503  -100010  used before ``async with`` or after close; no reopening
    ├── StorageError              503  -100011  the database failed or is unreachable (translated in db.py)
    ├── ConfigurationError        500  -100012  bad configuration (names the setting and what to do)
    ├── DecryptionError           500  -100013  ciphertext does not open with its bound context
    └── PoolReentry               500  -100016  a task holding a pool connection asked the pool for another (a bug)

Defined beside the code that raises them (same root, own errno ranges):

    engine.db.PoolExhausted                   503  -100011  (StorageError)  no pool connection free in time
    engine.queue.WorkerFailed                 503  -140001  a queue worker gave up after repeated crashes
    engine.queue.StaleAttempt                 409  (Conflict)  this attempt no longer owns its job (fencing)
    engine.webhooks.WebhookVerificationError  401  -130001  a received webhook fails its signature or timestamp
    engine.api.jwks.IdentityProviderUnavailable  503  -110006  a token's key is unknown and the JWKS unreachable

Messages never contain key material: they name fields and reasons only.
"""

from __future__ import annotations

from typing import ClassVar


class CredentialEngineError(Exception):
    """Root of every error the engine raises."""

    http_status: ClassVar[int] = 500
    errno: ClassVar[int] = -100000

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(CredentialEngineError):
    """A request field is missing or invalid; ``field`` names it."""

    http_status = 400
    errno = -100001

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}", field=field)
        self.reason = reason


class InvalidKeyFormat(InvalidRequest):
    """Key material that cannot be valid for its venue (e.g. a Kraken secret that is not base64)."""

    http_status = 422
    errno = -100002


class Unauthorized(CredentialEngineError):
    """The REST API could not tell who is calling (no, malformed, badly signed or expired token)."""

    http_status = 401
    errno = -110001


class Forbidden(CredentialEngineError):
    """The REST API knows who is calling, but the token's scopes do not cover the route (``engine.api.scopes``);
    the message names the scope that is missing."""

    http_status = 403
    errno = -110005


class NotFound(CredentialEngineError):
    """No such object for this owner. Other owners' ids answer the same, so nothing leaks."""

    http_status = 404
    errno = -100003


class Conflict(CredentialEngineError):
    """The request conflicts with the current state."""

    http_status = 409
    errno = -100005


class DuplicateCredential(Conflict):
    errno = -100004


class InvalidTransition(Conflict):
    """The lifecycle table does not allow this trigger from the current status."""

    errno = -100006

    def __init__(self, trigger: str, status: str) -> None:
        super().__init__(f"cannot {trigger} a credential that is {status}", field="status")
        self.trigger = trigger
        self.status = status


class RotationPending(Conflict):
    errno = -100007


class ActiveAccountsExist(Conflict):
    errno = -100008


class CredentialRevoked(Conflict):
    """The credential is REVOKED: a key lease cannot be opened on it, and a lease held when it was revoked (in
    any engine process on the database) no longer hands out keys (``engine.live``)."""

    errno = -100018


class LeaseClosed(Conflict):
    """A key lease was used after its ``async with`` block ended or its engine closed (``engine.live``)."""

    errno = -100019


class VerificationFailed(CredentialEngineError):
    """Keys did not pass verification where the caller waited for it (connect-with-keys)."""

    http_status = 400
    errno = -120001

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class WaitTimeout(CredentialEngineError):
    http_status = 408
    errno = -100009


class EngineClosed(CredentialEngineError):
    http_status = 503
    errno = -100010


class StorageError(CredentialEngineError):
    http_status = 503
    errno = -100011


class ConfigurationError(CredentialEngineError):
    errno = -100012


class DecryptionError(CredentialEngineError):
    errno = -100013


class RateLimited(CredentialEngineError):
    """Too many requests from one owner (or one client address): the REST API's token buckets
    (``engine.api.limits``). ``retry_after`` is how many seconds until a request would be accepted again; the
    API sends it as the ``Retry-After`` header."""

    http_status = 429
    errno = -100014

    def __init__(self, message: str, *, retry_after: float, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class RequestQuotaExceeded(RateLimited):
    """The owner's hourly quota of one kind of request (``quota``, e.g. ``verify_requests_per_hour``) is spent;
    ``retry_after`` is when the oldest request of the last hour leaves the window (``engine.bounds.quotas``)."""

    errno = -100017

    def __init__(self, message: str, *, quota: str, limit: int, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
        self.quota = quota
        self.limit = limit


class QuotaExceeded(Conflict):
    """The owner already holds as many objects of a kind as its quota allows (``quota``: ``credentials``,
    ``webhook_endpoints``); removing some makes room. Waiting does not help, hence 409 and not 429."""

    errno = -100015

    def __init__(self, message: str, *, quota: str, limit: int) -> None:
        super().__init__(message, field=quota)
        self.quota = quota
        self.limit = limit


class PoolReentry(CredentialEngineError):
    """A task that holds a pool connection (an open transaction) asked the pool for another one.

    Always a bug in the engine: under load every connection can be held by tasks waiting for a second one,
    and then nothing moves again. Raised at once by :mod:`engine.db`, before any waiting; use the
    connection the task holds (``conn=``) instead.
    """

    errno = -100016


class ExchangeClosed(Conflict):
    """A call on a ccxt exchange of the bridge (``engine.live.ccxt``) after it closed: its credential was
    revoked, its trading account disconnected, the credential rotated to keys of another Coinbase API, or its
    holder closed it. ``reason`` says which (``CREDENTIAL_REVOKED``, ``DISCONNECTED``, ``KEY_KIND_CHANGED``,
    ``CLOSED``). Library only: no REST route raises it."""

    errno = -100020

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, field="tradingAccountId")
        self.reason = reason


class BrokerUnsupported(Conflict):
    """A BROKER operation where it cannot be done: the venue offers no API to manage sub-account keys with a
    master key (Coinbase, Kraken), or an automatic rotation of a credential the engine did not mint."""

    errno = -100021


class BrokerNotPermitted(Conflict):
    """The BROKER credential cannot mint: it is not VERIFIED, or its master key may not manage sub-account keys
    (``permissions.subAccountKeys`` false), or the sub-account is not one of its ``sub:<id>`` identities."""

    errno = -100022


class WithdrawNotAllowed(InvalidRequest):
    """A minted key may read and trade, never withdraw: the engine refuses to create a withdrawing key."""

    errno = -100023
