"""OKX's sub-account API key endpoints (docs/venues.md §2.10), for a master account.

``GET /api/v5/users/subaccount/list`` (permission Read, 20 requests / 2 s per UID), ``POST
/api/v5/users/subaccount/apikey`` (create; Trade, 1 / s), ``GET /api/v5/users/subaccount/apikey`` (a
sub-account's keys; Read, 20 / 2 s) and ``POST /api/v5/users/subaccount/delete-apikey`` (Trade, 1 / s), signed
like every private endpoint (docs/venues.md §2.2). The write calls need a master key linked to IP addresses.

Answers, as OKX documents them: 59500 "Only the API key of the main account has permission." for a key of
a sub-account (any other account is a main account: one without sub-accounts lists none); 59510
"Sub-account does not exist"; 59505 for a passphrase that breaks the rules (8-32 characters with a digit, an
upper- and a lower-case letter and a special character); 59503 above 20 IPs; 59501 above 50 keys; 59502 for
a label the sub-account's keys already use; 59506 "API key doesn't exist." on deleting a key the sub-account
does not have. A master key without the Trade permission, or not linked to an IP, answers 50120 "API key
doesn't have permission" (the code for the IP rule is the simulator's choice: OKX documents the rule, not its
refusal; docs/venues.md §8).
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from aiohttp import web

from venues.simulator import common, masters, ratelimit
from venues.simulator.registry import TestKey

LIST_PATH = "/api/v5/users/subaccount/list"
APIKEY_PATH = "/api/v5/users/subaccount/apikey"
DELETE_PATH = "/api/v5/users/subaccount/delete-apikey"
METHOD_LIMITS = {  # (method, path) -> per-UID window (docs/venues.md §2.10)
    ("GET", LIST_PATH): ratelimit.Window(20, 2.0),
    ("GET", APIKEY_PATH): ratelimit.Window(20, 2.0),
    ("POST", APIKEY_PATH): ratelimit.Window(1, 1.0),
    ("POST", DELETE_PATH): ratelimit.Window(1, 1.0),
}
MAX_IPS = 20
MAX_KEYS = 50
_PASSPHRASE_CHARS = re.compile(r"[\x21-\x7e]{8,32}")


def error(code: int, msg: str, status: int = 200) -> web.Response:
    return common.answer({"code": str(code), "msg": msg, "data": []}, status)


def passphrase_ok(passphrase: str) -> bool:
    """8 to 32 characters with at least one digit, one upper-case and one lower-case letter and one special."""
    return (
        _PASSPHRASE_CHARS.fullmatch(passphrase) is not None
        and any(c.isdigit() for c in passphrase)
        and any(c.isupper() for c in passphrase)
        and any(c.islower() for c in passphrase)
        and any(not c.isalnum() for c in passphrase)
    )


def perm_text(key: TestKey) -> str:
    return ",".join(name for name, on in (("read_only", key.read), ("trade", key.trade)) if on)


class OkxSubAccounts(common.VenueServer):
    """The sub-account half of the OKX venue server (see :mod:`venues.simulator.okx`)."""

    async def authenticate(self, request: web.Request) -> TestKey:
        raise NotImplementedError  # OkxServer's

    def sub_account_routes(self) -> list[web.RouteDef]:
        return [
            web.get(LIST_PATH, self.list_sub_accounts),
            web.post(APIKEY_PATH, self.create_sub_key),
            web.get(APIKEY_PATH, self.list_sub_keys),
            web.post(DELETE_PATH, self.delete_sub_key),
        ]

    async def _master(self, request: web.Request, *, write: bool) -> TestKey:
        key = await self.authenticate(request)
        # every main account may have sub-accounts; a key of a sub-account may not manage them
        if key.parent_uid is not None or self.state.sub_accounts.owner_of(self.venue, key.uid) is not None:
            raise common.Reject(
                error(59500, "Only the API key of the main account has permission."), auth=False
            )
        if write and (not key.trade or not key.ip_allowlist):
            raise common.Reject(error(50120, "API key doesn't have permission", 401), auth=False)
        return key

    def _sub(self, key: TestKey, name: str) -> masters.SubAccount:
        sub = self.state.sub_accounts.find(self.venue, key.uid, name)
        if sub is None:
            raise common.Reject(error(59510, "Sub-account does not exist"), auth=False)
        return sub

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.text() or "{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise common.Reject(error(50002, "JSON syntax error", 400), auth=False)
        return body

    async def list_sub_accounts(self, request: web.Request) -> web.Response:
        key = await self._master(request, write=False)
        wanted = request.query.get("subAcct")
        rows = [
            {
                "type": "1",
                "enable": True,
                "subAcct": sub.sub_id,
                "uid": sub.uid,
                "label": sub.label,
                "mobile": "",
                "gAuth": False,
                "frozenFunc": [],
                "canTransOut": True,
                "ts": str(sub.created_at_ms),
                "subAcctLv": "1",
                "firstLvSubAcct": sub.sub_id,
                "ifDma": False,
            }
            for sub in self.state.sub_accounts.subs(self.venue, key.uid)
            if wanted is None or sub.sub_id == wanted
        ]
        return common.answer({"code": "0", "msg": "", "data": rows})

    async def create_sub_key(self, request: web.Request) -> web.Response:
        key = await self._master(request, write=True)
        body = await self._body(request)
        for name in ("subAcct", "label", "passphrase"):
            if not isinstance(body.get(name), str) or not body[name]:
                raise common.Reject(error(50014, f"Parameter {name} cannot be empty.", 400), auth=False)
        sub = self._sub(key, body["subAcct"])
        if not passphrase_ok(body["passphrase"]):
            raise common.Reject(error(59505, "The passphrase format is incorrect."), auth=False)
        perms = {p.strip() for p in str(body.get("perm", "read_only")).split(",") if p.strip()}
        if not perms <= {"read_only", "trade"}:
            raise common.Reject(error(59504, "Sub-accounts don't support withdrawals."), auth=False)
        ips = [ip.strip() for ip in str(body.get("ip", "")).split(",") if ip.strip()]
        if len(ips) > MAX_IPS:
            raise common.Reject(error(59503, "Each API key can bind up to 20 IP addresses"), auth=False)
        for ip in ips:
            try:
                ipaddress.ip_network(ip, strict=False)
            except ValueError:
                raise common.Reject(error(51000, "Parameter ip error", 400), auth=False) from None
        existing = self.state.registry.keys_of(self.venue, sub.uid)
        if len(existing) >= MAX_KEYS:
            raise common.Reject(error(59501, "Each account can create up to 50 API keys"), auth=False)
        if any(k.label == body["label"] for k in existing):
            msg = "This note name already exists. Enter a unique API key note name"
            raise common.Reject(error(59502, msg), auth=False)
        minted = self.state.registry.add(
            self.venue,
            uid=sub.uid,
            read=True,
            trade="trade" in perms,
            withdraw=False,
            transfer=False,
            ip_allowlist=ips,
            label=body["label"],
            parent_uid=key.uid,
        )
        # the passphrase is the caller's choice; the key registry stores it as the key's passphrase
        minted = self.state.registry.with_passphrase(minted.api_key, body["passphrase"])
        row = {
            "subAcct": sub.sub_id,
            "label": minted.label,
            "apiKey": minted.api_key,
            "secretKey": minted.api_secret,
            "passphrase": minted.api_passphrase,
            "perm": perm_text(minted),
            "ip": ",".join(minted.ip_allowlist),
            "ts": str(minted.created_at_ms),
        }
        return common.answer({"code": "0", "msg": "", "data": [row]})

    async def list_sub_keys(self, request: web.Request) -> web.Response:
        key = await self._master(request, write=False)
        name = request.query.get("subAcct", "")
        if not name:
            raise common.Reject(error(50014, "Parameter subAcct cannot be empty.", 400), auth=False)
        sub = self._sub(key, name)
        wanted = request.query.get("apiKey")
        rows = [
            {
                "label": k.label or "",
                "apiKey": k.api_key,
                "perm": perm_text(k),
                "ip": ",".join(k.ip_allowlist),
                "ts": str(k.created_at_ms),
            }
            for k in self.state.registry.keys_of(self.venue, sub.uid)
            if wanted is None or k.api_key == wanted
        ]
        return common.answer({"code": "0", "msg": "", "data": rows})

    async def delete_sub_key(self, request: web.Request) -> web.Response:
        key = await self._master(request, write=True)
        body = await self._body(request)
        sub = self._sub(key, str(body.get("subAcct", "")))
        target = self.state.registry.get(str(body.get("apiKey", "")), self.venue)
        if target is None or target.uid != sub.uid:
            raise common.Reject(error(59506, "API key doesn't exist."), auth=False)
        self.state.registry.remove(target.api_key)
        return common.answer({"code": "0", "msg": "", "data": [{"subAcct": sub.sub_id}]})
