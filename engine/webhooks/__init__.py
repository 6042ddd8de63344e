"""Webhooks: signed event delivery to the owners' endpoints, and what receivers use to check it.

The package hands on the receiver side, :mod:`engine.webhooks.signing` (Standard Webhooks signatures,
:class:`Verifier`, :func:`aiohttp_handler`). Importing it loads neither asyncpg nor the engine, so services
that only receive webhooks can use it without running the engine::

    from engine import webhooks

    app.router.add_post("/hooks", webhooks.aiohttp_handler(["whsec_..."], on_event))

The sending side is imported from its modules: :mod:`~engine.webhooks.service` (endpoints, secrets, fan-out),
:mod:`~engine.webhooks.delivery` (attempts, retries, ordering), :mod:`~engine.webhooks.guard` (the SSRF
guard), :mod:`~engine.webhooks.models` (value types), :mod:`~engine.webhooks.schemas` (the JSON Schema of
each event type); their SQL is ``webhooks.sql``.
"""

from engine.webhooks.signing import (
    DEFAULT_TOLERANCE,
    RecentIds,
    Verifier,
    WebhookVerificationError,
    aiohttp_handler,
    generate_secret,
    parse_event,
    secret_key,
    sign,
    signature_header,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "RecentIds",
    "Verifier",
    "WebhookVerificationError",
    "aiohttp_handler",
    "generate_secret",
    "parse_event",
    "secret_key",
    "sign",
    "signature_header",
]
