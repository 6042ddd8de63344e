"""The Binance probe (venues/binance.py) against docs/venues.md §1, with aioresponses (no network)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from venue_support import Gate, failure_of  # tests/unit/venues is on sys.path

from venues import base, binance, http, limits

API = "https://api.binance.com"
FAPI = "https://fapi.binance.com"
# docs/venues.md §1.8, the spot documentation's key pair
DOC_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
KEYS = base.ApiKeys(api_key=DOC_KEY, api_secret=DOC_SECRET)

RESTRICTIONS: dict[str, Any] = {
    "ipRestrict": True,
    "createTime": 1698645219000,
    "enableReading": True,
    "enableWithdrawals": False,
    "enableInternalTransfer": True,
    "enableMargin": False,
    "enableFutures": True,
    "permitsUniversalTransfer": False,
    "enableVanillaOptions": False,
    "enableFixApiTrade": False,
    "enableFixReadOnly": True,
    "enableSpotAndMarginTrading": True,
    "enablePortfolioMarginTrading": False,
    "tradingAuthorityExpirationTime": 1893456000000,
}
SPOT: dict[str, Any] = {"uid": 354937868, "accountType": "SPOT", "canTrade": True, "balances": []}
MARGIN: dict[str, Any] = {"tradeEnabled": True, "totalAssetOfBtc": "0", "userAssets": []}
FUTURES: dict[str, Any] = {"totalWalletBalance": "0", "assets": [], "positions": []}

# docs/venues.md §1.5 (and -3003 from 1.4), copied by hand: the module's table must say exactly this. Where the doc
# gives two classes or "bug", the choice made in venues/binance.py is written here too.
DOC_CODES: dict[int, base.Outcome] = {
    -2014: base.Outcome.INVALID_KEY,
    -2015: base.Outcome.INVALID_KEY,  # ambiguous; on the verify call it is INVALID_KEY (README contract)
    -2008: base.Outcome.INVALID_KEY,
    -1022: base.Outcome.INVALID_SECRET,
    -1021: base.Outcome.CLOCK_SKEW,
    -1131: base.Outcome.SERVER_ERROR,  # "bug": transient
    -1002: base.Outcome.PERMISSION_DENIED,
    -1099: base.Outcome.INVALID_KEY,  # "INVALID_KEY/PERMISSION"
    -2017: base.Outcome.ACCOUNT_RESTRICTED,
    -4056: base.Outcome.INVALID_KEY,
    -4057: base.Outcome.INVALID_KEY,
    -3001: base.Outcome.ACCOUNT_RESTRICTED,
    -3003: base.Outcome.PERMISSION_DENIED,  # 1.4: margin account not opened
    -1003: base.Outcome.RATE_LIMITED,
    -1015: base.Outcome.RATE_LIMITED,
    -1000: base.Outcome.SERVER_ERROR,
    -1001: base.Outcome.SERVER_ERROR,
    -1006: base.Outcome.SERVER_ERROR,
    -1007: base.Outcome.SERVER_ERROR,
    -1008: base.Outcome.SERVER_ERROR,
    -1016: base.Outcome.MAINTENANCE,
}


def at(host: str, path: str) -> re.Pattern[str]:
    """Any request to ``host + path``, whatever its query string."""
    return re.compile("^" + re.escape(host + path) + r"(\?.*)?$")


def ref_sign(secret: str, payload: str) -> str:
    """docs/venues.md §1.2 step 4, written independently of the module."""
    return hmac.new(secret.encode("ascii"), payload.encode("ascii"), hashlib.sha256).hexdigest()


@pytest.fixture
def probe(session: aiohttp.ClientSession) -> binance.BinanceProbe:
    return binance.BinanceProbe(session)


def mock_good(
    m: aioresponses,
    *,
    restrictions: dict[str, Any] | None = None,
    margin: dict[str, Any] | None = None,
    futures: dict[str, Any] | None = None,
) -> None:
    m.get(at(API, binance.RESTRICTIONS_PATH), payload=restrictions or RESTRICTIONS)
    m.get(at(API, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    m.get(at(API, binance.MARGIN_ACCOUNT_PATH), payload=margin or MARGIN)
    m.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), payload=futures or FUTURES)


# -- signing: the official vectors (docs/venues.md §1.8) -------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000"
            "&timestamp=1499827319559",
            "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71",
        ),
        (
            "symbol=%EF%BC%91%EF%BC%92%EF%BC%93%EF%BC%94%EF%BC%95%EF%BC%96&side=BUY&type=LIMIT"
            "&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559",
            "e1353ec6b14d888f1164ae9af8228a3dbd508bc82eb867db8ab6046442f33ef3",
        ),
        (
            # mixed: query string + body, concatenated with no separator
            "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC"
            + "quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559",
            "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77",
        ),
    ],
    ids=["spot", "spot-non-ascii", "spot-query-plus-body"],
)
def test_spot_doc_vectors(payload: str, expected: str) -> None:
    """sign_query reproduces the three official spot signatures byte for byte."""
    assert binance.sign_query(DOC_SECRET, payload) == expected


def test_non_ascii_values_are_percent_encoded_before_signing() -> None:
    """encode_params turns the doc's full-width symbol into the exact bytes the doc signs."""
    params = [
        ("symbol", "\uff11\uff12\uff13\uff14\uff15\uff16"),  # full-width digits 1-6
        ("side", "BUY"),
        ("type", "LIMIT"),
        ("timeInForce", "GTC"),
        ("quantity", "1"),
        ("price", "0.1"),
        ("recvWindow", "5000"),
        ("timestamp", "1499827319559"),
    ]
    payload = binance.encode_params(params)
    assert payload.startswith("symbol=%EF%BC%91%EF%BC%92%EF%BC%93%EF%BC%94%EF%BC%95%EF%BC%96&side=BUY")
    assert (
        binance.sign_query(DOC_SECRET, payload)
        == "e1353ec6b14d888f1164ae9af8228a3dbd508bc82eb867db8ab6046442f33ef3"
    )


