"""The sub-account key managers without a network: request shapes and signatures, answer parsing, grants.

Signatures are checked against ccxt (an independent implementation that has every one of these endpoints),
by handing ccxt the very parameters our request carried at the same instant; answer parsing against the
examples of the venues' documentation (docs/venues.md §1.10, §2.10, §3.10).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from venues import binance, http
from venues.base import ApiKeys, Outcome, ProbeFailure
from venues.binance_subaccounts import BinanceSubAccountKeys
from venues.binance_subaccounts import key_info as binance_key_info
from venues.bybit_subaccounts import BybitSubAccountKeys
from venues.bybit_subaccounts import key_info as bybit_key_info
from venues.okx_subaccounts import OkxSubAccountKeys, new_passphrase
from venues.okx_subaccounts import classify as okx_classify
from venues.simulator.okx_subaccounts import passphrase_ok
from venues.subaccounts import GrantProblem, KeyGrant, KeyLeftBehind, SubKeyInfo

ccxt = pytest.importorskip("ccxt")

NOW_MS = 1_700_000_000_123
MASTER = ApiKeys("MasterKey0123456789", "MasterSecret0123456789abcdef", "Master-Pass1!")

Sent = list[tuple[str, str, dict[str, str], str]]


def capture(manager: http.VenueProbe, answer: Any) -> Sent:
    """Replace the manager's one HTTP call: record (method, url, headers, body) and answer ``answer``."""
    sent: Sent = []

    async def fake_call(method: str, url: str, **kwargs: Any) -> http.Reply:
        data = kwargs.get("data")
        sent.append((method, url, dict(kwargs.get("headers") or {}), data if isinstance(data, str) else ""))
        return http.Reply(200, CIMultiDictProxy(CIMultiDict()), answer, json.dumps(answer))

    manager._call = fake_call  # type: ignore[method-assign]
    manager.now_ms = lambda: NOW_MS  # type: ignore[method-assign]
    return sent


def ccxt_request(name: str, call: str, params: dict[str, Any], keys: ApiKeys) -> dict[str, Any]:
    """What ccxt sends for ``call(params)`` at NOW_MS (its fetch replaced by a recorder)."""
    config: dict[str, Any] = {"apiKey": keys.api_key, "secret": keys.api_secret}
    if keys.api_passphrase:
        config["password"] = keys.api_passphrase
    exchange = getattr(ccxt, name)(config)
    seen: dict[str, Any] = {}

    def fetch(url: str, method: str = "GET", headers: Any = None, body: Any = None) -> Any:
        seen.update(url=url, method=method, headers=headers or {}, body=body)
        return {"code": "0", "data": [], "retCode": 0, "result": {}}

    exchange.fetch = fetch
    exchange.milliseconds = lambda: NOW_MS
    getattr(exchange, call)(params)
    return seen


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as client:
        yield client


# -- OKX ------------------------------------------------------------------------------------------------


async def test_okx_create_is_signed_as_ccxt_signs_it(session: aiohttp.ClientSession) -> None:
    manager = OkxSubAccountKeys(session, rate_limited=False)
    row = {
        "subAcct": "test12345",
        "label": "cred-1",
        "apiKey": "a1b2c3d4-0000-4000-8000-000000000001",
        "secretKey": "0123456789ABCDEF0123456789ABCDEF",
        "passphrase": "ignored",
        "perm": "read_only,trade",
        "ip": "10.0.0.1",
        "ts": "1597026383085",
    }
    sent = capture(manager, {"code": "0", "msg": "", "data": [row]})
    minted = await manager.create_key(
        MASTER, "test12345", KeyGrant(ip_allowlist=("10.0.0.1",), label="cred-1")
    )
    method, url, headers, body = sent[0]
    assert (method, urlsplit(url).path) == ("POST", "/api/v5/users/subaccount/apikey")
    fields = json.loads(body)
    assert fields["subAcct"] == "test12345" and fields["label"] == "cred-1"
    assert fields["perm"] == "read_only,trade" and fields["ip"] == "10.0.0.1"
    assert passphrase_ok(fields["passphrase"])
    # the minted key's passphrase is the one we chose and sent, not anything the answer says
    assert minted.keys.api_passphrase == fields["passphrase"]
    assert minted.info.trade and minted.info.ip_allowlist == ("10.0.0.1",)
    theirs = ccxt_request("okx", "privatePostUsersSubaccountApikey", fields, MASTER)
    assert theirs["body"] == body
    for name in ("OK-ACCESS-KEY", "OK-ACCESS-TIMESTAMP", "OK-ACCESS-PASSPHRASE", "OK-ACCESS-SIGN"):
        assert headers[name] == theirs["headers"][name], name


