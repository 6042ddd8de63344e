"""Operator routes, no token needed: ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``.

``/healthz`` says the process answers (liveness). ``/readyz`` says it can do its job: the database answers a
query and, when this process runs workers, they are alive; 503 otherwise, with each check named.
"""

from __future__ import annotations

from aiohttp import web

from engine import errors
from engine.api import http, openapi, routes
from engine.api import metrics as metricsmod


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz"""
    return http.ok({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz"""
    eng = routes.engine_of(request)
    try:
        database = await eng.db.ping()
    except errors.EngineClosed:
        database = False
    wants_workers = eng.config.workers > 0
    try:
        workers = eng.queue.running if wants_workers else True
    except errors.EngineClosed:
        workers = False
    checks = {"database": _word(database), "workers": _word(workers) if wants_workers else "disabled"}
    if database and workers:
        return http.ok({"status": "ready", "checks": checks})
    errno = errors.StorageError.errno if not database else errors.EngineClosed.errno
    failing = ", ".join(name for name, state in checks.items() if state == "down")
    body = {"data": {"status": "unavailable", "checks": checks}, "success": False, "errno": errno,
            "error": f"not ready: {failing} down"}  # fmt: skip
    return web.Response(text=http.dumps(body), status=503, content_type="application/json")


def _word(up: bool) -> str:
    return "up" if up else "down"


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics (Prometheus text format, or OpenMetrics when the scraper asks; engine/metrics.py)."""
    return await metricsmod.answer(routes.engine_of(request), request)


async def openapi_document(request: web.Request) -> web.Response:
    """GET /openapi.json"""
    return web.Response(text=openapi.document_json(), content_type="application/json")


ROUTES: tuple[tuple[str, str, http.Handler], ...] = (
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi_document),
)
