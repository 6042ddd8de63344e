"""The ccxt bridge: a ``ccxt.async_support`` exchange for one trading account, signing with a key lease.

``await eng.ccxt_exchange(owner_id, trading_account_id, purpose=...)`` picks the ccxt class and options from
the account's venue, account type and key kind (:func:`client_spec`), points every URL group at the venue's
base URL when the engine has one (``venue_urls``: the sandbox, the simulator), and opens a key lease on the
account's credential. The exchange it returns is a subclass of the ccxt class built here (:class:`LeasedExchange`):

* **keys are read at each signing.** ``sign`` (synchronous: no other request can interleave) takes the lease's
  current :class:`~venues.base.ApiKeys` once, lets ccxt sign with them, and drops them. A rotation the lease
  has swapped in signs the next request; nothing has to be reconnected.
* **no secret on the object.** ``apiKey``, ``secret`` and ``password`` are properties: outside ``sign`` they
  read :data:`HELD` (so ccxt's "are credentials set?" checks pass) and assigning a key to them is refused. The
  signed request headers ccxt keeps (``last_request_headers``, the fetch-history cache) are stored with
  their values masked, ``verbose`` (which prints the headers) cannot be turned on, and ccxt's debug log line
  of the request headers is dropped.
* **revocation and disconnection close it.** The lease's ``wait_revoked`` and a bus subscription to
  ``trading_account.disconnected`` of this account start :meth:`LeasedExchange.close`: no new request from
  that moment (:class:`~engine.errors.ExchangeClosed`, errno -100020, with the reason), requests already sent
  get :data:`DRAIN_TIMEOUT` seconds to come back, then ccxt's session closes and the lease is released.
  Closing the exchange yourself does the same (reason ``CLOSED``).

ccxt is an optional dependency (the ``ccxt`` extra): it is imported only when an exchange is built, and its
absence is a :class:`~engine.errors.ConfigurationError` saying what to install. What the bridge cannot hide:
while ``sign`` runs the key material is in ccxt's local variables and the request it builds (the headers go
to aiohttp); the lease is reachable through private attributes, as anything is in Python. The exchange's
answers, orders and errors carry no key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import structlog

from engine import errors
from engine.live.leases import KeyLease
from engine.models import ApiKeys, Event, TradingAccount, TradingAccountStatus, Venue
from venues import coinbase_auth
from venues.base import KeyFormatProblem

log = structlog.get_logger("engine.live.ccxt")

HELD = "<held by credential-engine>"  # what apiKey / secret / password read outside signing
MASK = "***"
DRAIN_TIMEOUT = 5.0  # seconds requests already sent may take to come back once the exchange closes
CLOSE_TIMEOUT = 10.0  # seconds ccxt's own close (sessions, connectors) may take
DEFAULT_PURPOSE = "ccxt exchange"  # the lease's audited purpose when the caller names none

# reasons an exchange closed (ExchangeClosed.reason); the first two are the event's own (engine/accounts.py)
REVOKED = "CREDENTIAL_REVOKED"
DISCONNECTED = "DISCONNECTED"
KEY_KIND_CHANGED = "KEY_KIND_CHANGED"
ENGINE_CLOSED = "ENGINE_CLOSED"
CLOSED = "CLOSED"

# headers whose value is safe to keep on the object after a request (everything else is masked)
_PLAIN_HEADERS = frozenset({"content-type", "accept", "user-agent", "accept-encoding", "content-length"})
# ccxt's debug line that carries the request headers (ccxt/async_support/base/exchange.py, fetch)
_REQUEST_LOG_FORMAT = "%s %s, Request: %s %s"
_CLIENT_LOGGER = "engine.live.ccxt.client"


# ---- what the bridge needs from the engine ----------------------------------------------------------------


class BridgeHost(Protocol):
    """The engine operations the bridge uses (``CredentialEngine`` is one)."""

    def lease_keys(
        self,
        owner_id: str,
        credential_id: uuid.UUID | str,
        *,
        purpose: str | None = None,
        allow_pending: bool = False,
    ) -> AbstractAsyncContextManager[KeyLease]: ...

    async def get_trading_account(
        self, owner_id: str, trading_account_id: uuid.UUID | str
    ) -> TradingAccount: ...

    def subscribe(
        self, listener: Callable[[Event], Awaitable[None]], types: Collection[str] | None = None
    ) -> Any: ...


# ---- which ccxt class, with which options -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """The ccxt exchange id and options for one trading account (``key_kind`` for the venues with two).

    ``params`` go with every order and trade call (:data:`ORDER_METHODS`) unless the caller gives them:
    what ccxt routes on per call rather than by an option.
    """

    exchange_id: str
    options: Mapping[str, Any] = field(default_factory=dict)
    key_kind: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


# (venue, account type) -> ccxt id and options; account types are docs/api-dialect.md §5's identities
_SPECS: Mapping[tuple[Venue, str], ClientSpec] = {
    (Venue.BINANCE, "spot"): ClientSpec("binance", {"defaultType": "spot"}),
    # the margin identity is the cross-margin account (venues/binance.py reads /sapi/v1/margin/account). ccxt's
    # binance sends an order to /sapi (margin) only with params["marginMode"] (or type "margin"): its market
    # is spot, and no option routes it. Without it a margin account's orders would land in the spot wallet.
    (Venue.BINANCE, "margin"): ClientSpec(
        "binance",
        {"defaultType": "margin", "defaultMarginMode": "cross"},
        params={"marginMode": "cross"},
    ),
    (Venue.BINANCE, "futures"): ClientSpec("binanceusdm"),
    (Venue.OKX, "trading"): ClientSpec("okx"),
    (Venue.OKX, "funding"): ClientSpec("okx", {"fetchBalance": {"type": "funding"}}),
    (Venue.BYBIT, "unified"): ClientSpec("bybit"),
    (Venue.BYBIT, "spot"): ClientSpec("bybit", {"defaultType": "spot"}),
    (Venue.BYBIT, "contract"): ClientSpec("bybit", {"defaultType": "swap"}),
    (Venue.KRAKEN, "spot"): ClientSpec("kraken"),
    (Venue.KRAKEN, "futures"): ClientSpec("krakenfutures"),
    # Advanced Trade's own balance call is v3 accounts; ccxt's default is the v2 retail API
    (Venue.COINBASE, "cdp"): ClientSpec(
        "coinbase", {"fetchBalance": "v3PrivateGetBrokerageAccounts"}, key_kind="cdp"
    ),
    (Venue.COINBASE, "exchange"): ClientSpec("coinbaseexchange", key_kind="exchange"),
}


def coinbase_key_kind(keys: ApiKeys) -> str:
    """``cdp`` (Advanced Trade, a JWT per request) or ``exchange`` (Coinbase Exchange, HMAC + passphrase).

    The secret tells (venues/coinbase_auth.py); keys that are neither are an :class:`errors.InvalidKeyFormat`.
    """
    try:
        signer = coinbase_auth.signer_for(keys)
    except KeyFormatProblem as problem:
        raise errors.InvalidKeyFormat(problem.field, problem.reason) from None
    return "cdp" if isinstance(signer, coinbase_auth.CdpSigner) else "exchange"


def client_spec(venue: Venue, account_type: str, keys: ApiKeys) -> ClientSpec:
    """The ccxt class and options for an account of ``venue`` and ``account_type`` driven by ``keys``.

    Coinbase's one account type (``default``) is served by two APIs: the key kind decides. Kraken's spot and
    futures keys are told apart by the account type (the credential's identity), as the probe found it.
    """
    kind = coinbase_key_kind(keys) if venue is Venue.COINBASE else account_type.lower()
    spec = _SPECS.get((venue, kind))
    if spec is None:
        known = sorted(t for v, t in _SPECS if v is venue and v is not Venue.COINBASE) or ["default"]
        raise errors.Conflict(
            f"no ccxt client for a {venue.value} account of type {account_type!r} (known: {', '.join(known)})",
            field="accountType",
        )
    return spec


def retarget_urls(urls: Any, base_url: str) -> Any:
    """Every URL of ccxt's ``urls['api']`` tree on ``base_url``, keeping each URL's path.

    ccxt writes some hosts as templates (``https://api.{hostname}``); only the path is kept, so the template
    does not matter. Non-string leaves are left as they are.
    """
    if isinstance(urls, dict):
        return {name: retarget_urls(value, base_url) for name, value in urls.items()}
    if not isinstance(urls, str):
        return urls
    path = urlsplit(urls.replace("{hostname}", "example.invalid")).path
    return base_url.rstrip("/") + path


def _masked_headers(headers: Any) -> Any:
    """A copy of request headers with every value masked except a few plain ones (content type ...)."""
    if not isinstance(headers, Mapping):
        return headers
    return {name: (value if str(name).lower() in _PLAIN_HEADERS else MASK) for name, value in headers.items()}


class _DropRequestHeaders(logging.Filter):
    """Drops ccxt's debug record of a request (its arguments hold the signed headers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _REQUEST_LOG_FORMAT


def _client_logger() -> logging.Logger:
    logger = logging.getLogger(_CLIENT_LOGGER)
    if not any(isinstance(f, _DropRequestHeaders) for f in logger.filters):
        logger.addFilter(_DropRequestHeaders())
    return logger


# ---- the leased exchange ------------------------------------------------------------------------------------


class LeasedExchange:
    """Mixed in before a ccxt ``async_support`` exchange class (:func:`leased_class`); see the module docstring.

    Its state lives in class-level defaults until :meth:`_bridge_attach` sets the instance's, because ccxt's
    constructor reads and writes attributes (``apiKey`` among them) before anything else runs.
    """

    _bridge_lease: KeyLease | None = None
    _bridge_signing: ApiKeys | None = None
    _bridge_passphrase: bool = False
    _bridge_reason: str | None = None  # set once: the exchange is closed (or closing) for this reason
    _bridge_account: str = ""
    _bridge_kind: str | None = None
    _bridge_kind_version: int = 0
    _bridge_inflight: int = 0
    _bridge_idle: asyncio.Event | None = None
    _bridge_close_task: asyncio.Task[None] | None = None
    _bridge_done: asyncio.Event | None = None
    _bridge_watch: asyncio.Task[None] | None = None
    _bridge_release: Callable[[], Awaitable[None]] | None = None
    _bridge_unsubscribe: Callable[[], None] | None = None
    _bridge_headers: Any = None
    _bridge_params: Mapping[str, Any] = {}  # the spec's params for order calls (ClientSpec.params)

    # -- key material: read at signing, never stored -----------------------------------------------------------

    def _bridge_field(self, name: str) -> str:
        keys = self._bridge_signing
        if keys is not None:
            value = getattr(keys, name)
            return "" if value is None else str(value)
        if self._bridge_lease is None:
            return ""
        if name == "api_passphrase" and not self._bridge_passphrase:
            return ""
        return HELD

    @staticmethod
    def _bridge_refuse(name: str, value: object) -> None:
        if value not in (None, "", HELD):
            raise errors.InvalidRequest(
                name, "the keys come from the credential engine's lease; set none here"
            )

    @property
    def apiKey(self) -> str:
        return self._bridge_field("api_key")

    @apiKey.setter
    def apiKey(self, value: object) -> None:
        self._bridge_refuse("apiKey", value)

    @property
    def secret(self) -> str:
        return self._bridge_field("api_secret")

    @secret.setter
    def secret(self, value: object) -> None:
        self._bridge_refuse("secret", value)

    @property
    def password(self) -> str:
        return self._bridge_field("api_passphrase")

    @password.setter
    def password(self, value: object) -> None:
        self._bridge_refuse("password", value)

    @property
    def verbose(self) -> bool:
        return False

    @verbose.setter
    def verbose(self, value: object) -> None:
        if value:
            raise errors.InvalidRequest("verbose", "would print signed request headers; not available here")

    @property
    def last_request_headers(self) -> Any:
        return self._bridge_headers

    @last_request_headers.setter
    def last_request_headers(self, value: Any) -> None:
        self._bridge_headers = _masked_headers(value)

    @property
    def lastRequestHeaders(self) -> Any:
        return self._bridge_headers

    @lastRequestHeaders.setter
    def lastRequestHeaders(self, value: Any) -> None:
        self._bridge_headers = _masked_headers(value)

    # ccxt's constructor copies every snake_case attribute to a camelCase one (a snapshot): the camelCase
    # names are properties too, so that they stay live and the copy is skipped (their value is None then)

    @property
    def closed_reason(self) -> str | None:
        """None while the exchange is usable; else why it closed (``CREDENTIAL_REVOKED``, ``DISCONNECTED``,
        ``KEY_KIND_CHANGED``, ``ENGINE_CLOSED``, ``CLOSED``)."""
        return self._bridge_reason

    @property
    def closedReason(self) -> str | None:
        return self._bridge_reason

    @property
    def secret_version(self) -> int | None:
        """The secret version of the keys the next request will be signed with (the lease's)."""
        lease = self._bridge_lease
        return None if lease is None else lease.secret_version

    @property
    def secretVersion(self) -> int | None:
        return self.secret_version

    def sign(self, *args: Any, **kwargs: Any) -> Any:
        """ccxt's ``sign`` with the lease's keys of this moment (one read), dropped again before returning."""
        self._bridge_check()
        lease = self._bridge_lease
        if lease is None or lease.closed:
            self._bridge_shut(ENGINE_CLOSED if lease is not None else CLOSED)
            self._bridge_check()
        assert lease is not None
        if lease.revoked:
            self._bridge_shut(REVOKED)
            self._bridge_check()
        keys = lease.keys
        if self._bridge_kind is not None and lease.secret_version != self._bridge_kind_version:
            self._bridge_kind_version = lease.secret_version
            if coinbase_key_kind(keys) != self._bridge_kind:  # rotated to keys of the other Coinbase API
                self._bridge_shut(KEY_KIND_CHANGED)
                self._bridge_check()
        self._bridge_signing = keys
        try:
            return cast(Any, super()).sign(*args, **kwargs)
        finally:
            self._bridge_signing = None

    def set_last_request(self, request: Any) -> None:
        """ccxt keeps the last request's url, body and headers: the headers only masked."""
        cast(Any, super()).set_last_request({**request, "headers": _masked_headers(request.get("headers"))})

    def add_fetch_cache(self, data: Any) -> None:
        """ccxt's fetch-history cache (off unless ``fetchHistoryCacheSize``): requests kept with masked headers."""
        request = data.get("request") if isinstance(data, dict) else None
        if isinstance(request, dict):
            data = {**data, "request": {**request, "headers": _masked_headers(request.get("headers"))}}
        cast(Any, super()).add_fetch_cache(data)

    async def fetch2(self, *args: Any, **kwargs: Any) -> Any:
        """Every REST call: refused once the exchange is closing; counted while in flight (for the drain).

        A request cut because the exchange closed under it (still out after the drain) raises
        :class:`errors.ExchangeClosed` saying so, chained to ccxt's network error: the venue may have taken it.
        """
        self._bridge_check()
        idle = self._bridge_idle
        self._bridge_inflight += 1
        if idle is not None:
            idle.clear()
        try:
            return await cast(Any, super()).fetch2(*args, **kwargs)
        except _ccxt().NetworkError as exc:
            reason = self._bridge_reason
            if reason is None or self._bridge_close_task is None:
                raise
            message = _CLOSED_MESSAGES.get(reason, "the exchange was closed")
            raise errors.ExchangeClosed(
                f"{message}, with this request in flight (the venue may have received it)", reason=reason
            ) from exc
        finally:
            self._bridge_inflight -= 1
            if self._bridge_inflight == 0 and idle is not None:
                idle.set()

    # -- closing -----------------------------------------------------------------------------------------------

    def _bridge_check(self) -> None:
        reason = self._bridge_reason
        if reason is not None:
            raise errors.ExchangeClosed(_CLOSED_MESSAGES.get(reason, "the exchange is closed"), reason=reason)

    def _bridge_shut(self, reason: str) -> None:
        """Refuse every new request from now on and start closing (in a task: callers may be event listeners)."""
        if self._bridge_reason is None:
            self._bridge_reason = reason
            log.info("ccxt_exchange_closing", trading_account_id=self._bridge_account, reason=reason)
        if self._bridge_close_task is None:
            self._bridge_close_task = asyncio.get_running_loop().create_task(self._bridge_close())

    async def close(self, clean_instance_data: bool = False) -> None:
        """Close: no new request, requests in flight get :data:`DRAIN_TIMEOUT` s, ccxt's session closes, the
        lease is released. Idempotent; also what revocation and disconnection run."""
        self._bridge_shut(CLOSED)
        task = self._bridge_close_task
        assert task is not None  # set by _bridge_shut
        await asyncio.shield(task)
        if clean_instance_data:
            cast(Any, super()).clean_rest_data()

    async def wait_closed(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a bound, as wait_for_status
        """Return once the exchange has closed (after revocation, disconnection or :meth:`close`);
        :class:`errors.WaitTimeout` after ``timeout`` seconds."""
        done = self._bridge_done
        if done is None:
            raise errors.ExchangeClosed("the exchange has no lease", reason=CLOSED)
        try:
            await asyncio.wait_for(done.wait(), timeout=timeout)
        except TimeoutError:
            raise errors.WaitTimeout(
                f"the exchange is still open after {timeout:g}s", field="tradingAccountId"
            ) from None

    async def _bridge_close(self) -> None:
        unsubscribe, self._bridge_unsubscribe = self._bridge_unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        watch = self._bridge_watch
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        idle = self._bridge_idle
        if idle is not None and self._bridge_inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), timeout=DRAIN_TIMEOUT)
        try:
            await asyncio.wait_for(cast(Any, super()).close(), timeout=CLOSE_TIMEOUT)
        except Exception as exc:  # the lease must still be released
            log.warning(
                "ccxt_close_failed", trading_account_id=self._bridge_account, error=type(exc).__name__
            )
        release, self._bridge_release = self._bridge_release, None
        try:
            if release is not None:
                await release()  # leaves the lease's block: the lease closes (no I/O)
        finally:
            if self._bridge_done is not None:
                self._bridge_done.set()
        log.info("ccxt_exchange_closed", trading_account_id=self._bridge_account, reason=self._bridge_reason)

    # -- wiring (called once by open_exchange) -------------------------------------------------------------------

    def _bridge_attach(
        self,
        *,
        lease: KeyLease,
        account_id: uuid.UUID,
        key_kind: str | None,
        release: Callable[[], Awaitable[None]],
    ) -> None:
        self._bridge_lease = lease
        self._bridge_account = str(account_id)
        self._bridge_kind = key_kind
        self._bridge_kind_version = lease.secret_version
        self._bridge_passphrase = lease.keys.api_passphrase is not None
        self._bridge_idle = asyncio.Event()
        self._bridge_idle.set()
        self._bridge_done = asyncio.Event()
        self._bridge_release = release
        self._bridge_watch = asyncio.get_running_loop().create_task(self._bridge_watch_revocation(lease))

    async def _bridge_watch_revocation(self, lease: KeyLease) -> None:
        try:
            await lease.wait_revoked()
        except errors.LeaseClosed:  # the engine closed under the exchange: no keys any more
            self._bridge_shut(ENGINE_CLOSED)
        else:
            self._bridge_shut(REVOKED)

    async def _bridge_on_disconnect(self, event: Event) -> None:
        account = event.data.get("tradingAccount") or {}
        if account.get("tradingAccountId") == self._bridge_account:
            reason = event.data.get("reason")
            self._bridge_shut(REVOKED if reason == REVOKED else DISCONNECTED)


_CLOSED_MESSAGES: Mapping[str, str] = {
    REVOKED: "the exchange was closed: its credential was revoked",
    DISCONNECTED: "the exchange was closed: its trading account was disconnected",
    KEY_KIND_CHANGED: "the exchange was closed: the credential was rotated to keys of another Coinbase API",
    ENGINE_CLOSED: "the exchange was closed: its credential engine closed",
    CLOSED: "the exchange was closed",
}

_CLASSES: dict[type, type] = {}

# ccxt's order and trade methods -> the position of ``params`` among their arguments (after self)
ORDER_METHODS: Mapping[str, int] = {
    "create_order": 5,
    "create_orders": 1,
    "edit_order": 6,
    "cancel_order": 2,
    "cancel_orders": 2,
    "cancel_all_orders": 1,
    "fetch_order": 2,
    "fetch_orders": 3,
    "fetch_open_orders": 3,
    "fetch_closed_orders": 3,
    "fetch_canceled_orders": 3,
    "fetch_my_trades": 3,
    "fetch_order_trades": 4,
}


def _with_spec_params(cls: type, name: str, index: int) -> Callable[..., Awaitable[Any]]:
    """``cls.<name>`` with the spec's ``params`` under the caller's (the caller's win)."""

    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        defaults = self._bridge_params
        if defaults:
            if len(args) > index:
                given = args[index] or {}
                args = (*args[:index], {**defaults, **given}, *args[index + 1 :])
            else:
                kwargs["params"] = {**defaults, **(kwargs.get("params") or {})}
        return await getattr(super(cls, self), name)(*args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"{cls.__name__}.{name}"
    return method


def _ccxt() -> Any:
    try:
        import ccxt.async_support as ccxt_async  # an optional extra, loaded on first use
    except ImportError:
        raise errors.ConfigurationError(
            "the ccxt bridge needs ccxt: pip install 'credential-engine[ccxt]'", field="ccxt"
        ) from None
    return ccxt_async


def leased_class(exchange_id: str) -> type:
    """The ccxt ``async_support`` class ``exchange_id`` with :class:`LeasedExchange` in front (cached)."""
    base = getattr(_ccxt(), exchange_id)
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Leased{base.__name__}", (LeasedExchange, base), {"__module__": __name__})
        for name, index in ORDER_METHODS.items():
            if hasattr(base, name):
                setattr(cls, name, _with_spec_params(cls, name, index))
        _CLASSES[base] = cls
    return cls


_RESERVED_CONFIG: Collection[str] = (
    "apiKey",
    "secret",
    "password",
    "uid",
    "privateKey",
    "token",
    "verbose",
    "urls",
    "logger",
)


async def open_exchange(
    host: BridgeHost,
    owner_id: str,
    trading_account_id: uuid.UUID | str,
    *,
    purpose: str | None = None,
    venue_urls: Mapping[Venue, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Any:
    """A leased ccxt exchange for an ACTIVE trading account (see the module docstring).

    ``purpose`` is audited with the lease (``DEFAULT_PURPOSE`` when None). ``config`` is merged into ccxt's
    constructor settings (``timeout``, ``enableRateLimit``, ``options``, ...); key material, ``verbose``,
    ``urls`` and ``logger`` are refused (:class:`errors.InvalidRequest`). Raises
    :class:`errors.NotFound` for another owner's or an unknown account, :class:`errors.Conflict` for a
    DISABLED one, the lease's errors for a credential that cannot be leased (not VERIFIED, revoked).
    """
    extra = dict(config or {})
    for name in _RESERVED_CONFIG:
        if name in extra:
            raise errors.InvalidRequest(f"config.{name}", "is set by the ccxt bridge")
    _ccxt()  # a missing extra is told before anything is opened
    # listen first, then read the account: a disconnection between the two is heard, not missed
    exchange: Any = None
    heard_early: list[Event] = []  # disconnections heard before the exchange exists

    async def on_disconnect(event: Event) -> None:
        if exchange is None:
            heard_early.append(event)
        else:
            await exchange._bridge_on_disconnect(event)

    unsubscribe = host.subscribe(on_disconnect, types={"trading_account.disconnected"})
    stack = contextlib.AsyncExitStack()
    try:
        account = await host.get_trading_account(owner_id, trading_account_id)
        if account.status is not TradingAccountStatus.ACTIVE:
            raise errors.Conflict(
                f"the trading account is {account.status.value}; connect it again", field="tradingAccountId"
            )
        lease = await stack.enter_async_context(
            host.lease_keys(owner_id, account.credential_id, purpose=purpose or DEFAULT_PURPOSE)
        )
        spec = client_spec(account.venue, account.account_type, lease.keys)
        cls = leased_class(spec.exchange_id)
        settings: dict[str, Any] = {"enableRateLimit": True, **extra}
        settings["options"] = {**dict(spec.options), **dict(extra.get("options") or {})}
        exchange = cls(settings)
        exchange.logger = _client_logger()
        base_url = (venue_urls or {}).get(account.venue)
        if base_url:
            exchange.urls["api"] = retarget_urls(exchange.urls["api"], base_url)
        exchange._bridge_params = dict(spec.params)
        exchange._bridge_unsubscribe = unsubscribe
        exchange._bridge_attach(
            lease=lease, account_id=account.trading_account_id, key_kind=spec.key_kind, release=stack.aclose
        )
    except BaseException:  # nothing was sent yet: ccxt opens its session on the first request
        unsubscribe()
        await stack.aclose()
        raise
    for event in heard_early:
        await exchange._bridge_on_disconnect(event)
    log.info(
        "ccxt_exchange_opened",
        trading_account_id=str(account.trading_account_id),
        exchange=spec.exchange_id,
        secret_version=lease.secret_version,
    )
    return exchange


__all__ = [
    "CLOSED",
    "DISCONNECTED",
    "ENGINE_CLOSED",
    "HELD",
    "KEY_KIND_CHANGED",
    "ORDER_METHODS",
    "REVOKED",
    "BridgeHost",
    "ClientSpec",
    "LeasedExchange",
    "client_spec",
    "coinbase_key_kind",
    "leased_class",
    "open_exchange",
    "retarget_urls",
]
