"""OKX sub-account API keys through a master key (docs/venues.md §2.10).

``GET /api/v5/users/subaccount/list`` lists the sub-accounts (named by ``subAcct``), ``POST
/api/v5/users/subaccount/apikey`` creates a key (the caller chooses its passphrase: we generate one per key),
``GET /api/v5/users/subaccount/apikey`` lists a sub-account's keys and ``POST
/api/v5/users/subaccount/delete-apikey`` deletes one. Signing, error mapping and clock resync are the probe's
(:mod:`venues.okx`). The write calls need the Trade permission and a master key linked to IP addresses;
:meth:`OkxSubAccountKeys.can_manage_keys` reads both (and whether the key is a master's) from
``account/config``.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlencode

from venues import base, http, okx
from venues.subaccounts import GrantProblem, KeyGrant, MintedKey, SubAccount, SubKeyInfo

LIST_PATH = "/api/v5/users/subaccount/list"
APIKEY_PATH = "/api/v5/users/subaccount/apikey"
DELETE_PATH = "/api/v5/users/subaccount/delete-apikey"
MAX_IPS = 20  # docs/venues.md §2.10
PAGE_SIZE = 100  # subaccount/list: limit maximum (docs/venues.md §2.10)
MAX_PAGES = 20  # 2,000 sub-accounts: a bound on one listing, so that a verification's requests are bounded
# the most requests list_sub_accounts and can_manage_keys make one after another (venues.subaccounts): every
# page, then account/config; each may be resynced and sent again
DISCOVERY_REQUESTS = 3 * (MAX_PAGES + 1)
MAX_LABEL = 50  # a bound of ours: OKX does not document the label's length
PASSPHRASE_LENGTH = 24  # within OKX's 8..32
_SPECIAL = "!@#$%^&*-_=+"
# Codes of these endpoints (docs/venues.md §2.10); the probe's table (okx._CODES) covers the rest
_CODES: dict[str, tuple[base.Outcome, str]] = {
    "59500": (base.Outcome.PERMISSION_DENIED, "only the API key of the main account has permission"),
    "59510": (base.Outcome.PERMISSION_DENIED, "the sub-account does not exist under this master account"),
    "59501": (base.Outcome.ACCOUNT_RESTRICTED, "the sub-account already has 50 API keys"),
    "59502": (base.Outcome.ACCOUNT_RESTRICTED, "a key of this sub-account already has this label"),
    "59503": (base.Outcome.SERVER_ERROR, "more than 20 IP addresses (a bug of ours: checked before sending)"),
    "59505": (base.Outcome.SERVER_ERROR, "passphrase format refused (a bug of ours: we generate it)"),
    "59506": (base.Outcome.PERMISSION_DENIED, "API key doesn't exist"),
    "59508": (base.Outcome.ACCOUNT_RESTRICTED, "the sub-account is suspended"),
}
KEY_GONE = "59506"


def new_passphrase() -> str:
    """A passphrase OKX accepts: 8-32 characters with a digit, an upper- and a lower-case letter and a special."""
    alphabet = string.ascii_letters + string.digits + _SPECIAL
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(PASSPHRASE_LENGTH))
        if (
            any(c.isdigit() for c in candidate)
            and any(c.isupper() for c in candidate)
            and any(c.islower() for c in candidate)
            and any(c in _SPECIAL for c in candidate)
        ):
            return candidate


def classify(reply: http.Reply) -> base.ProbeFailure | None:
    """The failure an answer of these endpoints means (their own codes first, then the probe's table)."""
    body = reply.body
    code = str(body.get("code")) if isinstance(body, dict) and body.get("code") is not None else None
    if code in _CODES and reply.status != 429:
        outcome, meaning = _CODES[code]
        return base.ProbeFailure(outcome, f"OKX {code}: {meaning}", venue_code=code)
    return okx.classify(reply)


def grant_body(sub_id: str, grant: KeyGrant, passphrase: str) -> dict[str, str]:
    """The create call's JSON body; :class:`GrantProblem` for a grant OKX cannot take."""
    if not grant.read:
        raise GrantProblem("read", "OKX keys always have the read permission")
    if len(grant.ip_allowlist) > MAX_IPS:
        raise GrantProblem("ipAllowlist", f"OKX binds at most {MAX_IPS} IP addresses to a key")
    if not grant.label or len(grant.label) > MAX_LABEL:
        raise GrantProblem("label", f"OKX needs a key label of 1 to {MAX_LABEL} characters")
    body = {
        "subAcct": sub_id,
        "label": grant.label,
        "passphrase": passphrase,
        "perm": "read_only,trade" if grant.trade else "read_only",
    }
    if grant.ip_allowlist:
        body["ip"] = ",".join(grant.ip_allowlist)
    return body


def key_info(row: Mapping[str, Any]) -> SubKeyInfo:
    """One row of the key listing (or of the create answer) as :class:`SubKeyInfo`; ValueError if malformed."""
    api_key, perm, ip = row.get("apiKey"), row.get("perm", ""), row.get("ip", "")
    if not isinstance(api_key, str) or not api_key or not isinstance(perm, str) or not isinstance(ip, str):
        raise ValueError("sub-account key row without apiKey/perm/ip")
    granted = {p.strip() for p in perm.split(",") if p.strip()}
    ts = row.get("ts")
    return SubKeyInfo(
        key_id=api_key,
        label=str(row.get("label", "") or ""),
        read=True,
        trade="trade" in granted,
        withdraw="withdraw" in granted,
        ip_allowlist=tuple(a.strip() for a in ip.split(",") if a.strip()),
        created_at_ms=int(ts) if isinstance(ts, str) and ts.isdigit() else None,
        expires_at_ms=None,  # OKX keys do not expire by date (docs/venues.md §2.7)
    )


class OkxSubAccountKeys(http.VenueProbe):
    """Mints, lists and deletes OKX sub-account keys through a master key."""

    venue: ClassVar[base.Venue] = base.Venue.OKX
    default_urls: ClassVar[Mapping[str, str]] = {"rest": "https://www.okx.com"}
    rate_per_second: ClassVar[float] = 100.0
    burst: ClassVar[float | None] = 100.0
    # per UID (docs/venues.md §2.10, §2.6), by method and path (the create call shares its path with the listing):
    # the listings 20 per 2 s, create and delete 1 per second, account/config 5 per 2 s
    key_windows: ClassVar[Mapping[str, tuple[int, float]]] = {
        f"GET {LIST_PATH}": (20, 2.0),
        f"GET {APIKEY_PATH}": (20, 2.0),
        f"POST {APIKEY_PATH}": (1, 1.0),
        f"POST {DELETE_PATH}": (1, 1.0),
        f"GET {okx.CONFIG_PATH}": (5, 2.0),
    }

    async def can_manage_keys(self, master: base.ApiKeys) -> bool:
        """``account/config``: a master key (``uid`` == ``mainUid``) with Trade and an IP list may manage keys."""
        reply = await self._request(master, "GET", okx.CONFIG_PATH)
        try:
            config = reply.body["data"][0]
            permissions = okx.permissions_from_config(config)
            uid, main_uid = str(config["uid"]), str(config.get("mainUid", config["uid"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise self.malformed(reply) from None
        return uid == main_uid and permissions.trade and permissions.ip_restricted

    async def list_sub_accounts(self, master: base.ApiKeys) -> tuple[SubAccount, ...]:
        found: list[SubAccount] = []
        after: str | None = None
        for _ in range(
            MAX_PAGES
        ):  # newest first, 100 a page; "after" pages to older ones (docs/venues.md §2.10)
            query = {"limit": str(PAGE_SIZE)} | ({"after": after} if after else {})
            reply = await self._request(master, "GET", f"{LIST_PATH}?{urlencode(query)}")
            rows = self._rows(reply)
            try:
                page = [
                    SubAccount(sub_id=str(r["subAcct"]), label=str(r.get("label", "") or "")) for r in rows
                ]
                oldest = min((int(r["ts"]) for r in rows), default=None)
            except (KeyError, TypeError, ValueError):
                raise self.malformed(reply) from None
            found.extend(sub for sub in page if sub not in found)
            if len(rows) < PAGE_SIZE or oldest is None:
                return tuple(found)
            after = str(oldest)
        raise base.ProbeFailure(
            base.Outcome.ACCOUNT_RESTRICTED,
            f"OKX listed more than {PAGE_SIZE * MAX_PAGES} sub-accounts: more than the engine reads in one "
            "verification",
        )

    async def create_key(self, master: base.ApiKeys, sub_id: str, grant: KeyGrant) -> MintedKey:
        _check_sub_id(sub_id)
        passphrase = new_passphrase()
        body = json.dumps(grant_body(sub_id, grant, passphrase), separators=(",", ":"))
        reply = await self._request(master, "POST", APIKEY_PATH, body)
        rows = self._rows(reply)
        try:
            row = rows[0]
            info = key_info(row)
            secret = row["secretKey"]
            if not isinstance(secret, str) or not secret:
                raise ValueError("no secretKey")
        except (IndexError, KeyError, TypeError, ValueError):
            raise self.malformed(reply) from None
        return MintedKey(sub_id=sub_id, info=info, keys=base.ApiKeys(info.key_id, secret, passphrase))

    async def list_keys(self, master: base.ApiKeys, sub_id: str) -> tuple[SubKeyInfo, ...]:
        _check_sub_id(sub_id)
        reply = await self._request(master, "GET", f"{APIKEY_PATH}?{urlencode({'subAcct': sub_id})}")
        try:
            return tuple(key_info(row) for row in self._rows(reply))
        except (TypeError, ValueError):
            raise self.malformed(reply) from None

    async def delete_key(self, master: base.ApiKeys, sub_id: str, key_id: str) -> bool:
        _check_sub_id(sub_id)
        body = json.dumps({"subAcct": sub_id, "apiKey": key_id}, separators=(",", ":"))
        try:
            await self._request(master, "POST", DELETE_PATH, body)
        except base.ProbeFailure as failure:
            if failure.venue_code == KEY_GONE:
                base.release_frames(failure)  # dropped: its frames hold the master's keys
                return False
            raise
        return True

    def _rows(self, reply: http.Reply) -> list[Mapping[str, Any]]:
        rows = reply.body.get("data") if isinstance(reply.body, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise self.malformed(reply)
        return rows

    async def _request(
        self, keys: base.ApiKeys, method: str, request_path: str, body: str = ""
    ) -> http.Reply:
        """One signed request; on CLOCK_SKEW resync from the public time endpoint and retry once."""
        seen = self.clock_generation
        reply = await self._send(keys, method, request_path, body)
        failure = classify(reply)
        if failure is not None and failure.outcome is base.Outcome.CLOCK_SKEW:
            await self.resync_clock(self.url("rest", okx.TIME_PATH), self._server_ms, seen=seen)
            reply = await self._send(keys, method, request_path, body)
            failure = classify(reply)
        if failure is not None:
            raise failure
        return reply

    async def _send(self, keys: base.ApiKeys, method: str, request_path: str, body: str) -> http.Reply:
        # wait first, then stamp; the windows are per method and path (OKX has no per-IP budget to look up)
        await self.throttle(keys.api_key, path=f"{method} {request_path.partition('?')[0]}")
        timestamp = okx.iso_timestamp(self.now_ms())
        headers = okx.auth_headers(keys, timestamp, method, request_path, body)
        return await self._call(
            method, self.url("rest", request_path), headers=headers, data=body or None, limit=False
        )

    def _server_ms(self, reply: http.Reply) -> float:
        failure = okx.classify(reply)
        if failure is not None:
            raise failure
        try:
            return float(int(reply.body["data"][0]["ts"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise self.malformed(reply) from None


def _check_sub_id(sub_id: str) -> None:
    """OKX sub-account names: 6 to 20 letters and digits (docs/venues.md §2.10)."""
    if not (6 <= len(sub_id) <= 20 and sub_id.isascii() and sub_id.isalnum()):
        raise GrantProblem("subAccount", "an OKX sub-account name is 6 to 20 letters and digits")
