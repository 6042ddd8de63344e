"""The REST API's connection layer: the answers aiohttp gives outside the application, in our envelope.

Some requests never reach the application's middlewares: a request aiohttp's parser refuses (a NUL or other
control character in a header, a malformed request line, a line too long) and an exception that escapes the
middlewares. aiohttp answers those itself, in ``web_protocol.RequestHandler.handle_error``
(https://github.com/aio-libs/aiohttp/blob/master/aiohttp/web_protocol.py): a ``text/plain`` body that
echoes the refused bytes back (an ``Authorization`` header with them), a ``Server: Python/x aiohttp/y``
header, and a traceback logged at ERROR for every malformed request anyone sends.

aiohttp has no public hook for these answers, so :class:`ApiRunner` (an ``AppRunner``) serves the
application through :class:`EnvelopeRequestHandler`, whose ``handle_error`` answers instead:

* a parse error: its status (400) with the envelope of ``InvalidRequest`` (errno -100001) and a fixed
  message that echoes nothing of the request; logged at INFO as ``http_bad_request`` with the request id and
  the parser's exception class, without traceback (a malformed request is the client's problem);
* anything else (a bug escaping the middlewares): 500 with the fixed text and the correlation id, logged at
  ERROR as ``http_unhandled`` with the traceback as redacted text, like the envelope middleware does;
* always an ``X-Request-Id`` header, no ``Server`` header, and the connection closed (as aiohttp does).

The private surface touched is small and pinned by ``tests/api/test_api_raw_http.py``: ``Server._loop`` and
``Server._kwargs`` (to build the handler), and ``StreamResponse._prepare_headers`` (after which aiohttp adds
its default ``Server`` header; routed answers drop it in ``on_response_prepare`` instead).
"""

from __future__ import annotations

import traceback
import uuid
from typing import Any

import structlog
from aiohttp import hdrs, web

from engine import errors
from engine.api import http

log = structlog.get_logger("engine.api")

BAD_REQUEST_MESSAGE = (
    "is not a valid HTTP request (a malformed request line or header: control characters such as NUL are "
    "not allowed in headers)"
)


class _BareResponse(web.Response):
    """A response without aiohttp's default ``Server`` header (for answers outside the application)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


def _request_id(request: web.BaseRequest) -> str:
    """The id the middleware gave the request, the client's sane ``X-Request-Id``, or a new one."""
    given = request.get(http.REQUEST_ID) if isinstance(request, web.Request) else None
    if given is None:
        header = request.headers.get(http.REQUEST_ID_HEADER, "")
        given = header if http.REQUEST_ID_PATTERN.match(header) else uuid.uuid4().hex
    return given


def envelope_error(status: int, request_id: str) -> web.Response:
    """The envelope answer for ``status`` outside the application (the connection is closed after it)."""
    if status >= 500:
        body = http.dumps(
            {
                "data": None,
                "success": False,
                "errno": http.INTERNAL_ERRNO,
                "error": f"internal error; correlation id {request_id}",
            }
        )
    else:
        refused = errors.InvalidRequest("request", BAD_REQUEST_MESSAGE)
        body = http.dumps({"data": None, "success": False, "errno": refused.errno, "error": refused.message})
    response = _BareResponse(
        text=body,
        status=status,
        content_type="application/json",
        headers={http.REQUEST_ID_HEADER: request_id},
    )
    response.force_close()
    return response


class EnvelopeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with our answers to requests the application never sees."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The module docstring's answer; ``message`` (aiohttp's text, which echoes the request) is unused."""
        request_id = _request_id(request)
        error = type(exc).__name__ if exc is not None else None
        if status >= 500:
            log.error(
                "http_unhandled",
                request_id=request_id,
                status=status,
                error=error,
                traceback="".join(traceback.format_exception(exc)) if exc is not None else None,
            )
        else:
            log.info("http_bad_request", request_id=request_id, status=status, error=error)
        if request.writer.output_size > 0:  # as aiohttp: part of an answer went out, the connection is broken
            raise ConnectionError("a response was already being sent; cannot send the error answer")
        return envelope_error(status, request_id)


class _EnvelopeServer(web.Server):
    """``web.Server`` making :class:`EnvelopeRequestHandler` connections (aiohttp's makes its own class)."""

    def __call__(self) -> web.RequestHandler:
        return EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose server answers malformed requests with :func:`envelope_error`."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        kwargs: dict[str, Any] = dict(made._kwargs)
        return _EnvelopeServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **kwargs,
        )
