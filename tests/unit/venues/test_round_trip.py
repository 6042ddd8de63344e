"""One round trip per verification (issue #14): every venue and key kind sends its verify call and its identity
calls at once, and the verify call's refusal is the key's verdict even when an identity call answered first.

Each case holds every call of the probe at a gate until all of them are in flight together (so none waits for
another's answer), then lets the identity calls answer first with an error of another kind (a rate limit), and
the verify call last with the key's refusal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from venue_support import failure_of  # tests/unit/venues is on sys.path

from venues import base, binance, bybit, coinbase, http, kraken, limits, okx

Answer = tuple[int, Any, dict[str, str]]  # HTTP status, JSON body, headers

PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    .decode()
)
KRAKEN_KEY = "Kr4kenPublicKeyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
RATE_LIMITED_AFTER = {"Retry-After": "7"}
NOW_MS = int(time.time() * 1000)


@dataclass(frozen=True)
class Case:
    """One venue and key kind: its calls (method, URL), the verify call's refusal and the verdict it means."""

    name: str
    build: Callable[[aiohttp.ClientSession], http.VenueProbe]
    keys: base.ApiKeys
    verify: tuple[str, str]
    refusal: Answer
    outcome: base.Outcome
    identities: list[tuple[str, str]]
    identity_answer: Answer  # a different error, answered before the verify call's
    extra: list[tuple[str, str, Answer]] = field(default_factory=list)  # other endpoints (clock), not gated


