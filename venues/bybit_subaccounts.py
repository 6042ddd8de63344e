"""Bybit sub-account API keys through a master key (docs/venues.md §3.10).

``GET /v5/user/query-sub-members`` lists the sub UIDs, ``POST /v5/user/create-sub-api`` creates a key,
``GET /v5/user/sub-apikeys`` lists a sub UID's keys (20 a page, with a cursor) and ``POST
/v5/user/delete-sub-api`` deletes one: the master names it in ``apikey``, so every call here needs only the
master key (the sub-account key could delete itself too; the engine never needs that). Signing, error mapping
and clock resync are the probe's (:mod:`venues.bybit`). The master key needs "Account Transfer", "Subaccount
Transfer" or "Withdrawal"; :meth:`BybitSubAccountKeys.can_manage_keys` reads them from ``query-api``.

A key bound to no IP expires after 90 days (docs/venues.md §3.7): the listing's ``expiredAt`` becomes
``SubKeyInfo.expires_at_ms``, which the engine's rotation policy schedules against.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urlencode

from venues import base, bybit, http, limits
from venues.subaccounts import GrantProblem, KeyGrant, MintedKey, SubAccount, SubKeyInfo

QUERY_SUB_MEMBERS_PATH = "/v5/user/query-sub-members"
CREATE_SUB_API_PATH = "/v5/user/create-sub-api"
SUB_APIKEYS_PATH = "/v5/user/sub-apikeys"
DELETE_SUB_API_PATH = "/v5/user/delete-sub-api"
PAGE = 20  # sub-apikeys: limit 1..20
MAX_PAGES = 50  # 1000 keys: a bound on one listing (a sub UID has far fewer)
# the most requests list_sub_accounts and can_manage_keys make one after another (venues.subaccounts): one
# each; each may be resynced and sent again
DISCOVERY_REQUESTS = 3 * 2
MASTER_PERMISSIONS = ("AccountTransfer", "SubMemberTransfer", "Withdraw")  # query-api's Wallet names
# What a trading key gets: every trading group, never a Wallet permission (no transfer, no withdrawal)
TRADE_PERMISSIONS: Mapping[str, list[str]] = {
    "ContractTrade": ["Order", "Position"],
    "Spot": ["SpotTrade"],
    "Options": ["OptionsTrade"],
    "Derivatives": ["DerivativesTrade"],
}


def grant_body(sub_id: str, grant: KeyGrant) -> dict[str, Any]:
    """The create call's JSON body; :class:`GrantProblem` for a grant Bybit cannot take."""
    if not grant.read:
        raise GrantProblem("read", "Bybit keys always read")
    body: dict[str, Any] = {
        "subuid": int(sub_id),
        "note": grant.label,
        "readOnly": 0 if grant.trade else 1,
        "permissions": dict(TRADE_PERMISSIONS) if grant.trade else {"ContractTrade": [], "Spot": []},
    }
    if grant.ip_allowlist:
        body["ips"] = ",".join(grant.ip_allowlist)
    return body


def _ms(text: object) -> int | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = int(moment.timestamp() * 1000)
    return ms if ms > 0 else None  # "1970-01-01T00:00:00Z": no expiry (an IP-bound key)


def key_info(row: Mapping[str, Any]) -> SubKeyInfo:
    """One sub-apikeys row as :class:`SubKeyInfo`. Trading is read from ``permissions`` (the listing's
    ``readOnly`` boolean is documented backwards, docs/venues.md §3.10); ValueError if malformed."""
    api_key, groups = row.get("apiKey"), row.get("permissions")
    if not isinstance(api_key, str) or not api_key or not isinstance(groups, dict):
        raise ValueError("sub-apikeys row without apiKey/permissions")
    ips = [ip for ip in row.get("ips") or [] if isinstance(ip, str) and ip.strip() not in ("", "*")]
    wallet = groups.get("Wallet") or []
    return SubKeyInfo(
        key_id=api_key,
        label=str(row.get("note", "") or ""),
        read=True,
        trade=any(groups.get(group) for group in bybit.TRADE_GROUPS),
        withdraw="Withdraw" in wallet,
        ip_allowlist=tuple(ips),
        created_at_ms=_ms(row.get("createdAt")),
        expires_at_ms=_ms(row.get("expiredAt")),
    )