async def test_okx_query_and_delete_are_signed_as_ccxt_signs_them(session: aiohttp.ClientSession) -> None:
    manager = OkxSubAccountKeys(session, rate_limited=False)
    # the documented example answer of "Query the API Key of a sub-account"
    listed = {
        "code": "0",
        "msg": "",
        "data": [
            {
                "label": "v5",
                "apiKey": "arg13sdfgs",
                "perm": "read_only,trade",
                "ip": "1.1.1.1,2.2.2.2",
                "ts": "1597026383085",
            }
        ],
    }
    sent = capture(manager, listed)
    keys = await manager.list_keys(MASTER, "test12345")
    assert keys == (
        SubKeyInfo(
            key_id="arg13sdfgs",
            label="v5",
            read=True,
            trade=True,
            ip_allowlist=("1.1.1.1", "2.2.2.2"),
            created_at_ms=1597026383085,
        ),
    )
    method, url, headers, _ = sent[0]
    assert method == "GET"
    theirs = ccxt_request("okx", "privateGetUsersSubaccountApikey", {"subAcct": "test12345"}, MASTER)
    assert url.endswith(urlsplit(theirs["url"]).path + "?" + urlsplit(theirs["url"]).query)
    assert headers["OK-ACCESS-SIGN"] == theirs["headers"]["OK-ACCESS-SIGN"]

    sent = capture(manager, {"code": "0", "msg": "", "data": [{"subAcct": "test12345"}]})
    assert await manager.delete_key(MASTER, "test12345", "arg13sdfgs") is True
    _, _, headers, body = sent[0]
    theirs = ccxt_request("okx", "privatePostUsersSubaccountDeleteApikey", json.loads(body), MASTER)
    assert theirs["body"] == body and headers["OK-ACCESS-SIGN"] == theirs["headers"]["OK-ACCESS-SIGN"]


async def test_okx_windows_are_per_method_and_path(session: aiohttp.ClientSession) -> None:
    """The listing shares its path with the create call but not its 1-a-second window (docs/venues.md §2.10)."""
    manager = OkxSubAccountKeys(session, rate_limited=True)
    capture(manager, {"code": "0", "msg": "", "data": []})
    waited: list[tuple[str, int, float]] = []
    assert manager.windows is not None

    @contextlib.asynccontextmanager
    async def spy(rules: Sequence[tuple[str, str, int, float]]) -> AsyncIterator[None]:
        waited.extend((endpoint, limit, seconds) for _, endpoint, limit, seconds in rules)
        yield

    manager.windows.reserved = spy  # type: ignore[method-assign]
    await manager.list_keys(MASTER, "test12345")
    with pytest.raises(ProbeFailure):  # the canned answer has no key: malformed, after the request went out
        await manager.create_key(MASTER, "test12345", KeyGrant(label="x"))
    await manager.delete_key(MASTER, "test12345", "k")
    per_call = [w for w in waited if w[0] != "*"]
    assert per_call == [
        ("GET /api/v5/users/subaccount/apikey", 20, 2.0),
        ("POST /api/v5/users/subaccount/apikey", 1, 1.0),
        ("POST /api/v5/users/subaccount/delete-apikey", 1, 1.0),
    ]


def test_okx_passphrases_follow_the_rules() -> None:
    made = {new_passphrase() for _ in range(200)}
    assert len(made) == 200
    assert all(passphrase_ok(p) for p in made)


def test_okx_codes() -> None:
    def reply(code: str) -> http.Reply:
        body = {"code": code, "msg": "", "data": []}
        return http.Reply(200, CIMultiDictProxy(CIMultiDict()), body, json.dumps(body))

    for code, outcome in (
        ("59500", Outcome.PERMISSION_DENIED),
        ("59510", Outcome.PERMISSION_DENIED),
        ("50120", Outcome.PERMISSION_DENIED),
        ("59502", Outcome.ACCOUNT_RESTRICTED),
        ("59505", Outcome.SERVER_ERROR),
    ):
        failure = okx_classify(reply(code))
        assert failure is not None and failure.outcome is outcome, code


@pytest.mark.parametrize(
    ("sub_id", "grant", "field"),
    [
        ("abc", KeyGrant(label="x"), "subAccount"),  # OKX names: 6-20 letters and digits
        ("test12345", KeyGrant(read=False, label="x"), "read"),
        ("test12345", KeyGrant(label=""), "label"),
        (
            "test12345",
            KeyGrant(label="x", ip_allowlist=tuple(f"10.0.0.{i}" for i in range(21))),
            "ipAllowlist",
        ),
    ],
)
async def test_okx_grant_problems(
    sub_id: str, grant: KeyGrant, field: str, session: aiohttp.ClientSession
) -> None:
    manager = OkxSubAccountKeys(session, rate_limited=False)
    sent = capture(manager, {})
    with pytest.raises(GrantProblem) as problem:
        await manager.create_key(MASTER, sub_id, grant)
    assert problem.value.field == field
    assert sent == []  # refused before any request


