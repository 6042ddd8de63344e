"""The Bybit probe (venues/bybit.py) against docs/venues.md §3, with aioresponses (no network)."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from venue_support import Gate, failure_of  # tests/unit/venues is on sys.path

from venues import base, bybit, http, limits

HOST = "https://api.bybit.com"
TESTNET = "https://api-testnet.bybit.com"
DEMO = "https://api-demo.bybit.com"
SIM = "http://127.0.0.1:18082"
API_KEY = "XXXXXXXXXX1234ABCD"  # 18 characters, like real Bybit keys
SECRET = "YYYYYYYYYYYYYYYYYYYYYYYYYY1234567890"  # 36
KEYS = base.ApiKeys(api_key=API_KEY, api_secret=SECRET)
USER_ID = 24617703

API_INFO: dict[str, Any] = {
    "id": "13770661",
    "note": "engine probe",
    "apiKey": API_KEY,
    "readOnly": 0,
    "secret": "",
    "permissions": {
        "ContractTrade": ["Order", "Position"],
        "Spot": ["SpotTrade"],
        "Wallet": ["AccountTransfer", "SubMemberTransfer"],
        "Options": [],
        "Derivatives": [],
        "Exchange": [],
        "Earn": [],
    },
    "ips": ["203.0.113.7", "198.51.100.9"],
    "type": 1,
    "deadlineDay": -2,  # docs/venues.md §3.3: what an IP-bound key reports
    "expiredAt": "1970-01-01T00:00:00Z",
    "createdAt": "2024-11-23T07:24:35Z",
    "uta": 1,
    "userID": USER_ID,
    "inviterID": 0,
    "isMaster": True,
    "parentUid": "0",
    "kycLevel": "LEVEL_DEFAULT",
}
ACCOUNT_INFO: dict[str, Any] = {
    "unifiedMarginStatus": 5,
    "marginMode": "REGULAR_MARGIN",
    "isMasterTrader": False,
}
MEMBERS: dict[str, Any] = {"accounts": [{"uid": str(USER_ID), "accountType": ["UNIFIED", "FUND"]}]}

# docs/venues.md §3.5, copied by hand: the module's table must say exactly this. Where the doc says "bug" or gives
# two classes, the choice made in venues/bybit.py is written here too.
DOC_CODES: dict[int, base.Outcome] = {
    10003: base.Outcome.INVALID_KEY,  # "INVALID_KEY or WRONG_ENVIRONMENT (try other hosts)"
    10004: base.Outcome.INVALID_SECRET,
    10005: base.Outcome.PERMISSION_DENIED,
    10007: base.Outcome.INVALID_KEY,
    10010: base.Outcome.IP_NOT_ALLOWED,
    33004: base.Outcome.KEY_EXPIRED,
    -2015: base.Outcome.KEY_EXPIRED,
    10002: base.Outcome.CLOCK_SKEW,
    -1: base.Outcome.CLOCK_SKEW,
    10008: base.Outcome.ACCOUNT_RESTRICTED,
    10009: base.Outcome.ACCOUNT_RESTRICTED,
    10024: base.Outcome.ACCOUNT_RESTRICTED,
    10027: base.Outcome.ACCOUNT_RESTRICTED,
    10028: base.Outcome.PERMISSION_DENIED,  # "identity mismatch": on an identity call, not reached
    100028: base.Outcome.PERMISSION_DENIED,
    10006: base.Outcome.RATE_LIMITED,
    429: base.Outcome.RATE_LIMITED,
    10000: base.Outcome.SERVER_ERROR,
    10016: base.Outcome.SERVER_ERROR,
    10001: base.Outcome.SERVER_ERROR,  # "bug": transient
    10017: base.Outcome.SERVER_ERROR,
}


def ref_sign(secret: str, timestamp: str, api_key: str, recv_window: str, query_or_body: str) -> str:
    """docs/venues.md §3.2 written independently of the module: hex HMAC-SHA256(ts + key + recvWindow + payload)."""
    payload = (timestamp + api_key + recv_window + query_or_body).encode("utf-8")
    return hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).hexdigest()


def ok(result: dict[str, Any]) -> dict[str, Any]:
    return {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": int(time.time() * 1000)}


def error(code: int, message: str = "documented message") -> dict[str, Any]:
    return {
        "retCode": code,
        "retMsg": message,
        "result": {},
        "retExtInfo": {},
        "time": int(time.time() * 1000),
    }


def time_answer(server_ms: int) -> dict[str, Any]:
    return ok({"timeSecond": str(server_ms // 1000), "timeNano": str(server_ms * 1_000_000 + 123_456)})


@pytest.fixture
def probe(session: aiohttp.ClientSession) -> bybit.BybitProbe:
    return bybit.BybitProbe(session)


@pytest.fixture
def sim_probe(session: aiohttp.ClientSession) -> bybit.BybitProbe:
    """A probe pointed at one base URL (a sandbox or the simulator): no other environment to try."""
    return bybit.BybitProbe(session, base_url=SIM)


def mock_good(
    m: aioresponses,
    *,
    host: str = HOST,
    info: dict[str, Any] | None = None,
    account: dict[str, Any] | None = None,
    members: dict[str, Any] | None = None,
) -> None:
    m.get(host + bybit.QUERY_API_PATH, payload=ok(info or API_INFO))
    m.get(host + bybit.ACCOUNT_INFO_PATH, payload=ok(account or ACCOUNT_INFO))
    m.get(host + bybit.MEMBER_TYPE_PATH, payload=ok(members or MEMBERS))


# -- signing (docs/venues.md §3.2; 3.8: the doc's signatures cannot be reproduced, its pre-sign strings can) ---


def test_pre_sign_strings_match_the_guide() -> None:
    """pre_sign builds the guide's GET and POST strings: timestamp + key + recvWindow + query/body."""
    assert (
        bybit.pre_sign(1658384314791, "XXXXXXXXXX", 5000, "category=option&symbol=BTC-29JUL22-25000-C")
        == "1658384314791XXXXXXXXXX5000category=option&symbol=BTC-29JUL22-25000-C"
    )
    assert (
        bybit.pre_sign(1658385579423, "XXXXXXXXXX", 5000, '{"category": "option"}')
        == '1658385579423XXXXXXXXXX5000{"category": "option"}'
    )
    assert bybit.pre_sign(1658385579423, "XXXXXXXXXX", 5000) == "1658385579423XXXXXXXXXX5000"


