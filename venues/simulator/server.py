"""The :class:`Simulator`: five venue servers and an admin port, driven from Python or over HTTP.

Lifecycle (as httpx's client): constructed with no I/O; ``await start()`` binds one aiohttp site per venue
on its own port (contract: no path prefix, so paths are exactly the venue's) plus the admin port;
``await close()`` stops them, idempotently; a closed simulator does not start again. ``async with
Simulator() as sim:`` does both.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from decimal import Decimal
from types import TracebackType
from typing import Any

from aiohttp import web

from venues.base import Venue
from venues.simulator import (
    admin,
    binance,
    bybit,
    coinbase,
    common,
    faults,
    kraken,
    masters,
    okx,
    signlog,
    stats,
    trading,
)
from venues.simulator.registry import TestKey

SERVERS: dict[Venue, type[common.VenueServer]] = {
    Venue.BINANCE: binance.BinanceServer,
    Venue.OKX: okx.OkxServer,
    Venue.BYBIT: bybit.BybitServer,
    Venue.COINBASE: coinbase.CoinbaseServer,
    Venue.KRAKEN: kraken.KrakenServer,
}
SHUTDOWN_TIMEOUT = 1.0  # seconds given to in-flight requests at close (hanging faults end at once)


def _venue(venue: Venue | str) -> Venue:
    """A Venue from itself or its name in any case ("okx", "OKX")."""
    return venue if isinstance(venue, Venue) else Venue(venue.upper())


class _Phase(enum.Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


class Simulator:
    """Exchange simulator: the private endpoints of every venue's probe, with the venues' own auth rules,
    plus the little trading set of docs/venues.md §x.9 and the signing log.

    ``seed`` seeds the RNG that picks injected faults (key material always comes from ``secrets``).
    ``enforce_rate_limits=False`` keeps counting violations in :meth:`stats` but answers them normally.
    """

    def __init__(self, *, seed: int | None = None, enforce_rate_limits: bool = True) -> None:
        self._state = common.State(seed=seed, enforce_rate_limits=enforce_rate_limits)
        self._runners: list[web.AppRunner] = []
        self._urls: dict[Venue, str] = {}
        self._admin_url: str | None = None
        self._phase = _Phase.UNOPENED

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", *, port_base: int = 0) -> None:
        """Serve every venue and the admin API on ``host``.

        ``port_base`` 0 picks free ports; otherwise the venues take ``port_base + 0..4`` (in ``Venue``
        order) and the admin API ``port_base + 5``.
        """
        if self._phase is not _Phase.UNOPENED:
            raise RuntimeError(f"simulator is {self._phase.value}; create a new one")
        self._phase = _Phase.OPENED
        try:
            for index, venue in enumerate(Venue):
                server = SERVERS[venue](self._state)
                port = port_base + index if port_base else 0
                self._urls[venue] = await self._serve(server.app(), host, port)
            admin_port = port_base + len(Venue) if port_base else 0
            self._admin_url = await self._serve(admin.AdminApi(self).app(), host, admin_port)
        except BaseException:
            await self.close()
            raise

    async def _serve(self, app: web.Application, host: str, port: int) -> str:
        # access_log=None: aiohttp's access log prints the request line, query string (signatures) included.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[-1][1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound_port}"

    async def close(self) -> None:
        """Stop serving. Idempotent; hanging ``timeout`` faults end at once."""
        if self._phase is _Phase.CLOSED:
            return
        self._phase = _Phase.CLOSED
        self._state.closing.set()
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def urls(self) -> dict[Venue, str]:
        """Base URL of each venue (give it to the probe as ``base_url``)."""
        if self._phase is not _Phase.OPENED:
            raise RuntimeError("simulator is not running")
        return dict(self._urls)

    @property
    def admin_url(self) -> str:
        if self._phase is not _Phase.OPENED or self._admin_url is None:
            raise RuntimeError("simulator is not running")
        return self._admin_url

    # -- accounts ---------------------------------------------------------------------------------

    def add_key(
        self,
        venue: Venue | str,
        *,
        uid: str | None = None,
        read: bool = True,
        trade: bool = True,
        withdraw: bool = False,
        identities: Iterable[str] | None = None,
        ip_allowlist: Iterable[str] = (),
        expires_at_ms: int | None = None,
        environment: str = "production",
        kind: str | None = None,
        label: str | None = None,
        transfer: bool = True,
    ) -> TestKey:
        """Register a new key with fresh key material in the venue's format.

        ``identities=None`` gives the venue's (kind's) full identity set; ``kind`` is COINBASE ``"cdp"``
        (default) / ``"cdp_ed25519"`` / ``"exchange"`` or KRAKEN ``"spot"`` (default) / ``"futures"``.
        Keys with the same ``uid`` belong to the same account; a key of a sub-account's uid is that sub-account's
        (its ``parent_uid`` is the master's). ``transfer``: Bybit's wallet transfer permissions (a Bybit master key
        needs them, or ``withdraw``, to manage sub-account keys).
        """
        chosen = _venue(venue)
        owner = self._state.sub_accounts.owner_of(chosen, str(uid)) if uid is not None else None
        return self._state.registry.add(
            chosen,
            uid=uid,
            read=read,
            trade=trade,
            withdraw=withdraw,
            identities=identities,
            ip_allowlist=ip_allowlist,
            expires_at_ms=expires_at_ms,
            environment=environment,
            kind=kind,
            label=label,
            transfer=transfer,
            parent_uid=owner.master_uid if owner is not None else None,
        )

    def remove_key(self, api_key: str) -> None:
        """Forget a key: the venue answers it as unknown from now on. KeyError if not registered."""
        self._state.registry.remove(api_key)

    def key_removed_at(self, api_key: str) -> float | None:
        """When a key was removed (deleted through a venue's API, by ``remove_key`` or with its sub-account), in
        wall-clock seconds (``time.time()``, the clock of :meth:`signed_requests`); None if it never was."""
        return self._state.registry.removed_at(api_key)

    def update_key(self, api_key: str, **changes: Any) -> TestKey:
        """Change a key's uid, permissions, identities, ip_allowlist, expires_at_ms, environment or label."""
        return self._state.registry.update(api_key, **changes)

    def list_keys(self) -> list[TestKey]:
        """Every registered key."""
        return self._state.registry.keys()

    def seed_demo_accounts(self) -> list[TestKey]:
        """Per venue: a good read+trade key reaching every identity, a second key of the same account
        (rotation), and a withdraw-enabled key; plus a Coinbase Exchange key and a Kraken Futures key."""
        made: list[TestKey] = []
        for venue in Venue:
            good = self.add_key(venue, label="demo-good")
            made.append(good)
            # A second key of the same account; Coinbase's is an Ed25519 CDP key to show both kinds.
            second_kind = "cdp_ed25519" if venue is Venue.COINBASE else None
            made.append(self.add_key(venue, uid=good.uid, kind=second_kind, label="demo-rotation"))
            made.append(self.add_key(venue, uid=good.uid, withdraw=True, label="demo-withdraw"))
        made.append(self.add_key(Venue.COINBASE, kind="exchange", label="demo-exchange"))
        made.append(self.add_key(Venue.KRAKEN, kind="futures", label="demo-futures"))
        return made

    # -- master accounts and sub-accounts (docs/venues.md §1.10, §2.10, §3.10) -----------------------------

    def add_master_account(
        self,
        venue: Venue | str,
        *,
        sub_accounts: int = 2,
        uid: str | None = None,
        read: bool = True,
        trade: bool = True,
        withdraw: bool = False,
        transfer: bool = True,
        ip_allowlist: Iterable[str] = ("127.0.0.1",),
        label: str | None = None,
    ) -> masters.MasterAccount:
        """A master account (Binance: a Binance Link broker master) with ``sub_accounts`` sub-accounts and a key.

        The defaults give a key that may manage sub-account keys on every venue: "trade" (Binance, OKX), an IP
        allow-list (OKX wants a master key linked to IPs; loopback here), transfer permissions (Bybit). Turn one
        off to get a master the venue refuses. ``uid`` reuses an account (another key of the same master).
        """
        chosen = _venue(venue)
        key = self._state.registry.add(
            chosen,
            uid=uid,
            read=read,
            trade=trade,
            withdraw=withdraw,
            transfer=transfer,
            ip_allowlist=ip_allowlist,
            label=label,
        )
        book = self._state.sub_accounts
        new = not book.is_master(chosen, key.uid)
        try:
            book.add_master(chosen, key.uid)
        except ValueError:
            self._state.registry.remove(key.api_key)
            raise
        if new:
            for index in range(max(0, int(sub_accounts))):
                book.add_sub(chosen, key.uid, label=f"sub{index + 1}")
        return masters.MasterAccount(key=key, sub_accounts=tuple(book.subs(chosen, key.uid)))

    def seed_demo_masters(self) -> list[masters.MasterAccount]:
        """Per venue with a sub-account key API (Binance Link, OKX, Bybit): a master with two sub-accounts and a
        key that may manage their keys (docs/venues.md §0.1)."""
        return [
            self.add_master_account(venue, sub_accounts=2, label="demo-master")
            for venue in masters.SubAccounts.VENUES
        ]

    def add_sub_account(self, venue: Venue | str, master_uid: str, *, label: str = "") -> masters.SubAccount:
        """One more sub-account for master ``master_uid`` (KeyError when that account is no master)."""
        return self._state.sub_accounts.add_sub(_venue(venue), str(master_uid), label=label)

    def sub_accounts(self, venue: Venue | str, master_uid: str) -> list[masters.SubAccount]:
        """The master's sub-accounts, oldest first."""
        return self._state.sub_accounts.subs(_venue(venue), str(master_uid))

    def sub_account_keys(
        self, venue: Venue | str, master_uid: str, sub_id: str | None = None
    ) -> list[TestKey]:
        """The live keys of the master's sub-accounts (of ``sub_id`` only, when given): the registry that
        reconciliation tests compare with. A deleted key is absent at once."""
        chosen = _venue(venue)
        book = self._state.sub_accounts
        uids = {
            sub.uid for sub in book.subs(chosen, str(master_uid)) if sub_id is None or sub.sub_id == sub_id
        }
        live = self._state.registry.keys()
        return [key for key in live if key.venue is chosen and key.uid in uids]

    # -- behaviour --------------------------------------------------------------------------------

    def set_clock_offset(self, venue: Venue | str, offset_ms: int) -> None:
        """Shift the venue's clock (its time endpoint and its timestamp checks) by ``offset_ms``."""
        self._state.clock_offsets[_venue(venue)] = int(offset_ms)

    def set_faults(self, venue: Venue | str, settings: faults.Faults) -> None:
        self._state.faults[_venue(venue)] = settings

    def clear_faults(self, venue: Venue | str | None = None) -> None:
        """Remove injected faults of ``venue``, or of every venue."""
        if venue is None:
            self._state.faults.clear()
        else:
            self._state.faults.pop(_venue(venue), None)

    def stats(self, venue: Venue | str) -> stats.VenueStats:
        return self._state.stats[_venue(venue)].snapshot()

    # -- trading and the signing log ----------------------------------------------------------------

    def signed_requests(
        self,
        venue: Venue | str | None = None,
        *,
        api_key: str | None = None,
        since: float | None = None,
        authenticated: bool | None = None,
    ) -> list[signlog.SignedRequest]:
        """Requests that claimed a key (oldest first), filtered by venue, key, arrival time
        (``since``: wall-clock seconds, ``time.time()``) and whether the venue authenticated them."""
        return self._state.signing_log.query(
            venue=_venue(venue) if venue is not None else None,
            api_key=api_key,
            since=since,
            authenticated=authenticated,
        )

    def clear_signed_requests(self) -> None:
        """Empty the signing log (e.g. between phases of a long run)."""
        self._state.signing_log.clear()

    def balances(self, venue: Venue | str, uid: str, wallet: str) -> dict[str, tuple[Decimal, Decimal]]:
        """``{asset: (free, locked)}`` of one account wallet (see :mod:`venues.simulator.trading`)."""
        return self._state.book.balances((_venue(venue), str(uid), wallet))

    def set_balance(self, venue: Venue | str, uid: str, wallet: str, asset: str, free: Decimal | str) -> None:
        """Set the free amount of ``asset`` in an account wallet (e.g. 0 to see an order refused)."""
        self._state.book.set_balance((_venue(venue), str(uid), wallet), asset, Decimal(str(free)))

    def orders(self, venue: Venue | str, uid: str, wallet: str) -> list[trading.Order]:
        """An account wallet's open orders and its latest cancelled ones, oldest first."""
        return self._state.book.orders((_venue(venue), str(uid), wallet))
