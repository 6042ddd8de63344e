"""The REST API server (aiohttp): docs/api-dialect.md §3's endpoints over one :class:`~engine.engine.CredentialEngine`.

    async with CredentialEngine(EngineConfig.from_env()) as eng:
        server = ApiServer(eng, ApiConfig.from_env())
        await server.start()            # http://127.0.0.1:8080
        ...
        await server.close()

Modules: :mod:`engine.api.http` (envelope, errors, parsing, middlewares), :mod:`engine.api.protocol` (the
answers to requests aiohttp refuses before the application sees them), :mod:`engine.api.routes`
(credentials, trading accounts), :mod:`engine.api.webhook_routes` (webhook endpoints), :mod:`engine.api.ops`
(health, readiness, metrics, OpenAPI), :mod:`engine.api.openapi` (the document). The server does not own the
engine: whoever opened it closes it, after the server.

Environment (``ApiConfig.from_env``): ``ENGINE_API_JWT_SECRET`` (required, >= 32 bytes),
``ENGINE_API_HOST`` (127.0.0.1), ``ENGINE_API_PORT`` (8080), ``ENGINE_API_MAX_BODY`` (65536 bytes),
``ENGINE_API_CONNECT_TIMEOUT`` (30 s: how long connect-with-keys waits for the verification), and the rate
limits of :mod:`engine.api.limits` (``ENGINE_API_RATE_LIMIT`` ..., ``ENGINE_API_TRUSTED_PROXIES``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from engine import errors
from engine.api import auth, http, limits, ops, protocol, routes, webhook_routes
from engine.config import settings_view
from engine.sensitive import SecretText

if TYPE_CHECKING:
    from engine.engine import CredentialEngine

MAX_BODY_BYTES = 64 * 1024  # the largest valid request (a PEM secret and a few fields) is a few KiB
SHUTDOWN_TIMEOUT = 5.0  # seconds given to in-flight requests when the server stops

ROUTES: tuple[tuple[str, str, http.Handler], ...] = (
    *routes.ROUTES,
    *webhook_routes.ROUTES,
    *ops.ROUTES,
)


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """How the REST API listens and whom it trusts. No I/O when built.

    ``jwt_secret`` is left out of the ``repr`` and kept as a :class:`~engine.sensitive.SecretText`, so a
    traceback rendered with frame locals shows ``'***'`` for it.
    """

    jwt_secret: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = MAX_BODY_BYTES
    connect_wait_timeout: float = 30.0
    rate_limits: limits.RateLimits = field(default_factory=limits.RateLimits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "jwt_secret", SecretText(self.jwt_secret))
        auth.check_secret(self.jwt_secret)
        if not 0 <= self.port <= 65535:
            raise errors.ConfigurationError("port must be 0-65535 (0 picks a free port)", field="port")
        if self.max_body_bytes < 1024:
            raise errors.ConfigurationError("max_body_bytes must be at least 1024", field="max_body_bytes")
        if self.connect_wait_timeout <= 0:
            raise errors.ConfigurationError(
                "connect_wait_timeout must be positive", field="connect_wait_timeout"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ApiConfig:
        """Build from ``ENGINE_API_*`` variables (module docstring); keyword overrides win."""
        env = settings_view(os.environ if env is None else env)  # secrets masked; nothing else of it
        kwargs: dict[str, Any] = {}
        if env.get(auth.SECRET_ENV):
            kwargs["jwt_secret"] = env[auth.SECRET_ENV]
        if env.get("ENGINE_API_HOST"):
            kwargs["host"] = env["ENGINE_API_HOST"]
        for name, key, conv in (
            ("port", "ENGINE_API_PORT", int),
            ("max_body_bytes", "ENGINE_API_MAX_BODY", int),
            ("connect_wait_timeout", "ENGINE_API_CONNECT_TIMEOUT", float),
        ):
            if env.get(key):
                try:
                    kwargs[name] = conv(env[key])
                except ValueError:
                    raise errors.ConfigurationError(f"{key} must be a number", field=key) from None
        kwargs["rate_limits"] = limits.RateLimits.from_env(env)
        kwargs.update(overrides)
        if "jwt_secret" not in kwargs:
            raise errors.ConfigurationError(
                f"{auth.SECRET_ENV} is not set: the API needs a secret to check bearer tokens "
                "(or run `credential-engine serve --sandbox`, which makes one)",
                field=auth.SECRET_ENV,
            )
        return cls(**kwargs)


def make_app(engine: CredentialEngine, config: ApiConfig) -> web.Application:
    """The aiohttp application: every route of :data:`ROUTES`; the envelope, rate limit and auth middlewares."""
    app = web.Application(
        middlewares=[
            http.envelope_middleware,  # outermost: every answer, 429s included, in the envelope
            limits.rate_limit_middleware,
            http.auth_middleware,
        ],
        client_max_size=config.max_body_bytes,
    )
    limits.install(app, engine, config.rate_limits)
    app[routes.ENGINE] = engine
    app[routes.CONNECT_WAIT] = config.connect_wait_timeout
    app[http.TOKEN_VERIFIER] = auth.TokenVerifier.hs256(config.jwt_secret)
    # counted into the engine's own counter: its registry shows them (engine/metrics.py)
    app[http.HTTP_COUNTS] = engine.metrics.http_requests
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_response_prepare.append(_without_server_header)
    return app


async def _without_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No ``Server: Python/3.x aiohttp/3.y``: versions help nobody but someone looking for a known bug."""
    response.headers.pop("Server", None)


class ApiServer:
    """The API on a TCP port. ``start()`` once, ``close()`` idempotently; the engine is not closed here."""

    def __init__(self, engine: CredentialEngine, config: ApiConfig) -> None:
        self.config = config
        self.app = make_app(engine, config)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    async def start(self) -> None:
        if self._runner is not None:
            raise errors.EngineClosed("an ApiServer starts once")
        # access_log=None: the envelope middleware logs each request (route pattern, status, request id)
        # ApiRunner: requests aiohttp's parser refuses are answered in the envelope too (engine/protocol.py)
        self._runner = protocol.ApiRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self.config.host, self.config.port)
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        port = self._runner.addresses[-1][1]
        host = self.config.host
        shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in ("0.0.0.0", "") else host)  # noqa: S104
        self._url = f"http://{shown}:{port}"

    @property
    def url(self) -> str:
        if self._url is None:
            raise errors.EngineClosed("the API server is not running")
        return self._url

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._url = None
