"""Kraken probe: spot keys (API-Sign; GetApiKeyInfo) and futures keys (Authent; api-keys/v3/check).

One probe for both APIs, whose keys are different keys (venues/README.md), in one round trip. A secret that
decodes to 64 bytes may be a spot or a futures key: ``POST /0/private/GetApiKeyInfo`` (permissions, IP
allowlist, expiry and IIBAN), ``Balance`` and ``TradeBalance`` (the "spot" identity), the futures auth
service's ``GET /api/auth/v1/api-keys/v3/check`` (permissions, account UID) and
``GET /derivatives/api/v3/accounts`` (the "futures" identity) all go out at once. GetApiKeyInfo decides: unless
it answers ``EAPI:Invalid key``, the key is judged as a spot key; then the futures answers judge it. When
both APIs reject the key, the spot answer is reported. Any other secret is a futures key: only the two futures
calls are sent, at once.

Nonces are strictly increasing per API key across concurrent requests (:class:`kraken_auth.NonceBook`); a
refused nonce resyncs the clock from ``GET /0/public/Time`` and retries once with a higher one.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode

import aiohttp

from venues import base, http, kraken_auth, limits

SPOT_KEY_INFO = "GetApiKeyInfo"
SPOT_BALANCE = "Balance"
SPOT_TRADE_BALANCE = "TradeBalance"
SPOT_TIME = "/0/public/Time"
FUTURES_CHECK = "/api/auth/v1/api-keys/v3/check"
FUTURES_ACCOUNTS = "/derivatives/api/v3/accounts"
FUTURES_ACCOUNTS_COST = 2  # docs/venues.md §5B
USER_AGENT = "credential-engine/0.1"  # Kraken requires a User-Agent (docs/venues.md §5A.2)
FORM = "application/x-www-form-urlencoded"
INVALID_KEY_CODE = "EAPI:Invalid key"
PERMISSION_DENIED_CODE = "EGeneral:Permission denied"

Outcome = base.Outcome

# Spot errors (body {"error": ["E<Category>:<Message>"]}, HTTP 200), docs/venues.md §5A.5. A code matches its entry
# exactly or with a ":<detail>" suffix ("EService: Throttled: <ts>"); spaces are ignored.
KRAKEN_SPOT_ERRORS: Mapping[str, base.Outcome] = {
    INVALID_KEY_CODE: Outcome.INVALID_KEY,  # also a body/signature mismatch (5A.2)
    "EAPI:Invalid signature": Outcome.INVALID_SECRET,
    "EAPI:Invalid nonce": Outcome.CLOCK_SKEW,  # after one resync + higher nonce
    PERMISSION_DENIED_CODE: Outcome.PERMISSION_DENIED,  # IP_NOT_ALLOWED on GetApiKeyInfo (contract)
    "EGeneral:Temporary lockout": Outcome.RATE_LIMITED,
    "EAPI:Rate limit exceeded": Outcome.RATE_LIMITED,
    "EOrder:Rate limit exceeded": Outcome.RATE_LIMITED,
    "EGeneral:Too many requests": Outcome.RATE_LIMITED,
    "EService: Throttled": Outcome.RATE_LIMITED,
    "EService:Unavailable": Outcome.MAINTENANCE,
    "EService:Market in cancel_only mode": Outcome.MAINTENANCE,
    "EService:Market in post_only mode": Outcome.MAINTENANCE,
    "EService:Busy": Outcome.SERVER_ERROR,
    "EGeneral:Internal error": Outcome.SERVER_ERROR,
    "EDatabase:Internal error": Outcome.SERVER_ERROR,
    "ETrade:User Locked": Outcome.ACCOUNT_RESTRICTED,
    # "bug" in docs/venues.md: our request is wrong, not the key. Transient, so the job ends dead for an operator
    # instead of failing a good credential.
    "EGeneral:Invalid arguments": Outcome.SERVER_ERROR,
    "EAPI:Bad request": Outcome.SERVER_ERROR,
}
# Futures errors (body {"result": "error", "error": "<code>"}), docs/venues.md §5B.
KRAKEN_FUTURES_ERRORS: Mapping[str, base.Outcome] = {
    "authenticationError": Outcome.INVALID_KEY,  # invalid key, signature or permission: no telling
    "nonceBelowThreshold": Outcome.CLOCK_SKEW,
    "nonceDuplicate": Outcome.CLOCK_SKEW,
    "apiLimitExceeded": Outcome.RATE_LIMITED,
    "unavailable": Outcome.MAINTENANCE,
    "Unavailable": Outcome.MAINTENANCE,
    "Server Error": Outcome.SERVER_ERROR,
    "accountInactive": Outcome.ACCOUNT_RESTRICTED,
    "invalidArgument": Outcome.SERVER_ERROR,  # a probe bug, as on spot
    "requiredArgumentMissing": Outcome.SERVER_ERROR,
}
# HTTP answers without a known code; any other status is SERVER_ERROR. On spot a non-200 answer never reached
# the API (Cloudflare, network: 5A.5), so only 429 means something of its own there.
KRAKEN_SPOT_HTTP_STATUS: Mapping[int, base.Outcome] = {429: Outcome.RATE_LIMITED}
KRAKEN_FUTURES_HTTP_STATUS: Mapping[int, base.Outcome] = {
    401: Outcome.INVALID_KEY,  # "API key is not found or request signature is invalid" (5B)
    403: Outcome.PERMISSION_DENIED,
    429: Outcome.RATE_LIMITED,
}

# GetApiKeyInfo permission strings: confirmed ones (5A.3) and the Fast-API schema's names.
_SPOT_TRADE = frozenset({"modify-trades", "trades_modify"})
_SPOT_WITHDRAW = frozenset({"withdraw-funds", "funds_withdraw"})
_SPOT_EARN = frozenset({"earn-funds", "funds_earn"})  # moving funds to/from Earn: an internal transfer
_SPOT_READ = frozenset({"ledger_query", "export_data", "export-data"})  # plus every "query-*" / "*_query*"

_HINTS: Mapping[base.Outcome, str] = {
    Outcome.INVALID_KEY: "the key was rejected (unknown, expired or deleted key, or a signature mismatch)",
    Outcome.INVALID_SECRET: "the signature was rejected: the secret does not belong to this key",
    Outcome.IP_NOT_ALLOWED: "this IP address is not on the key's allowlist",
    Outcome.PERMISSION_DENIED: "the key lacks the permission this call needs",
    Outcome.CLOCK_SKEW: "the nonce was refused again after a clock resync and a higher nonce; another client "
    "of this key may use larger nonces",
    Outcome.RATE_LIMITED: "rate limit hit",
    Outcome.MAINTENANCE: "Kraken is in maintenance or restricted mode",
    Outcome.SERVER_ERROR: "Kraken failed or answered unexpectedly",
    Outcome.ACCOUNT_RESTRICTED: "the account is locked or inactive",
}
_IP_WORDS = ("ip address", "allowlist", "whitelist", "allow list", "allow-list")
_CODE_RE = re.compile(r"[A-Za-z][A-Za-z :_]{0,63}")  # an echo-safe venue code: no digits, nothing key-like
_SAFE_VALUE_RE = re.compile(r"[A-Za-z0-9 ._:/-]{1,40}")


class KrakenProbe(http.VenueProbe):
    """Verifies Kraken spot keys and Kraken Futures keys (told apart by which API accepts them)."""

    venue = base.Venue.KRAKEN
    default_urls: ClassVar[Mapping[str, str]] = {
        "spot": "https://api.kraken.com",
        "futures": "https://futures.kraken.com",
    }
    rate_per_second = 50.0  # futures: 500 cost per 10 s (docs/venues.md §5B); spot is limited per key, below
    burst = 100.0
    # Spot: a per-key counter, starter tier max 15, decay 0.33/s (5A.6). The key owner's own bots share that
    # counter, so we stay well below its top.
    key_rate_per_second = 0.33
    key_burst = 10.0

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str | None = None,
        timeout: float = http.DEFAULT_TIMEOUT,
        limiter: limits.RateLimiter | None = None,
        spot_key_limits: tuple[float, float] | None = None,
        rate_limited: bool = True,
        budgets: limits.IpBudgets | None = None,
    ) -> None:
        super().__init__(
            session,
            base_url=base_url,
            timeout=timeout,
            limiter=limiter,
            rate_limited=rate_limited,
            budgets=budgets,
        )
        if spot_key_limits is not None and rate_limited:
            self.key_limiters = limits.KeyLimiters(*spot_key_limits)
        self.nonces = kraken_auth.NonceBook(self.now_ms)

    def check_keys(self, keys: base.ApiKeys) -> None:
        kraken_auth.parse_keys(keys)

    async def probe(self, keys: base.ApiKeys) -> base.ProbeResult:
        try:
            pair = kraken_auth.parse_keys(keys)
        except base.KeyFormatProblem as problem:
            outcome = Outcome.INVALID_SECRET if problem.field == "apiSecret" else Outcome.INVALID_KEY
            raise base.ProbeFailure(outcome, f"Kraken keys are malformed: {problem}") from None
        if not pair.may_be_spot:
            return self._futures_result(*await http.gather_identities(self._futures_calls(pair)))
        # One round trip. A secret of spot length may belong to a spot or a futures key (the two APIs issue
        # different keys of the same shape), so the spot calls (GetApiKeyInfo, Balance, TradeBalance) and the
        # futures calls (the api-keys check, accounts) go out at once; GetApiKeyInfo decides which answers count.
        # What the speculation costs: a spot key also sends the two futures calls, refused (authenticationError)
        # without touching any futures account's budget of 500 per 10 s (docs/venues.md §5B.6), since the key
        # has no futures account; a futures key also sends Balance and TradeBalance, refused as
        # "EAPI:Invalid key" on a spot counter (§5A.6) that no key owns. Two extra requests per probe, never a
        # cost to a real key's budget (a spot probe costs 6 instead of 3 on our per-IP safety bucket of 50 a
        # second), for one round trip instead of two for every futures key.
        info, balance, trade_balance, check, accounts = await http.gather_identities(
            [
                self._spot(pair, SPOT_KEY_INFO),
                self._spot(pair, SPOT_BALANCE),
                self._spot(pair, SPOT_TRADE_BALANCE),
                *self._futures_calls(pair),
            ]
        )
        if not (isinstance(info, base.ProbeFailure) and info.venue_code == INVALID_KEY_CODE):
            http.raise_verify_failure(info, [balance, trade_balance])  # GetApiKeyInfo decides (5A.3)
            return self._probe_spot(info, [balance, trade_balance])
        spot_rejection = info
        try:
            return self._futures_result(check, accounts)
        except base.ProbeFailure as failure:
            if failure.outcome is not Outcome.INVALID_KEY:
                raise  # e.g. a futures key of an inactive account, or futures unreachable: not conclusive
            base.release_frames(
                failure
            )  # dropped, so its frames (the key pair) must not wait for a collection
        raise base.ProbeFailure(
            spot_rejection.outcome,
            f"{spot_rejection.message}; Kraken Futures does not accept it either",
            venue_code=spot_rejection.venue_code,
        )

    # -- spot --------------------------------------------------------------------------------------------

    def _probe_spot(self, info: Mapping[str, Any], checks: Sequence[object]) -> base.ProbeResult:
        """A spot probe's result, from GetApiKeyInfo's ``info`` and the answers of the identity ``checks``."""
        permissions, details = self._read_key_info(info)
        account_id = info.get("iban")
        if not isinstance(account_id, str) or not account_id:
            raise self._unreadable(f"spot {SPOT_KEY_INFO}")
        reached = _reached(checks, not_reached={Outcome.PERMISSION_DENIED})
        return base.ProbeResult(
            venue=self.venue,
            venue_account_id=account_id,
            permissions=permissions,
            identities=("spot",) if reached else (),
            details=details,
        )

    def _read_key_info(self, info: Mapping[str, Any]) -> tuple[base.Permissions, dict[str, str]]:
        names = info.get("permissions")
        allowlist = info.get("ipAllowlist") or []
        valid_until = _int_or_none(info.get("validUntil", "0"))
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or not isinstance(allowlist, list)
            or not all(isinstance(ip, str) for ip in allowlist)
            or valid_until is None
        ):
            raise self._unreadable(f"spot {SPOT_KEY_INFO}")
        granted = frozenset(names)
        withdraw = bool(granted & _SPOT_WITHDRAW)
        expires_at_ms = valid_until * 1000 if valid_until > 0 else None  # "0" = no expiry (5A.3)
        if expires_at_ms is not None and expires_at_ms <= self.now_ms():
            raise base.ProbeFailure(Outcome.KEY_EXPIRED, "Kraken key is past its validUntil time")
        permissions = base.Permissions(
            read=any(_is_spot_read(n) for n in granted),
            trade=bool(granted & _SPOT_TRADE),
            withdraw=withdraw,
            transfer=withdraw or bool(granted & _SPOT_EARN),  # WalletTransfer needs Withdraw Funds
            ip_restricted=bool(allowlist),
            ip_allowlist=tuple(allowlist),
            expires_at_ms=expires_at_ms,
        )
        details = {"api": "spot", "permissions": ",".join(sorted(n for n in granted if _safe(n)))}
        label = info.get("apiKeyName")
        if isinstance(label, str) and _safe(label):
            details["keyName"] = label
        return permissions, details

    async def _spot(self, pair: kraken_auth.KrakenKeys, method: str) -> dict[str, Any]:
        """One private spot call's ``result``; a refused nonce resyncs and retries once with a higher one."""
        path = f"/0/private/{method}"
        url = self.url("spot", path)
        for attempt in range(2):
            if self.key_limiters is not None:  # spot calls count per key; futures ones per account (5B)
                await self.key_limiters.acquire(pair.api_key)
            seen = self.clock_generation
            # From taking the nonce to queueing in _call's FIFO limiter nothing awaits, so requests of one
            # key leave in nonce order.
            nonce = str(self.nonces.next(pair.api_key))
            post_data = urlencode({"nonce": nonce})
            headers = {
                "API-Key": pair.api_key,
                "API-Sign": kraken_auth.spot_signature(pair.secret, path, nonce, post_data),
                "Content-Type": FORM,
                "User-Agent": USER_AGENT,
            }
            reply = await self._call("POST", url, headers=headers, data=post_data.encode())
            answer = self._spot_answer(reply, method)
            if not isinstance(answer, base.ProbeFailure):
                return answer
            if answer.outcome is not Outcome.CLOCK_SKEW or attempt > 0:
                raise answer
            await self._resync_clock(seen)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spot_answer(self, reply: http.Reply, method: str) -> dict[str, Any] | base.ProbeFailure:
        if reply.status != 200:
            return self._http_failure(reply, f"spot {method}", KRAKEN_SPOT_HTTP_STATUS)
        body = reply.body
        if not isinstance(body, dict) or not isinstance(body.get("error"), list):
            return self.malformed(reply)
        errors = [e for e in body["error"] if isinstance(e, str) and e.startswith("E")]  # W...: warnings
        if errors:
            entry = _spot_entry(errors[0])
            if entry is None:
                return self._failure(Outcome.SERVER_ERROR, f"spot {method}", _echo(errors[0]), reply)
            outcome = KRAKEN_SPOT_ERRORS[entry]
            if entry == PERMISSION_DENIED_CODE and method == SPOT_KEY_INFO:
                outcome = Outcome.IP_NOT_ALLOWED  # GetApiKeyInfo needs no permission: the IP (contract)
            return self._failure(outcome, f"spot {method}", entry, reply)
        result = body.get("result")
        if not isinstance(result, dict):
            return self.malformed(reply)
        return result

    # -- futures -----------------------------------------------------------------------------------------

    def _futures_calls(self, pair: kraken_auth.KrakenKeys) -> list[Coroutine[Any, Any, Any]]:
        """The futures probe's two calls, to be sent at once: the api-keys check (the verify) and accounts."""
        return [
            self._futures_get(pair, FUTURES_CHECK),
            self._futures_get(pair, FUTURES_ACCOUNTS, cost=FUTURES_ACCOUNTS_COST),
        ]

    def _futures_result(self, check: Any, accounts: Any) -> base.ProbeResult:
        """A futures probe's result from the answers (or failures) of the check and the accounts call."""
        if isinstance(check, BaseException):
            if (
                isinstance(check, base.ProbeFailure)
                and check.outcome is Outcome.INVALID_KEY
                and not isinstance(accounts, BaseException)
            ):
                # The accounts call proves the key; the check's signing path is unconfirmed (docs/venues.md §5B).
                raise base.ProbeFailure(
                    Outcome.SERVER_ERROR,
                    "Kraken Futures accepted the key on /accounts but the api-keys check refused it: "
                    "cannot read its permissions and account id",
                    venue_code=check.venue_code,
                )
            raise check
        # authenticationError after a passing check means "no permission for this call" (5B)
        reached = _reached([accounts], not_reached={Outcome.PERMISSION_DENIED, Outcome.INVALID_KEY})
        if reached and not isinstance(accounts.get("accounts"), dict):
            raise self._unreadable(f"futures {FUTURES_ACCOUNTS}")
        account_uid = check.get("accountUid")
        if not isinstance(account_uid, str) or not account_uid:
            raise self._unreadable(f"futures {FUTURES_CHECK}")
        read, trade, withdraw, summary = _futures_permissions(check.get("permissions"))
        cidrs = check.get("allowedCidrBlocks")
        if not isinstance(cidrs, list):
            single = check.get("allowedCidrBlock")
            cidrs = [single] if isinstance(single, str) and single else []
        allowlist = tuple(c for c in cidrs if isinstance(c, str))
        return base.ProbeResult(
            venue=self.venue,
            venue_account_id=account_uid,
            permissions=base.Permissions(
                read=read or reached,
                trade=trade,
                withdraw=withdraw,
                transfer=withdraw,
                ip_restricted=bool(allowlist),
                ip_allowlist=allowlist,
            ),
            identities=("futures",) if reached else (),
            details={"api": "futures", "permissions": summary},
        )

    async def _futures_get(self, pair: kraken_auth.KrakenKeys, path: str, *, cost: float = 1.0) -> Any:
        """One signed futures GET; a refused nonce resyncs and retries once with a higher one."""
        url = self.url("futures", path)
        endpoint_path = path.removeprefix("/derivatives")  # signed without the prefix (docs/venues.md §5B)
        for attempt in range(2):
            seen = self.clock_generation
            nonce = str(self.nonces.next(pair.api_key))
            headers = {
                "APIKey": pair.api_key,
                "Authent": kraken_auth.futures_authent(pair.secret, "", nonce, endpoint_path),
                "Nonce": nonce,
                "User-Agent": USER_AGENT,
            }
            reply = await self._call("GET", url, headers=headers, cost=cost)
            answer = self._futures_answer(reply, path)
            if not isinstance(answer, base.ProbeFailure):
                return answer
            if answer.outcome is not Outcome.CLOCK_SKEW or attempt > 0:
                raise answer
            await self._resync_clock(seen)
        raise AssertionError("unreachable")  # pragma: no cover

    def _futures_answer(self, reply: http.Reply, path: str) -> dict[str, Any] | base.ProbeFailure:
        body = reply.body
        code = body.get("error") if isinstance(body, dict) else None
        failed = isinstance(body, dict) and (body.get("result") == "error" or code is not None)
        if 200 <= reply.status < 300 and isinstance(body, dict) and not failed:
            return body
        where = f"futures {path}"
        if isinstance(code, str) and code in KRAKEN_FUTURES_ERRORS:
            return self._failure(KRAKEN_FUTURES_ERRORS[code], where, code, reply)
        if reply.status in (401, 403) and _mentions_ip(reply.text):
            return self._failure(Outcome.IP_NOT_ALLOWED, where, None, reply)
        if 200 <= reply.status < 300 and not failed:
            return self.malformed(reply)
        echoed = _echo(code) if isinstance(code, str) else None
        return self._http_failure(reply, where, KRAKEN_FUTURES_HTTP_STATUS, echoed)

    # -- shared ------------------------------------------------------------------------------------------

    def _http_failure(
        self,
        reply: http.Reply,
        where: str,
        table: Mapping[int, base.Outcome],
        venue_code: str | None = None,
    ) -> base.ProbeFailure:
        return self._failure(table.get(reply.status, Outcome.SERVER_ERROR), where, venue_code, reply)

    def _failure(
        self, outcome: base.Outcome, where: str, venue_code: str | None, reply: http.Reply
    ) -> base.ProbeFailure:
        shown = venue_code or f"HTTP {reply.status}"
        return base.ProbeFailure(
            outcome,
            f"Kraken {where} answered {shown}: {_HINTS.get(outcome, '')}",
            retry_after=reply.retry_after() if outcome.transient else None,
            venue_code=venue_code,
        )

    async def _resync_clock(self, seen: int) -> None:
        """Learn Kraken's clock from ``GET /0/public/Time`` unless a resync happened since ``seen``."""

        def server_ms(reply: http.Reply) -> float:
            if reply.status != 200:
                raise self._http_failure(reply, SPOT_TIME, KRAKEN_SPOT_HTTP_STATUS)
            result = reply.body.get("result") if isinstance(reply.body, dict) else None
            unixtime = _int_or_none(result.get("unixtime")) if isinstance(result, dict) else None
            if not unixtime:
                raise self.malformed(reply)
            return float(unixtime * 1000)

        # whole seconds only: aim at the middle of the second, ignore what that resolution cannot see
        await self.resync_clock(
            self.url("spot", SPOT_TIME),
            server_ms,
            seen=seen,
            headers={"User-Agent": USER_AGENT},
            resolution_ms=1000,
        )

    def _unreadable(self, where: str) -> base.ProbeFailure:
        return base.ProbeFailure(Outcome.SERVER_ERROR, f"Kraken {where} answered in an unexpected shape")


