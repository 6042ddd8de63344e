"""Bybit V5's sub-account API key endpoints (docs/venues.md §3.10).

``GET /v5/user/query-sub-members`` (the master's sub UIDs), ``POST /v5/user/create-sub-api`` (a key for a sub
UID: ``subuid``, ``note``, ``readOnly``, ``ips``, ``permissions``), ``GET /v5/user/sub-apikeys`` (a sub UID's
keys, ``limit`` 1-20 per page with a ``cursor``) and ``POST /v5/user/delete-sub-api`` (``apikey``: the master
names the key; a sub-account key calling without ``apikey`` deletes itself). Signed like every private endpoint
(docs/venues.md §3.2); retCodes come with HTTP 200.

Who may call them (documented): query-sub-members and create-sub-api need a master key with "Account Transfer",
"Subaccount Transfer" or "Withdrawal"; sub-apikeys a master key with any permission; delete-sub-api a master key
with one of those three, or the sub-account key itself with a transfer permission. A key that does not qualify
answers 10005 "Permission denied, please check your API key permissions."; so does a ``subuid`` that is not
the master's (the simulator's choice: Bybit does not document that refusal), and deleting a key the master's
sub-accounts do not have answers 10001 (also the simulator's choice; docs/venues.md §8).
"""

from __future__ import annotations

import ipaddress
import json
import zlib
from typing import Any

from aiohttp import web

from venues.simulator import common, masters
from venues.simulator.registry import TestKey

QUERY_SUB_MEMBERS_PATH = "/v5/user/query-sub-members"
CREATE_SUB_API_PATH = "/v5/user/create-sub-api"
SUB_APIKEYS_PATH = "/v5/user/sub-apikeys"
DELETE_SUB_API_PATH = "/v5/user/delete-sub-api"
MAX_PAGE = 20
TRADE_GROUPS = ("ContractTrade", "Spot", "Options", "Derivatives")
DENIED = "Permission denied, please check your API key permissions."


