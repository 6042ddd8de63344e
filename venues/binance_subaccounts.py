"""Binance sub-account API keys through a Binance Link (broker) master key (docs/venues.md §1.10).

``GET /sapi/v1/broker/subAccount`` lists the master's sub-accounts (``subaccountId``), ``POST
/sapi/v1/broker/subAccountApi`` creates a key (``canTrade``, ``marginTrade``, ``futuresTrade``), ``GET`` of the
same path lists a sub-account's keys and ``DELETE`` deletes one. Signing (HMAC-SHA256 of the query string),
error mapping and clock resync are the probe's (:mod:`venues.binance`). The master key needs its "trade" option
and the account must be a Binance Link broker master; :meth:`BinanceSubAccountKeys.can_manage_keys` checks both
with two cheap reads.

Limits of this API, which the engine must know (docs/venues.md §1.10): the create call takes no label and no IP
list, so a grant with an IP allow-list takes a second call (``POST /sapi/v2/broker/subAccountApi/ipRestriction``);
when that fails the new key is deleted, and when the delete fails too :class:`~venues.subaccounts.KeyLeftBehind`
carries its id. The key listing shows each key masked (``vmP*************``):
:class:`~venues.subaccounts.SubKeyInfo` marks it ``masked`` and :meth:`~venues.subaccounts.SubKeyInfo.matches`
compares it with a recorded key, but a key the engine never recorded cannot be deleted through this API (its
full id is unknown).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from venues import base, binance, http, limits
from venues.subaccounts import GrantProblem, KeyGrant, KeyLeftBehind, MintedKey, SubAccount, SubKeyInfo

SUB_ACCOUNT_PATH = "/sapi/v1/broker/subAccount"
SUB_ACCOUNT_API_PATH = "/sapi/v1/broker/subAccountApi"
IP_RESTRICTION_PATH = "/sapi/v2/broker/subAccountApi/ipRestriction"
CREATE_WEIGHT = 8.0  # IP weight of the create call (docs/venues.md §1.10); the others are undocumented: 1
PAGE_SIZE = 500  # subAccountApi: size default and maximum
MAX_PAGES = 20
# the most requests list_sub_accounts and can_manage_keys make one after another (venues.subaccounts): every
# page, then two more; each may be resynced and sent again
DISCOVERY_REQUESTS = 3 * (MAX_PAGES + 2)
# Codes met on these endpoints, where they mean something else than on the probe's (docs/venues.md §1.10)
_CODES: dict[str, tuple[base.Outcome, str]] = {
    "-1002": (base.Outcome.PERMISSION_DENIED, "not authorized: not a Binance Link master key with 'trade'"),
    "-1130": (base.Outcome.PERMISSION_DENIED, "the sub-account is not one of this master's"),
    "-2008": (base.Outcome.PERMISSION_DENIED, "the sub-account has no such API key"),
}
KEY_GONE = "-2008"
CREATE_PER_SUB = "create per sub-account"


def classify(reply: http.Reply) -> base.ProbeFailure | None:
    """The failure an answer of these endpoints means (their codes first, then the probe's table)."""
    failure = binance.classify(reply)
    if (
        failure is not None
        and failure.venue_code in _CODES
        and failure.outcome is not base.Outcome.RATE_LIMITED
    ):
        outcome, meaning = _CODES[failure.venue_code]
        return base.ProbeFailure(
            outcome, f"Binance {failure.venue_code}: {meaning}", venue_code=failure.venue_code
        )
    return failure


def grant_params(sub_id: str, grant: KeyGrant) -> list[tuple[str, str]]:
    """The create call's parameters; :class:`GrantProblem` for a grant Binance Link cannot take."""
    if not grant.read:
        raise GrantProblem("read", "Binance keys always read")
    for entry in grant.ip_allowlist:
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            raise GrantProblem(
                "ipAllowlist", "Binance binds single IP addresses to a key, not ranges"
            ) from None
    flag = "true" if grant.trade else "false"
    # least privilege: spot trading only; margin and futures stay off (the sub-account may not even have them)
    return [("subAccountId", sub_id), ("canTrade", flag), ("marginTrade", "false"), ("futuresTrade", "false")]


def key_info(row: Mapping[str, Any]) -> SubKeyInfo:
    """One row of the key listing; ValueError if malformed."""
    api_key = row.get("apikey", row.get("apiKey"))
    if not isinstance(api_key, str) or not api_key:
        raise ValueError("subAccountApi row without apikey")
    return SubKeyInfo(
        key_id=api_key,
        read=True,
        trade=any(row.get(flag) is True for flag in ("canTrade", "marginTrade", "futuresTrade")),
        masked="*" in api_key,
    )


class BinanceSubAccountKeys(http.VenueProbe):
    """Mints, lists and deletes Binance Link sub-account keys through a broker master key."""

    venue: ClassVar[base.Venue] = base.Venue.BINANCE
    default_urls: ClassVar[Mapping[str, str]] = {"api": "https://api.binance.com"}
    rate_per_second: ClassVar[float] = 50.0
    burst: ClassVar[float | None] = 60.0
    ip_budgets: ClassVar[Mapping[str, limits.IpBudget]] = {
        "/sapi/": limits.IpBudget("binance:sapi", 12000, 60.0)
    }
    # "You can only create 1 api key for each sub account per second": create_key waits on this window per
    # (master key, sub-account); it is no request path, so no other call draws on it
    key_windows: ClassVar[Mapping[str, tuple[int, float]]] = {CREATE_PER_SUB: (1, 1.0)}

    async def can_manage_keys(self, master: base.ApiKeys) -> bool:
        """The key's "trade" option (``apiRestrictions``) and a broker master's sub-account listing."""
        reply = await self._request(master, "GET", binance.RESTRICTIONS_PATH)
        try:
            permissions = binance.permissions_from_restrictions(reply.body)
        except (TypeError, ValueError):
            raise self.malformed(reply) from None
        if not permissions.trade:
            return False
        try:
            await self._request(master, "GET", SUB_ACCOUNT_PATH, [("page", "1"), ("size", "1")])
        except base.ProbeFailure as failure:
            if failure.outcome is base.Outcome.PERMISSION_DENIED:
                base.release_frames(failure)  # dropped: its frames hold the master's keys
                return False
            raise
        return True

    async def list_sub_accounts(self, master: base.ApiKeys) -> tuple[SubAccount, ...]:
        found: list[SubAccount] = []
        for page in range(1, MAX_PAGES + 1):
            params = [("page", str(page)), ("size", str(PAGE_SIZE))]
            reply = await self._request(master, "GET", SUB_ACCOUNT_PATH, params)
            rows = self._rows(reply)
            try:
                found.extend(
                    SubAccount(sub_id=str(r["subaccountId"]), label=str(r.get("tag", "") or "")) for r in rows
                )
            except KeyError:
                raise self.malformed(reply) from None
            if len(rows) < PAGE_SIZE:
                break
        return tuple(dict.fromkeys(found))

    async def create_key(self, master: base.ApiKeys, sub_id: str, grant: KeyGrant) -> MintedKey:
        _check_sub_id(sub_id)
        params = grant_params(sub_id, grant)
        # the sub-account's own window: its place taken when the request leaves, with the IP budget (throttle)
        per_sub = (f"{sub_id}\x00{master.api_key}", CREATE_PER_SUB, *self.key_windows[CREATE_PER_SUB])
        reply = await self._request(
            master, "POST", SUB_ACCOUNT_API_PATH, params, cost=CREATE_WEIGHT, windows=(per_sub,)
        )
        body = reply.body
        api_key = body.get("apiKey") if isinstance(body, dict) else None
        secret = body.get("secretKey") if isinstance(body, dict) else None
        if not isinstance(api_key, str) or not api_key or not isinstance(secret, str) or not secret:
            raise self.malformed(reply)
        if grant.ip_allowlist:
            await self._bind_ips(master, sub_id, api_key, grant.ip_allowlist)
        info = SubKeyInfo(
            key_id=api_key, read=True, trade=body.get("canTrade") is True, ip_allowlist=grant.ip_allowlist
        )
        return MintedKey(sub_id=sub_id, info=info, keys=base.ApiKeys(api_key, secret))

    async def _bind_ips(self, master: base.ApiKeys, sub_id: str, api_key: str, ips: Sequence[str]) -> None:
        """The second step of a create with an IP list; on failure delete the new key (never leave an unbound
        key behind silently: Binance lists keys masked, so it could not be found again)."""
        params = [
            ("subAccountId", sub_id),
            ("subAccountApiKey", api_key),
            ("status", "2"),
            ("ipAddress", ",".join(ips)),
        ]
        try:
            await self._request(master, "POST", IP_RESTRICTION_PATH, params)
        except base.ProbeFailure as failure:
            try:
                await self.delete_key(master, sub_id, api_key)
            except base.ProbeFailure:
                raise KeyLeftBehind(
                    failure.outcome,
                    f"Binance did not bind the IP list to the new key ({failure.message}) and it could not be deleted",
                    sub_id=sub_id,
                    key_id=api_key,
                ) from None
            raise

    async def list_keys(self, master: base.ApiKeys, sub_id: str) -> tuple[SubKeyInfo, ...]:
        _check_sub_id(sub_id)
        found: list[SubKeyInfo] = []
        for page in range(1, MAX_PAGES + 1):
            params = [("subAccountId", sub_id), ("page", str(page)), ("size", str(PAGE_SIZE))]
            reply = await self._request(master, "GET", SUB_ACCOUNT_API_PATH, params)
            rows = self._rows(reply)
            try:
                found.extend(key_info(row) for row in rows)
            except ValueError:
                raise self.malformed(reply) from None
            if len(rows) < PAGE_SIZE:
                break
        return tuple(found)

    async def delete_key(self, master: base.ApiKeys, sub_id: str, key_id: str) -> bool:
        _check_sub_id(sub_id)
        if "*" in key_id:
            raise GrantProblem(
                "keyId", "a masked key (as Binance lists it) cannot be deleted by its masked form"
            )
        params = [("subAccountId", sub_id), ("subAccountApiKey", key_id)]
        try:
            await self._request(master, "DELETE", SUB_ACCOUNT_API_PATH, params)
        except base.ProbeFailure as failure:
            if failure.venue_code == KEY_GONE:
                base.release_frames(failure)  # dropped: its frames hold the master's keys
                return False
            raise
        return True

    def _rows(self, reply: http.Reply) -> list[Mapping[str, Any]]:
        rows = reply.body
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise self.malformed(reply)
        return rows

    async def _request(
        self,
        keys: base.ApiKeys,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        cost: float = 1.0,
        windows: Sequence[tuple[str, str, int, float]] = (),
    ) -> http.Reply:
        """One signed request (parameters in the query string); one retry after a clock resync. ``windows``:
        per-key windows of this call beside the IP budget (:meth:`http.VenueProbe.throttle`)."""
        seen = self.clock_generation
        reply = await self._send(keys, method, path, params, cost, windows)
        failure = classify(reply)
        if failure is not None and failure.outcome is base.Outcome.CLOCK_SKEW:
            await self.resync_clock(self.url("api", binance.TIME_PATHS["api"]), self._server_ms, seen=seen)
            reply = await self._send(keys, method, path, params, cost, windows)
            failure = classify(reply)
        if failure is not None:
            raise failure
        return reply

    async def _send(
        self,
        keys: base.ApiKeys,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]],
        cost: float,
        windows: Sequence[tuple[str, str, int, float]] = (),
    ) -> http.Reply:
        # per IP (docs/venues.md §1.6), and the call's windows; wait first, then stamp
        await self.throttle(None, cost, path=path, windows=windows)
        query = binance.signed_query(keys.api_secret, self.now_ms(), params)
        headers = {"X-MBX-APIKEY": keys.api_key}
        return await self._call(method, f"{self.url('api', path)}?{query}", headers=headers, limit=False)

    def _server_ms(self, reply: http.Reply) -> float:
        failure = binance.classify(reply)
        if failure is not None:
            raise failure
        server_ms = reply.body.get("serverTime") if isinstance(reply.body, dict) else None
        if isinstance(server_ms, bool) or not isinstance(server_ms, int):
            raise self.malformed(reply)
        return float(server_ms)


def _check_sub_id(sub_id: str) -> None:
    """Binance Link names a sub-account by its numeric ``subaccountId``."""
    if not (sub_id.isascii() and sub_id.isdigit() and len(sub_id) <= 32):
        raise GrantProblem("subAccount", "a Binance Link sub-account is named by its numeric subaccountId")