FUTURES_SECRET = "2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9"


def test_usdm_doc_vector() -> None:
    """sign_query reproduces the official USD-M futures signature."""
    payload = (
        "symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=9000&timeInForce=GTC&recvWindow=5000"
        "&timestamp=1591702613943"
    )
    assert (
        binance.sign_query(FUTURES_SECRET, payload)
        == "3c661234138461fcc7a7d8746c6558c9842d4e10870d2ecbedf7777cad694af9"
    )


def test_usdm_example_3_only_reproduces_with_the_stray_space() -> None:
    """USD-M "Example 3" matches the doc only with its stray space; without it, the computed value."""
    query = "symbol=BTCUSDT&side=BUY&type=LIMIT&timeInForce=GTC"
    with_space = "quantity=1&price=9000&recvWindow=5000&timestamp= 1591702613943"
    assert (
        binance.sign_query(FUTURES_SECRET, query + with_space)
        == "f9d0ae5e813ef6ccf15c2b5a434047a0181cb5a342b903b367ca6d27a66e36f2"
    )
    assert (
        binance.sign_query(FUTURES_SECRET, query + with_space.replace(" ", ""))
        == "30baaf0fab549bbeda7f5ef201898b34122da25fd23c646cac2c529aebe670a4"
    )


def test_signed_query_order_is_timestamp_recvwindow_params_signature() -> None:
    """signed_query puts timestamp, recvWindow, the params, then the signature of all that, last."""
    query = binance.signed_query(DOC_SECRET, 1499827319559, [("omitZeroBalances", "true")])
    payload = "timestamp=1499827319559&recvWindow=5000&omitZeroBalances=true"
    assert query == f"{payload}&signature={ref_sign(DOC_SECRET, payload)}"


# -- a full probe ----------------------------------------------------------------------------------------


async def test_good_key(probe: binance.BinanceProbe, mocked: aioresponses) -> None:
    """A good key yields permissions from apiRestrictions, the spot uid and all three identities."""
    mock_good(mocked)
    result = await probe.probe(KEYS)
    assert result == base.ProbeResult(
        venue=base.Venue.BINANCE,
        venue_account_id="354937868",
        permissions=base.Permissions(
            read=True,
            trade=True,
            withdraw=False,
            transfer=True,
            ip_restricted=True,
            ip_allowlist=(),
            expires_at_ms=1893456000000,
        ),
        identities=("futures", "margin", "spot"),
    )