@pytest.mark.parametrize(
    ("timestamp", "recv_window", "query_or_body"),
    [
        (1658384314791, 5000, "category=option&symbol=BTC-29JUL22-25000-C"),  # GET with a query
        (1658385579423, 5000, '{"category":"option","symbol":"BTC-29JUL22-25000-C","orderType":"Limit"}'),
        (1700000000000, 20000, ""),  # GET without a query
        (1700000000001, 5000, "accountType=UNIFIED"),
    ],
    ids=["get-query", "post-json", "get-empty", "wallet-balance"],
)
def test_signer_matches_the_documented_formula(timestamp: int, recv_window: int, query_or_body: str) -> None:
    """auth_headers' X-BAPI-SIGN equals an independent hex HMAC-SHA256 of the documented string."""
    headers = bybit.auth_headers(KEYS, timestamp, query_or_body, recv_window=recv_window)
    assert headers == {
        "X-BAPI-API-KEY": API_KEY,
        "X-BAPI-TIMESTAMP": str(timestamp),
        "X-BAPI-RECV-WINDOW": str(recv_window),
        "X-BAPI-SIGN": ref_sign(SECRET, str(timestamp), API_KEY, str(recv_window), query_or_body),
    }
    assert (
        bybit.sign(SECRET, bybit.pre_sign(timestamp, API_KEY, recv_window, query_or_body))
        == headers["X-BAPI-SIGN"]
    )


# -- a full probe ----------------------------------------------------------------------------------------