class BybitSubAccounts(common.VenueServer):
    """The sub-account half of the BYBIT venue server (see :mod:`venues.simulator.bybit`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # BybitServer's

    def error(
        self, code: int, msg: str, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        raise NotImplementedError  # BybitServer's

    def envelope(self, result: Any, code: int = 0, msg: str = "OK") -> dict[str, Any]:
        raise NotImplementedError  # BybitServer's

    def key_permissions(self, key: TestKey) -> dict[str, list[str]]:
        raise NotImplementedError  # BybitServer's

    def key_expiry(self, key: TestKey) -> tuple[int, str]:
        raise NotImplementedError  # BybitServer's

    def sub_account_routes(self) -> list[web.RouteDef]:
        return [
            web.get(QUERY_SUB_MEMBERS_PATH, self.query_sub_members),
            web.post(CREATE_SUB_API_PATH, self.create_sub_api),
            web.get(SUB_APIKEYS_PATH, self.sub_apikeys),
            web.post(DELETE_SUB_API_PATH, self.delete_sub_api),
        ]

    def _denied(self) -> common.Reject:
        return common.Reject(self.error(10005, DENIED), auth=False)

    def _is_master(self, key: TestKey) -> bool:
        # every main account may have sub-accounts (one without lists none); a sub-account key is no master
        return key.parent_uid is None and self.state.sub_accounts.owner_of(self.venue, key.uid) is None

    async def _master(self, request: web.Request, *, any_permission: bool = False) -> TestKey:
        key = await self.authenticate(request)
        if not self._is_master(key) or not (any_permission or key.transfer or key.withdraw):
            raise self._denied()
        return key

    def _sub(self, key: TestKey, sub_id: str) -> masters.SubAccount:
        sub = self.state.sub_accounts.find(self.venue, key.uid, sub_id)
        if sub is None:
            raise self._denied()
        return sub

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.text() or "{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise common.Reject(self.error(10001, "params error: body is not a JSON object"), auth=False)
        return body

    async def query_sub_members(self, request: web.Request) -> web.Response:
        key = await self._master(request)
        members = [
            {
                "uid": sub.uid,
                "username": sub.label or f"sim{sub.uid}",
                "memberType": 1,
                "status": 1,
                "accountMode": 5,
                "remark": sub.label,
            }
            for sub in self.state.sub_accounts.subs(self.venue, key.uid)
        ]
        return common.answer(self.envelope({"subMembers": members}))

    async def create_sub_api(self, request: web.Request) -> web.Response:
        key = await self._master(request)
        body = await self._body(request)
        subuid = body.get("subuid")
        read_only = body.get("readOnly")
        permissions = body.get("permissions")
        if isinstance(subuid, bool) or not isinstance(subuid, int) or read_only not in (0, 1):
            raise common.Reject(
                self.error(10001, "params error: subuid and readOnly are required"), auth=False
            )
        if not isinstance(permissions, dict) or not all(isinstance(v, list) for v in permissions.values()):
            raise common.Reject(self.error(10001, "params error: permissions"), auth=False)
        sub = self._sub(key, str(subuid))
        ips = [
            ip.strip() for ip in str(body.get("ips", "") or "").split(",") if ip.strip() and ip.strip() != "*"
        ]
        for ip in ips:
            try:
                ipaddress.ip_network(ip, strict=False)
            except ValueError:
                raise common.Reject(self.error(10001, "params error: ips"), auth=False) from None
        trade = read_only == 0 and any(permissions.get(group) for group in TRADE_GROUPS)
        wallet = permissions.get("Wallet") or []
        minted = self.state.registry.add(
            self.venue,
            uid=sub.uid,
            read=True,
            trade=trade,
            withdraw=False,  # sub-account keys cannot withdraw
            transfer=read_only == 0
            and any(p in wallet for p in ("AccountTransfer", "SubMemberTransferList")),
            ip_allowlist=ips,
            label=str(body.get("note", "") or ""),
            parent_uid=key.uid,
        )
        result = {
            "id": str(zlib.crc32(minted.api_key.encode())),
            "note": minted.label or "",
            "apiKey": minted.api_key,
            "readOnly": read_only,
            "secret": minted.api_secret,
            "permissions": self.key_permissions(minted),
        }
        return common.answer(self.envelope(result, msg=""))

    def _listed(self, key: TestKey) -> dict[str, Any]:
        deadline_day, expired_at = self.key_expiry(key)
        status = 1 if deadline_day == -2 else (2 if deadline_day <= 0 else (4 if deadline_day < 7 else 3))
        return {
            "id": str(zlib.crc32(key.api_key.encode())),
            "ips": list(key.ip_allowlist) or ["*"],
            "apiKey": key.api_key,
            "note": key.label or "",
            "status": status,
            "expiredAt": expired_at,
            "createdAt": common.iso_seconds(key.created_at_ms),
            "type": 1,
            "permissions": self.key_permissions(key),
            "secret": "******",
            # docs/venues.md §3.10: Bybit documents this boolean as "true: read and write, false: read only"
            "readOnly": key.trade,
            "deadlineDay": deadline_day,
            "flag": "hmac",
        }

    async def sub_apikeys(self, request: web.Request) -> web.Response:
        key = await self._master(request, any_permission=True)
        sub = self._sub(key, request.query.get("subMemberId", ""))
        try:
            limit = int(request.query.get("limit", str(MAX_PAGE)))
            start = int(request.query.get("cursor", "0") or "0")
        except ValueError:
            raise common.Reject(self.error(10001, "params error: limit/cursor"), auth=False) from None
        if not 1 <= limit <= MAX_PAGE or start < 0:
            raise common.Reject(self.error(10001, "params error: limit must be 1-20"), auth=False)
        keys = self.state.registry.keys_of(self.venue, sub.uid)
        page = keys[start : start + limit]
        after = start + limit
        cursor = str(after) if after < len(keys) else ""
        return common.answer(
            self.envelope({"result": [self._listed(k) for k in page], "nextPageCursor": cursor})
        )

    async def delete_sub_api(self, request: web.Request) -> web.Response:
        key = await self.authenticate(request)
        body = await self._body(request)
        named = body.get("apikey")
        if key.parent_uid is not None:  # a sub-account key deletes itself, and may not name a key
            if named is not None or not key.transfer:
                raise self._denied()
            self.state.registry.remove(key.api_key)
            return common.answer(self.envelope({}, msg=""))
        if not self._is_master(key) or not (key.transfer or key.withdraw):
            raise self._denied()
        target = self.state.registry.get(str(named or ""), self.venue)
        if target is None or target.parent_uid != key.uid:
            raise common.Reject(self.error(10001, "params error: apikey does not exist"), auth=False)
        self.state.registry.remove(target.api_key)
        return common.answer(self.envelope({}, msg=""))
