"""The simulator's admin HTTP API (JSON), so other processes can drive a running simulator.

==========================  ==========================================================================
``POST /keys``              body: ``Simulator.add_key``'s arguments (``venue`` required, lists for
                            ``identities``/``ip_allowlist``) -> 201 with the key material
                            (``api_key``, ``api_secret``, ``api_passphrase``, ``uid``, ``kind``, ...)
``GET /keys``               the registered keys, without secrets
``PATCH /keys/{api_key}``   body: fields to change (``Simulator.update_key``) -> the key, without secrets
``DELETE /keys/{api_key}``  -> 204
``PUT /faults/{venue}``     body: ``Faults`` fields -> the faults now in force
``DELETE /faults``          clears every venue's faults (``DELETE /faults/{venue}``: one venue) -> 204
``PUT /clock/{venue}``      body ``{"offset_ms": int}`` -> 204
``GET /stats``              ``{venue: stats}`` (``?venue=BINANCE`` for one)
``GET /urls``               ``{"venues": {venue: url}, "admin": url}``
``GET /requests``           the signing log: ``[{venue, api_key, method, path, at, status,
                            authenticated}]``; filters ``?venue=&api_key=&since=`` (seconds)
``DELETE /requests``        empties the signing log -> 204
``GET /balances/{venue}/{uid}/{wallet}``  ``{asset: {"free": str, "locked": str}}``
``PUT /balances/{venue}/{uid}/{wallet}``  body ``{"asset": "USDT", "free": "100"}`` -> the balances
``GET /orders/{venue}/{uid}/{wallet}``    the wallet's open orders and latest cancelled ones
``POST /masters``           body: ``Simulator.add_master_account``'s arguments (``venue`` required,
                            ``sub_accounts`` a count) -> 201 ``{"key": {... with secrets},
                            "sub_accounts": [{"sub_id", "uid", "label", ...}]}``
``GET /masters/{venue}/{uid}/sub-accounts``  the master's sub-accounts, each with ``keys``: its live
                            keys without secrets (the registry reconciliation compares with)
``POST /masters/{venue}/{uid}/sub-accounts``  body ``{"label": str}`` (optional) -> 201, the new sub-account
==========================  ==========================================================================

``{api_key}`` is the key, URL-encoded. Coinbase CDP key names contain ``/``: send them percent-encoded
(``organizations%2F...``) or as they are; the route takes the rest of the path either way. Errors answer
``{"error": "..."}`` with 400 (bad input) or 404 (unknown key or venue). The admin API has no
authentication: it listens on the simulator's host (loopback by default) and hands out test keys only.

The routes drive any object with the :class:`SimulatorControls` methods (the :class:`~venues.simulator.Simulator`
is one); this module never imports the server, which builds the admin app from itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol
from urllib.parse import unquote

from aiohttp import web

from venues.base import Venue
from venues.simulator import common, faults, masters, signlog, trading
from venues.simulator.registry import TestKey
from venues.simulator.stats import VenueStats

ADD_KEY_FIELDS = frozenset(
    {
        "uid",
        "read",
        "trade",
        "withdraw",
        "identities",
        "ip_allowlist",
        "expires_at_ms",
        "environment",
        "kind",
        "label",
        "transfer",
    }
)
ADD_MASTER_FIELDS = frozenset(
    {"sub_accounts", "uid", "read", "trade", "withdraw", "transfer", "ip_allowlist", "label"}
)


class SimulatorControls(Protocol):
    """What the admin routes call: the simulator's Python API, as far as the routes use it."""

    @property
    def urls(self) -> Mapping[Venue, str]: ...

    @property
    def admin_url(self) -> str: ...

    def add_key(
        self,
        venue: Venue,
        *,
        uid: str | None = ...,
        read: bool = ...,
        trade: bool = ...,
        withdraw: bool = ...,
        identities: Iterable[str] | None = ...,
        ip_allowlist: Iterable[str] = ...,
        expires_at_ms: int | None = ...,
        environment: str = ...,
        kind: str | None = ...,
        label: str | None = ...,
        transfer: bool = ...,
    ) -> TestKey: ...

    def add_master_account(
        self,
        venue: Venue,
        *,
        sub_accounts: int = ...,
        uid: str | None = ...,
        read: bool = ...,
        trade: bool = ...,
        withdraw: bool = ...,
        transfer: bool = ...,
        ip_allowlist: Iterable[str] = ...,
        label: str | None = ...,
    ) -> masters.MasterAccount: ...

    def add_sub_account(self, venue: Venue, master_uid: str, *, label: str = ...) -> masters.SubAccount: ...

    def sub_accounts(self, venue: Venue, master_uid: str) -> list[masters.SubAccount]: ...

    def sub_account_keys(self, venue: Venue, master_uid: str, sub_id: str | None = ...) -> list[TestKey]: ...

    def list_keys(self) -> list[TestKey]: ...

    def update_key(self, api_key: str, **changes: Any) -> TestKey: ...

    def remove_key(self, api_key: str) -> None: ...

    def set_faults(self, venue: Venue, settings: faults.Faults) -> None: ...

    def clear_faults(self, venue: Venue | None = None) -> None: ...

    def set_clock_offset(self, venue: Venue, offset_ms: int) -> None: ...

    def stats(self, venue: Venue) -> VenueStats: ...

    def signed_requests(
        self,
        venue: Venue | None = None,
        *,
        api_key: str | None = None,
        since: float | None = None,
        authenticated: bool | None = None,
    ) -> list[signlog.SignedRequest]: ...

    def clear_signed_requests(self) -> None: ...

    def balances(self, venue: Venue, uid: str, wallet: str) -> dict[str, tuple[Decimal, Decimal]]: ...

    def set_balance(self, venue: Venue, uid: str, wallet: str, asset: str, free: Decimal | str) -> None: ...

    def orders(self, venue: Venue, uid: str, wallet: str) -> list[trading.Order]: ...