async def test_good_key(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """A good UTA key yields permissions from query-api, the userID and the "unified" identity."""
    mock_good(mocked)
    result = await probe.probe(KEYS)
    assert result == base.ProbeResult(
        venue=base.Venue.BYBIT,
        venue_account_id=str(USER_ID),
        permissions=base.Permissions(
            read=True,
            trade=True,
            withdraw=False,
            transfer=True,
            ip_restricted=True,
            ip_allowlist=("203.0.113.7", "198.51.100.9"),
            expires_at_ms=None,
        ),
        identities=("unified",),
        details={"note": "engine probe", "isMaster": "true", "uta": "1", "unifiedMarginStatus": "5"},
    )


async def test_withdraw_enabled_key_reports_withdraw(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """ "Withdraw" in permissions.Wallet becomes withdraw=True."""
    wallet = {**API_INFO["permissions"], "Wallet": ["AccountTransfer", "Withdraw"]}
    mock_good(mocked, info={**API_INFO, "permissions": wallet})
    result = await probe.probe(KEYS)
    assert result.permissions.withdraw is True


async def test_read_only_key(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """readOnly=1 means no trading or transfers even when listed; ["*"] means no IP bound."""
    info = {**API_INFO, "readOnly": 1, "ips": ["*"]}
    mock_good(mocked, info=info)
    result = await probe.probe(KEYS)
    assert result.permissions == base.Permissions(read=True)


async def test_requests_are_stamped_after_waiting_for_the_rate_limiter(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """A request queued behind the rate limiter is stamped when its turn comes, not when it was queued."""
    probe = bybit.BybitProbe(session, limiter=limits.RateLimiter(2.0, 1.0))  # 3 requests: about 1 s
    lags: list[float] = []

    def stamped(payload: dict[str, Any]) -> Callable[..., CallbackResult]:
        def callback(url: Any, **kwargs: Any) -> CallbackResult:
            lags.append(time.time() - int(kwargs["headers"]["X-BAPI-TIMESTAMP"]) / 1000)
            return CallbackResult(payload=payload)

        return callback

    mocked.get(HOST + bybit.QUERY_API_PATH, callback=stamped(ok(API_INFO)))
    mocked.get(HOST + bybit.ACCOUNT_INFO_PATH, callback=stamped(ok(ACCOUNT_INFO)))
    mocked.get(HOST + bybit.MEMBER_TYPE_PATH, callback=stamped(ok(MEMBERS)))
    started = time.monotonic()
    await probe.probe(KEYS)
    assert time.monotonic() - started > 0.8  # the limiter did make requests wait
    assert len(lags) == 3
    assert max(lags) < 0.2


async def test_unbound_key_reports_its_expiry(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """A key without IP reports expiredAt: it becomes expires_at_ms."""
    info = {**API_INFO, "ips": [], "deadlineDay": 83, "expiredAt": "2099-03-01T12:00:00Z"}
    mock_good(mocked, info=info)
    result = await probe.probe(KEYS)
    assert result.permissions.expires_at_ms == int(datetime(2099, 3, 1, 12, tzinfo=UTC).timestamp() * 1000)
    assert result.permissions.ip_restricted is False


def test_expiry_without_a_zone_is_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    """An expiredAt without "Z" is read as UTC, whatever the machine's time zone."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        got = bybit.key_expiry_ms({"expiredAt": "2099-03-01T12:00:00"}, now_ms=0)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert got == int(datetime(2099, 3, 1, 12, tzinfo=UTC).timestamp() * 1000)


async def test_deadline_day_alone_gives_an_expiry(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """Without expiredAt, deadlineDay days from now is the expiry."""
    info = {key: value for key, value in API_INFO.items() if key != "expiredAt"}
    mock_good(mocked, info={**info, "ips": [], "deadlineDay": 30})
    result = await probe.probe(KEYS)
    assert result.permissions.expires_at_ms is not None
    assert abs(result.permissions.expires_at_ms - (time.time() * 1000 + 30 * 86_400_000)) < 60_000


async def test_past_expiry_is_key_expired(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """An expiredAt already past on a successful answer raises KEY_EXPIRED (the contract)."""
    mock_good(mocked, info={**API_INFO, "ips": [], "deadlineDay": 0, "expiredAt": "2020-01-01T00:00:00Z"})
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.KEY_EXPIRED
    assert "2020-01-01" in failure.message


@pytest.mark.parametrize(
    ("status", "wallets", "identities"),
    [
        (5, ["UNIFIED", "FUND"], ("unified",)),
        (1, ["SPOT", "CONTRACT", "FUND"], ("contract", "spot")),
        (1, [], ("contract", "spot")),
        (3, ["UNIFIED", "CONTRACT", "FUND"], ("contract", "unified")),
        (6, ["FUND"], ("unified",)),
    ],
    ids=["uta2", "classic", "classic-no-wallets", "uta1-with-inverse", "uta2-pro"],
)
async def test_identities_follow_account_kind_and_wallets(
    probe: bybit.BybitProbe,
    mocked: aioresponses,
    status: int,
    wallets: list[str],
    identities: tuple[str, ...],
) -> None:
    """unifiedMarginStatus and the UID's wallets give unified / spot / contract (docs/venues.md §3.4)."""
    mock_good(
        mocked,
        account={**ACCOUNT_INFO, "unifiedMarginStatus": status},
        members={"accounts": [{"uid": str(USER_ID), "accountType": wallets}]},
    )
    result = await probe.probe(KEYS)
    assert result.identities == identities


async def test_sub_account_wallets_are_not_ours(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """A master key sees sub-accounts in get-member-type: only its own UID's wallets count."""
    members = {
        "accounts": [
            {"uid": "99999999", "accountType": ["SPOT", "CONTRACT"]},
            {"uid": str(USER_ID), "accountType": ["UNIFIED"]},
        ]
    }
    mock_good(mocked, members=members)
    result = await probe.probe(KEYS)
    assert result.identities == ("unified",)


async def test_refused_identity_call_is_not_reached(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """10005 on account/info leaves only what get-member-type shows; the probe still succeeds."""
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=ok(API_INFO))
    mocked.get(HOST + bybit.ACCOUNT_INFO_PATH, payload=error(10005))
    mocked.get(
        HOST + bybit.MEMBER_TYPE_PATH,
        payload=ok({"accounts": [{"uid": str(USER_ID), "accountType": ["SPOT", "FUND"]}]}),
    )
    result = await probe.probe(KEYS)
    assert result.identities == ("spot",)
    assert "unifiedMarginStatus" not in result.details


async def test_transient_identity_failure_fails_the_probe(
    probe: bybit.BybitProbe, mocked: aioresponses
) -> None:
    """A 10006 on one identity call fails the whole probe as RATE_LIMITED: no partial identity list."""
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=ok(API_INFO))
    mocked.get(HOST + bybit.ACCOUNT_INFO_PATH, payload=ok(ACCOUNT_INFO))
    mocked.get(HOST + bybit.MEMBER_TYPE_PATH, payload=error(10006))
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.RATE_LIMITED


async def test_requests_are_signed_as_sent(
    probe: bybit.BybitProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """Each request's X-BAPI-SIGN recomputes from its own timestamp, key, recvWindow and query."""
    mock_good(mocked)
    await probe.probe(KEYS)
    assert sorted(urlsplit(url).path for _, url, _ in sent) == sorted(
        [bybit.QUERY_API_PATH, bybit.ACCOUNT_INFO_PATH, bybit.MEMBER_TYPE_PATH]
    )
    for _, url, headers in sent:
        assert headers["X-BAPI-API-KEY"] == API_KEY
        assert headers["X-BAPI-RECV-WINDOW"] == "5000"
        assert abs(int(headers["X-BAPI-TIMESTAMP"]) - time.time() * 1000) < 60_000
        expected = ref_sign(SECRET, headers["X-BAPI-TIMESTAMP"], API_KEY, "5000", urlsplit(url).query)
        assert headers["X-BAPI-SIGN"] == expected
    assert len(mocked.requests) == 3
    for calls in mocked.requests.values():  # as aioresponses saw them reach aiohttp
        assert calls[0].kwargs["headers"]["X-BAPI-API-KEY"] == API_KEY


async def test_identity_requests_run_concurrently(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """account/info and get-member-type are asked at once: both are in flight together."""
    gate = Gate(expected=2)
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=ok(API_INFO))
    mocked.get(HOST + bybit.ACCOUNT_INFO_PATH, callback=gate.reply(ok(ACCOUNT_INFO)))
    mocked.get(HOST + bybit.MEMBER_TYPE_PATH, callback=gate.reply(ok(MEMBERS)))
    result = await probe.probe(KEYS)
    assert gate.peak == 2
    assert result.identities == ("unified",)


async def test_base_url_is_used(sim_probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """With base_url, every call goes there with the documented paths."""
    mock_good(mocked, host=SIM)
    result = await sim_probe.probe(KEYS)
    assert result.venue_account_id == str(USER_ID)


# -- another environment (10003, the probe <-> simulator contract) ---------------------------------------


async def test_testnet_key_is_wrong_environment(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """10003 on mainnet, accepted by testnet -> WRONG_ENVIRONMENT naming testnet."""
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=error(10003))
    mocked.get(TESTNET + bybit.QUERY_API_PATH, payload=ok(API_INFO))
    mocked.get(DEMO + bybit.QUERY_API_PATH, payload=error(10003))
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.WRONG_ENVIRONMENT
    assert "testnet" in failure.message


async def test_other_environments_are_tried_concurrently(
    probe: bybit.BybitProbe, mocked: aioresponses
) -> None:
    """Testnet and demo are asked at once; a demo key is WRONG_ENVIRONMENT naming demo."""
    gate = Gate(expected=2)
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=error(10003))
    mocked.get(TESTNET + bybit.QUERY_API_PATH, callback=gate.reply(error(10003)))
    mocked.get(DEMO + bybit.QUERY_API_PATH, callback=gate.reply(ok(API_INFO)))
    failure = await failure_of(probe.probe(KEYS))
    assert gate.peak == 2
    assert failure.outcome is base.Outcome.WRONG_ENVIRONMENT
    assert "demo" in failure.message


async def test_unknown_everywhere_is_invalid_key(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """10003 on mainnet, testnet and demo (or unreachable) -> INVALID_KEY."""
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=error(10003))
    mocked.get(TESTNET + bybit.QUERY_API_PATH, payload=error(10003))
    mocked.get(DEMO + bybit.QUERY_API_PATH, exception=aiohttp.ClientConnectionError("down"))
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.INVALID_KEY
    assert failure.venue_code == "10003"


async def test_with_a_base_url_10003_is_invalid_key(
    sim_probe: bybit.BybitProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """With a base_url there is no other host to try: 10003 is INVALID_KEY after one query-api request (the
    identity calls went out beside it, to the same host)."""
    mocked.get(SIM + bybit.QUERY_API_PATH, status=401, payload=error(10003))
    failure = await failure_of(sim_probe.probe(KEYS))
    assert failure.outcome is base.Outcome.INVALID_KEY
    assert all(url.startswith(SIM) for _, url, _ in sent)
    assert [url for _, url, _ in sent if urlsplit(url).path == bybit.QUERY_API_PATH] == [
        SIM + bybit.QUERY_API_PATH
    ]


# -- clock skew ------------------------------------------------------------------------------------------


async def test_clock_skew_resyncs_and_retries_once(
    probe: bybit.BybitProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """10002 -> GET /v5/market/time -> the retry carries the venue's time, and succeeds."""
    server_ms = int(time.time() * 1000) + 45_000
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=error(10002))
    mocked.get(HOST + bybit.TIME_PATH, payload=time_answer(server_ms))
    mock_good(mocked)
    result = await probe.probe(KEYS)
    assert result.venue_account_id == str(USER_ID)
    assert abs(probe.clock_offset_ms - 45_000) < 5_000
    stamps = [int(h["X-BAPI-TIMESTAMP"]) for _, url, h in sent if url.endswith(bybit.QUERY_API_PATH)]
    assert len(stamps) == 2
    assert abs(stamps[1] - server_ms) < 5_000


async def test_second_clock_skew_fails(
    probe: bybit.BybitProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """A second 10002 after the resync raises CLOCK_SKEW (transient); the clock is fetched once."""
    mocked.get(HOST + bybit.QUERY_API_PATH, payload=error(10002), repeat=True)
    mocked.get(HOST + bybit.TIME_PATH, payload=time_answer(int(time.time() * 1000)))
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.CLOCK_SKEW
    assert failure.transient
    paths = [urlsplit(url).path for _, url, _ in sent]
    # the identity calls went out beside query-api (unmocked here: NETWORK, outranked by query-api's verdict)
    assert [p for p in paths if p in (bybit.QUERY_API_PATH, bybit.TIME_PATH)] == [
        bybit.QUERY_API_PATH,
        bybit.TIME_PATH,
        bybit.QUERY_API_PATH,
    ]


# -- HTTP answers ----------------------------------------------------------------------------------------


async def test_rate_limit_carries_retry_after(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """HTTP 429 is RATE_LIMITED with the Retry-After seconds."""
    mocked.get(HOST + bybit.QUERY_API_PATH, status=429, body="", headers={"Retry-After": "4"})
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.RATE_LIMITED
    assert failure.retry_after == 4.0


async def test_ip_ban_403_waits_ten_minutes(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """HTTP 403 ("access too frequent") is RATE_LIMITED; without Retry-After, wait the documented 10 min."""
    mocked.get(HOST + bybit.QUERY_API_PATH, status=403, body="access too frequent")
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.RATE_LIMITED
    assert failure.retry_after == 600.0


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (401, "", base.Outcome.INVALID_KEY),
        (401, "IP address 127.0.0.1 is not in the API key's whitelist", base.Outcome.IP_NOT_ALLOWED),
        (500, "", base.Outcome.SERVER_ERROR),
        (502, "<html>Bad Gateway</html>", base.Outcome.SERVER_ERROR),
        (404, "", base.Outcome.SERVER_ERROR),
        (200, "<html>not json</html>", base.Outcome.SERVER_ERROR),
        (200, '{"retCode":0,"retMsg":"OK"}', base.Outcome.SERVER_ERROR),
        (200, '{"retCode":0,"retMsg":"OK","result":{"userID":1}}', base.Outcome.SERVER_ERROR),
        (
            200,
            '{"retCode":0,"retMsg":"OK","result":{"readOnly":0,"permissions":{}}}',
            base.Outcome.SERVER_ERROR,
        ),
    ],
    ids=["401", "401-ip", "500", "502", "404", "html", "no-result", "no-permissions", "no-user"],
)
async def test_http_answers(
    probe: bybit.BybitProbe, mocked: aioresponses, status: int, body: str, outcome: base.Outcome
) -> None:
    """Bare HTTP statuses and unreadable bodies land in their class; only 401 is a key verdict."""
    mocked.get(HOST + bybit.QUERY_API_PATH, status=status, body=body)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.transient is (status not in (401,))


async def test_timeout(probe: bybit.BybitProbe, mocked: aioresponses) -> None:
    """A request that times out is TIMEOUT (transient)."""
    mocked.get(HOST + bybit.QUERY_API_PATH, exception=TimeoutError())
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.TIMEOUT
    assert failure.transient


# -- the error table -------------------------------------------------------------------------------------


def test_error_table_is_the_documented_one() -> None:
    """bybit.ERRORS holds exactly the retCodes of docs/venues.md §3.5, each in its documented class."""
    assert bybit.ERRORS == DOC_CODES


# docs/venues.md §3.5 "HTTP", copied by hand (5xx, and any other 4xx, are SERVER_ERROR outside the table)
DOC_HTTP: dict[int, base.Outcome] = {
    401: base.Outcome.INVALID_KEY,  # "invalid request (wrong key / missing auth headers)"
    403: base.Outcome.RATE_LIMITED,  # "IP rate limit breached" (or GET with a body, or a US IP)
    429: base.Outcome.RATE_LIMITED,
}


def test_http_table_is_the_documented_one() -> None:
    """bybit.HTTP_STATUS holds exactly the statuses docs/venues.md §3.5 gives a meaning."""
    assert bybit.HTTP_STATUS == DOC_HTTP


@pytest.mark.parametrize(("status", "outcome"), sorted(bybit.HTTP_STATUS.items()))
async def test_every_http_status_lands_in_its_class(
    sim_probe: bybit.BybitProbe, mocked: aioresponses, status: int, outcome: base.Outcome
) -> None:
    """A bare HTTP ``status`` (no retCode) fails with the table's outcome; transient ones keep Retry-After."""
    mocked.get(SIM + bybit.QUERY_API_PATH, status=status, body="", headers={"Retry-After": "5"})
    failure = await failure_of(sim_probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.retry_after == (5.0 if outcome.transient else None)


@pytest.mark.parametrize(("code", "outcome"), sorted(bybit.ERRORS.items()))
async def test_every_code_lands_in_its_class(
    sim_probe: bybit.BybitProbe, mocked: aioresponses, code: int, outcome: base.Outcome
) -> None:
    """query-api answering ``code`` fails the probe with the table's outcome and the venue code."""
    mocked.get(SIM + bybit.QUERY_API_PATH, payload=error(code), repeat=True)
    mocked.get(SIM + bybit.TIME_PATH, payload=time_answer(int(time.time() * 1000)))
    failure = await failure_of(sim_probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.venue_code == str(code)
    assert failure.transient is outcome.transient


@pytest.mark.parametrize(("code", "outcome"), sorted(DOC_CODES.items()))
def test_classify_follows_the_doc(code: int, outcome: base.Outcome) -> None:
    """classify() maps each documented retCode (on HTTP 200) to the documented class."""
    failure = bybit.classify(http.Reply(status=200, headers={}, body=error(code), text=""))
    assert failure is not None
    assert failure.outcome is outcome


def test_unknown_code_is_transient() -> None:
    """A retCode docs/venues.md does not list is SERVER_ERROR: never a reason to mark a key FAILED."""
    failure = bybit.classify(http.Reply(status=200, headers={}, body=error(170999), text=""))
    assert failure is not None
    assert failure.outcome is base.Outcome.SERVER_ERROR


# -- key format ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        KEYS,
        base.ApiKeys(api_key="a" * 8, api_secret="B" * 8),
        base.ApiKeys(api_key="k" * 128, api_secret="S" * 128),
    ],
    ids=["real", "min", "max"],
)
def test_check_keys_accepts_real_shapes(probe: bybit.BybitProbe, keys: base.ApiKeys) -> None:
    """18-char keys, 36-char secrets and 8..128 alphanumerics pass check_keys."""
    probe.check_keys(keys)


@pytest.mark.parametrize(
    ("api_key", "api_secret", "field", "reason"),
    [
        ("", SECRET, "apiKey", "empty"),
        (API_KEY, "", "apiSecret", "empty"),
        (API_KEY[:5] + " " + API_KEY[6:], SECRET, "apiKey", "whitespace"),
        (API_KEY, SECRET + "\r\n", "apiSecret", "whitespace"),
        (API_KEY, SECRET[:4] + "\x1b" + SECRET[5:], "apiSecret", "control"),
        (API_KEY, "z" * 1000, "apiSecret", "longer than 256"),
        ("k-e-y-1234", SECRET, "apiKey", "letters and digits"),
        ("short", SECRET, "apiKey", "letters and digits"),
        (
            API_KEY,
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE...\n-----END RSA PRIVATE KEY-----",
            "apiSecret",
            "HMAC",
        ),
    ],
    ids=["empty-key", "empty-secret", "space", "crlf", "escape", "huge", "dashes", "short", "rsa"],
)
def test_check_keys_rejects_garbage(
    probe: bybit.BybitProbe, api_key: str, api_secret: str, field: str, reason: str
) -> None:
    """Garbage is refused naming the field and the reason, never echoing the value."""
    with pytest.raises(base.KeyFormatProblem) as caught:
        probe.check_keys(base.ApiKeys(api_key=api_key, api_secret=api_secret))
    assert caught.value.field == field
    assert reason in caught.value.reason
    if len(api_secret) > 8:
        assert api_secret not in str(caught.value)


async def test_malformed_keys_fail_the_probe_without_a_request(
    probe: bybit.BybitProbe, mocked: aioresponses
) -> None:
    """probe() turns a key-format problem into a permanent ProbeFailure and sends nothing."""
    failure = await failure_of(probe.probe(base.ApiKeys(api_key="", api_secret=SECRET)))
    assert failure.outcome is base.Outcome.INVALID_KEY
    assert not failure.transient
    assert mocked.requests == {}


# -- no key material in failures or results --------------------------------------------------------------

CANARY_KEY = "CanaryKey7Q2xW9zz"
CANARY_SECRET = "CanarySecret3Zp8ABCDEFGHIJ0123456789"
CANARY = base.ApiKeys(api_key=CANARY_KEY, api_secret=CANARY_SECRET)
# Bybit's real 10004 answer echoes the string it expected to be signed, key included
ECHO = f"error sign! origin_string[1658384314791{CANARY_KEY}5000] secret {CANARY_SECRET}"

MockSpec = tuple[str, dict[str, Any]]
CANARY_PATHS: dict[str, list[MockSpec]] = {
    **{
        f"code{code}": [(HOST + bybit.QUERY_API_PATH, {"payload": error(code, ECHO), "repeat": True})]
        for code in bybit.ERRORS
    },
    "other-environment": [
        (HOST + bybit.QUERY_API_PATH, {"payload": error(10003, ECHO)}),
        (TESTNET + bybit.QUERY_API_PATH, {"payload": ok({**API_INFO, "apiKey": CANARY_KEY, "note": ECHO})}),
        (DEMO + bybit.QUERY_API_PATH, {"payload": error(10003, ECHO)}),
    ],
    "unknown-code": [(HOST + bybit.QUERY_API_PATH, {"payload": error(31337, ECHO)})],
    "401": [(HOST + bybit.QUERY_API_PATH, {"status": 401, "body": ECHO})],
    "403": [(HOST + bybit.QUERY_API_PATH, {"status": 403, "body": ECHO})],
    "429": [(HOST + bybit.QUERY_API_PATH, {"status": 429, "body": ECHO})],
    "500": [(HOST + bybit.QUERY_API_PATH, {"status": 500, "body": ECHO})],
    "not-json": [(HOST + bybit.QUERY_API_PATH, {"body": ECHO})],
    "timeout": [(HOST + bybit.QUERY_API_PATH, {"exception": TimeoutError(ECHO)})],
    "network": [(HOST + bybit.QUERY_API_PATH, {"exception": aiohttp.ClientConnectionError(ECHO)})],
    "expired": [
        (
            HOST + bybit.QUERY_API_PATH,
            {"payload": ok({**API_INFO, "ips": [], "expiredAt": "2021-01-01T00:00:00Z"})},
        )
    ],
    "identity-5xx": [
        (HOST + bybit.QUERY_API_PATH, {"payload": ok({**API_INFO, "apiKey": CANARY_KEY})}),
        (HOST + bybit.ACCOUNT_INFO_PATH, {"status": 502, "body": ECHO}),
        (HOST + bybit.MEMBER_TYPE_PATH, {"payload": ok(MEMBERS)}),
    ],
}


def assert_no_canary(text: str, signatures: list[str]) -> None:
    for secret in (CANARY_KEY, CANARY_SECRET, "Canary", *signatures):
        assert secret not in text


def signatures_sent(sent: list[tuple[str, str, dict[str, str]]]) -> list[str]:
    return [h["X-BAPI-SIGN"] for _, _, h in sent if "X-BAPI-SIGN" in h]


@pytest.mark.parametrize("path", sorted(CANARY_PATHS))
async def test_canary_never_leaks_from_failures(
    probe: bybit.BybitProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]], path: str
) -> None:
    """Through every failure path, the key, the secret and the signatures stay out of the ProbeFailure."""
    mocked.get(HOST + bybit.TIME_PATH, payload=time_answer(int(time.time() * 1000)))
    for url, answer in CANARY_PATHS[path]:
        mocked.get(url, **answer)
    failure = await failure_of(probe.probe(CANARY))
    assert_no_canary(
        " ".join([str(failure), repr(failure), repr(failure.args), failure.message, str(failure.venue_code)]),
        signatures_sent(sent),
    )


async def test_canary_never_leaks_from_bad_format(probe: bybit.BybitProbe) -> None:
    """A malformed canary secret is refused without echoing it."""
    failure = await failure_of(probe.probe(base.ApiKeys(api_key=CANARY_KEY, api_secret=CANARY_SECRET + "!")))
    assert_no_canary(" ".join([str(failure), repr(failure), repr(failure.args)]), [])


async def test_canary_never_leaks_from_results(
    probe: bybit.BybitProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """A successful ProbeResult holds no key material although query-api returns the apiKey."""
    mock_good(mocked, info={**API_INFO, "apiKey": CANARY_KEY, "note": "desk 7"})
    result = await probe.probe(CANARY)
    assert_no_canary(repr(result) + str(result), signatures_sent(sent))