class BybitSubAccountKeys(http.VenueProbe):
    """Mints, lists and deletes Bybit sub-account keys through a master key."""

    venue: ClassVar[base.Venue] = base.Venue.BYBIT
    default_urls: ClassVar[Mapping[str, str]] = {"rest": "https://api.bybit.com"}
    rate_per_second: ClassVar[float] = 60.0
    burst: ClassVar[float | None] = 60.0
    ip_budgets: ClassVar[Mapping[str, limits.IpBudget]] = {"/": limits.IpBudget("bybit", 600, 5.0)}
    # Bybit documents no per-UID limit for these endpoints that we found; 5 a second each is our own caution
    key_windows: ClassVar[Mapping[str, tuple[int, float]]] = {
        QUERY_SUB_MEMBERS_PATH: (5, 1.0),
        CREATE_SUB_API_PATH: (5, 1.0),
        SUB_APIKEYS_PATH: (5, 1.0),
        DELETE_SUB_API_PATH: (5, 1.0),
        bybit.QUERY_API_PATH: (10, 1.0),
    }

    async def can_manage_keys(self, master: base.ApiKeys) -> bool:
        """``query-api``: a master key (``isMaster``) with a transfer or withdrawal permission."""
        reply = await self._request(master, "GET", bybit.QUERY_API_PATH)
        info = reply.body["result"]
        wallet = (info.get("permissions") or {}).get("Wallet") if isinstance(info, dict) else None
        if not isinstance(wallet, list) or not isinstance(info.get("isMaster"), bool):
            raise self.malformed(reply)
        return info["isMaster"] and any(p in wallet for p in MASTER_PERMISSIONS)

    async def list_sub_accounts(self, master: base.ApiKeys) -> tuple[SubAccount, ...]:
        reply = await self._request(master, "GET", QUERY_SUB_MEMBERS_PATH)
        members = reply.body["result"].get("subMembers")
        try:
            if not isinstance(members, list):
                raise TypeError("subMembers")
            return tuple(
                SubAccount(sub_id=str(m["uid"]), label=str(m.get("username", "") or "")) for m in members
            )
        except (KeyError, TypeError):
            raise self.malformed(reply) from None

    async def create_key(self, master: base.ApiKeys, sub_id: str, grant: KeyGrant) -> MintedKey:
        _check_sub_id(sub_id)
        body = json.dumps(grant_body(sub_id, grant), separators=(",", ":"))
        reply = await self._request(master, "POST", CREATE_SUB_API_PATH, body)
        result = reply.body["result"]
        api_key, secret = result.get("apiKey"), result.get("secret")
        if not isinstance(api_key, str) or not api_key or not isinstance(secret, str) or not secret:
            raise self.malformed(reply)
        info = SubKeyInfo(
            key_id=api_key,
            label=str(result.get("note", "") or ""),
            read=True,
            trade=grant.trade,
            ip_allowlist=grant.ip_allowlist,
        )
        return MintedKey(sub_id=sub_id, info=info, keys=base.ApiKeys(api_key, secret))

    async def list_keys(self, master: base.ApiKeys, sub_id: str) -> tuple[SubKeyInfo, ...]:
        _check_sub_id(sub_id)
        found: list[SubKeyInfo] = []
        cursor = ""
        for _ in range(MAX_PAGES):
            query = {"subMemberId": sub_id, "limit": str(PAGE)} | ({"cursor": cursor} if cursor else {})
            reply = await self._request(master, "GET", SUB_APIKEYS_PATH, urlencode(query))
            result = reply.body["result"]
            rows = result.get("result")
            try:
                if not isinstance(rows, list):
                    raise TypeError("result")
                found.extend(key_info(row) for row in rows)
            except (TypeError, ValueError):
                raise self.malformed(reply) from None
            cursor = str(result.get("nextPageCursor") or "")
            if not cursor or not rows:
                return tuple(found)
        raise base.ProbeFailure(base.Outcome.SERVER_ERROR, f"Bybit listed more than {PAGE * MAX_PAGES} keys")

    async def delete_key(self, master: base.ApiKeys, sub_id: str, key_id: str) -> bool:
        _check_sub_id(sub_id)
        body = json.dumps({"apikey": key_id}, separators=(",", ":"))
        try:
            await self._request(master, "POST", DELETE_SUB_API_PATH, body)
        except base.ProbeFailure as failure:
            if failure.outcome in _RETRY_FIRST:
                raise
            # Bybit documents no "no such key" answer: the listing decides (a key it no longer has is deleted)
            if any(info.matches(key_id) for info in await self.list_keys(master, sub_id)):
                raise
            base.release_frames(failure)  # dropped: its frames hold the master's keys
            return False
        return True

    async def _request(self, keys: base.ApiKeys, method: str, path: str, payload: str = "") -> http.Reply:
        """One signed request (GET: ``payload`` is the query; POST: the JSON body); one retry after a resync."""
        seen = self.clock_generation
        reply = await self._send(keys, method, path, payload)
        failure = bybit.classify(reply)
        if failure is not None and failure.outcome is base.Outcome.CLOCK_SKEW:
            await self.resync_clock(self.url("rest", bybit.TIME_PATH), self._server_ms, seen=seen)
            reply = await self._send(keys, method, path, payload)
            failure = bybit.classify(reply)
        if failure is not None:
            raise failure
        return reply

    async def _send(self, keys: base.ApiKeys, method: str, path: str, payload: str) -> http.Reply:
        await self.throttle(keys.api_key, path=path)  # wait first, then stamp
        headers = bybit.auth_headers(keys, self.now_ms(), payload)
        if method == "GET":
            url = self.url("rest", path) + (f"?{payload}" if payload else "")
            return await self._call("GET", url, headers=headers, limit=False)
        headers["Content-Type"] = "application/json"
        return await self._call(method, self.url("rest", path), headers=headers, data=payload, limit=False)

    def _server_ms(self, reply: http.Reply) -> float:
        failure = bybit.classify(reply)
        if failure is not None:
            raise failure
        try:
            nanos = reply.body["result"].get("timeNano")
            return float(int(nanos) // 1_000_000 if nanos else int(reply.body["time"]))
        except (KeyError, TypeError, ValueError):
            raise self.malformed(reply) from None


_RETRY_FIRST = frozenset(
    {base.Outcome.TIMEOUT, base.Outcome.NETWORK, base.Outcome.RATE_LIMITED, base.Outcome.MAINTENANCE}
)


def _check_sub_id(sub_id: str) -> None:
    """Bybit names a sub-account by its numeric UID."""
    if not (sub_id.isascii() and sub_id.isdigit() and len(sub_id) <= 20):
        raise GrantProblem("subAccount", "a Bybit sub-account is named by its numeric UID")