# -- Bybit ----------------------------------------------------------------------------------------------


async def test_bybit_create_is_signed_as_ccxt_signs_it(session: aiohttp.ClientSession) -> None:
    manager = BybitSubAccountKeys(session, rate_limited=False)
    result = {
        "id": "16651283",
        "note": "cred-1",
        "apiKey": "XXXXXXXXXXXXXXXXXX",
        "readOnly": 0,
        "secret": "YYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY",
        "permissions": {},
    }
    sent = capture(manager, {"retCode": 0, "retMsg": "", "result": result, "retExtInfo": {}, "time": NOW_MS})
    keys = ApiKeys(MASTER.api_key, MASTER.api_secret)
    minted = await manager.create_key(keys, "100101", KeyGrant(ip_allowlist=("10.0.0.1",), label="cred-1"))
    assert minted.keys == ApiKeys("XXXXXXXXXXXXXXXXXX", "YYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYYY")
    method, url, headers, body = sent[0]
    assert (method, urlsplit(url).path) == ("POST", "/v5/user/create-sub-api")
    fields = json.loads(body)
    assert fields["subuid"] == 100101 and fields["readOnly"] == 0 and fields["ips"] == "10.0.0.1"
    assert "Wallet" not in fields["permissions"]  # least privilege: no transfer, no withdrawal
    assert fields["permissions"]["Spot"] == ["SpotTrade"]
    theirs = ccxt_request("bybit", "privatePostV5UserCreateSubApi", fields, keys)
    assert theirs["body"] == body
    for name in ("X-BAPI-API-KEY", "X-BAPI-TIMESTAMP", "X-BAPI-RECV-WINDOW", "X-BAPI-SIGN"):
        assert headers[name] == theirs["headers"][name], name


async def test_bybit_listing_and_delete_are_signed_as_ccxt_signs_them(session: aiohttp.ClientSession) -> None:
    manager = BybitSubAccountKeys(session, rate_limited=False)
    keys = ApiKeys(MASTER.api_key, MASTER.api_secret)
    # the documented example row of "Get Sub Account All API Keys" (shape; values ours)
    row = {
        "id": "24828209",
        "ips": ["*"],
        "apiKey": "XXXXXX",
        "note": "cred-1",
        "status": 3,
        "expiredAt": "2024-05-20T07:49:47Z",
        "createdAt": "2024-02-20T07:49:47Z",
        "type": 1,
        "permissions": {"ContractTrade": ["Order", "Position"], "Spot": ["SpotTrade"], "Wallet": []},
        "secret": "******",
        "readOnly": True,
        "deadlineDay": 21,
        "flag": "hmac",
    }
    answer = {"retCode": 0, "retMsg": "", "result": {"result": [row], "nextPageCursor": ""}, "time": NOW_MS}
    sent = capture(manager, answer)
    (info,) = await manager.list_keys(keys, "100101")
    assert info.key_id == "XXXXXX" and info.trade and not info.withdraw and info.ip_allowlist == ()
    assert info.expires_at_ms == 1716191387000 and info.created_at_ms == 1708415387000
    _, url, headers, _ = sent[0]
    query = dict(parse_qsl(urlsplit(url).query))
    assert query == {"subMemberId": "100101", "limit": "20"}
    theirs = ccxt_request("bybit", "privateGetV5UserSubApikeys", query, keys)
    assert urlsplit(theirs["url"]).query == urlsplit(url).query
    assert headers["X-BAPI-SIGN"] == theirs["headers"]["X-BAPI-SIGN"]

    sent = capture(manager, {"retCode": 0, "retMsg": "", "result": {}, "time": NOW_MS})
    assert await manager.delete_key(keys, "100101", "XXXXXX") is True
    _, _, headers, body = sent[0]
    assert json.loads(body) == {"apikey": "XXXXXX"}  # the master names the key (docs/venues.md §3.10)
    theirs = ccxt_request("bybit", "privatePostV5UserDeleteSubApi", json.loads(body), keys)
    assert theirs["body"] == body and headers["X-BAPI-SIGN"] == theirs["headers"]["X-BAPI-SIGN"]