CASES = [
    Case(
        "binance",
        binance.BinanceProbe,
        base.ApiKeys("A" * 64, "B" * 64),
        ("GET", "https://api.binance.com/sapi/v1/account/apiRestrictions"),
        (400, {"code": -1022, "msg": "Signature for this request is not valid."}, {}),
        base.Outcome.INVALID_SECRET,
        [
            ("GET", "https://api.binance.com/api/v3/account"),
            ("GET", "https://api.binance.com/sapi/v1/margin/account"),
            ("GET", "https://fapi.binance.com/fapi/v2/account"),
        ],
        (429, {"code": -1003, "msg": "Too many requests"}, RATE_LIMITED_AFTER),
    ),
    Case(
        "okx",
        okx.OkxProbe,
        base.ApiKeys(
            "37c541a1-c2b5-4c4f-9f5d-3d8a2b1c0e9f", "22582BD0CFF14C41EDBF1AB98506286D", "Pass-phrase1"
        ),
        ("GET", "https://www.okx.com/api/v5/account/config"),
        (401, {"code": "50113", "msg": "Invalid Sign", "data": []}, {}),
        base.Outcome.INVALID_SECRET,
        [
            ("GET", "https://www.okx.com/api/v5/account/balance"),
            ("GET", "https://www.okx.com/api/v5/asset/balances"),
        ],
        (429, {"code": "50011", "msg": "Too Many Requests", "data": []}, RATE_LIMITED_AFTER),
    ),
    Case(
        "bybit",
        bybit.BybitProbe,
        base.ApiKeys("XXXXXXXXXX1234ABCD", "S" * 36),
        ("GET", "https://api.bybit.com/v5/user/query-api"),
        (200, {"retCode": 10004, "retMsg": "error sign!", "result": {}}, {}),
        base.Outcome.INVALID_SECRET,
        [
            ("GET", "https://api.bybit.com/v5/account/info"),
            ("GET", "https://api.bybit.com/v5/user/get-member-type"),
        ],
        (200, {"retCode": 10006, "retMsg": "Too many visits!", "result": {}}, RATE_LIMITED_AFTER),
    ),
    Case(
        "coinbase-cdp",
        coinbase.CoinbaseProbe,
        base.ApiKeys("organizations/0f1e2d3c-aaaa-bbbb-cccc-123456789abc/apiKeys/9a8b7c6d-1111", PEM),
        ("GET", "https://api.coinbase.com/api/v3/brokerage/key_permissions"),
        (401, {"error": "unauthorized", "message": "Unauthorized"}, {}),
        base.Outcome.INVALID_KEY,
        [
            ("GET", "https://api.coinbase.com/api/v3/brokerage/accounts?limit=1"),
            ("GET", "https://api.coinbase.com/api/v3/brokerage/portfolios"),
        ],
        (429, {"error": "rate_limit_exceeded", "message": "Too many requests"}, RATE_LIMITED_AFTER),
        # a 401 resyncs the clock once and retries (docs/venues.md §4A.5)
        [("GET", "https://api.coinbase.com/api/v3/brokerage/time", (200, {"epochMillis": str(NOW_MS)}, {}))],
    ),
    Case(
        "coinbase-exchange",
        coinbase.CoinbaseProbe,
        base.ApiKeys(
            "c2ab0b5e9d7f4a3b8e1d6c0f9a2b3c4d", base64.b64encode(b"s" * 64).decode(), "exchange-passphrase"
        ),
        ("GET", "https://api.exchange.coinbase.com/accounts"),
        (401, {"message": "invalid signature"}, {}),
        base.Outcome.INVALID_SECRET,
        [("GET", "https://api.exchange.coinbase.com/profiles")],
        (429, {"message": "Rate limit exceeded"}, RATE_LIMITED_AFTER),
    ),
    Case(
        "kraken-spot",
        kraken.KrakenProbe,
        base.ApiKeys(KRAKEN_KEY, base64.b64encode(b"k" * 64).decode()),
        ("POST", "https://api.kraken.com/0/private/GetApiKeyInfo"),
        (200, {"error": ["EAPI:Invalid signature"]}, {}),
        base.Outcome.INVALID_SECRET,
        [
            ("POST", "https://api.kraken.com/0/private/Balance"),
            ("POST", "https://api.kraken.com/0/private/TradeBalance"),
            # a 64-byte secret may be a futures key's: the futures calls go out beside (speculation)
            ("GET", "https://futures.kraken.com/api/auth/v1/api-keys/v3/check"),
            ("GET", "https://futures.kraken.com/derivatives/api/v3/accounts"),
        ],
        (429, {"error": ["EAPI:Rate limit exceeded"]}, RATE_LIMITED_AFTER),
    ),
    Case(
        "kraken-futures",
        kraken.KrakenProbe,
        base.ApiKeys(KRAKEN_KEY, base64.b64encode(b"f" * 48).decode()),  # cannot be a spot secret
        ("GET", "https://futures.kraken.com/api/auth/v1/api-keys/v3/check"),
        (401, {"result": "error", "error": "authenticationError"}, {}),
        base.Outcome.INVALID_KEY,
        [("GET", "https://futures.kraken.com/derivatives/api/v3/accounts")],
        (429, {"result": "error", "error": "apiLimitExceeded"}, RATE_LIMITED_AFTER),
    ),
]


def exact(url: str) -> re.Pattern[str]:
    """The URL with any query string after it (Binance signs its parameters into the query)."""
    return re.compile(re.escape(url) + (r"(&.*)?$" if "?" in url else r"(\?.*)?$"))


