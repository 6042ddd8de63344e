"""Kraken probe: signing (official vector, futures formula), nonces, error tables, full probes, no leaks."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import itertools
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from venues import base, kraken, kraken_auth, limits

SPOT = "https://api.kraken.com"
FUTURES = "https://futures.kraken.com"
KEY_INFO_URL = f"{SPOT}/0/private/GetApiKeyInfo"
BALANCE_URL = f"{SPOT}/0/private/Balance"
TRADE_BALANCE_URL = f"{SPOT}/0/private/TradeBalance"
TIME_URL = f"{SPOT}/0/public/Time"
CHECK_URL = f"{FUTURES}/api/auth/v1/api-keys/v3/check"
ACCOUNTS_URL = f"{FUTURES}/derivatives/api/v3/accounts"

CANARY = "CANARYkr4k3n"
API_KEY = "Kr4kenPublicKeyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # 56 characters
SPOT_SECRET = base64.b64encode((CANARY.encode() * 8)[:64]).decode()  # 64 bytes: may be a spot key
FUTURES_SECRET = base64.b64encode((CANARY.encode() * 8)[:48]).decode()  # cannot be a spot secret
SPOT_KEYS = base.ApiKeys(API_KEY, SPOT_SECRET)
FUTURES_KEYS = base.ApiKeys(API_KEY, FUTURES_SECRET)

KEY_INFO = {
    "apiKeyName": "probe-key",
    "apiKey": API_KEY,
    "nonce": "1772627060997",
    "nonceWindow": 0,
    "permissions": ["query-funds", "withdraw-funds", "query-open-trades", "modify-trades"],
    "iban": "AA88 N84G WOAK NMOI",
    "validUntil": "0",
    "queryFrom": "0",
    "queryTo": "0",
    "createdTime": "1772542900",
    "modifiedTime": "1772543095",
    "ipAllowlist": ["10.0.0.0/8"],
    "lastUsed": "1772627061",
}
CHECK = {
    "apiKey": API_KEY,
    "accountUid": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
    "iiban": "AA08 N84G CPAR UN7A",
    "createdAt": "2019-08-24T14:15:22Z",
    "permissions": {"general": "full_access", "withdrawal": "no_access"},
    "allowedCidrBlock": "192.168.0.0/16",
    "allowedCidrBlocks": ["192.168.0.0/16"],
}
ACCOUNTS = {
    "result": "success",
    "accounts": {"cash": {"type": "cashAccount"}, "flex": {"type": "multiCollateralMarginAccount"}},
    "serverTime": "2024-01-01T00:00:00.000Z",
}


def ok(result: object) -> dict[str, Any]:
    return {"error": [], "result": result}


def spot_error(code: str) -> dict[str, Any]:
    return {"error": [code]}


def futures_error(code: str) -> dict[str, Any]:
    return {"result": "error", "error": code, "serverTime": "2024-01-01T00:00:00.000Z"}


@pytest.fixture
async def probe(session: aiohttp.ClientSession) -> kraken.KrakenProbe:
    return kraken.KrakenProbe(session)


def calls(m: aioresponses, method: str, url: str) -> list[Any]:
    return list(m.requests.get((method, URL(url)), []))


def good_spot(m: aioresponses, info: dict[str, Any] | None = None) -> None:
    m.post(KEY_INFO_URL, payload=ok(info or KEY_INFO))
    m.post(BALANCE_URL, payload=ok({"ZUSD": "10.0"}))
    m.post(TRADE_BALANCE_URL, payload=ok({"eb": "10.0"}))


def good_futures(m: aioresponses) -> None:
    m.get(CHECK_URL, payload=CHECK)
    m.get(ACCOUNTS_URL, payload=ACCOUNTS)


def server_time(offset_s: float) -> dict[str, Any]:
    return ok({"unixtime": int(time.time() + offset_s), "rfc1123": "ignored"})


# -- independent implementations of the documented formulas (docs/venues.md §5A.2, 5B), not the module's --------


def documented_api_sign(secret_b64: str, path: str, post_data: str) -> str:
    nonce = parse_qs(post_data)["nonce"][0]
    digest = hashlib.sha256(nonce.encode() + post_data.encode()).digest()
    mac = hmac.new(base64.b64decode(secret_b64), path.encode() + digest, hashlib.sha512)
    return base64.b64encode(mac.digest()).decode()


def documented_authent(secret_b64: str, post_data: str, nonce: str, endpoint_path: str) -> str:
    digest = hashlib.sha256(f"{post_data}{nonce}{endpoint_path}".encode()).digest()
    return base64.b64encode(hmac.new(base64.b64decode(secret_b64), digest, hashlib.sha512).digest()).decode()


# -- signing -----------------------------------------------------------------------------------------------


def test_spot_signature_reproduces_official_vector() -> None:
    """The AddOrder example of docs/venues.md §5A.8 signs byte for byte."""
    secret = base64.b64decode(
        "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg=="
    )
    signature = kraken_auth.spot_signature(
        secret,
        "/0/private/AddOrder",
        "1616492376594",
        "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25",
    )
    assert signature == (
        "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
    )


def test_futures_authent_matches_documented_formula() -> None:
    """Authent equals base64(HMAC-SHA512(b64decode(secret), SHA256(postData + Nonce + endpointPath)))."""
    secret = base64.b64encode(bytes(range(64))).decode()
    got = kraken_auth.futures_authent(
        base64.b64decode(secret), "symbol=fi_xbtusd_180615", "1415957147987", "/api/v3/orderbook"
    )
    assert got == documented_authent(secret, "symbol=fi_xbtusd_180615", "1415957147987", "/api/v3/orderbook")


async def test_spot_requests_carry_documented_headers(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """Spot calls send API-Key, a form body with the nonce, an API-Sign of that body and a User-Agent."""
    good_spot(mocked)
    await probe.probe(SPOT_KEYS)
    for url in (KEY_INFO_URL, BALANCE_URL, TRADE_BALANCE_URL):
        (call,) = calls(mocked, "POST", url)
        headers, body = call.kwargs["headers"], call.kwargs["data"].decode()
        assert headers["API-Key"] == API_KEY
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert headers["User-Agent"]
        assert headers["API-Sign"] == documented_api_sign(SPOT_SECRET, URL(url).path, body)


async def test_futures_requests_carry_documented_authent(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """Futures calls sign SHA256("" + Nonce + path minus /derivatives), send APIKey, Nonce, User-Agent."""
    good_futures(mocked)
    await probe.probe(FUTURES_KEYS)
    for url, endpoint_path in (
        (CHECK_URL, "/api/auth/v1/api-keys/v3/check"),
        (ACCOUNTS_URL, "/api/v3/accounts"),
    ):
        (call,) = calls(mocked, "GET", url)
        headers = call.kwargs["headers"]
        assert headers["APIKey"] == API_KEY
        assert headers["User-Agent"]
        assert headers["Authent"] == documented_authent(FUTURES_SECRET, "", headers["Nonce"], endpoint_path)


# -- nonces ------------------------------------------------------------------------------------------------


async def test_nonce_strictly_increasing_across_concurrent_requests(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """150 requests of one key, from 50 concurrent probes, leave with strictly increasing nonces."""
    fast = kraken.KrakenProbe(session, spot_key_limits=(1e6, 1e6), limiter=limits.RateLimiter(1e6, 1e6))
    sent: list[tuple[int, str, str, str]] = []  # nonce, path, body, API-Sign in the order they left

    def record(url: URL, **kwargs: Any) -> None:
        body = kwargs["data"].decode()
        sent.append((int(parse_qs(body)["nonce"][0]), url.path, body, kwargs["headers"]["API-Sign"]))

    mocked.post(KEY_INFO_URL, payload=ok(KEY_INFO), callback=record, repeat=True)
    mocked.post(BALANCE_URL, payload=ok({}), callback=record, repeat=True)
    mocked.post(TRADE_BALANCE_URL, payload=ok({}), callback=record, repeat=True)
    results = await asyncio.gather(*(fast.probe(SPOT_KEYS) for _ in range(50)))

    assert len(results) == 50
    assert len(sent) == 150
    nonces = [nonce for nonce, _, _, _ in sent]
    assert all(a < b for a, b in itertools.pairwise(nonces)), "nonces must rise in send order"
    for _, path, body, sign in sent:
        assert sign == documented_api_sign(SPOT_SECRET, path, body)


def test_nonce_book_rises_past_clock_and_keeps_keys_apart() -> None:
    """A frozen clock still gives rising nonces per key, and each key has its own counter."""
    book = kraken_auth.NonceBook(lambda: 1_000)
    assert [book.next("a"), book.next("a"), book.next("a")] == [1_000, 1_001, 1_002]
    assert book.next("b") == 1_000


async def test_spot_key_limiter_paces_one_key(session: aiohttp.ClientSession, mocked: aioresponses) -> None:
    """Spot calls of one key pass a per-key bucket: beyond the burst they wait for the decay."""
    slow = kraken.KrakenProbe(session, spot_key_limits=(20.0, 3.0))
    good_spot(mocked)
    good_spot(mocked)
    started = time.monotonic()
    await asyncio.gather(slow.probe(SPOT_KEYS), slow.probe(SPOT_KEYS))  # 6 calls: 3 free, 3 at 20/s
    assert time.monotonic() - started >= 0.12


def test_default_spot_pacing_stays_below_starter_tier() -> None:
    """The default per-key bucket never lets the probe alone fill Kraken's starter counter (max 15)."""
    assert (kraken.KrakenProbe.key_burst or 0) < 15
    assert (kraken.KrakenProbe.key_rate_per_second or 1) <= 0.33