def test_bybit_listing_reads_trading_from_permissions_not_readonly() -> None:
    """sub-apikeys documents readOnly backwards (docs/venues.md §3.10): permissions decide."""
    base_row: dict[str, Any] = {"apiKey": "K", "ips": ["10.0.0.1"], "expiredAt": "1970-01-01T00:00:00Z"}
    read_only = bybit_key_info(base_row | {"permissions": {"Spot": []}, "readOnly": True})
    trading = bybit_key_info(base_row | {"permissions": {"Spot": ["SpotTrade"]}, "readOnly": False})
    assert not read_only.trade and trading.trade
    assert read_only.expires_at_ms is None and read_only.ip_allowlist == ("10.0.0.1",)


async def test_bybit_delete_of_a_key_no_longer_listed_is_false(session: aiohttp.ClientSession) -> None:
    manager = BybitSubAccountKeys(session, rate_limited=False)
    answers = iter(
        [
            {"retCode": 10001, "retMsg": "params error", "result": {}, "time": NOW_MS},
            {"retCode": 0, "retMsg": "", "result": {"result": [], "nextPageCursor": ""}, "time": NOW_MS},
        ]
    )
    sent: Sent = []

    async def fake_call(method: str, url: str, **kwargs: Any) -> http.Reply:
        sent.append((method, url, {}, ""))
        body = next(answers)
        return http.Reply(200, CIMultiDictProxy(CIMultiDict()), body, json.dumps(body))

    manager._call = fake_call  # type: ignore[method-assign]
    assert await manager.delete_key(MASTER, "100101", "GoneKey") is False
    assert [urlsplit(u).path for _, u, _, _ in sent] == ["/v5/user/delete-sub-api", "/v5/user/sub-apikeys"]


# -- Binance --------------------------------------------------------------------------------------------


async def test_binance_requests_are_signed_as_ccxt_signs_them(session: aiohttp.ClientSession) -> None:
    manager = BinanceSubAccountKeys(session, rate_limited=False)
    keys = ApiKeys(
        "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
        "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
    )
    # the documented example answer of "Create Api Key for Sub Account"
    created = {
        "subaccountId": "1",
        "apiKey": "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
        "secretKey": "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0",
        "canTrade": True,
        "marginTrade": False,
        "futuresTrade": False,
    }
    sent = capture(manager, created)
    minted = await manager.create_key(keys, "1", KeyGrant(label="ignored"))
    assert minted.keys.api_key == created["apiKey"] and minted.info.trade
    method, url, headers, _ = sent[0]
    assert (method, urlsplit(url).path) == ("POST", "/sapi/v1/broker/subAccountApi")
    query = urlsplit(url).query
    params = dict(parse_qsl(query))
    assert params["subAccountId"] == "1" and params["canTrade"] == "true"
    assert params["marginTrade"] == "false" and params["futuresTrade"] == "false"
    assert headers["X-MBX-APIKEY"] == keys.api_key
    # ccxt orders the parameters its own way; our signer must sign ccxt's query exactly as ccxt does
    theirs = ccxt_request(
        "binance",
        "sapiPostBrokerSubAccountApi",
        {k: v for k, v in params.items() if k not in ("timestamp", "recvWindow", "signature")},
        keys,
    )
    their_query = theirs["body"] or urlsplit(theirs["url"]).query
    payload, _, their_signature = their_query.rpartition("&signature=")
    assert binance.sign_query(keys.api_secret, payload) == their_signature
    unsigned, _, ours = query.rpartition("&signature=")
    assert binance.sign_query(keys.api_secret, unsigned) == ours


def test_binance_masked_listing() -> None:
    """The documented example of "Query Sub Account Api Key": keys listed as their first 3 characters."""
    rows = [
        {
            "apikey": "vmP*************",
            "subaccountId": "1",
            "canTrade": True,
            "marginTrade": True,
            "futuresTrade": False,
        },
        {
            "apikey": "5VN*************",
            "subaccountId": "1",
            "canTrade": True,
            "marginTrade": False,
            "futuresTrade": False,
        },
    ]
    infos = [binance_key_info(row) for row in rows]
    assert all(info.masked and info.trade for info in infos)
    full = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
    assert infos[0].matches(full) and not infos[1].matches(full)
    assert SubKeyInfo(key_id=full).matches(full) and not SubKeyInfo(key_id=full).matches(full[:-1])


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m: m.create_key(MASTER, "1", KeyGrant(ip_allowlist=("10.0.0.0/24",))), "ipAllowlist"),
        (lambda m: m.create_key(MASTER, "sub-name", KeyGrant()), "subAccount"),
        (lambda m: m.delete_key(MASTER, "1", "vmP*************"), "keyId"),
    ],
    ids=["ip-range", "sub-id", "masked-delete"],
)
async def test_binance_grant_problems(
    call: Callable[[BinanceSubAccountKeys], Any], field: str, session: aiohttp.ClientSession
) -> None:
    manager = BinanceSubAccountKeys(session, rate_limited=False)
    sent = capture(manager, {})
    with pytest.raises(GrantProblem) as problem:
        await call(manager)
    assert problem.value.field == field and sent == []


