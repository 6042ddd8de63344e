"""The OKX probe (venues/okx.py) against docs/venues.md §2, with aioresponses (no network)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from venue_support import Gate, failure_of  # tests/unit/venues is on sys.path

from venues import base, http, limits, okx

HOST = "https://www.okx.com"
API_KEY = "37c541a1-c2b5-4c4f-9f5d-3d8a2b1c0e9f"
SECRET = "22582BD0CFF14C41EDBF1AB98506286D"
PASSPHRASE = "Tr4ding-Pass!"
KEYS = base.ApiKeys(api_key=API_KEY, api_secret=SECRET, api_passphrase=PASSPHRASE)

CONFIG: dict[str, Any] = {
    "uid": "44705892343619584",
    "mainUid": "44705892343619584",
    "acctLv": "2",
    "label": "engine probe",
    "perm": "read_only,trade",
    "ip": "203.0.113.7,198.51.100.0",
    "type": "0",
}
BALANCE: dict[str, Any] = {"code": "0", "msg": "", "data": [{"totalEq": "0", "details": []}]}
FUNDING: dict[str, Any] = {"code": "0", "msg": "", "data": []}

# docs/venues.md §2.5, copied by hand: the module's table must say exactly this. Where the doc says "bug" or gives
# two classes, the choice made in venues/okx.py is written here too.
DOC_CODES: dict[str, base.Outcome] = {
    "50100": base.Outcome.ACCOUNT_RESTRICTED,
    "50101": base.Outcome.WRONG_ENVIRONMENT,
    "50102": base.Outcome.CLOCK_SKEW,
    "50103": base.Outcome.SERVER_ERROR,  # "bug (or INVALID_* if value empty)": check_keys forbids empty
    "50104": base.Outcome.SERVER_ERROR,
    "50106": base.Outcome.SERVER_ERROR,
    "50107": base.Outcome.SERVER_ERROR,
    "50105": base.Outcome.INVALID_PASSPHRASE,
    "50108": base.Outcome.WRONG_ENVIRONMENT,  # "bug/env": we send no broker id, so env
    "50109": base.Outcome.WRONG_ENVIRONMENT,
    "50110": base.Outcome.IP_NOT_ALLOWED,
    "50111": base.Outcome.INVALID_KEY,
    "50112": base.Outcome.CLOCK_SKEW,  # "CLOCK_SKEW/bug"
    "50113": base.Outcome.INVALID_SECRET,
    "50114": base.Outcome.INVALID_KEY,
    "50115": base.Outcome.SERVER_ERROR,  # "bug"
    "50119": base.Outcome.INVALID_KEY,  # "INVALID_KEY / WRONG_ENVIRONMENT"; the contract says INVALID_KEY
    "50120": base.Outcome.PERMISSION_DENIED,
    "50121": base.Outcome.IP_NOT_ALLOWED,  # "IP_NOT_ALLOWED/ACCOUNT_RESTRICTED"
    "50007": base.Outcome.ACCOUNT_RESTRICTED,
    "50009": base.Outcome.ACCOUNT_RESTRICTED,
    "50027": base.Outcome.ACCOUNT_RESTRICTED,
    "50008": base.Outcome.INVALID_KEY,
    "50011": base.Outcome.RATE_LIMITED,
    "50061": base.Outcome.RATE_LIMITED,
    "50001": base.Outcome.MAINTENANCE,
    "50004": base.Outcome.TIMEOUT,
    "50005": base.Outcome.MAINTENANCE,
    "50013": base.Outcome.SERVER_ERROR,
    "50026": base.Outcome.SERVER_ERROR,
}


def ref_sign(secret: str, timestamp: str, method: str, request_path: str, body: str = "") -> str:
    """docs/venues.md §2.2 written independently of the module: base64(HMAC-SHA256(secret, ts+METHOD+path+body))."""
    message = (timestamp + method + request_path + body).encode("utf-8")
    return base64.b64encode(hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()).decode()


def config_answer(**fields: Any) -> dict[str, Any]:
    return {"code": "0", "msg": "", "data": [{**CONFIG, **fields}]}


def error(code: str) -> dict[str, Any]:
    return {"code": code, "msg": "documented message", "data": []}


@pytest.fixture
def probe(session: aiohttp.ClientSession) -> okx.OkxProbe:
    return okx.OkxProbe(session)


def mock_good(m: aioresponses, *, config: dict[str, Any] | None = None) -> None:
    m.get(HOST + okx.CONFIG_PATH, payload=config or config_answer())
    m.get(HOST + okx.TRADING_BALANCE_PATH, payload=BALANCE)
    m.get(HOST + okx.FUNDING_BALANCES_PATH, payload=FUNDING)


# -- signing (docs/venues.md §2.2; OKX publishes no numeric vector, 2.8) ---------------------------------------


def test_iso_timestamp() -> None:
    """OK-ACCESS-TIMESTAMP is ISO-8601 UTC with exactly three millisecond digits and a Z."""
    assert okx.iso_timestamp(1607418537715) == "2020-12-08T09:08:57.715Z"
    assert okx.iso_timestamp(1607418537005) == "2020-12-08T09:08:57.005Z"
    assert okx.iso_timestamp(1607418537000) == "2020-12-08T09:08:57.000Z"


@pytest.mark.parametrize(
    ("timestamp", "method", "request_path", "body"),
    [
        (
            "2020-12-08T09:08:57.715Z",
            "GET",
            "/api/v5/account/balance?ccy=BTC",
            "",
        ),  # the doc's formula example
        ("2020-12-08T09:08:57.715Z", "GET", "/api/v5/account/config", ""),
        (
            "2023-01-02T03:04:05.006Z",
            "POST",
            "/api/v5/trade/order",
            '{"instId":"BTC-USDT","tdMode":"cash","side":"buy","ordType":"market","sz":"100"}',
        ),
        ("2024-02-29T23:59:59.999Z", "GET", "/api/v5/asset/balances?ccy=BTC,ETH", ""),
    ],
    ids=["doc-balance-query", "config", "post-json", "query-comma"],
)
def test_signer_matches_the_documented_formula(
    timestamp: str, method: str, request_path: str, body: str
) -> None:
    """okx.sign equals an independent base64 HMAC-SHA256 over timestamp + METHOD + requestPath + body."""
    assert okx.sign(SECRET, timestamp, method, request_path, body) == ref_sign(
        SECRET, timestamp, method, request_path, body
    )


def test_signer_upper_cases_the_method_and_uses_the_secret_as_text() -> None:
    """The method is signed upper-case; the secret is the HMAC key as text, not base64-decoded."""
    assert okx.sign(SECRET, "2020-12-08T09:08:57.715Z", "get", "/api/v5/account/config") == ref_sign(
        SECRET, "2020-12-08T09:08:57.715Z", "GET", "/api/v5/account/config"
    )
    assert okx.sign(SECRET, "t", "GET", "/p") != ref_sign(
        base64.b64decode(SECRET).decode("latin-1"), "t", "GET", "/p"
    )


def test_auth_headers_for_a_post() -> None:
    """The four OK-ACCESS-* headers, plus Content-Type for a JSON body; the passphrase in plain text."""
    body = json.dumps({"ccy": "USDT", "amt": "1"}, separators=(",", ":"))
    headers = okx.auth_headers(KEYS, "2020-12-08T09:08:57.715Z", "POST", "/api/v5/asset/transfer", body)
    assert headers == {
        "OK-ACCESS-KEY": API_KEY,
        "OK-ACCESS-SIGN": ref_sign(
            SECRET, "2020-12-08T09:08:57.715Z", "POST", "/api/v5/asset/transfer", body
        ),
        "OK-ACCESS-TIMESTAMP": "2020-12-08T09:08:57.715Z",
        "OK-ACCESS-PASSPHRASE": PASSPHRASE,
        "Content-Type": "application/json",
    }


# -- a full probe ----------------------------------------------------------------------------------------


async def test_good_key(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """A good key yields perm/ip from account/config, the uid and both identities."""
    mock_good(mocked)
    result = await probe.probe(KEYS)
    assert result == base.ProbeResult(
        venue=base.Venue.OKX,
        venue_account_id="44705892343619584",
        permissions=base.Permissions(
            read=True,
            trade=True,
            withdraw=False,
            transfer=False,
            ip_restricted=True,
            ip_allowlist=("203.0.113.7", "198.51.100.0"),
            expires_at_ms=None,
        ),
        identities=("funding", "trading"),
        details={"label": "engine probe", "accountMode": "2", "mainUid": "44705892343619584"},
    )


async def test_withdraw_enabled_key_reports_withdraw(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """perm containing "withdraw" becomes withdraw=True."""
    mock_good(mocked, config=config_answer(perm="read_only,withdraw,trade"))
    result = await probe.probe(KEYS)
    assert result.permissions.withdraw is True
    assert result.permissions.trade is True


async def test_read_only_key_without_ip(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """perm "read_only" and ip "" read as read-only and unrestricted, with no deletion warning."""
    mock_good(mocked, config=config_answer(perm="read_only", ip=""))
    result = await probe.probe(KEYS)
    assert result.permissions == base.Permissions(read=True)
    assert "deletedAfterInactiveDays" not in result.details


async def test_trade_key_without_ip_is_flagged_for_deletion(
    probe: okx.OkxProbe, mocked: aioresponses
) -> None:
    """A trade key with no bound IP carries the 14-day inactivity deletion note (docs/venues.md §2.7)."""
    mock_good(mocked, config=config_answer(perm="read_only,trade", ip=""))
    result = await probe.probe(KEYS)
    assert result.details["deletedAfterInactiveDays"] == "14"


async def test_requests_are_stamped_after_waiting_for_the_rate_limiter(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """A request queued behind the rate limiter is stamped when its turn comes, not when it was queued."""
    probe = okx.OkxProbe(session, limiter=limits.RateLimiter(2.0, 1.0))  # 3 requests: about 1 s
    lags: list[float] = []

    def stamped(payload: dict[str, Any]) -> Callable[..., CallbackResult]:
        def callback(url: Any, **kwargs: Any) -> CallbackResult:
            stamp = datetime.fromisoformat(kwargs["headers"]["OK-ACCESS-TIMESTAMP"]).timestamp()
            lags.append(time.time() - stamp)
            return CallbackResult(payload=payload)

        return callback

    mocked.get(HOST + okx.CONFIG_PATH, callback=stamped(config_answer()))
    mocked.get(HOST + okx.TRADING_BALANCE_PATH, callback=stamped(BALANCE))
    mocked.get(HOST + okx.FUNDING_BALANCES_PATH, callback=stamped(FUNDING))
    started = time.monotonic()
    await probe.probe(KEYS)
    assert time.monotonic() - started > 0.8  # the limiter did make requests wait
    assert len(lags) == 3
    assert max(lags) < 0.2


async def test_requests_carry_the_documented_headers(
    probe: okx.OkxProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """Each request's OK-ACCESS-SIGN recomputes from its own timestamp, method and path."""
    mock_good(mocked)
    await probe.probe(KEYS)
    assert sorted(urlsplit(url).path for _, url, _ in sent) == sorted(
        [okx.CONFIG_PATH, okx.TRADING_BALANCE_PATH, okx.FUNDING_BALANCES_PATH]
    )
    assert len(mocked.requests) == 3
    for (method, url), calls in mocked.requests.items():  # as aioresponses saw them reach aiohttp
        headers = calls[0].kwargs["headers"]
        timestamp = headers["OK-ACCESS-TIMESTAMP"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", timestamp)
        sent_at = datetime.fromisoformat(timestamp).timestamp()
        assert abs(sent_at - time.time()) < 60
        assert headers["OK-ACCESS-KEY"] == API_KEY
        assert headers["OK-ACCESS-PASSPHRASE"] == PASSPHRASE
        assert headers["OK-ACCESS-SIGN"] == ref_sign(SECRET, timestamp, method.upper(), url.raw_path_qs)
        assert okx.DEMO_HEADER not in headers


async def test_identity_requests_run_concurrently(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """Trading and funding are asked at once: both are in flight together."""
    gate = Gate(expected=2)
    mocked.get(HOST + okx.CONFIG_PATH, payload=config_answer())
    mocked.get(HOST + okx.TRADING_BALANCE_PATH, callback=gate.reply(BALANCE))
    mocked.get(HOST + okx.FUNDING_BALANCES_PATH, callback=gate.reply(FUNDING))
    result = await probe.probe(KEYS)
    assert gate.peak == 2
    assert result.identities == ("funding", "trading")


async def test_identity_without_permission_is_not_reached(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """50120 on the funding call leaves funding out; the probe still succeeds."""
    mocked.get(HOST + okx.CONFIG_PATH, payload=config_answer())
    mocked.get(HOST + okx.TRADING_BALANCE_PATH, payload=BALANCE)
    mocked.get(HOST + okx.FUNDING_BALANCES_PATH, payload=error("50120"))
    result = await probe.probe(KEYS)
    assert result.identities == ("trading",)


async def test_transient_identity_failure_fails_the_probe(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """A 429 on one identity call fails the whole probe as RATE_LIMITED: no partial identity list."""
    mocked.get(HOST + okx.CONFIG_PATH, payload=config_answer())
    mocked.get(HOST + okx.TRADING_BALANCE_PATH, payload=BALANCE)
    mocked.get(
        HOST + okx.FUNDING_BALANCES_PATH, status=429, payload=error("50011"), headers={"Retry-After": "2"}
    )
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.RATE_LIMITED
    assert failure.retry_after == 2.0


async def test_base_url_is_used(session: aiohttp.ClientSession, mocked: aioresponses) -> None:
    """With base_url, every call goes there with the documented paths."""
    sim = "http://127.0.0.1:18081"
    mocked.get(sim + okx.CONFIG_PATH, payload=config_answer())
    mocked.get(sim + okx.TRADING_BALANCE_PATH, payload=BALANCE)
    mocked.get(sim + okx.FUNDING_BALANCES_PATH, payload=FUNDING)
    result = await okx.OkxProbe(session, base_url=sim).probe(KEYS)
    assert result.identities == ("funding", "trading")


# -- demo keys (50101, the probe <-> simulator contract) -------------------------------------------------


async def test_demo_key_is_wrong_environment(
    probe: okx.OkxProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """50101, then success with x-simulated-trading: 1 -> WRONG_ENVIRONMENT (a demo-trading key)."""
    mocked.get(HOST + okx.CONFIG_PATH, status=401, payload=error("50101"))
    mocked.get(HOST + okx.CONFIG_PATH, payload=config_answer())
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.WRONG_ENVIRONMENT
    assert "demo" in failure.message
    # the balance calls went out beside the first config call (one round trip); the demo check is config alone
    config_calls = [headers for _, url, headers in sent if url.endswith(okx.CONFIG_PATH)]
    assert [headers.get(okx.DEMO_HEADER) for headers in config_calls] == [None, "1"]


async def test_50101_everywhere_is_invalid_key(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """50101 with and without the demo header -> INVALID_KEY."""
    mocked.get(HOST + okx.CONFIG_PATH, status=401, payload=error("50101"), repeat=True)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.INVALID_KEY
    assert failure.venue_code == "50101"


async def test_50101_then_transient_stays_transient(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """If the demo retry meets a 5xx, the probe fails transiently instead of guessing."""
    mocked.get(HOST + okx.CONFIG_PATH, status=401, payload=error("50101"))
    mocked.get(HOST + okx.CONFIG_PATH, status=502, body="Bad Gateway")
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.SERVER_ERROR


# -- clock skew ------------------------------------------------------------------------------------------


async def test_clock_skew_resyncs_and_retries_once(
    probe: okx.OkxProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """50102 -> GET /api/v5/public/time -> the retry is stamped with the venue's time, and succeeds."""
    server_ms = int(time.time() * 1000) - 90_000  # the venue runs 90 s behind
    mocked.get(HOST + okx.CONFIG_PATH, status=401, payload=error("50102"))
    mocked.get(HOST + okx.TIME_PATH, payload={"code": "0", "msg": "", "data": [{"ts": str(server_ms)}]})
    mock_good(mocked)
    result = await probe.probe(KEYS)
    assert result.venue_account_id == "44705892343619584"
    assert abs(probe.clock_offset_ms + 90_000) < 5_000
    config_stamps = [h["OK-ACCESS-TIMESTAMP"] for _, url, h in sent if url.endswith(okx.CONFIG_PATH)]
    assert len(config_stamps) == 2
    retried_ms = datetime.fromisoformat(config_stamps[1]).timestamp() * 1000
    assert abs(retried_ms - server_ms) < 5_000


async def test_second_clock_skew_fails(
    probe: okx.OkxProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """A second 50102 after the resync raises CLOCK_SKEW (transient); the clock is fetched once."""
    mocked.get(HOST + okx.CONFIG_PATH, status=401, payload=error("50102"), repeat=True)
    mocked.get(HOST + okx.TIME_PATH, payload={"code": "0", "data": [{"ts": str(int(time.time() * 1000))}]})
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.CLOCK_SKEW
    assert failure.transient
    paths = [urlsplit(url).path for _, url, _ in sent]
    # the balance calls went out beside config (unmocked here: NETWORK, which the config call's verdict outranks)
    assert [p for p in paths if p in (okx.CONFIG_PATH, okx.TIME_PATH)] == [
        okx.CONFIG_PATH,
        okx.TIME_PATH,
        okx.CONFIG_PATH,
    ]


# -- transient HTTP answers ------------------------------------------------------------------------------


async def test_rate_limit_carries_retry_after(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """HTTP 429 (+50011) is RATE_LIMITED with the Retry-After seconds."""
    mocked.get(HOST + okx.CONFIG_PATH, status=429, payload=error("50011"), headers={"Retry-After": "3"})
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.RATE_LIMITED
    assert failure.retry_after == 3.0


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (500, '{"code":"50026","msg":"System error","data":[]}', base.Outcome.SERVER_ERROR),
        (503, "Service Unavailable", base.Outcome.SERVER_ERROR),
        (200, "<html>maintenance</html>", base.Outcome.SERVER_ERROR),
        (200, '{"code":"0","msg":""}', base.Outcome.SERVER_ERROR),
        (200, '{"code":"0","msg":"","data":[{"uid":"1"}]}', base.Outcome.SERVER_ERROR),
        (200, '{"code":"0","msg":"","data":[]}', base.Outcome.SERVER_ERROR),
        (403, "", base.Outcome.SERVER_ERROR),
    ],
    ids=["500-50026", "503", "html", "no-data", "no-perm", "empty-data", "403-empty"],
)
async def test_transient_answers(
    probe: okx.OkxProbe, mocked: aioresponses, status: int, body: str, outcome: base.Outcome
) -> None:
    """5xx and unreadable answers are transient, never a key verdict."""
    mocked.get(HOST + okx.CONFIG_PATH, status=status, body=body)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.transient


async def test_timeout(probe: okx.OkxProbe, mocked: aioresponses) -> None:
    """A request that times out is TIMEOUT (transient)."""
    mocked.get(HOST + okx.CONFIG_PATH, exception=TimeoutError())
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.TIMEOUT
    assert failure.transient


# -- the error table -------------------------------------------------------------------------------------


def test_error_table_is_the_documented_one() -> None:
    """okx.ERRORS holds exactly the codes of docs/venues.md §2.5, each in its documented class."""
    assert okx.ERRORS == DOC_CODES


def test_http_table_is_the_documented_one() -> None:
    """okx.HTTP_STATUS holds the one status docs/venues.md §2.5/2.6 gives a meaning without a code: 429."""
    assert okx.HTTP_STATUS == {429: base.Outcome.RATE_LIMITED}


@pytest.mark.parametrize(("status", "outcome"), sorted(okx.HTTP_STATUS.items()))
async def test_every_http_status_lands_in_its_class(
    probe: okx.OkxProbe, mocked: aioresponses, status: int, outcome: base.Outcome
) -> None:
    """A bare HTTP ``status`` (no OKX code) fails with the table's outcome and its Retry-After."""
    mocked.get(HOST + okx.CONFIG_PATH, status=status, body="Too Many Requests", headers={"Retry-After": "5"})
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.retry_after == 5.0


@pytest.mark.parametrize(("code", "outcome"), sorted(okx.ERRORS.items()))
async def test_every_code_lands_in_its_class(
    probe: okx.OkxProbe, mocked: aioresponses, code: str, outcome: base.Outcome
) -> None:
    """account/config answering ``code`` fails the probe with the table's outcome and the venue code.

    50101 only ends as WRONG_ENVIRONMENT when the demo retry succeeds, which this test lets it do.
    """
    mocked.get(HOST + okx.CONFIG_PATH, status=401, payload=error(code))
    mocked.get(HOST + okx.TIME_PATH, payload={"code": "0", "data": [{"ts": str(int(time.time() * 1000))}]})
    follow_up = config_answer() if code == okx.ENVIRONMENT_MISMATCH_CODE else error(code)
    mocked.get(HOST + okx.CONFIG_PATH, status=200, payload=follow_up)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.venue_code == code
    assert failure.transient is outcome.transient


@pytest.mark.parametrize(("code", "outcome"), sorted(DOC_CODES.items()))
def test_classify_follows_the_doc(code: str, outcome: base.Outcome) -> None:
    """classify() maps each documented code (even on HTTP 200) to the documented class."""
    failure = okx.classify(http.Reply(status=200, headers={}, body=error(code), text=""))
    assert failure is not None
    assert failure.outcome is outcome


def test_unknown_code_is_transient() -> None:
    """A code docs/venues.md does not list is SERVER_ERROR: never a reason to mark a key FAILED."""
    failure = okx.classify(http.Reply(status=200, headers={}, body=error("59999"), text=""))
    assert failure is not None
    assert failure.outcome is base.Outcome.SERVER_ERROR


# -- key format ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        KEYS,
        base.ApiKeys(api_key="a" * 8, api_secret="B" * 8, api_passphrase="p"),
        base.ApiKeys(api_key="k-" * 64, api_secret="S" * 128, api_passphrase="!" * 128),
    ],
    ids=["real", "min", "max"],
)
def test_check_keys_accepts_real_shapes(probe: okx.OkxProbe, keys: base.ApiKeys) -> None:
    """UUID keys, 32-hex secrets and visible-ASCII passphrases pass check_keys."""
    probe.check_keys(keys)


@pytest.mark.parametrize(
    ("api_key", "api_secret", "passphrase", "field", "reason"),
    [
        (API_KEY, SECRET, None, "apiPassphrase", "required"),
        (API_KEY, SECRET, "", "apiPassphrase", "required"),
        (API_KEY, SECRET, "two words", "apiPassphrase", "whitespace"),
        (API_KEY, SECRET, "pass\x07word", "apiPassphrase", "control"),
        (API_KEY, SECRET, "pässword", "apiPassphrase", "visible ASCII"),
        (API_KEY, SECRET, "p" * 129, "apiPassphrase", "visible ASCII"),
        ("", SECRET, PASSPHRASE, "apiKey", "empty"),
        (API_KEY + " ", SECRET, PASSPHRASE, "apiKey", "whitespace"),
        (API_KEY.replace("-", "_"), SECRET, PASSPHRASE, "apiKey", "UUID"),
        (API_KEY, SECRET + "=", PASSPHRASE, "apiSecret", "letters and digits"),
        (API_KEY, "s" * 300, PASSPHRASE, "apiSecret", "longer than 256"),
        (API_KEY, "\t" + SECRET, PASSPHRASE, "apiSecret", "whitespace"),
    ],
    ids=[
        "no-passphrase",
        "empty-passphrase",
        "space-passphrase",
        "bell-passphrase",
        "non-ascii-passphrase",
        "long-passphrase",
        "empty-key",
        "trailing-space-key",
        "underscore-key",
        "base64-secret",
        "huge-secret",
        "tab-secret",
    ],
)
def test_check_keys_rejects_garbage(
    probe: okx.OkxProbe, api_key: str, api_secret: str, passphrase: str | None, field: str, reason: str
) -> None:
    """Garbage is refused naming the field and the reason, never echoing the value."""
    with pytest.raises(base.KeyFormatProblem) as caught:
        probe.check_keys(base.ApiKeys(api_key=api_key, api_secret=api_secret, api_passphrase=passphrase))
    assert caught.value.field == field
    assert reason in caught.value.reason
    for value in (api_secret, passphrase or "<none>"):
        assert value not in str(caught.value)


async def test_missing_passphrase_fails_the_probe_without_a_request(
    probe: okx.OkxProbe, mocked: aioresponses
) -> None:
    """probe() without a passphrase is INVALID_PASSPHRASE (permanent) and sends nothing."""
    failure = await failure_of(probe.probe(base.ApiKeys(api_key=API_KEY, api_secret=SECRET)))
    assert failure.outcome is base.Outcome.INVALID_PASSPHRASE
    assert "apiPassphrase" in failure.message
    assert mocked.requests == {}


# -- no key material in failures or results --------------------------------------------------------------

CANARY_KEY = "CanaryKey-7Q2x-W9aa-bbbb-cccccccccccc"
CANARY_SECRET = "CanarySecret3Zp8ABCDEF0123456789"
CANARY_PASSPHRASE = "CanaryPass!x9"
CANARY = base.ApiKeys(api_key=CANARY_KEY, api_secret=CANARY_SECRET, api_passphrase=CANARY_PASSPHRASE)
ECHO = f"key {CANARY_KEY} secret {CANARY_SECRET} passphrase {CANARY_PASSPHRASE}"
TIME_OK: dict[str, Any] = {"code": "0", "data": [{"ts": "0"}]}

MockSpec = tuple[str, dict[str, Any]]
CONFIG_URL = HOST + okx.CONFIG_PATH
CANARY_PATHS: dict[str, list[MockSpec]] = {
    **{
        f"code{code}": [(CONFIG_URL, {"status": 401, "payload": {"code": code, "msg": ECHO}, "repeat": True})]
        for code in okx.ERRORS
    },
    "demo-key": [
        (CONFIG_URL, {"status": 401, "payload": {"code": "50101", "msg": ECHO}}),
        (CONFIG_URL, {"payload": config_answer(label="demo")}),
    ],
    "unknown-code": [(CONFIG_URL, {"payload": {"code": "58888", "msg": ECHO}})],
    "429": [(CONFIG_URL, {"status": 429, "body": ECHO})],
    "500": [(CONFIG_URL, {"status": 500, "body": ECHO})],
    "not-json": [(CONFIG_URL, {"body": ECHO})],
    "timeout": [(CONFIG_URL, {"exception": TimeoutError(ECHO)})],
    "network": [(CONFIG_URL, {"exception": aiohttp.ClientConnectionError(ECHO)})],
    "identity-5xx": [
        (CONFIG_URL, {"payload": config_answer()}),
        (HOST + okx.TRADING_BALANCE_PATH, {"status": 502, "body": ECHO}),
        (HOST + okx.FUNDING_BALANCES_PATH, {"payload": FUNDING}),
    ],
}


def assert_no_canary(text: str, signatures: list[str]) -> None:
    for secret in (CANARY_KEY, CANARY_SECRET, CANARY_PASSPHRASE, "Canary", *signatures):
        assert secret not in text


def signatures_sent(sent: list[tuple[str, str, dict[str, str]]]) -> list[str]:
    return [h["OK-ACCESS-SIGN"] for _, _, h in sent if "OK-ACCESS-SIGN" in h]


@pytest.mark.parametrize("path", sorted(CANARY_PATHS))
async def test_canary_never_leaks_from_failures(
    probe: okx.OkxProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]], path: str
) -> None:
    """Through every failure path, key, secret, passphrase and signatures stay out of the ProbeFailure."""
    mocked.get(HOST + okx.TIME_PATH, payload=TIME_OK)
    for url, answer in CANARY_PATHS[path]:
        mocked.get(url, **answer)
    failure = await failure_of(probe.probe(CANARY))
    assert_no_canary(
        " ".join([str(failure), repr(failure), repr(failure.args), failure.message, str(failure.venue_code)]),
        signatures_sent(sent),
    )


@pytest.mark.parametrize(
    "keys",
    [
        base.ApiKeys(api_key=CANARY_KEY, api_secret=CANARY_SECRET),
        base.ApiKeys(api_key=CANARY_KEY, api_secret=CANARY_SECRET, api_passphrase=CANARY_PASSPHRASE + " x"),
        base.ApiKeys(api_key=CANARY_KEY + "\n", api_secret=CANARY_SECRET, api_passphrase=CANARY_PASSPHRASE),
    ],
    ids=["no-passphrase", "bad-passphrase", "bad-key"],
)
async def test_canary_never_leaks_from_bad_format(probe: okx.OkxProbe, keys: base.ApiKeys) -> None:
    """Malformed canary keys are refused without echoing any of them."""
    failure = await failure_of(probe.probe(keys))
    assert_no_canary(" ".join([str(failure), repr(failure), repr(failure.args)]), [])


async def test_canary_never_leaks_from_results(
    probe: okx.OkxProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """A successful ProbeResult holds no key material, even when the venue echoes some."""
    mocked.get(CONFIG_URL, payload=config_answer(apiKey=CANARY_KEY, secret=CANARY_SECRET))
    mocked.get(HOST + okx.TRADING_BALANCE_PATH, payload={**BALANCE, "msg": ECHO})
    mocked.get(HOST + okx.FUNDING_BALANCES_PATH, payload=FUNDING)
    result = await probe.probe(CANARY)
    assert_no_canary(repr(result) + str(result), signatures_sent(sent))