# -- full probes -------------------------------------------------------------------------------------------


async def test_spot_probe_good_key(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A good spot key: permissions from GetApiKeyInfo, IIBAN as account id, allowlist, expiry, identity."""
    valid_until = int(time.time()) + 86_400
    good_spot(mocked, {**KEY_INFO, "validUntil": str(valid_until)})
    result = await probe.probe(SPOT_KEYS)
    assert result.venue is base.Venue.KRAKEN
    assert result.venue_account_id == "AA88 N84G WOAK NMOI"
    assert result.identities == ("spot",)
    assert result.permissions == base.Permissions(
        read=True,
        trade=True,
        withdraw=True,
        transfer=True,
        ip_restricted=True,
        ip_allowlist=("10.0.0.0/8",),
        expires_at_ms=valid_until * 1000,
    )
    assert result.details["api"] == "spot"
    assert result.details["keyName"] == "probe-key"
    # the futures check went out beside the spot calls (one round trip); unmocked here (NETWORK), and ignored,
    # since GetApiKeyInfo accepted the key
    assert len(calls(mocked, "GET", CHECK_URL)) == 1


async def test_spot_read_only_key(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A query-only key without expiry or allowlist reads as read-only, unrestricted, never expiring."""
    good_spot(mocked, {**KEY_INFO, "permissions": ["query-funds"], "ipAllowlist": []})
    result = await probe.probe(SPOT_KEYS)
    assert result.permissions == base.Permissions(read=True)


async def test_spot_identity_requests_in_flight_together(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """Balance and TradeBalance are both sent before either answers."""
    both = asyncio.Barrier(2)

    async def meet(url: URL, **kwargs: Any) -> None:
        await asyncio.wait_for(both.wait(), 2)

    mocked.post(KEY_INFO_URL, payload=ok(KEY_INFO))
    mocked.post(BALANCE_URL, payload=ok({}), callback=meet)
    mocked.post(TRADE_BALANCE_URL, payload=ok({}), callback=meet)
    result = await probe.probe(SPOT_KEYS)
    assert result.identities == ("spot",)


async def test_spot_identity_denied_is_not_reached(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A key without Query Funds verifies, but reaches no identity."""
    mocked.post(KEY_INFO_URL, payload=ok({**KEY_INFO, "permissions": ["modify-trades"]}))
    mocked.post(BALANCE_URL, payload=spot_error("EGeneral:Permission denied"))
    mocked.post(TRADE_BALANCE_URL, payload=spot_error("EGeneral:Permission denied"))
    result = await probe.probe(SPOT_KEYS)
    assert result.identities == ()
    assert result.permissions.trade
    assert not result.permissions.read


async def test_spot_identity_transient_fails_probe(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """When no identity check succeeds and one failed transiently, the probe fails transiently."""
    mocked.post(KEY_INFO_URL, payload=ok(KEY_INFO))
    mocked.post(BALANCE_URL, payload=spot_error("EService:Busy"))
    mocked.post(TRADE_BALANCE_URL, payload=spot_error("EGeneral:Permission denied"))
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.SERVER_ERROR


async def test_spot_expired_key(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A validUntil in the past is KEY_EXPIRED."""
    mocked.post(KEY_INFO_URL, payload=ok({**KEY_INFO, "validUntil": str(int(time.time()) - 60)}))
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.KEY_EXPIRED


async def test_spot_permission_denied_on_key_info_is_ip(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """GetApiKeyInfo needs no permission, so Permission denied there means the IP (the contract)."""
    mocked.post(KEY_INFO_URL, payload=spot_error("EGeneral:Permission denied"))
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.IP_NOT_ALLOWED


async def test_futures_probe_good_key(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A futures key (secret not spot-shaped): permissions and UID from the check, futures identity."""
    good_futures(mocked)
    result = await probe.probe(FUTURES_KEYS)
    assert result.venue_account_id == CHECK["accountUid"]
    assert result.identities == ("futures",)
    assert result.permissions == base.Permissions(
        read=True, trade=True, ip_restricted=True, ip_allowlist=("192.168.0.0/16",)
    )
    assert result.details["api"] == "futures"
    assert calls(mocked, "POST", KEY_INFO_URL) == []


async def test_futures_read_only_withdrawal_key(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A read-only general area and a full withdrawal area read as read + withdraw, no trade."""
    permissions = {"General API": "Read Only", "Withdrawal API": "Full Access"}
    mocked.get(CHECK_URL, payload={**CHECK, "permissions": permissions, "allowedCidrBlocks": []})
    mocked.get(ACCOUNTS_URL, payload=ACCOUNTS)
    result = await probe.probe(FUTURES_KEYS)
    assert result.permissions == base.Permissions(read=True, withdraw=True, transfer=True)


async def test_spot_invalid_key_falls_back_to_futures(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """A spot-shaped secret that spot does not know is tried as a futures key."""
    mocked.post(KEY_INFO_URL, payload=spot_error("EAPI:Invalid key"))
    good_futures(mocked)
    result = await probe.probe(SPOT_KEYS)
    assert result.identities == ("futures",)


async def test_both_apis_reject_reports_spot(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """When spot and futures both reject the key, the spot answer is reported."""
    mocked.post(KEY_INFO_URL, payload=spot_error("EAPI:Invalid key"))
    mocked.get(CHECK_URL, status=401, payload=futures_error("authenticationError"))
    mocked.get(ACCOUNTS_URL, status=401, payload=futures_error("authenticationError"))
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.INVALID_KEY
    assert caught.value.venue_code == "EAPI:Invalid key"


async def test_futures_identity_requests_in_flight_together(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """The futures check and the accounts call are both sent before either answers."""
    both = asyncio.Barrier(2)

    async def meet(url: URL, **kwargs: Any) -> None:
        await asyncio.wait_for(both.wait(), 2)

    mocked.get(CHECK_URL, payload=CHECK, callback=meet)
    mocked.get(ACCOUNTS_URL, payload=ACCOUNTS, callback=meet)
    assert (await probe.probe(FUTURES_KEYS)).identities == ("futures",)


async def test_futures_accounts_denied_is_not_reached(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """After a passing check, authenticationError on accounts means no access there: no identity."""
    mocked.get(CHECK_URL, payload={**CHECK, "permissions": {"general": "no_access"}})
    mocked.get(ACCOUNTS_URL, payload=futures_error("authenticationError"))
    result = await probe.probe(FUTURES_KEYS)
    assert result.identities == ()
    assert not result.permissions.read


async def test_futures_check_refused_but_accounts_accepted(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """A key the accounts call accepts is never called invalid because the (unconfirmed) check refused it."""
    mocked.get(CHECK_URL, status=401, payload=futures_error("authenticationError"))
    mocked.get(ACCOUNTS_URL, payload=ACCOUNTS)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(FUTURES_KEYS)
    assert caught.value.transient


# -- clock skew and nonce recovery --------------------------------------------------------------------------


async def test_invalid_nonce_resyncs_and_retries_with_higher_nonce(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """EAPI:Invalid nonce fetches Kraken's time, then retries once with a nonce above the refused one."""
    mocked.post(KEY_INFO_URL, payload=spot_error("EAPI:Invalid nonce"))
    mocked.get(TIME_URL, payload=server_time(3600))
    good_spot(mocked)
    result = await probe.probe(SPOT_KEYS)
    assert result.identities == ("spot",)
    first, second = (
        int(parse_qs(c.kwargs["data"].decode())["nonce"][0]) for c in calls(mocked, "POST", KEY_INFO_URL)
    )
    assert second > first
    assert second >= (time.time() + 3590) * 1000  # the resynced clock moved the nonce ahead
    assert calls(mocked, "GET", TIME_URL)[0].kwargs["headers"]["User-Agent"]


async def test_invalid_nonce_twice_is_clock_skew(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A second refused nonce gives up with CLOCK_SKEW (transient) after exactly one resync."""
    mocked.post(KEY_INFO_URL, payload=spot_error("EAPI:Invalid nonce"), repeat=True)
    mocked.get(TIME_URL, payload=server_time(0), repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.CLOCK_SKEW
    assert len(calls(mocked, "POST", KEY_INFO_URL)) == 2
    assert len(calls(mocked, "GET", TIME_URL)) == 1


async def test_futures_nonce_refusal_resyncs_and_retries(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """nonceBelowThreshold on futures resyncs once and retries with a higher Nonce header."""
    mocked.get(CHECK_URL, payload=futures_error("nonceBelowThreshold"))
    mocked.get(TIME_URL, payload=server_time(0))
    mocked.get(CHECK_URL, payload=CHECK)
    mocked.get(ACCOUNTS_URL, payload=ACCOUNTS)
    result = await probe.probe(FUTURES_KEYS)
    assert result.venue_account_id == CHECK["accountUid"]
    first, second = (int(c.kwargs["headers"]["Nonce"]) for c in calls(mocked, "GET", CHECK_URL))
    assert second > first


# -- transport-level failures -------------------------------------------------------------------------------


async def test_rate_limited_http_429_carries_retry_after(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """HTTP 429 is RATE_LIMITED with the Retry-After seconds."""
    mocked.post(KEY_INFO_URL, status=429, body="slow down", headers={"Retry-After": "7"})
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.RATE_LIMITED
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize("status", [500, 502, 503, 520])
async def test_http_5xx_is_server_error(probe: kraken.KrakenProbe, mocked: aioresponses, status: int) -> None:
    """A 5xx answer (Cloudflare included) is a transient SERVER_ERROR."""
    mocked.post(KEY_INFO_URL, status=status, body="<html>bad gateway</html>")
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.SERVER_ERROR


async def test_spot_non_200_never_reached_api(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A spot 403 (a CDN block) did not reach the API: transient, never a verdict on the key (5A.5)."""
    mocked.post(KEY_INFO_URL, status=403, body="forbidden")
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.transient


@pytest.mark.parametrize("body", ["not json {", '{"result": {}}', '{"error": [], "result": []}', ""])
async def test_malformed_spot_answer(probe: kraken.KrakenProbe, mocked: aioresponses, body: str) -> None:
    """An unreadable or wrongly shaped spot answer is a transient SERVER_ERROR."""
    mocked.post(KEY_INFO_URL, status=200, body=body)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.SERVER_ERROR


async def test_malformed_futures_answer(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A futures check answering non-JSON is a transient SERVER_ERROR."""
    mocked.get(CHECK_URL, status=200, body="<html>")
    mocked.get(ACCOUNTS_URL, payload=ACCOUNTS)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(FUTURES_KEYS)
    assert caught.value.outcome is base.Outcome.SERVER_ERROR


async def test_timeout(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A request that times out is TIMEOUT."""
    mocked.post(KEY_INFO_URL, exception=TimeoutError())
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is base.Outcome.TIMEOUT


async def test_warnings_are_not_errors(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """W... entries in the error list are warnings: the result still counts."""
    mocked.post(KEY_INFO_URL, payload={"error": ["WGeneral:Deprecated"], "result": KEY_INFO})
    mocked.post(BALANCE_URL, payload=ok({}))
    mocked.post(TRADE_BALANCE_URL, payload=ok({}))
    assert (await probe.probe(SPOT_KEYS)).identities == ("spot",)


# -- error tables -------------------------------------------------------------------------------------------


def expected_on_key_info(code: str) -> base.Outcome:
    """What GetApiKeyInfo answering ``code`` must become: the table, but Permission denied there is the IP."""
    if code == "EGeneral:Permission denied":
        return base.Outcome.IP_NOT_ALLOWED
    return kraken.KRAKEN_SPOT_ERRORS[code]


async def spot_outcome(probe: kraken.KrakenProbe, m: aioresponses, code: str) -> base.ProbeFailure:
    m.post(KEY_INFO_URL, payload=spot_error(code), repeat=True)
    m.get(TIME_URL, payload=server_time(0), repeat=True)
    m.get(CHECK_URL, status=401, payload=futures_error("authenticationError"), repeat=True)
    m.get(ACCOUNTS_URL, status=401, payload=futures_error("authenticationError"), repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    return caught.value


@pytest.mark.parametrize("code", sorted(kraken.KRAKEN_SPOT_ERRORS))
async def test_spot_error_table(probe: kraken.KrakenProbe, mocked: aioresponses, code: str) -> None:
    """Every spot error of the module's table lands in its outcome."""
    failure = await spot_outcome(probe, mocked, code)
    assert failure.outcome is expected_on_key_info(code)
    assert failure.venue_code == code


# docs/venues.md §5A.5, copied: error -> documented class (our pick where it names two).
SPOT_DOCUMENTED = [
    ("EAPI:Invalid key", {base.Outcome.INVALID_KEY}),
    ("EAPI:Invalid signature", {base.Outcome.INVALID_SECRET}),
    ("EAPI:Invalid nonce", {base.Outcome.CLOCK_SKEW}),
    ("EGeneral:Permission denied", {base.Outcome.IP_NOT_ALLOWED}),  # on GetApiKeyInfo (contract)
    ("EGeneral:Temporary lockout", {base.Outcome.RATE_LIMITED}),
    ("EAPI:Rate limit exceeded", {base.Outcome.RATE_LIMITED}),
    ("EOrder:Rate limit exceeded", {base.Outcome.RATE_LIMITED}),
    ("EGeneral:Too many requests", {base.Outcome.RATE_LIMITED}),
    ("EService: Throttled: 1700000000", {base.Outcome.RATE_LIMITED}),
    ("EService:Unavailable", {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("EService:Busy", {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("EService:Market in cancel_only mode", {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("EService:Market in post_only mode", {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("EGeneral:Internal error", {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("EDatabase:Internal error", {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("ETrade:User Locked", {base.Outcome.ACCOUNT_RESTRICTED}),
    ("EGeneral:Invalid arguments", {base.Outcome.SERVER_ERROR}),  # "bug": never blame the key
    ("EAPI:Bad request", {base.Outcome.SERVER_ERROR}),
]


@pytest.mark.parametrize(("code", "allowed"), SPOT_DOCUMENTED)
async def test_spot_documented_errors(
    probe: kraken.KrakenProbe, mocked: aioresponses, code: str, allowed: set[base.Outcome]
) -> None:
    """Each error docs/venues.md §5A.5 lists lands in the class it documents."""
    assert (await spot_outcome(probe, mocked, code)).outcome in allowed


async def test_spot_permission_denied_on_identity_is_permission(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """Off GetApiKeyInfo, Permission denied keeps its table class (identity not reached)."""
    assert kraken.KRAKEN_SPOT_ERRORS["EGeneral:Permission denied"] is base.Outcome.PERMISSION_DENIED
    mocked.post(KEY_INFO_URL, payload=ok(KEY_INFO))
    mocked.post(BALANCE_URL, payload=spot_error("EGeneral:Permission denied"))
    mocked.post(TRADE_BALANCE_URL, payload=spot_error("EGeneral:Permission denied"))
    assert (await probe.probe(SPOT_KEYS)).identities == ()


async def test_unknown_spot_error_is_transient(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """An error no table knows never fails a credential: transient SERVER_ERROR."""
    failure = await spot_outcome(probe, mocked, "EFunding:Something new")
    assert failure.outcome is base.Outcome.SERVER_ERROR
    assert failure.venue_code == "EFunding:Something new"


async def futures_outcome(probe: kraken.KrakenProbe, m: aioresponses, code: str, status: int) -> base.Outcome:
    m.get(CHECK_URL, status=status, payload=futures_error(code), repeat=True)
    m.get(ACCOUNTS_URL, status=status, payload=futures_error(code), repeat=True)
    m.get(TIME_URL, payload=server_time(0), repeat=True)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(FUTURES_KEYS)
    return caught.value.outcome


@pytest.mark.parametrize("code", sorted(kraken.KRAKEN_FUTURES_ERRORS))
async def test_futures_error_table(probe: kraken.KrakenProbe, mocked: aioresponses, code: str) -> None:
    """Every futures error of the module's table lands in its outcome."""
    assert await futures_outcome(probe, mocked, code, 200) is kraken.KRAKEN_FUTURES_ERRORS[code]


# docs/venues.md §5B, copied.
FUTURES_DOCUMENTED = [
    ("authenticationError", 401, {base.Outcome.INVALID_KEY}),
    ("authenticationError", 200, {base.Outcome.INVALID_KEY}),
    ("nonceBelowThreshold", 200, {base.Outcome.CLOCK_SKEW}),
    ("nonceDuplicate", 200, {base.Outcome.CLOCK_SKEW}),
    ("apiLimitExceeded", 200, {base.Outcome.RATE_LIMITED}),
    ("unavailable", 200, {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("Unavailable", 503, {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("Server Error", 500, {base.Outcome.MAINTENANCE, base.Outcome.SERVER_ERROR}),
    ("accountInactive", 200, {base.Outcome.ACCOUNT_RESTRICTED}),
    ("invalidArgument", 200, {base.Outcome.SERVER_ERROR}),
    ("requiredArgumentMissing", 200, {base.Outcome.SERVER_ERROR}),
]


@pytest.mark.parametrize(("code", "status", "allowed"), FUTURES_DOCUMENTED)
async def test_futures_documented_errors(
    probe: kraken.KrakenProbe, mocked: aioresponses, code: str, status: int, allowed: set[base.Outcome]
) -> None:
    """Each error docs/venues.md §5B lists lands in the class it documents."""
    assert await futures_outcome(probe, mocked, code, status) in allowed


@pytest.mark.parametrize("status", sorted(kraken.KRAKEN_FUTURES_HTTP_STATUS))
async def test_futures_http_status_table(
    probe: kraken.KrakenProbe, mocked: aioresponses, status: int
) -> None:
    """A futures status without a known code lands in the status table's outcome."""
    mocked.get(CHECK_URL, status=status, body="")
    mocked.get(ACCOUNTS_URL, status=status, body="")
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(FUTURES_KEYS)
    assert caught.value.outcome is kraken.KRAKEN_FUTURES_HTTP_STATUS[status]


@pytest.mark.parametrize("status", sorted(kraken.KRAKEN_SPOT_HTTP_STATUS))
async def test_spot_http_status_table(probe: kraken.KrakenProbe, mocked: aioresponses, status: int) -> None:
    """A spot status of the table lands in its outcome."""
    mocked.post(KEY_INFO_URL, status=status, body="")
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(SPOT_KEYS)
    assert caught.value.outcome is kraken.KRAKEN_SPOT_HTTP_STATUS[status]


# -- key format --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        (base.ApiKeys("short", SPOT_SECRET), "apiKey"),
        (base.ApiKeys(API_KEY[:-4] + " \n!!", SPOT_SECRET), "apiKey"),
        (base.ApiKeys(API_KEY, "not base64 at all " + CANARY), "apiSecret"),
        (base.ApiKeys(API_KEY, SPOT_SECRET[:-3]), "apiSecret"),  # truncated: bad padding
        (base.ApiKeys(API_KEY, base64.b64encode(b"tiny").decode()), "apiSecret"),
        (base.ApiKeys(API_KEY, ""), "apiSecret"),
    ],
)
async def test_check_keys_names_the_field(probe: kraken.KrakenProbe, keys: base.ApiKeys, field: str) -> None:
    """Malformed keys raise KeyFormatProblem naming the field, never echoing the value."""
    with pytest.raises(base.KeyFormatProblem) as caught:
        probe.check_keys(keys)
    assert caught.value.field == field
    for value in (CANARY, keys.api_key, keys.api_secret):
        assert not value or value not in str(caught.value)


async def test_check_keys_accepts_spot_and_futures_shapes(probe: kraken.KrakenProbe) -> None:
    """A 64-byte base64 secret, another base64 secret (futures) and a pasted newline all pass."""
    probe.check_keys(SPOT_KEYS)
    probe.check_keys(FUTURES_KEYS)
    probe.check_keys(base.ApiKeys(API_KEY, SPOT_SECRET + "\n"))


async def test_probe_with_malformed_secret_fails_without_io(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """probe() of a secret that is not base64 is INVALID_SECRET and sends nothing."""
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(base.ApiKeys(API_KEY, "%%%" + CANARY))
    assert caught.value.outcome is base.Outcome.INVALID_SECRET
    assert mocked.requests == {}


# -- no secrets anywhere -------------------------------------------------------------------------------------

Scenario = Callable[[aioresponses], base.ApiKeys]


def _scenarios() -> list[tuple[str, Scenario]]:
    out: list[tuple[str, Scenario]] = []

    def spot(payload: dict[str, Any] | None = None, **kw: Any) -> Scenario:
        def arrange(m: aioresponses) -> base.ApiKeys:
            m.post(KEY_INFO_URL, payload=payload, repeat=True, **kw)
            m.get(TIME_URL, payload=server_time(0), repeat=True)
            m.get(CHECK_URL, status=401, payload=futures_error("authenticationError"), repeat=True)
            m.get(ACCOUNTS_URL, status=401, payload=futures_error("authenticationError"), repeat=True)
            return SPOT_KEYS

        return arrange

    def futures(status: int, payload: dict[str, Any] | None = None, **kw: Any) -> Scenario:
        def arrange(m: aioresponses) -> base.ApiKeys:
            m.get(CHECK_URL, status=status, payload=payload, repeat=True, **kw)
            m.get(ACCOUNTS_URL, status=status, payload=payload, repeat=True, **kw)
            m.get(TIME_URL, payload=server_time(0), repeat=True)
            return FUTURES_KEYS

        return arrange

    for code in kraken.KRAKEN_SPOT_ERRORS:
        out.append((f"spot {code}", spot(spot_error(code))))
    for code in kraken.KRAKEN_FUTURES_ERRORS:
        out.append((f"futures {code}", futures(200, futures_error(code))))
    out.append(("spot expired", spot(ok({**KEY_INFO, "validUntil": "1"}))))
    out.append(("spot 429", spot(None, status=429, body="", headers={"Retry-After": "3"})))
    out.append(("spot 502", spot(None, status=502, body="<html>")))
    out.append(("spot malformed", spot(None, status=200, body="{nope")))
    out.append(("spot timeout", spot(None, exception=TimeoutError())))
    out.append(("spot network", spot(None, exception=aiohttp.ClientConnectionError(f"{API_KEY} {CANARY}"))))
    out.append(("futures 401", futures(401, None, body="")))
    out.append(("futures timeout", futures(200, None, exception=TimeoutError())))
    return out


@pytest.mark.parametrize(("name", "arrange"), _scenarios())
async def test_canary_never_leaks(
    probe: kraken.KrakenProbe, mocked: aioresponses, name: str, arrange: Scenario
) -> None:
    """No failure path puts the secret, the signatures or the full API key into the raised ProbeFailure."""
    keys = arrange(mocked)
    with pytest.raises(base.ProbeFailure) as caught:
        await probe.probe(keys)
    signatures = [
        call.kwargs["headers"].get(header)
        for calls_ in mocked.requests.values()
        for call in calls_
        for header in ("API-Sign", "Authent")
        if call.kwargs.get("headers") and call.kwargs["headers"].get(header)
    ]
    failure = caught.value
    shown = [str(failure), repr(failure), failure.message, str(failure.venue_code), *map(repr, failure.args)]
    for secret in (CANARY, keys.api_secret, API_KEY, *signatures):
        assert all(secret not in text for text in shown), name


async def test_canary_absent_from_result(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """A successful ProbeResult holds neither the secret nor the API key."""
    good_spot(mocked)
    result = await probe.probe(SPOT_KEYS)
    for secret in (CANARY, SPOT_SECRET, API_KEY):
        assert secret not in repr(result)
        assert secret not in str(result)


def test_key_pair_repr_is_masked() -> None:
    """The decoded key pair's repr shows a masked key only."""
    pair = kraken_auth.parse_keys(SPOT_KEYS)
    assert API_KEY not in repr(pair)
    assert CANARY not in repr(pair)


async def test_rate_limits_can_be_lifted_for_simulators(session: aiohttp.ClientSession) -> None:
    """rate_limited=False removes both the per-key and the venue-wide bucket (simulators only)."""
    free = kraken.KrakenProbe(session, rate_limited=False)
    assert free.key_limiters is None
    assert free.limiter.rate >= limits.UNLIMITED


def _live_key_pairs() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kraken_auth.KrakenKeys))


async def test_refused_speculative_calls_do_not_keep_the_key_pair(
    probe: kraken.KrakenProbe, mocked: aioresponses
) -> None:
    """A spot key's futures calls are refused by design; their frames must not keep the decoded secret alive
    (before: each refused call's frame held the key pair in a reference cycle until a garbage collection)."""
    for _ in range(3):
        good_spot(mocked)
        mocked.get(CHECK_URL, payload=futures_error("authenticationError"))
        mocked.get(ACCOUNTS_URL, payload=futures_error("authenticationError"))
    gc.collect()
    gc.disable()  # what is freed must be freed by reference counting alone
    try:
        before = _live_key_pairs()
        for _ in range(3):
            result = await probe.probe(SPOT_KEYS)
            assert result.identities == ("spot",)
        assert _live_key_pairs() == before
    finally:
        gc.enable()


async def test_a_failed_probe_releases_the_key_pair(probe: kraken.KrakenProbe, mocked: aioresponses) -> None:
    """Once a failure is released (the engine does it for every probe failure), its traceback's frames no
    longer hold the key pair, and nothing is left for the garbage collector."""
    mocked.post(KEY_INFO_URL, payload=spot_error("EAPI:Invalid key"))
    mocked.post(BALANCE_URL, payload=spot_error("EAPI:Invalid key"))
    mocked.post(TRADE_BALANCE_URL, payload=spot_error("EAPI:Invalid key"))
    mocked.get(CHECK_URL, payload=futures_error("authenticationError"))
    mocked.get(ACCOUNTS_URL, payload=futures_error("authenticationError"))
    gc.collect()
    gc.disable()
    try:
        before = _live_key_pairs()
        failure = None
        try:  # not pytest.raises: its record keeps the traceback apart from the exception
            await probe.probe(SPOT_KEYS)
        except base.ProbeFailure as caught:
            failure = caught
        assert failure is not None and failure.outcome is base.Outcome.INVALID_KEY
        assert _live_key_pairs() == before + 1  # held by the failure's frames
        base.release_frames(failure)
        assert _live_key_pairs() == before
    finally:
        gc.enable()