async def test_binance_delete_of_unknown_key_is_false(session: aiohttp.ClientSession) -> None:
    manager = BinanceSubAccountKeys(session, rate_limited=False)

    async def fake_call(method: str, url: str, **kwargs: Any) -> http.Reply:
        body = {"code": -2008, "msg": "Invalid Api-Key ID."}
        return http.Reply(400, CIMultiDictProxy(CIMultiDict()), body, json.dumps(body))

    manager._call = fake_call  # type: ignore[method-assign]
    assert await manager.delete_key(MASTER, "1", "SomeFullKey123") is False


async def test_binance_refusal_of_a_non_broker_is_permission_denied(session: aiohttp.ClientSession) -> None:
    manager = BinanceSubAccountKeys(session, rate_limited=False)

    async def fake_call(method: str, url: str, **kwargs: Any) -> http.Reply:
        body = {"code": -1002, "msg": "You are not authorized to execute this request."}
        return http.Reply(401, CIMultiDictProxy(CIMultiDict()), body, json.dumps(body))

    manager._call = fake_call  # type: ignore[method-assign]
    with pytest.raises(ProbeFailure) as refused:
        await manager.list_sub_accounts(MASTER)
    assert refused.value.outcome is Outcome.PERMISSION_DENIED and not refused.value.transient


def scripted(manager: http.VenueProbe, answers: list[tuple[int, Any]]) -> list[tuple[str, str]]:
    """Answer the manager's calls from ``answers`` in order; returns the (method, path) of each call."""
    calls: list[tuple[str, str]] = []
    queue = iter(answers)

    async def fake_call(method: str, url: str, **kwargs: Any) -> http.Reply:
        calls.append((method, urlsplit(url).path))
        status, body = next(queue)
        return http.Reply(status, CIMultiDictProxy(CIMultiDict()), body, json.dumps(body))

    manager._call = fake_call  # type: ignore[method-assign]
    return calls


CREATED = {
    "subaccountId": "1",
    "apiKey": "NewKey0123456789",
    "secretKey": "NewSecret0123456789",
    "canTrade": True,
}
SERVER_ERROR = {"code": -1001, "msg": "Internal error; unable to process your request. Please try again."}


async def test_binance_binds_the_ip_list_in_a_second_call(session: aiohttp.ClientSession) -> None:
    manager = BinanceSubAccountKeys(session, rate_limited=False)
    bound = {"status": "2", "ipList": ["10.0.0.1"], "updateTime": NOW_MS, "apiKey": "NewKey0123456789"}
    calls = scripted(manager, [(200, CREATED), (200, bound)])
    minted = await manager.create_key(MASTER, "1", KeyGrant(ip_allowlist=("10.0.0.1",)))
    assert minted.info.ip_allowlist == ("10.0.0.1",)
    assert calls == [
        ("POST", "/sapi/v1/broker/subAccountApi"),
        ("POST", "/sapi/v2/broker/subAccountApi/ipRestriction"),
    ]


async def test_binance_deletes_the_new_key_when_binding_fails(session: aiohttp.ClientSession) -> None:
    manager = BinanceSubAccountKeys(session, rate_limited=False)
    calls = scripted(manager, [(200, CREATED), (500, SERVER_ERROR), (200, {})])
    with pytest.raises(ProbeFailure) as failed:
        await manager.create_key(MASTER, "1", KeyGrant(ip_allowlist=("10.0.0.1",)))
    assert failed.value.transient and not isinstance(failed.value, KeyLeftBehind)
    assert calls[-1] == ("DELETE", "/sapi/v1/broker/subAccountApi")


async def test_binance_reports_a_key_it_could_not_delete(session: aiohttp.ClientSession) -> None:
    manager = BinanceSubAccountKeys(session, rate_limited=False)
    scripted(manager, [(200, CREATED), (500, SERVER_ERROR), (500, SERVER_ERROR)])
    with pytest.raises(KeyLeftBehind) as left:
        await manager.create_key(MASTER, "1", KeyGrant(ip_allowlist=("10.0.0.1",)))
    assert left.value.key_id == "NewKey0123456789" and left.value.sub_id == "1" and left.value.transient
    assert "NewKey0123456789" not in str(left.value)  # the message shows the key masked
