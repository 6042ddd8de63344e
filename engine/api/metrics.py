"""``GET /metrics`` over HTTP: the engine's registry (:mod:`engine.metrics`) in the Prometheus exposition formats.

:func:`answer` is the handler of ``serve``'s ``/metrics`` route. :class:`MetricsServer` is a listener of its own
that answers only ``/metrics`` (and ``/healthz``): ``credential-engine worker --metrics-port PORT`` runs one, so
scaled-out workers are scraped too, and ``serve --metrics-port PORT`` can keep the metrics off the API's port.
The format follows the scraper's ``Accept`` header (prometheus_client's ``choose_encoder``): the text format
0.0.4 by default, OpenMetrics 1.0 when asked (https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import hdrs, web

from engine import errors

if TYPE_CHECKING:
    from engine.engine import CredentialEngine

__all__ = ["MetricsServer", "answer"]

SHUTDOWN_TIMEOUT = 2.0  # seconds an in-flight scrape gets when the listener stops


async def answer(engine: CredentialEngine, request: web.Request) -> web.Response:
    """The engine's metrics for ``request`` (its ``Accept`` header picks the format)."""
    accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
    body, content_type = await engine.metrics.exposition(accept)
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})


class MetricsServer:
    """A listener answering ``GET /metrics`` (the engine's registry) and ``GET /healthz``; nothing else.

    ``start()`` once, ``close()`` idempotently; the engine is neither opened nor closed here. Port 0 picks a
    free port (:attr:`url` tells which).
    """

    def __init__(self, engine: CredentialEngine, *, host: str = "127.0.0.1", port: int = 9464) -> None:
        if not 0 <= port <= 65535:
            raise errors.ConfigurationError("the metrics port must be 0-65535", field="metrics_port")
        self.engine = engine
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    def _app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            return await answer(self.engine, request)

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise errors.EngineClosed("a MetricsServer starts once")
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[-1][1]
        host = self.host
        shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)  # noqa: S104
        self._url = f"http://{shown}:{port}/metrics"

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        if self._url is None:
            raise errors.EngineClosed("the metrics server is not running")
        return self._url

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._url = None