async def test_withdraw_enabled_key_reports_withdraw(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """enableWithdrawals=true becomes withdraw=True (the policy, not the probe, rejects it)."""
    mock_good(mocked, restrictions={**RESTRICTIONS, "enableWithdrawals": True})
    result = await probe.probe(KEYS)
    assert result.permissions.withdraw is True


async def test_read_only_key_without_expiry(probe: binance.BinanceProbe, mocked: aioresponses) -> None:
    """A key with every trade flag off and no trading expiry reads as read-only, expires_at_ms None."""
    restrictions = {
        **RESTRICTIONS,
        "enableSpotAndMarginTrading": False,
        "enableFutures": False,
        "enableInternalTransfer": False,
    }
    del restrictions["tradingAuthorityExpirationTime"]
    mock_good(mocked, restrictions=restrictions)
    result = await probe.probe(KEYS)
    assert result.permissions == base.Permissions(read=True, ip_restricted=True)


async def test_requests_are_signed_as_sent(
    probe: binance.BinanceProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """Every signed request carries X-MBX-APIKEY and a signature over its exact query, put last."""
    mock_good(mocked)
    await probe.probe(KEYS)
    assert {urlsplit(url).path for _, url, _ in sent} == {
        binance.RESTRICTIONS_PATH,
        binance.SPOT_ACCOUNT_PATH,
        binance.MARGIN_ACCOUNT_PATH,
        binance.FUTURES_ACCOUNT_PATH,
    }
    for method, url, headers in sent:
        assert method == "GET"
        assert headers == {"X-MBX-APIKEY": DOC_KEY}
        query = urlsplit(url).query
        payload, _, signature = query.rpartition("&signature=")
        assert signature == ref_sign(DOC_SECRET, payload)
        names = [name for name, _ in parse_qsl(query)]
        assert names[:2] == ["timestamp", "recvWindow"]
        assert names[-1] == "signature"
        assert abs(int(dict(parse_qsl(query))["timestamp"]) - time.time() * 1000) < 60_000
    # aioresponses' own record shows the same header reached aiohttp
    for calls in mocked.requests.values():
        assert calls[0].kwargs["headers"]["X-MBX-APIKEY"] == DOC_KEY


async def test_requests_are_stamped_after_waiting_for_the_rate_limiter(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """A request queued behind the weight limiter is stamped when its turn comes, not when it was queued."""
    probe = binance.BinanceProbe(session, limiter=limits.RateLimiter(20.0, 20.0))  # 36 weight: about 0.8 s
    lags: list[float] = []

    def stamped(payload: dict[str, Any]) -> Callable[..., CallbackResult]:
        def callback(url: Any, **kwargs: Any) -> CallbackResult:
            lags.append(time.time() - int(url.query["timestamp"]) / 1000)
            return CallbackResult(payload=payload)

        return callback

    mocked.get(at(API, binance.RESTRICTIONS_PATH), callback=stamped(RESTRICTIONS))
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), callback=stamped(SPOT))
    mocked.get(at(API, binance.MARGIN_ACCOUNT_PATH), callback=stamped(MARGIN))
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), callback=stamped(FUTURES))
    started = time.monotonic()
    await probe.probe(KEYS)
    assert time.monotonic() - started > 0.6  # the limiter did make requests wait
    assert len(lags) == 4
    assert max(lags) < 0.2


async def test_identity_requests_run_concurrently(probe: binance.BinanceProbe, mocked: aioresponses) -> None:
    """Spot, margin and futures are asked at once: all three are in flight together."""
    gate = Gate(expected=3)
    mocked.get(at(API, binance.RESTRICTIONS_PATH), payload=RESTRICTIONS)
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), callback=gate.reply(SPOT))
    mocked.get(at(API, binance.MARGIN_ACCOUNT_PATH), callback=gate.reply(MARGIN))
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), callback=gate.reply(FUTURES))
    result = await probe.probe(KEYS)
    assert gate.peak == 3
    assert result.identities == ("futures", "margin", "spot")


