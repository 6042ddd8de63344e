"""Requests that HTTP clients refuse to send, written byte by byte to the server's loopback socket.

aiohttp's parser refuses them before the application sees them; the server must still answer in the
envelope, with an ``X-Request-Id`` and without a ``Server`` header, echo nothing of the request, and log no
traceback at ERROR (engine/api/protocol.py). Every other kind of answer is checked for the ``Server`` header
the same way, over the same raw socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog

from engine.api import ApiServer, auth
from engine.api import http as api_http

INVALID_REQUEST = -100001


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def envelope(self) -> Any:
        assert self.header("Content-Type")[0].startswith("application/json"), self.headers
        return json.loads(self.body)


async def exchange(server: ApiServer, request: bytes) -> RawAnswer:
    """Send ``request`` as is over a new loopback connection; read the answer until the server closes."""
    parts = urlsplit(server.url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), 5)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
    return RawAnswer(int(status_line.split()[1]), headers, body)


def request(target: str = "/healthz", *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    lines = [method + b" " + target.encode("latin-1") + b" HTTP/1.1", b"Host: 127.0.0.1", *headers]
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


TOKEN_SECRET_PART = b"SECRETTOKENPART"
MALFORMED = [
    pytest.param(request("/healthz", b"X-Note: a\x00b"), id="NUL-in-header-value"),
    pytest.param(
        request("/api/v3/credential/list", b"Authorization: Bearer abc." + TOKEN_SECRET_PART + b"\x00"),
        id="NUL-after-a-bearer-token",
    ),
    pytest.param(request("/healthz", b"X-Note: a\x01b"), id="SOH-in-header-value"),
    pytest.param(request("/healthz", b"X-Note: a\x7fb"), id="DEL-in-header-value"),
    pytest.param(request("/healthz", b"X-No\x00te: ab"), id="NUL-in-header-name"),
    pytest.param(request("/healthz", b"X-Request-Id: id\x00x"), id="NUL-in-the-request-id"),
    pytest.param(request("/heal\x00thz"), id="NUL-in-the-target"),
    pytest.param(b"NOT AN HTTP REQUEST\x00\r\n\r\n", id="garbage-request-line"),
    pytest.param(request("/healthz", b"X-Long: " + b"a" * 9000), id="header-line-too-long"),
]


@pytest.mark.parametrize("raw", MALFORMED)
async def test_malformed_requests_answer_400_in_the_envelope(
    server: ApiServer, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """400, errno -100001 naming the request, an X-Request-Id (also in the log line), no Server header,
    nothing of the request echoed, no ERROR record and no traceback in the logs."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logged:
        answer = await exchange(server, raw)
    assert answer.status == 400
    body = answer.envelope()
    assert body["data"] is None and body["success"] is False and body["errno"] == INVALID_REQUEST
    assert body["error"].startswith("request: ")
    [request_id] = answer.header("X-Request-Id")
    assert api_http.REQUEST_ID_PATTERN.match(request_id) and "\x00" not in request_id
    assert answer.header("Server") == []
    assert (
        TOKEN_SECRET_PART not in answer.body and b"X-No" not in answer.body and b"a\x00b" not in answer.body
    )
    [entry] = [e for e in logged if e["event"] == "http_bad_request"]
    assert entry["log_level"] == "info" and entry["request_id"] == request_id and entry["status"] == 400
    assert all(e["log_level"] not in ("error", "critical") for e in logged), logged
    assert all("traceback" not in e and "exc_info" not in e for e in logged), logged
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    assert TOKEN_SECRET_PART.decode() not in caplog.text + repr(logged)


async def test_the_connection_is_closed_after_a_malformed_request(server: ApiServer) -> None:
    """A valid request pipelined behind a malformed one is not served: the connection ends at the 400."""
    raw = request("/healthz", b"X-Note: a\x00b") + request("/healthz")
    answer = await exchange(server, raw)
    assert answer.status == 400 and b"HTTP/1" not in answer.body


async def test_no_answer_carries_a_server_header(
    server: ApiServer, jwt_secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2xx, 401, 404, 405, 413 and 500 (a bug escaping the middlewares) alike: no Server header, always an
    X-Request-Id, always the envelope (or Prometheus text for /metrics)."""
    token = auth.mint_token(jwt_secret, "owner-1").encode()
    cases = {
        200: request("/api/v3/credential/list", b"Authorization: Bearer " + token),
        401: request("/api/v3/credential/list"),
        404: request("/nowhere"),
        405: request("/healthz", method=b"DELETE"),
        413: request(
            "/api/v3/credential/create",
            b"Authorization: Bearer " + token,
            method=b"POST",
            body=b"{" + b" " * (server.config.max_body_bytes + 10) + b"}",
        ),
    }
    for status, raw in cases.items():
        answer = await exchange(server, raw)
        assert answer.status == status, (status, answer)
        assert answer.header("Server") == [] and len(answer.header("X-Request-Id")) == 1, answer.headers
        assert answer.envelope()["success"] is (status == 200)
    metrics = await exchange(server, request("/metrics"))
    assert metrics.status == 200 and metrics.header("Server") == []

    def broken_route_name(request: Any) -> str:
        raise RuntimeError("a bug after the handler")

    monkeypatch.setattr(api_http, "route_name", broken_route_name)
    with structlog.testing.capture_logs() as logged:
        answer = await exchange(server, request("/healthz", b"X-Request-Id: corr-500"))
    assert answer.status == 500 and answer.header("Server") == []
    assert answer.header("X-Request-Id") == ["corr-500"]
    assert answer.envelope() == {
        "data": None,
        "success": False,
        "errno": -100000,
        "error": "internal error; correlation id corr-500",
    }
    assert b"a bug after the handler" not in answer.body
    [entry] = [e for e in logged if e["event"] == "http_unhandled"]  # a bug is logged, as text
    assert entry["request_id"] == "corr-500" and "a bug after the handler" in entry["traceback"]
