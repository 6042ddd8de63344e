"""The REST API: an aiohttp server over one :class:`~engine.engine.CredentialEngine`.

The package hands on the server (:mod:`engine.api.server`): :class:`ApiServer`, :class:`ApiConfig`,
:func:`make_app` and the route table ``ROUTES``. Its parts: :mod:`~engine.api.http` (envelope, errors,
parsing, middlewares), :mod:`~engine.api.protocol` (answers to requests aiohttp refuses), :mod:`~engine.api.auth`
(bearer tokens), :mod:`~engine.api.jwks` (an identity provider's keys), :mod:`~engine.api.scopes` (scopes per
route), :mod:`~engine.api.limits` (rate limits), :mod:`~engine.api.routes` (credentials, trading
accounts), :mod:`~engine.api.webhook_routes` (webhook endpoints), :mod:`~engine.api.ops` (health, readiness,
metrics, OpenAPI), :mod:`~engine.api.metrics` (the Prometheus exposition), :mod:`~engine.api.openapi` and
:mod:`~engine.api.openapi_schemas` (the document).
"""

from engine.api.server import ROUTES, ApiConfig, ApiServer, make_app

__all__ = ["ROUTES", "ApiConfig", "ApiServer", "make_app"]
