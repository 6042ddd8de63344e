"""Every documented error kind over HTTP: its status, its errno, a message naming the field, never a trace."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog
import structlog.testing

from engine import CredentialEngine, errors
from engine.api import http as api_http
from engine.api.jwks import IdentityProviderUnavailable
from engine.testing import FakeVenue
from venues.base import ApiKeys, ProbeResult, Venue

DOCS = Path(__file__).resolve().parents[2] / "README.md"
CREATE = "/api/v3/credential/create"


def documented_errnos() -> dict[str, tuple[int, int]]:
    """kind -> (HTTP status, errno) from the errno table in README.md."""
    rows = re.findall(r"^\| (\d{3}) \| (-\d+) \| (\w+) \|", DOCS.read_text(encoding="utf-8"), re.MULTILINE)
    return {kind: (int(status), int(errno)) for status, errno, kind in rows}


def error_kinds() -> dict[str, type[errors.CredentialEngineError]]:
    kinds = {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.CredentialEngineError)
    }
    kinds.update({cls.__name__: cls for cls in api_http.HTTP_ERRORS})
    kinds["IdentityProviderUnavailable"] = IdentityProviderUnavailable  # beside the JWKS code that raises it
    return kinds


def test_errno_table_documents_every_error_kind() -> None:
    """README.md's errno table has exactly one row per error kind, with the class's status and errno."""
    table = documented_errnos()
    kinds = error_kinds()
    assert set(table) == set(kinds)
    for name, cls in kinds.items():
        assert table[name] == (cls.http_status, cls.errno), name


def test_errnos_are_unique_across_the_api() -> None:
    """No two error kinds the API can answer share an errno."""
    numbers = [cls.errno for cls in error_kinds().values()]
    assert len(numbers) == len(set(numbers))
    assert all(n < 0 for n in numbers)


def test_server_errors_answer_a_fixed_message() -> None:
    """5xx kinds answer their errno with a fixed text and the correlation id, never their message."""
    for exc in (
        errors.ConfigurationError("ENGINE_X must be 1 (it was 'hunter2')"),
        errors.DecryptionError("bad tag for credential 7"),
        errors.StorageError("database error 08006 at 10.0.0.7"),
    ):
        response = api_http.error_response(exc, "req-1")
        assert response.status == exc.http_status
        assert response.text is not None
        assert str(exc.errno) in response.text
        assert "req-1" in response.text
        assert exc.message not in response.text


async def test_invalid_request_names_the_field(api: Any, create_body: Callable[..., Any]) -> None:
    """Missing and wrongly typed fields answer 400 -100001 with a message starting with the field."""
    cases = [
        (create_body(venue=None), "venue"),
        (create_body(apiKey=None), "apiKey"),
        (create_body(apiSecret=None), "apiSecret"),
        (create_body(venue="MTGOX"), "venue"),
        (create_body(apiKey=12345), "apiKey"),
        (create_body(nickname=["a"]), "nickname"),
        (create_body(credentialType="SPOT"), "credentialType"),
        (create_body(nickname="x" * 101), "nickname"),
        (create_body(apiKey="k" * 513), "apiKey"),
    ]
    for body, field in cases:
        reply = await api.post(CREATE, body)
        assert reply.status == 400, (body, reply.body)
        assert reply.body["errno"] == -100001
        assert reply.body["error"].startswith(field), reply.body["error"]


async def test_malformed_bodies_are_400(api: Any) -> None:
    """Not JSON, not an object, empty, bad UTF-8, or nested past recursion: 400 naming the body."""
    for data in (b"{", b"[]", b"", b'"text"', b"\xff\xfe\x00", b"[" * 50_000, b"null", b"12"):
        reply = await api.call("POST", CREATE, data=data, headers={"Content-Type": "application/json"})
        assert reply.status == 400, data[:10]
        assert reply.body["errno"] == -100001
        assert reply.body["error"].startswith("body")


async def test_wrong_types_of_flags_and_ids(
    api: Any, eng: CredentialEngine, create_body: Callable[..., Any]
) -> None:
    """Booleans must be booleans and ids strings: 400 naming immediate, cascade, credentialId."""
    cid = (await api.post(CREATE, create_body())).data["credentialId"]
    rotate = await api.post(
        "/api/v3/credential/rotate",
        {"credentialId": cid, "apiKey": "k", "apiSecret": "s", "immediate": "yes"},
    )
    assert rotate.status == 400 and rotate.body["error"].startswith("immediate")
    revoke = await api.post("/api/v3/credential/revoke", {"credentialId": cid, "cascade": 1})
    assert revoke.status == 400 and revoke.body["error"].startswith("cascade")
    verify = await api.post("/api/v3/credential/verify", {"credentialId": 7})
    assert verify.status == 400 and verify.body["error"].startswith("credentialId")


async def test_repeated_query_parameter_is_400(api: Any) -> None:
    """A query parameter given twice is refused rather than guessed."""
    reply = await api.call("GET", "/api/v3/credential/list?venue=OKX&venue=BINANCE")
    assert reply.status == 400
    assert reply.body["error"].startswith("venue")


async def test_invalid_key_format_is_422(api: Any, create_body: Callable[..., Any]) -> None:
    """Key material that cannot be right for the venue answers 422 -100002 (docs/api-dialect.md §9)."""
    for body in (create_body(apiKey="malformed-key"), create_body(apiKey="has space")):
        reply = await api.post(CREATE, body)
        assert reply.status == 422, body
        assert reply.body["errno"] == -100002
        assert reply.body["error"].startswith("apiKey")


async def test_unknown_route_wrong_method_and_oversized_body(api: Any) -> None:
    """404 -110002, 405 -110003 with Allow, and 413 -110004: all in the envelope."""
    missing = await api.get("/api/v3/credential/nothing")
    assert (missing.status, missing.body["errno"]) == (404, -110002)
    outside = await api.get("/", token=None)
    assert (outside.status, outside.body["errno"]) == (404, -110002)
    wrong = await api.call("GET", CREATE)
    assert (wrong.status, wrong.body["errno"]) == (405, -110003)
    assert wrong.headers["Allow"] == "POST"
    put = await api.call("PUT", "/api/v3/credential/list")
    assert (put.status, put.body["errno"]) == (405, -110003)
    big = await api.call("POST", CREATE, data=b'{"venue": "' + b"x" * 70_000 + b'"}')
    assert (big.status, big.body["errno"]) == (413, -110004)


class ExplodingProbe:
    """A probe with a bug: its key check raises something the engine does not know."""

    def check_keys(self, keys: ApiKeys) -> None:
        raise RuntimeError(f"boom while checking {keys.api_key}")

    async def probe(self, keys: ApiKeys) -> ProbeResult:
        raise AssertionError("not reached")


async def test_unexpected_exception_is_500_with_correlation_id_only(
    make_engine: Any,
    make_api: Any,
    fake: FakeVenue,
    create_body: Callable[..., Any],
) -> None:
    """A bug answers 500 -100000 naming only the correlation id (= X-Request-Id); no detail, no trace."""
    probes = {**fake.probes(), Venue.BINANCE: ExplodingProbe()}
    client = await make_api(await make_engine(probes=probes))
    with structlog.testing.capture_logs() as logged:
        reply = await client.post(CREATE, create_body(), headers={"X-Request-Id": "corr-123"})
    [entry] = [e for e in logged if e["event"] == "http_unhandled"]
    assert entry["request_id"] == "corr-123" and entry["error"] == "RuntimeError"
    assert "boom while checking" in entry["traceback"]  # the server log has the details ...
    assert "exc_info" not in entry  # ... as text: no renderer gets the frames (and their locals)
    assert reply.status == 500
    assert reply.body["errno"] == -100000
    assert reply.body["error"] == "internal error; correlation id corr-123"
    assert reply.headers["X-Request-Id"] == "corr-123"
    assert "boom" not in reply.text and "RuntimeError" not in reply.text


async def test_closed_engine_is_503(eng: CredentialEngine, api: Any) -> None:
    """Requests after the engine closed answer 503 -100010 (shutting down), never 500."""
    await eng.close()
    reply = await api.get("/api/v3/credential/list")
    assert reply.status == 503
    assert reply.body["errno"] == -100010
    assert "correlation id" in reply.body["error"]


async def test_unreachable_database_is_503(
    api: Any, pg_admin: str, database_url: str, template_database: str, drop_db: Any
) -> None:
    """When the database goes away, requests answer 503 -100011 and /readyz says the database is down."""
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin)
    try:
        await drop_db(name)
        reply = await api.get("/api/v3/credential/list")
        ready = await api.get("/readyz")
    finally:  # bring it back, so that the engine shuts down as usual
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_database}")
        await admin.close()
    assert reply.status == 503
    assert reply.body["errno"] == -100011
    assert "correlation id" in reply.body["error"]
    assert ready.status == 503
    assert ready.body["data"]["checks"]["database"] == "down"


async def test_connect_wait_timeout_is_408(make_engine: Any, make_api: Any, fake: FakeVenue) -> None:
    """Connect with keys whose verification does not finish in time answers 408 -100009."""
    key = fake.add_key("slow-key", "slow-secret")
    key.gate = asyncio.Event()
    client = await make_api(await make_engine(), connect_wait_timeout=0.3)
    try:
        reply = await client.post(
            "/api/v3/tradingAccount/connect",
            {"venue": "BINANCE", "apiKey": "slow-key", "apiSecret": "slow-secret"},
        )
    finally:
        key.gate.set()
    assert reply.status == 408
    assert reply.body["errno"] == -100009
