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

Environment (``ApiConfig.from_env``; one variable per field, ``ApiConfig.ENV``, read by the loop of
:mod:`engine.environment`): how tokens are checked, at least one of ``ENGINE_API_JWKS_URL`` (an identity
provider's keys, :mod:`engine.api.jwks`, with ``ENGINE_API_ISSUER`` and ``ENGINE_API_AUDIENCE`` required beside
it, ``ENGINE_API_JWT_ALGORITHMS`` (RS256,ES256,EdDSA), ``ENGINE_API_JWKS_CACHE_TTL`` (300 s),
``ENGINE_API_JWKS_REFETCH_INTERVAL`` (30 s), ``ENGINE_API_JWKS_TIMEOUT`` (5 s)) and ``ENGINE_API_JWT_SECRET``
(HS256, >= 32 bytes: development tokens; or ``ENGINE_API_JWT_SECRET_FILE``, a file holding it);
``ENGINE_API_OWNER_CLAIM`` (``sub``: the identity provider's claim naming the owner); ``ENGINE_API_HOST``
(127.0.0.1), ``ENGINE_API_PORT`` (8080), ``ENGINE_API_MAX_BODY`` (65536 bytes), ``ENGINE_API_CONNECT_TIMEOUT``
(30 s: how long connect-with-keys waits for the verification), and the rate limits of :mod:`engine.api.limits`
(``ENGINE_API_RATE_LIMIT`` ..., ``ENGINE_API_TRUSTED_PROXIES``, ``ENGINE_API_INSTANCE_HEARTBEAT``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

from engine import environment, errors
from engine.api import auth, http, jwks, limits, ops, protocol, routes, scopes, webhook_routes
from engine.environment import settings_view
from engine.sensitive import SecretText

if TYPE_CHECKING:
    from engine.engine import CredentialEngine

JWKS_URL_ENV = "ENGINE_API_JWKS_URL"
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

    Tokens are checked with an identity provider's keys (``jwks_url``, with ``issuer`` and ``audience``),
    with the shared HS256 ``jwt_secret``, or both; at least one is required. ``jwt_secret`` is left out of
    the ``repr`` and kept as a :class:`~engine.sensitive.SecretText`, so a traceback rendered with frame
    locals shows ``'***'`` for it.
    """

    jwt_secret: str | None = field(default=None, repr=False)
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    jwt_algorithms: tuple[str, ...] = tuple(sorted(auth.PUBLIC_KEY_ALGORITHMS))
    owner_claim: str = auth.DEFAULT_OWNER_CLAIM
    jwks_cache_ttl: float = jwks.DEFAULT_CACHE_TTL
    jwks_refetch_interval: float = jwks.DEFAULT_MIN_REFETCH_INTERVAL
    jwks_timeout: float = jwks.DEFAULT_TIMEOUT
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = MAX_BODY_BYTES
    connect_wait_timeout: float = 30.0
    rate_limits: limits.RateLimits = field(default_factory=limits.RateLimits)

    ENV: ClassVar[environment.Section] = environment.Section(
        prefix="ENGINE_API_",
        names={"max_body_bytes": "ENGINE_API_MAX_BODY", "connect_wait_timeout": "ENGINE_API_CONNECT_TIMEOUT"},
        secrets=frozenset({"jwt_secret"}),
        bounds={
            "jwks_cache_ttl": environment.POSITIVE,
            "jwks_timeout": environment.POSITIVE,
            "connect_wait_timeout": environment.POSITIVE,
            "port": environment.Bound(maximum=65535),
            "max_body_bytes": environment.Bound(minimum=1024),
        },
    )

    def __post_init__(self) -> None:
        if self.jwt_secret is not None:
            object.__setattr__(self, "jwt_secret", SecretText(self.jwt_secret))
            auth.check_secret(self.jwt_secret)
        if self.jwt_secret is None and self.jwks_url is None:
            raise errors.ConfigurationError(
                f"the API needs a way to check bearer tokens: set {JWKS_URL_ENV} (an identity provider) or "
                f"{auth.SECRET_ENV} (development tokens; `credential-engine serve --sandbox` makes one)",
                field=JWKS_URL_ENV,
            )
        if self.jwks_url is not None:
            jwks.check_url(self.jwks_url)
            for name, env in (("issuer", "ENGINE_API_ISSUER"), ("audience", "ENGINE_API_AUDIENCE")):
                if not getattr(self, name):
                    raise errors.ConfigurationError(
                        f"{env} is required with {JWKS_URL_ENV}: without it a token the identity provider "
                        "issued for another service would be accepted here",
                        field=env,
                    )
            if not self.jwt_algorithms or not set(self.jwt_algorithms) <= auth.PUBLIC_KEY_ALGORITHMS:
                raise errors.ConfigurationError(
                    f"ENGINE_API_JWT_ALGORITHMS must be some of {', '.join(sorted(auth.PUBLIC_KEY_ALGORITHMS))}",
                    field="ENGINE_API_JWT_ALGORITHMS",
                )
        for name in ("jwks_cache_ttl", "jwks_timeout"):
            if not getattr(self, name) > 0:  # NaN too
                raise errors.ConfigurationError(f"{name} must be positive", field=name)
        if not self.jwks_refetch_interval >= 0:
            raise errors.ConfigurationError(
                "jwks_refetch_interval must be >= 0", field="jwks_refetch_interval"
            )
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
        """Build from ``ENGINE_API_*`` variables, one per field (``ENV``, read by :mod:`engine.environment`;
        ``ENGINE_API_JWT_SECRET`` also from ``ENGINE_API_JWT_SECRET_FILE``); keyword overrides win."""
        env = settings_view(os.environ if env is None else env)  # secrets masked; nothing else of it
        return environment.build(cls, env, overrides)

    def authenticator(self) -> tuple[auth.Authenticator, jwks.JwksKeys | None]:
        """The token check these settings describe, and the JWKS cache it fetches through (to start and
        close with the application), if any."""
        verifiers: list[auth.TokenVerifier] = []
        keys: jwks.JwksKeys | None = None
        if self.jwks_url is not None:
            keys = jwks.JwksKeys(
                self.jwks_url,
                algorithms=self.jwt_algorithms,
                cache_ttl=self.jwks_cache_ttl,
                min_refetch_interval=self.jwks_refetch_interval,
                timeout=self.jwks_timeout,
            )
            verifiers.append(
                auth.TokenVerifier(
                    algorithms=self.jwt_algorithms,
                    async_keys=keys.key,
                    issuer=self.issuer,
                    audience=self.audience,
                    owner_claim=self.owner_claim,
                )
            )
        if self.jwt_secret is not None:
            verifiers.append(auth.TokenVerifier.hs256(self.jwt_secret))
        return auth.Authenticator(*verifiers), keys


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
    authenticator, keys = config.authenticator()
    app[http.TOKEN_VERIFIER] = authenticator
    if keys is not None:
        app[JWKS_KEYS] = keys
        app.on_startup.append(_start_keys)
        app.on_cleanup.append(_close_keys)
    # counted into the engine's own counter: its registry shows them (engine/metrics.py)
    app[http.HTTP_COUNTS] = engine.metrics.http_requests
    scopes.check_routes((method, path) for method, path, _ in ROUTES)  # no /api route without a scope
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.on_response_prepare.append(_without_server_header)
    return app


JWKS_KEYS: web.AppKey[jwks.JwksKeys] = web.AppKey("jwks_keys", jwks.JwksKeys)


async def _start_keys(app: web.Application) -> None:
    """One bounded fetch of the identity provider's keys; a failure is logged and the server starts anyway."""
    await app[JWKS_KEYS].start()


async def _close_keys(app: web.Application) -> None:
    await app[JWKS_KEYS].close()


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