class Timeline:
    """Holds every gated request until ``expected`` are in flight together; records when each answers."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived: list[str] = []
        self.answered: list[str] = []
        self.all_in = asyncio.Event()
        self.identities_answered = asyncio.Event()

    def reply(self, name: str, answer: Answer, *, last: bool) -> Callable[..., Awaitable[CallbackResult]]:
        status, body, headers = answer

        async def callback(url: Any, **kwargs: Any) -> CallbackResult:
            self.arrived.append(name)
            if len(self.arrived) >= self.expected:
                self.all_in.set()
            await asyncio.wait_for(
                self.all_in.wait(), 5.0
            )  # TimeoutError: a call waited for another's answer
            if last:  # the verify call answers after every identity call has answered
                await asyncio.wait_for(self.identities_answered.wait(), 5.0)
            self.answered.append(name)
            if len(self.answered) >= self.expected - 1:
                self.identities_answered.set()
            return CallbackResult(status=status, body=json.dumps(body), headers=headers)

        return callback


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_all_calls_in_flight_at_once_and_the_verify_call_decides(
    case: Case, session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """Every call is sent before any answers; the identity calls' rate limit (answered first) does not hide the
    verify call's refusal, which is reported with its outcome (permanent: no retry)."""
    timeline = Timeline(1 + len(case.identities))
    method, url = case.verify
    mocked.add(exact(url), method, callback=timeline.reply("verify", case.refusal, last=True), repeat=True)
    for method, url in case.identities:
        answer = timeline.reply(url, case.identity_answer, last=False)
        mocked.add(exact(url), method, callback=answer, repeat=True)
    for method, url, (status, body, headers) in case.extra:
        mocked.add(url, method, status=status, body=json.dumps(body), headers=headers, repeat=True)
    probe = case.build(session)
    failure = await failure_of(probe.probe(case.keys))
    assert failure.outcome is case.outcome, failure.message
    assert not failure.transient
    assert timeline.arrived[: timeline.expected].count("verify") == 1  # all in flight before any answer
    assert timeline.answered[timeline.expected - 1] == "verify"  # the verdict came last, and still decided


async def test_verify_transient_retries_after_the_longest_retry_after(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """A transient verify failure retries the whole probe, no sooner than any call that was refused said."""
    case = CASES[0]
    mocked.get(
        exact(case.verify[1]), status=429, payload={"code": -1003}, headers={"Retry-After": "3"}, repeat=True
    )
    for _, url in case.identities:
        mocked.get(exact(url), status=429, payload={"code": -1003}, headers={"Retry-After": "9"}, repeat=True)
    failure = await failure_of(case.build(session).probe(case.keys))
    assert failure.outcome is base.Outcome.RATE_LIMITED
    assert failure.retry_after == 9.0


def test_raise_verify_failure_rules() -> None:
    """The helper: a successful verify returns; a permanent one wins over any transient; a bug is raised."""
    reply = http.Reply(status=200, headers={}, body={}, text="{}")
    busy = base.ProbeFailure(base.Outcome.RATE_LIMITED, retry_after=5.0)
    http.raise_verify_failure(reply, [busy])  # identity transients are judged later, by each venue
    refused = base.ProbeFailure(base.Outcome.INVALID_SECRET)
    with pytest.raises(base.ProbeFailure) as caught:
        http.raise_verify_failure(refused, [busy])
    assert caught.value is refused
    slow = base.ProbeFailure(base.Outcome.TIMEOUT)
    with pytest.raises(base.ProbeFailure) as caught:
        http.raise_verify_failure(slow, [busy, refused])
    assert caught.value is busy  # the longest Retry-After among the calls
    with pytest.raises(base.ProbeFailure) as caught:
        http.raise_verify_failure(slow, [base.ProbeFailure(base.Outcome.NETWORK)])
    assert caught.value is slow  # a tie: the verify call's own failure
    with pytest.raises(KeyError):
        http.raise_verify_failure(KeyError("bug"), [busy])


async def test_calls_sent_together_still_pay_the_limiter_exactly(
    session: aiohttp.ClientSession, mocked: aioresponses
) -> None:
    """Binance's per-IP weight: a probe sending its four calls at once is charged 1 + 20 + 10 + 5 = 36, each
    call through the limiter (a bucket of exactly 36 that hardly refills lets the probe through, empty)."""
    case = CASES[0]
    limiter = limits.RateLimiter(0.001, 36.0)
    mocked.get(
        exact(case.verify[1]), status=400, payload={"code": -1022, "msg": "bad signature"}, repeat=True
    )
    for _, url in case.identities:
        mocked.get(exact(url), status=400, payload={"code": -1022, "msg": "bad signature"}, repeat=True)
    probe = binance.BinanceProbe(session, limiter=limiter)
    failure = await asyncio.wait_for(failure_of(probe.probe(case.keys)), 10.0)
    assert failure.outcome is base.Outcome.INVALID_SECRET
    assert limiter._tokens < 1.0  # all 36 spent: nothing skipped the limiter, nothing was charged twice
    assert len(mocked.requests) == 4