def _error(message: str, status: int) -> web.Response:
    return common.answer({"error": message}, status)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json(loads=json.loads)
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error":"body must be JSON"}', content_type="application/json"
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text='{"error":"body must be a JSON object"}', content_type="application/json"
        )
    return data


def _venue(text: str) -> Venue:
    try:
        return Venue(text.upper())
    except ValueError:
        raise web.HTTPNotFound(text='{"error":"unknown venue"}', content_type="application/json") from None


class AdminApi:
    """Routes of the admin port; every call goes through the simulator's Python API (:class:`SimulatorControls`)."""

    def __init__(self, simulator: SimulatorControls) -> None:
        self.sim = simulator

    def app(self) -> web.Application:
        application = web.Application()
        application.add_routes(
            [
                web.post("/keys", self.add_key),
                web.get("/keys", self.list_keys),
                web.patch("/keys/{api_key:.+}", self.update_key),
                web.delete("/keys/{api_key:.+}", self.remove_key),
                web.put("/faults/{venue}", self.set_faults),
                web.delete("/faults", self.clear_faults),
                web.delete("/faults/{venue}", self.clear_faults),
                web.put("/clock/{venue}", self.set_clock),
                web.get("/stats", self.stats),
                web.get("/urls", self.urls),
                web.get("/requests", self.requests),
                web.delete("/requests", self.clear_requests),
                web.get("/balances/{venue}/{uid}/{wallet}", self.balances),
                web.put("/balances/{venue}/{uid}/{wallet}", self.set_balance),
                web.get("/orders/{venue}/{uid}/{wallet}", self.orders),
                web.post("/masters", self.add_master),
                web.get("/masters/{venue}/{uid}/sub-accounts", self.list_sub_accounts),
                web.post("/masters/{venue}/{uid}/sub-accounts", self.add_sub_account),
            ]
        )
        return application

    async def add_key(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        if "venue" not in data:
            return _error("venue is required", 400)
        venue = _venue(str(data.pop("venue")))
        unknown = set(data) - ADD_KEY_FIELDS
        if unknown:
            return _error(f"unknown fields {sorted(unknown)}", 400)
        try:
            key = self.sim.add_key(venue, **data)
        except (TypeError, ValueError) as exc:
            return _error(str(exc), 400)
        return common.answer(key.as_dict(secrets=True), 201)

    async def list_keys(self, request: web.Request) -> web.Response:
        return common.answer([key.as_dict(secrets=False) for key in self.sim.list_keys()])

    def _api_key(self, request: web.Request) -> str:
        return unquote(request.match_info["api_key"])

    async def update_key(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        try:
            key = self.sim.update_key(self._api_key(request), **data)
        except KeyError:
            return _error("unknown key", 404)
        except (TypeError, ValueError) as exc:
            return _error(str(exc), 400)
        return common.answer(key.as_dict(secrets=False))

    async def remove_key(self, request: web.Request) -> web.Response:
        try:
            self.sim.remove_key(self._api_key(request))
        except KeyError:
            return _error("unknown key", 404)
        return web.Response(status=204)

    async def set_faults(self, request: web.Request) -> web.Response:
        venue = _venue(request.match_info["venue"])
        data = await _json_object(request)
        try:
            settings = faults.Faults.from_dict(data)
        except (TypeError, ValueError) as exc:
            return _error(str(exc), 400)
        self.sim.set_faults(venue, settings)
        return common.answer(settings.as_dict())

    async def clear_faults(self, request: web.Request) -> web.Response:
        name = request.match_info.get("venue")
        self.sim.clear_faults(_venue(name) if name else None)
        return web.Response(status=204)

    async def set_clock(self, request: web.Request) -> web.Response:
        venue = _venue(request.match_info["venue"])
        data = await _json_object(request)
        try:
            offset = int(data["offset_ms"])
        except (KeyError, TypeError, ValueError):
            return _error("offset_ms (an integer) is required", 400)
        self.sim.set_clock_offset(venue, offset)
        return web.Response(status=204)

    async def stats(self, request: web.Request) -> web.Response:
        name = request.query.get("venue")
        venues = [_venue(name)] if name else list(Venue)
        return common.answer({venue.value: self.sim.stats(venue).as_dict() for venue in venues})

    async def urls(self, request: web.Request) -> web.Response:
        return common.answer(
            {
                "venues": {venue.value: url for venue, url in self.sim.urls.items()},
                "admin": self.sim.admin_url,
            }
        )

    async def requests(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            since = float(query["since"]) if "since" in query else None
        except ValueError:
            return _error("since must be a number of seconds", 400)
        venue = _venue(query["venue"]) if "venue" in query else None
        entries = self.sim.signed_requests(venue, api_key=query.get("api_key"), since=since)
        return common.answer([entry.as_dict() for entry in entries])

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.sim.clear_signed_requests()
        return web.Response(status=204)

    def _balances(self, venue: Venue, uid: str, wallet: str) -> web.Response:
        held = self.sim.balances(venue, uid, wallet)
        return common.answer({a: {"free": str(f), "locked": str(lk)} for a, (f, lk) in held.items()})

    async def balances(self, request: web.Request) -> web.Response:
        info = request.match_info
        return self._balances(_venue(info["venue"]), info["uid"], info["wallet"])

    async def set_balance(self, request: web.Request) -> web.Response:
        info = request.match_info
        venue = _venue(info["venue"])
        data = await _json_object(request)
        asset, free = data.get("asset"), data.get("free")
        if not isinstance(asset, str) or not asset:
            return _error("asset (a currency code) is required", 400)
        try:
            amount = Decimal(str(free))
        except (InvalidOperation, ValueError):
            return _error("free must be a decimal amount", 400)
        try:
            self.sim.set_balance(venue, info["uid"], info["wallet"], asset, amount)
        except ValueError as exc:
            return _error(str(exc), 400)
        return self._balances(venue, info["uid"], info["wallet"])

    async def orders(self, request: web.Request) -> web.Response:
        info = request.match_info
        orders = self.sim.orders(_venue(info["venue"]), info["uid"], info["wallet"])
        return common.answer([order.as_dict() for order in orders])

    async def add_master(self, request: web.Request) -> web.Response:
        data = await _json_object(request)
        if "venue" not in data:
            return _error("venue is required", 400)
        venue = _venue(str(data.pop("venue")))
        unknown = set(data) - ADD_MASTER_FIELDS
        if unknown:
            return _error(f"unknown fields {sorted(unknown)}", 400)
        try:
            made = self.sim.add_master_account(venue, **data)
        except (TypeError, ValueError) as exc:
            return _error(str(exc), 400)
        return common.answer(made.as_dict(secrets=True), 201)

    async def list_sub_accounts(self, request: web.Request) -> web.Response:
        venue = _venue(request.match_info["venue"])
        uid = request.match_info["uid"]
        rows = []
        for sub in self.sim.sub_accounts(venue, uid):
            keys = self.sim.sub_account_keys(venue, uid, sub.sub_id)
            rows.append(sub.as_dict() | {"keys": [key.as_dict(secrets=False) for key in keys]})
        return common.answer(rows)

    async def add_sub_account(self, request: web.Request) -> web.Response:
        venue = _venue(request.match_info["venue"])
        data = await _json_object(request) if request.can_read_body else {}
        label = data.get("label", "")
        if not isinstance(label, str):
            return _error("label must be a string", 400)
        try:
            sub = self.sim.add_sub_account(venue, request.match_info["uid"], label=label)
        except KeyError:
            return _error("unknown master account", 404)
        return common.answer(sub.as_dict(), 201)