async def test_margin_not_opened_and_futures_not_enabled(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """-3003 on margin and -2015 on futures (after the verify passed) mean "not reached", not a failure."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), payload=RESTRICTIONS)
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    mocked.get(
        at(API, binance.MARGIN_ACCOUNT_PATH),
        status=400,
        payload={"code": -3003, "msg": "Margin account does not exist."},
    )
    mocked.get(
        at(FAPI, binance.FUTURES_ACCOUNT_PATH),
        status=401,
        payload={"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
    )
    result = await probe.probe(KEYS)
    assert result.identities == ("spot",)


async def test_transient_identity_failure_fails_the_probe(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """A 503 on one identity call fails the whole probe transiently: no partial identity list."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), payload=RESTRICTIONS)
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    mocked.get(at(API, binance.MARGIN_ACCOUNT_PATH), payload=MARGIN)
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), status=503, body="Service Unavailable.")
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.SERVER_ERROR
    assert failure.transient


async def test_minus_2015_on_verify_names_all_three_causes(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """-2015 on apiRestrictions is INVALID_KEY with a message naming unknown key, IP and permission."""
    mocked.get(
        at(API, binance.RESTRICTIONS_PATH),
        status=401,
        payload={
            "code": -2015,
            "msg": "Invalid API-key, IP, or permissions for action, request ip: 127.0.0.1",
        },
    )
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.INVALID_KEY
    assert failure.venue_code == "-2015"
    for cause in ("unknown", "IP", "Enable Reading"):
        assert cause in failure.message


async def test_spot_refused_after_verify_is_permission_denied(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """A key that passes apiRestrictions but cannot read /api/v3/account has no uid: PERMISSION_DENIED."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), payload=RESTRICTIONS)
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), status=401, payload={"code": -2015, "msg": "x"})
    mocked.get(at(API, binance.MARGIN_ACCOUNT_PATH), payload=MARGIN)
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), payload=FUTURES)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.PERMISSION_DENIED
    assert failure.venue_code == "-2015"


TESTNET = "https://testnet.binance.vision"


async def test_no_sapi_host_falls_back_to_the_spot_account(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """With a base_url whose /sapi is 404 (spot testnet), /api/v3/account verifies; permissions are
    account-level and margin/futures (404 there too) are not reached."""
    mocked.get(at(TESTNET, binance.RESTRICTIONS_PATH), status=404, body="")
    mocked.get(at(TESTNET, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    mocked.get(at(TESTNET, binance.MARGIN_ACCOUNT_PATH), status=404, body="")
    mocked.get(at(TESTNET, binance.FUTURES_ACCOUNT_PATH), status=404, body="")
    result = await binance.BinanceProbe(session, base_url=TESTNET).probe(KEYS)
    assert result.identities == ("spot",)
    assert result.permissions == base.Permissions(read=True, trade=True)
    assert "account-level" in result.details["permissions"]


async def test_no_sapi_host_with_a_bad_key_reports_the_key(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """In the fallback the spot call is the verify call: its -2014 is the key's failure."""
    mocked.get(at(TESTNET, binance.RESTRICTIONS_PATH), status=404, body="")
    mocked.get(at(TESTNET, binance.SPOT_ACCOUNT_PATH), status=400, payload={"code": -2014, "msg": "x"})
    mocked.get(at(TESTNET, binance.MARGIN_ACCOUNT_PATH), status=404, body="")
    mocked.get(at(TESTNET, binance.FUTURES_ACCOUNT_PATH), status=503, body="")
    failure = await failure_of(binance.BinanceProbe(session, base_url=TESTNET).probe(KEYS))
    assert failure.outcome is base.Outcome.INVALID_KEY


async def test_404_on_production_hosts_is_transient(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """On the production hosts a 404 is an anomaly: SERVER_ERROR, never the no-/sapi fallback."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), status=404, body="")
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.SERVER_ERROR
    assert failure.transient


async def test_404_on_a_production_identity_is_transient(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """A 404 from the production margin endpoint fails transiently instead of dropping "margin"."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), payload=RESTRICTIONS)
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    mocked.get(at(API, binance.MARGIN_ACCOUNT_PATH), status=404, body="")
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), payload=FUTURES)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.SERVER_ERROR


async def test_base_url_serves_every_host_role(session: aiohttp.ClientSession, mocked: aioresponses) -> None:
    """With base_url, the api and fapi roles both go there, paths unchanged."""
    sim = "http://127.0.0.1:18080"
    mocked.get(at(sim, binance.RESTRICTIONS_PATH), payload=RESTRICTIONS)
    mocked.get(at(sim, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    mocked.get(at(sim, binance.MARGIN_ACCOUNT_PATH), payload=MARGIN)
    mocked.get(at(sim, binance.FUTURES_ACCOUNT_PATH), payload=FUTURES)
    result = await binance.BinanceProbe(session, base_url=sim + "/").probe(KEYS)
    assert result.identities == ("futures", "margin", "spot")


# -- clock skew ------------------------------------------------------------------------------------------


async def test_clock_skew_resyncs_and_retries_once(
    probe: binance.BinanceProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """-1021 -> GET /api/v3/time -> the retried request carries the venue's time, and succeeds."""
    server_ms = int(time.time() * 1000) + 120_000  # the venue runs two minutes ahead
    mocked.get(at(API, binance.RESTRICTIONS_PATH), status=400, payload={"code": -1021, "msg": "x"})
    mocked.get(API + "/api/v3/time", payload={"serverTime": server_ms})
    mock_good(mocked)
    result = await probe.probe(KEYS)
    assert result.venue_account_id == "354937868"
    assert abs(probe.clock_offset_ms - 120_000) < 5_000
    restriction_calls = [url for _, url, _ in sent if binance.RESTRICTIONS_PATH in url]
    assert len(restriction_calls) == 2
    retried_ts = int(dict(parse_qsl(urlsplit(restriction_calls[1]).query))["timestamp"])
    assert abs(retried_ts - server_ms) < 5_000


async def test_second_clock_skew_fails(
    probe: binance.BinanceProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """A second -1021 after the resync raises CLOCK_SKEW (transient); the clock is fetched once."""
    skew = {"code": -1021, "msg": "Timestamp for this request is outside of the recvWindow."}
    mocked.get(at(API, binance.RESTRICTIONS_PATH), status=400, payload=skew, repeat=True)
    mocked.get(API + "/api/v3/time", payload={"serverTime": int(time.time() * 1000)})
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.CLOCK_SKEW
    assert failure.transient
    assert [urlsplit(url).path for _, url, _ in sent].count("/api/v3/time") == 1
    assert [urlsplit(url).path for _, url, _ in sent].count(binance.RESTRICTIONS_PATH) == 2


async def test_futures_skew_resyncs_from_the_futures_clock(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """A -1021 from fapi resyncs from GET /fapi/v1/time and retries the futures call."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), payload=RESTRICTIONS)
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), payload=SPOT)
    mocked.get(at(API, binance.MARGIN_ACCOUNT_PATH), payload=MARGIN)
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), status=400, payload={"code": -1021, "msg": "x"})
    mocked.get(FAPI + "/fapi/v1/time", payload={"serverTime": int(time.time() * 1000)})
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), payload=FUTURES)
    result = await probe.probe(KEYS)
    assert "futures" in result.identities


# -- transient HTTP answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 418])
async def test_rate_limit_carries_retry_after(
    probe: binance.BinanceProbe, mocked: aioresponses, status: int
) -> None:
    """429 and 418 (IP ban) are RATE_LIMITED with the Retry-After seconds."""
    mocked.get(
        at(API, binance.RESTRICTIONS_PATH),
        status=status,
        payload={"code": -1003, "msg": "Too much request weight used."},
        headers={"Retry-After": "37"},
    )
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.RATE_LIMITED
    assert failure.transient
    assert failure.retry_after == 37.0


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (403, "<html>WAF</html>", base.Outcome.RATE_LIMITED),
        (500, "Internal Server Error", base.Outcome.SERVER_ERROR),
        (502, "", base.Outcome.SERVER_ERROR),
        (503, '{"code":-1008,"msg":"Server is currently overloaded"}', base.Outcome.SERVER_ERROR),
        (408, "", base.Outcome.TIMEOUT),
        (200, "<html>not json</html>", base.Outcome.SERVER_ERROR),
        (200, '{"enableReading": "yes"}', base.Outcome.SERVER_ERROR),
        (200, "[1, 2]", base.Outcome.SERVER_ERROR),
        (409, '{"unexpected": true}', base.Outcome.SERVER_ERROR),
    ],
    ids=["403-waf", "500", "502-empty", "503-busy", "408", "html", "bad-fields", "list", "409"],
)
async def test_transient_answers(
    probe: binance.BinanceProbe, mocked: aioresponses, status: int, body: str, outcome: base.Outcome
) -> None:
    """WAF blocks, 5xx, backend timeouts and unreadable bodies are transient, never a key verdict."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), status=status, body=body)
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.transient


async def test_timeout(probe: binance.BinanceProbe, mocked: aioresponses) -> None:
    """A request that times out is TIMEOUT (transient)."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), exception=TimeoutError())
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.TIMEOUT
    assert failure.transient


async def test_connection_error(probe: binance.BinanceProbe, mocked: aioresponses) -> None:
    """A refused connection is NETWORK (transient)."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), exception=aiohttp.ClientConnectionError("refused"))
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is base.Outcome.NETWORK
    assert failure.transient


# -- the error table -------------------------------------------------------------------------------------


def test_error_table_is_the_documented_one() -> None:
    """binance.ERRORS holds exactly the codes of docs/venues.md §1.5 (+ -3003), each in its documented class."""
    assert binance.ERRORS == DOC_CODES


# docs/venues.md §1.5 "HTTP", copied by hand (5xx, and any other 4xx, are SERVER_ERROR outside the table)
DOC_HTTP: dict[int, base.Outcome] = {
    418: base.Outcome.RATE_LIMITED,
    429: base.Outcome.RATE_LIMITED,
    403: base.Outcome.RATE_LIMITED,  # WAF block
    408: base.Outcome.TIMEOUT,
}


def test_http_table_is_the_documented_one() -> None:
    """binance.HTTP_STATUS holds exactly the statuses docs/venues.md §1.5 gives a meaning."""
    assert binance.HTTP_STATUS == DOC_HTTP


@pytest.mark.parametrize(("status", "outcome"), sorted(binance.HTTP_STATUS.items()))
async def test_every_http_status_lands_in_its_class(
    probe: binance.BinanceProbe, mocked: aioresponses, status: int, outcome: base.Outcome
) -> None:
    """A bare HTTP ``status`` (no Binance code) fails with the table's outcome and its Retry-After."""
    mocked.get(
        at(API, binance.RESTRICTIONS_PATH), status=status, body="<html/>", headers={"Retry-After": "5"}
    )
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.retry_after == 5.0


@pytest.mark.parametrize(("code", "outcome"), sorted(binance.ERRORS.items()))
async def test_every_code_lands_in_its_class(
    probe: binance.BinanceProbe, mocked: aioresponses, code: int, outcome: base.Outcome
) -> None:
    """The verify call answering ``code`` fails the probe with the table's outcome and the venue code."""
    answer = {"code": code, "msg": "documented message"}
    mocked.get(at(API, binance.RESTRICTIONS_PATH), status=400, payload=answer, repeat=True)
    mocked.get(API + "/api/v3/time", payload={"serverTime": int(time.time() * 1000)})
    failure = await failure_of(probe.probe(KEYS))
    assert failure.outcome is outcome
    assert failure.venue_code == str(code)
    assert failure.transient is outcome.transient


@pytest.mark.parametrize(("code", "outcome"), sorted(DOC_CODES.items()))
def test_classify_follows_the_doc(code: int, outcome: base.Outcome) -> None:
    """classify() maps each documented code, as a 4xx answer, to the documented class."""
    reply = http.Reply(status=400, headers={}, body={"code": code, "msg": "m"}, text="")
    failure = binance.classify(reply)
    assert failure is not None
    assert failure.outcome is outcome


def test_unknown_code_is_transient() -> None:
    """A code docs/venues.md does not list is SERVER_ERROR: never a reason to mark a key FAILED."""
    reply = http.Reply(status=400, headers={}, body={"code": -9999, "msg": "new"}, text="")
    failure = binance.classify(reply)
    assert failure is not None
    assert failure.outcome is base.Outcome.SERVER_ERROR


# -- key format ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        KEYS,
        base.ApiKeys(api_key="a" * 8, api_secret="B" * 8),
        base.ApiKeys(api_key="a1" * 64, api_secret="Z9" * 64),
    ],
    ids=["doc-64", "min-8", "max-128"],
)
def test_check_keys_accepts_real_shapes(probe: binance.BinanceProbe, keys: base.ApiKeys) -> None:
    """64-char production keys and 8..128 alphanumerics pass check_keys."""
    probe.check_keys(keys)


@pytest.mark.parametrize(
    ("api_key", "api_secret", "field", "reason"),
    [
        ("", DOC_SECRET, "apiKey", "empty"),
        (DOC_KEY, "", "apiSecret", "empty"),
        (DOC_KEY[:30] + " " + DOC_KEY[31:], DOC_SECRET, "apiKey", "whitespace"),
        (DOC_KEY + "\n", DOC_SECRET, "apiKey", "whitespace"),
        (DOC_KEY, DOC_SECRET[:10] + "\x00" + DOC_SECRET[11:], "apiSecret", "control"),
        (DOC_KEY, "x" * 257, "apiSecret", "longer than 256"),
        (DOC_KEY, "a" * 129, "apiSecret", "8 to 128"),
        ("short", DOC_SECRET, "apiKey", "8 to 128"),
        (DOC_KEY, DOC_SECRET[:-1] + "/", "apiSecret", "letters and digits"),
        (DOC_KEY, "-----BEGIN PRIVATE KEY-----\nMC4CAQ...\n-----END PRIVATE KEY-----", "apiSecret", "HMAC"),
    ],
    ids=["empty-key", "empty-secret", "space", "newline", "nul", "too-long", "129", "short", "slash", "pem"],
)
def test_check_keys_rejects_garbage(
    probe: binance.BinanceProbe, api_key: str, api_secret: str, field: str, reason: str
) -> None:
    """Garbage is refused naming the field and the reason, never echoing the value."""
    with pytest.raises(base.KeyFormatProblem) as caught:
        probe.check_keys(base.ApiKeys(api_key=api_key, api_secret=api_secret))
    assert caught.value.field == field
    assert reason in caught.value.reason
    if len(api_secret) > 8:
        assert api_secret not in str(caught.value)


async def test_malformed_keys_fail_the_probe_without_a_request(
    probe: binance.BinanceProbe, mocked: aioresponses
) -> None:
    """probe() turns a key-format problem into a permanent ProbeFailure and sends nothing."""
    failure = await failure_of(probe.probe(base.ApiKeys(api_key=DOC_KEY, api_secret="bad secret!")))
    assert failure.outcome is base.Outcome.INVALID_SECRET
    assert not failure.transient
    assert "apiSecret" in failure.message
    assert mocked.requests == {}


# -- no key material in failures or results --------------------------------------------------------------

CANARY_KEY = "CanaryKey7Q2xW9" + "K" * 49
CANARY_SECRET = "CanarySecret3Zp8" + "S" * 48
CANARY = base.ApiKeys(api_key=CANARY_KEY, api_secret=CANARY_SECRET)
ECHO = f"key {CANARY_KEY} secret {CANARY_SECRET}"  # a hostile/buggy venue echoing what it was sent

MockSpec = tuple[re.Pattern[str] | str, dict[str, Any]]
RESTRICTIONS_URL = at(API, binance.RESTRICTIONS_PATH)
CANARY_PATHS: dict[str, list[MockSpec]] = {
    **{
        f"code{code}": [
            (RESTRICTIONS_URL, {"status": 400, "payload": {"code": code, "msg": ECHO}, "repeat": True})
        ]
        for code in binance.ERRORS
    },
    "unknown-code": [(RESTRICTIONS_URL, {"status": 400, "payload": {"code": -7777, "msg": ECHO}})],
    "429": [(RESTRICTIONS_URL, {"status": 429, "body": ECHO})],
    "403": [(RESTRICTIONS_URL, {"status": 403, "body": ECHO})],
    "500": [(RESTRICTIONS_URL, {"status": 500, "body": ECHO})],
    "not-json": [(RESTRICTIONS_URL, {"status": 200, "body": ECHO})],
    "timeout": [(RESTRICTIONS_URL, {"exception": TimeoutError(ECHO)})],
    "network": [(RESTRICTIONS_URL, {"exception": aiohttp.ClientConnectionError(ECHO)})],
    "spot-refused": [
        (RESTRICTIONS_URL, {"payload": RESTRICTIONS}),
        (at(API, binance.SPOT_ACCOUNT_PATH), {"status": 401, "payload": {"code": -2015, "msg": ECHO}}),
        (at(API, binance.MARGIN_ACCOUNT_PATH), {"payload": MARGIN}),
        (at(FAPI, binance.FUTURES_ACCOUNT_PATH), {"payload": FUTURES}),
    ],
    "identity-5xx": [
        (RESTRICTIONS_URL, {"payload": RESTRICTIONS}),
        (at(API, binance.SPOT_ACCOUNT_PATH), {"payload": SPOT}),
        (at(API, binance.MARGIN_ACCOUNT_PATH), {"status": 502, "body": ECHO}),
        (at(FAPI, binance.FUTURES_ACCOUNT_PATH), {"payload": FUTURES}),
    ],
}


def assert_no_canary(text: str, signatures: list[str]) -> None:
    for secret in (CANARY_KEY, CANARY_SECRET, "CanaryKey", "CanarySecret", *signatures):
        assert secret not in text


def signatures_sent(sent: list[tuple[str, str, dict[str, str]]]) -> list[str]:
    found = [dict(parse_qsl(urlsplit(url).query)).get("signature", "") for _, url, _ in sent]
    return [signature for signature in found if signature]


@pytest.mark.parametrize("path", sorted(CANARY_PATHS))
async def test_canary_never_leaks_from_failures(
    probe: binance.BinanceProbe,
    mocked: aioresponses,
    sent: list[tuple[str, str, dict[str, str]]],
    path: str,
) -> None:
    """Through every failure path, the key, the secret and the signatures stay out of the ProbeFailure."""
    mocked.get(API + "/api/v3/time", payload={"serverTime": int(time.time() * 1000)})
    for url, answer in CANARY_PATHS[path]:
        mocked.get(url, **answer)
    failure = await failure_of(probe.probe(CANARY))
    text = " ".join(
        [str(failure), repr(failure), repr(failure.args), failure.message, str(failure.venue_code)]
    )
    assert_no_canary(text, signatures_sent(sent))


async def test_canary_never_leaks_from_bad_format(probe: binance.BinanceProbe) -> None:
    """A malformed canary secret is refused without echoing it."""
    bad = base.ApiKeys(api_key=CANARY_KEY, api_secret=CANARY_SECRET + " tail")
    failure = await failure_of(probe.probe(bad))
    assert_no_canary(" ".join([str(failure), repr(failure), repr(failure.args)]), [])


async def test_canary_never_leaks_from_results(
    probe: binance.BinanceProbe, mocked: aioresponses, sent: list[tuple[str, str, dict[str, str]]]
) -> None:
    """A successful ProbeResult holds no key material, even when the venue echoes it."""
    mocked.get(at(API, binance.RESTRICTIONS_PATH), payload={**RESTRICTIONS, "note": ECHO})
    mocked.get(at(API, binance.SPOT_ACCOUNT_PATH), payload={**SPOT, "accountType": ECHO})
    mocked.get(at(API, binance.MARGIN_ACCOUNT_PATH), payload=MARGIN)
    mocked.get(at(FAPI, binance.FUTURES_ACCOUNT_PATH), payload=FUTURES)
    result = await probe.probe(CANARY)
    assert_no_canary(repr(result) + str(result), signatures_sent(sent))
