"""Bybit (V5): hex HMAC-SHA256 over timestamp + apiKey + recvWindow + query/body (docs/venues.md §3).

One probe = one round trip: ``GET /v5/user/query-api`` (the key's permissions, IPs, expiry and ``userID``)
and two identity calls at once (query-api's refusal decides): ``/v5/account/info`` (``unifiedMarginStatus``:
unified vs classic) and ``/v5/user/get-member-type`` (the wallets of this UID), which docs/venues.md §3.4 turns
into unified/spot/contract.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

from venues import base, http, limits

RECV_WINDOW_MS = 5000  # docs/venues.md §3.2: the documented default
QUERY_API_PATH = "/v5/user/query-api"
ACCOUNT_INFO_PATH = "/v5/account/info"
MEMBER_TYPE_PATH = "/v5/user/get-member-type"
TIME_PATH = "/v5/market/time"  # docs/venues.md §6, clock-sync endpoints
INVALID_KEY_CODE = 10003  # may mean "a key of another environment" (docs/venues.md §3.5)
# Where a key refused by mainnet (10003) may live; tried only with the default URLs (venues/README.md)
OTHER_ENVIRONMENTS: Mapping[str, str] = {
    "testnet": "https://api-testnet.bybit.com",
    "demo": "https://api-demo.bybit.com",
}
IP_BAN_WAIT_S = 600.0  # docs/venues.md §3.5: HTTP 403 "access too frequent" -> stop and wait >= 10 minutes
DAY_MS = 86_400_000

# docs/venues.md §3.5: retCode -> (outcome, what it means). The doc's "bug" rows (parameter error, route not
# found) are SERVER_ERROR: transient, so a probe bug never marks a key FAILED. 10028/100028 (an endpoint
# for the other account kind) are PERMISSION_DENIED: on an identity call that means "not reached".
_CODES: dict[int, tuple[base.Outcome, str]] = {
    10003: (
        base.Outcome.INVALID_KEY,
        "API key is invalid (or belongs to another environment or regional site)",
    ),
    10004: (base.Outcome.INVALID_SECRET, "signature error: the API secret does not belong to this key"),
    10005: (base.Outcome.PERMISSION_DENIED, "permission denied for this API key"),
    10007: (base.Outcome.INVALID_KEY, "user authentication failed"),
    10010: (base.Outcome.IP_NOT_ALLOWED, "unmatched IP: this IP is not bound to the key"),
    33004: (base.Outcome.KEY_EXPIRED, "the API key has expired"),
    -2015: (base.Outcome.KEY_EXPIRED, "the API key has expired (spot)"),
    10002: (base.Outcome.CLOCK_SKEW, "request time outside the recv window"),
    -1: (base.Outcome.CLOCK_SKEW, "request expired"),
    10008: (base.Outcome.ACCOUNT_RESTRICTED, "common banned: check the account mode"),
    10009: (base.Outcome.ACCOUNT_RESTRICTED, "service restricted for this region"),
    10024: (base.Outcome.ACCOUNT_RESTRICTED, "compliance rules triggered"),
    10027: (base.Outcome.ACCOUNT_RESTRICTED, "transactions are banned"),
    10028: (base.Outcome.PERMISSION_DENIED, "endpoint only for unified accounts"),
    100028: (base.Outcome.PERMISSION_DENIED, "endpoint not for unified accounts"),
    10006: (base.Outcome.RATE_LIMITED, "too many visits: API rate limit exceeded"),
    429: (base.Outcome.RATE_LIMITED, "trading service under high load"),
    10000: (base.Outcome.SERVER_ERROR, "server timeout"),
    10016: (base.Outcome.SERVER_ERROR, "server error (service restarting)"),
    10001: (base.Outcome.SERVER_ERROR, "parameter error (a probe bug)"),
    10017: (base.Outcome.SERVER_ERROR, "route not found (a probe bug)"),
}
ERRORS: dict[int, base.Outcome] = {code: outcome for code, (outcome, _) in _CODES.items()}

# Answers without a retCode, by HTTP status (docs/venues.md §3.5 "HTTP"). Any other 4xx/5xx is SERVER_ERROR.
HTTP_STATUS: dict[int, base.Outcome] = {
    401: base.Outcome.INVALID_KEY,  # "invalid request (wrong key / missing auth headers)"
    403: base.Outcome.RATE_LIMITED,  # IP rate limit breached (or a US IP): transient, wait >= 10 min
    429: base.Outcome.RATE_LIMITED,  # system-level protection
}
_IP_HINTS = ("ip address", "allowlist", "whitelist")  # venues/README.md: an auth error naming an IP

# query-api permission groups that allow trading (docs/venues.md §3.3 "Derivation")
TRADE_GROUPS = ("ContractTrade", "Spot", "Options", "Derivatives")
TRANSFER_PERMISSIONS = ("AccountTransfer", "SubMemberTransfer", "SubMemberTransferList")
UNIFIED_STATUSES = frozenset({3, 4, 5, 6})  # UTA1.0, UTA1.0 pro, UTA2.0, UTA2.0 pro
CLASSIC_STATUS = 1
WALLET_IDENTITIES = {"UNIFIED": "unified", "SPOT": "spot", "CONTRACT": "contract"}  # get-member-type

_TOKEN = re.compile(r"[A-Za-z0-9]{8,128}")


def pre_sign(timestamp_ms: int, api_key: str, recv_window: int, query_or_body: str = "") -> str:
    """The string Bybit signs: timestamp + apiKey + recvWindow + (GET: query string, POST: JSON body)."""
    return f"{timestamp_ms}{api_key}{recv_window}{query_or_body}"


def sign(secret: str, payload: str) -> str:
    """X-BAPI-SIGN for HMAC keys: lowercase hex HMAC-SHA256 of ``payload`` keyed by the secret (UTF-8)."""
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def auth_headers(
    keys: base.ApiKeys, timestamp_ms: int, query_or_body: str = "", *, recv_window: int = RECV_WINDOW_MS
) -> dict[str, str]:
    """The X-BAPI-* headers of a request whose query string (GET) or JSON body (POST) is ``query_or_body``."""
    payload = pre_sign(timestamp_ms, keys.api_key, recv_window, query_or_body)
    return {
        "X-BAPI-API-KEY": keys.api_key,
        "X-BAPI-TIMESTAMP": str(timestamp_ms),
        "X-BAPI-RECV-WINDOW": str(recv_window),
        "X-BAPI-SIGN": sign(keys.api_secret, payload),
    }


def classify(reply: http.Reply) -> base.ProbeFailure | None:
    """The failure a Bybit answer means, or None when it is a readable success (``retCode`` 0)."""
    body = reply.body
    code = body.get("retCode") if isinstance(body, dict) else None
    if isinstance(code, bool) or not isinstance(code, int):
        code = None
    retry_after = reply.retry_after()
    if reply.status == 429:
        return base.ProbeFailure(
            base.Outcome.RATE_LIMITED,
            "Bybit rate limit hit (HTTP 429)",
            retry_after=retry_after,
            venue_code="HTTP 429",
        )
    if code is not None and code != 0:
        outcome, meaning = _CODES.get(code, (base.Outcome.SERVER_ERROR, "unrecognised error code"))
        return base.ProbeFailure(
            outcome,
            f"Bybit {code}: {meaning}",
            retry_after=retry_after if outcome.transient else None,
            venue_code=str(code),
        )
    if reply.status >= 400:
        outcome = HTTP_STATUS.get(reply.status, base.Outcome.SERVER_ERROR)
        if outcome is base.Outcome.INVALID_KEY and any(hint in reply.text.lower() for hint in _IP_HINTS):
            outcome = base.Outcome.IP_NOT_ALLOWED
        if reply.status == 403 and retry_after is None:
            retry_after = IP_BAN_WAIT_S
        return base.ProbeFailure(
            outcome,
            f"Bybit answered HTTP {reply.status}",
            retry_after=retry_after if outcome.transient else None,
            venue_code=f"HTTP {reply.status}",
        )
    if code != 0 or not isinstance(body.get("result"), dict):
        return base.ProbeFailure(
            base.Outcome.SERVER_ERROR, f"Bybit sent an unreadable answer (HTTP {reply.status})"
        )
    return None


def permissions_from_api_info(info: Mapping[str, Any], now_ms: int) -> base.Permissions:
    """Map ``query-api`` ``result`` (docs/venues.md §3.3) to :class:`Permissions`; ``ValueError`` if malformed."""
    groups = info.get("permissions")
    read_only = info.get("readOnly")
    if not isinstance(groups, dict) or read_only not in (0, 1):
        raise ValueError("query-api without permissions/readOnly")
    wallet, bound = groups.get("Wallet") or [], info.get("ips") or []
    if not isinstance(wallet, list) or not isinstance(bound, list):
        raise ValueError("query-api Wallet/ips are not lists")
    ips = [ip.strip() for ip in bound if isinstance(ip, str) and ip.strip() not in ("", "*")]
    return base.Permissions(
        read=True,  # every key can read; query-api itself answers to any permission
        trade=read_only == 0 and any(groups.get(group) for group in TRADE_GROUPS),
        withdraw="Withdraw" in wallet,
        transfer=read_only == 0 and any(p in wallet for p in TRANSFER_PERMISSIONS),  # a write, like trading
        ip_restricted=bool(ips),  # [] or ["*"] mean "no IP bound" (docs/venues.md §3.3)
        ip_allowlist=tuple(ips),
        expires_at_ms=key_expiry_ms(info, now_ms),
    )


def key_expiry_ms(info: Mapping[str, Any], now_ms: int) -> int | None:
    """``expiredAt`` in ms; else ``deadlineDay`` days from now; None when neither says (IP-bound keys).

    An IP-bound key reports ``expiredAt`` "1970-01-01T00:00:00Z" and ``deadlineDay`` -2 (docs/venues.md §3.3).
    """
    expired_at = info.get("expiredAt")
    if isinstance(expired_at, str) and expired_at:
        try:
            moment = datetime.fromisoformat(expired_at)
        except ValueError:
            moment = datetime.fromtimestamp(0, tz=UTC)
        if moment.tzinfo is None:  # Bybit writes "Z"; a bare datetime is UTC too, never local time
            moment = moment.replace(tzinfo=UTC)
        ms = int(moment.timestamp() * 1000)
        if ms > 0:
            return ms
    days = info.get("deadlineDay")
    if isinstance(days, int) and not isinstance(days, bool) and days > 0:
        return now_ms + days * DAY_MS
    return None


def identities_from(margin_status: int | None, wallets: Sequence[str] | None) -> set[str]:
    """Identities from docs/venues.md §3.4: unified <= a UTA status (>= 3) or a UNIFIED wallet; spot and
    contract <= the classic status or their own wallets. ``None`` for an answer the key could not read.
    """
    found: set[str] = set()
    if margin_status in UNIFIED_STATUSES:
        found.add("unified")
    elif margin_status == CLASSIC_STATUS:
        found.update({"spot", "contract"})
    for wallet in wallets or ():
        if wallet in WALLET_IDENTITIES:
            found.add(WALLET_IDENTITIES[wallet])
    return found


class BybitProbe(http.VenueProbe):
    """Verifies a Bybit HMAC key, reads its permissions and expiry, finds unified / spot / contract."""

    venue: ClassVar[base.Venue] = base.Venue.BYBIT
    default_urls: ClassVar[Mapping[str, str]] = {"rest": "https://api.bybit.com"}
    # per IP: 600 requests / 5 s (docs/venues.md §3.6), half of it for us; per UID and endpoint: query-api and
    # get-member-type 10/s, account/info 50/s
    rate_per_second: ClassVar[float] = 60.0
    burst: ClassVar[float | None] = 60.0
    # shared by the processes of one egress IP: 600 requests / 5 s for every host (docs/venues.md §3.6), half for us
    ip_budgets: ClassVar[Mapping[str, limits.IpBudget]] = {"/": limits.IpBudget("bybit", 600, 5.0)}
    key_windows: ClassVar[Mapping[str, tuple[int, float]]] = {
        QUERY_API_PATH: (10, 1.0),
        MEMBER_TYPE_PATH: (10, 1.0),
        ACCOUNT_INFO_PATH: (50, 1.0),
    }

    def check_keys(self, keys: base.ApiKeys) -> None:
        """HMAC key and secret: letters and digits (18 and 36 in practice); 8..128 pass."""
        base.check_token("apiKey", keys.api_key, _TOKEN, "must be 8 to 128 letters and digits")
        if "PRIVATE KEY" in keys.api_secret:
            raise base.KeyFormatProblem("apiSecret", "is an RSA private key: only HMAC keys are supported")
        base.check_token("apiSecret", keys.api_secret, _TOKEN, "must be 8 to 128 letters and digits")

    async def probe(self, keys: base.ApiKeys) -> base.ProbeResult:
        try:
            self.check_keys(keys)
        except base.KeyFormatProblem as problem:
            raise base.format_failure(self.venue, problem) from None
        # One round trip: query-api and both identity calls go out at once (docs/venues.md §6); the query-api
        # answer decides (a bad key fails all three). What the speculation costs: a bad key spends two more
        # requests of the 600 per 5 s per IP (§3.6), 0.3 %; a good key sends the same three calls as before.
        api_reply, account, members = await http.gather_identities(
            [
                self._verify(keys),
                self._signed_get(keys, ACCOUNT_INFO_PATH),
                self._signed_get(keys, MEMBER_TYPE_PATH),
            ]
        )
        http.raise_verify_failure(api_reply, [account, members])
        info = api_reply.body["result"]
        user_id = info.get("userID")
        try:
            permissions = permissions_from_api_info(info, self.now_ms())
        except (TypeError, ValueError):
            raise self.malformed(api_reply) from None
        if isinstance(user_id, bool) or not isinstance(user_id, int | str) or str(user_id) in ("", "0"):
            raise self.malformed(api_reply)
        expiry = permissions.expires_at_ms
        if expiry is not None and expiry <= self.now_ms():  # the contract: a past expiredAt is KEY_EXPIRED
            when = datetime.fromtimestamp(expiry / 1000, tz=UTC).isoformat(timespec="seconds")
            raise base.ProbeFailure(base.Outcome.KEY_EXPIRED, f"Bybit reports the API key expired at {when}")

        account, members = http.settle_identities([account, members])
        margin_status = self._margin_status(account)
        wallets = self._wallets(members, str(user_id))
        return base.ProbeResult(
            venue=self.venue,
            venue_account_id=str(user_id),
            permissions=permissions,
            identities=tuple(sorted(identities_from(margin_status, wallets))),
            details=_details(info, margin_status),
        )

    async def _verify(self, keys: base.ApiKeys) -> http.Reply:
        """``query-api``; on 10003 with the default URLs, look for the key on testnet and demo."""
        try:
            return await self._signed_get(keys, QUERY_API_PATH)
        except base.ProbeFailure as failure:
            if failure.venue_code != str(INVALID_KEY_CODE) or self.base_url is not None:
                raise
            base.release_frames(failure)  # dropped: its frames hold the keys
        names = list(OTHER_ENVIRONMENTS)
        answers = await http.gather_identities(  # failures come back released: their frames hold the keys
            [self._send(keys, QUERY_API_PATH, host=OTHER_ENVIRONMENTS[name]) for name in names]
        )
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, http.Reply) and classify(answer) is None:
                raise base.ProbeFailure(
                    base.Outcome.WRONG_ENVIRONMENT,
                    f"Bybit 10003: the key belongs to Bybit {name} ({OTHER_ENVIRONMENTS[name]}), not mainnet",
                    venue_code=str(INVALID_KEY_CODE),
                )
            if isinstance(answer, BaseException) and not isinstance(answer, base.ProbeFailure):
                raise answer
        raise base.ProbeFailure(
            base.Outcome.INVALID_KEY,
            f"Bybit {INVALID_KEY_CODE}: {_CODES[INVALID_KEY_CODE][1]}",
            venue_code=str(INVALID_KEY_CODE),
        )

    def _margin_status(self, result: http.Reply | base.ProbeFailure) -> int | None:
        """``unifiedMarginStatus`` from ``account/info``, or None when the key may not read it (permanent)."""
        if isinstance(result, base.ProbeFailure):
            return None
        status = result.body["result"].get("unifiedMarginStatus")
        if isinstance(status, bool) or not isinstance(status, int):
            raise self.malformed(result)
        return status

    def _wallets(self, result: http.Reply | base.ProbeFailure, user_id: str) -> list[str] | None:
        """The wallets (``accountType``) get-member-type lists for this UID, or None when refused."""
        if isinstance(result, base.ProbeFailure):
            return None
        accounts = result.body["result"].get("accounts")
        if not isinstance(accounts, list) or not all(isinstance(a, dict) for a in accounts):
            raise self.malformed(result)
        # a master key may see its sub-accounts too: keep the entries of this UID (all if none carry a uid)
        own = [a for a in accounts if str(a.get("uid", "")) == user_id] or [
            a for a in accounts if "uid" not in a
        ]
        wallets: list[str] = []
        for account in own:
            types = account.get("accountType")
            if not isinstance(types, list):
                raise self.malformed(result)
            wallets.extend(str(t) for t in types)
        return wallets

    async def _signed_get(self, keys: base.ApiKeys, path: str, query: str = "") -> http.Reply:
        """One signed GET; on CLOCK_SKEW resync from the public time endpoint and retry once."""
        seen = self.clock_generation
        reply = await self._send(keys, path, query)
        failure = classify(reply)
        if failure is not None and failure.outcome is base.Outcome.CLOCK_SKEW:
            await self._resync(seen)
            reply = await self._send(keys, path, query)
            failure = classify(reply)
        if failure is not None:
            raise failure
        return reply

    async def _send(
        self, keys: base.ApiKeys, path: str, query: str = "", *, host: str | None = None
    ) -> http.Reply:
        url = (host + path if host else self.url("rest", path)) + (f"?{query}" if query else "")
        # wait first, then stamp: a queued request must not go out stale
        await self.throttle(keys.api_key, path=path)
        return await self._call("GET", url, headers=auth_headers(keys, self.now_ms(), query), limit=False)

    async def _resync(self, seen: int) -> None:
        """Learn Bybit's clock from ``GET /v5/market/time``."""
        await self.resync_clock(self.url("rest", TIME_PATH), self._server_ms, seen=seen)

    def _server_ms(self, reply: http.Reply) -> float:
        failure = classify(reply)
        if failure is not None:
            raise failure
        try:
            nanos = reply.body["result"].get("timeNano")
            return float(int(nanos) // 1_000_000 if nanos else int(reply.body["time"]))
        except (KeyError, TypeError, ValueError):
            raise self.malformed(reply) from None


def _details(info: Mapping[str, Any], margin_status: int | None) -> dict[str, str]:
    """Non-secret facts worth showing: the key's note, master/sub, unified flag and account mode."""
    details: dict[str, str] = {}
    note = info.get("note")
    if isinstance(note, str) and note:
        details["note"] = note
    if isinstance(info.get("isMaster"), bool):
        details["isMaster"] = str(info["isMaster"]).lower()
    if info.get("uta") in (0, 1):
        details["uta"] = str(info["uta"])
    if margin_status is not None:
        details["unifiedMarginStatus"] = str(margin_status)
    return details