def _spot_entry(code: str) -> str | None:
    """The table entry a spot error code falls under, if any."""
    squashed = code.replace(" ", "")
    for entry in KRAKEN_SPOT_ERRORS:
        key = entry.replace(" ", "")
        if squashed == key or squashed.startswith(key + ":"):
            return entry
    return None


def _is_spot_read(name: str) -> bool:
    return name.startswith("query-") or "_query" in name or name in _SPOT_READ


def _futures_permissions(raw: object) -> tuple[bool, bool, bool, str]:
    """(read, trade, withdraw, summary) from the check's ``permissions`` object, whose schema is undocumented
    (docs/venues.md §8). We read it as the Futures UI sets it: a "general" area (no access / read only / full
    access) and a "withdrawal" area (no access / full access), under any spelling."""
    if isinstance(raw, dict):
        entries = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list):
        entries = [(str(v), True) for v in raw]
    else:
        entries = []
    read = trade = withdraw = False
    for area, level in entries:
        where, how = _squash(area), _squash(level)
        if how in ("", "none", "noaccess", "false", "no", "0"):
            continue
        if "withdraw" in where:
            withdraw = True
        elif any(word in where for word in ("general", "trad", "order")):
            read = True
            trade = trade or how not in ("readonly", "read", "view")
        elif any(word in where for word in ("read", "view", "query")):
            read = True
    summary = ",".join(
        f"{area}={level}"
        for area, level in entries
        if isinstance(level, str | bool) and _safe(area) and _safe(str(level))
    )
    return read, trade, withdraw, summary or "unknown"


def _squash(value: object) -> str:
    text = " ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _reached(results: Sequence[object], *, not_reached: set[base.Outcome]) -> bool:
    """True when any identity check succeeded. Otherwise a transient (or unexpected) failure is raised,
    since "not reached" cannot be concluded from it; failures in ``not_reached`` just mean False."""
    if any(not isinstance(r, BaseException) for r in results):
        return True
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if not isinstance(failure, base.ProbeFailure) or failure.transient:
            raise failure
    for failure in failures:
        if isinstance(failure, base.ProbeFailure) and failure.outcome not in not_reached:
            raise failure
    return False


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _mentions_ip(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _IP_WORDS)


def _echo(code: str) -> str | None:
    """A venue code we do not know, shown only if it cannot carry key material."""
    return code if _CODE_RE.fullmatch(code) else None


def _safe(value: str) -> bool:
    return bool(_SAFE_VALUE_RE.fullmatch(value))
