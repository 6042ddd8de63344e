"""Webhooks: Standard Webhooks signatures, and what receivers use to check them.

The engine sends every lifecycle event to its owner's webhook endpoints, signed per the Standard Webhooks
spec (https://www.standardwebhooks.com), so any consumer can verify them, with this module or with the
``standardwebhooks`` libraries::

    webhook-id:        the event id (the same on every attempt: consumers dedupe on it)
    webhook-timestamp: seconds since the epoch, when this attempt was signed
    webhook-signature: v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")> [v1,<...> ...]
    body:              {"type": ..., "timestamp": <ms>, "data": {...}}

A secret is ``whsec_`` + base64 of 32 random bytes; the HMAC key is the decoded bytes. While a rotated-out
secret is in its grace period, each request carries one signature per active secret, space-separated, and
a receiver accepts the request when any of them matches any secret it knows.

Receiving (this module imports neither asyncpg nor the engine, only aiohttp and the value types)::

    from aiohttp import web
    from engine import Event, webhooks

    async def on_event(event: Event) -> None:
        print(event.type, event.credential_id, event.sequence, event.data["credential"]["status"])

    app = web.Application()
    app.router.add_post("/hooks", webhooks.aiohttp_handler(["whsec_..."], on_event))
    web.run_app(app)

The handler reads the body with a size cap, verifies signature and timestamp (5 minutes either way by
default), answers duplicates of a recent ``webhook-id`` with 200 without calling ``on_event`` again, and
answers 500 when ``on_event`` raises so that the sender retries. :class:`Verifier` is the same check for
other frameworks.

Sending lives in :mod:`engine.webhooks.service` (endpoints, secrets, fan-out) and
:mod:`engine.webhooks.delivery` (attempts, retries, ordering); the SSRF guard in :mod:`engine.webhooks.guard`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets as secretslib
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import structlog
from aiohttp import web

from engine import errors
from engine.models import Event

__all__ = [
    "DEFAULT_TOLERANCE",
    "RecentIds",
    "Verifier",
    "WebhookVerificationError",
    "aiohttp_handler",
    "generate_secret",
    "parse_event",
    "sign",
    "signature_header",
]

log = structlog.get_logger("engine.webhooks")

SECRET_PREFIX = "whsec_"  # noqa: S105 - the prefix of every secret, not a secret
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64 random bytes
DEFAULT_TOLERANCE = 300.0  # seconds a webhook-timestamp may be off, either way (the spec's 5 minutes)
MAX_BODY = 1 << 20  # bytes a receiver reads before answering 413
MAX_ID_LENGTH = 256
MAX_SIGNATURES = 16  # signatures of one request that are checked (bounds the work an attacker can ask for)
DEDUPE_CAPACITY = 10_000  # webhook ids a handler remembers

Callback = Callable[[Event], Awaitable[None]]


class WebhookVerificationError(errors.CredentialEngineError):
    """A webhook request that does not verify (headers, timestamp, signature or payload). Never names a secret."""

    http_status = 401
    errno = -130001


def generate_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secretslib.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of a secret: the base64-decoded part after ``whsec_`` (bytes are taken as they are)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        text = secret.strip()
        text = text.removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def sign(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, "<msg_id>.<timestamp>.<body>")>`` for one secret."""
    digest = hmac.new(secret_key(secret), _signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,`` signature per key, space-separated."""
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


def _signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


class Verifier:
    """Checks Standard Webhooks requests against one or more active secrets (rotation: old and new)."""

    __slots__ = ("_keys", "tolerance")

    def __init__(
        self, secrets: str | bytes | Sequence[str | bytes], *, tolerance: float = DEFAULT_TOLERANCE
    ) -> None:
        given = [secrets] if isinstance(secrets, str | bytes) else list(secrets)
        if not given:
            raise ValueError("a Verifier needs at least one secret")
        if tolerance <= 0:
            raise ValueError("tolerance must be positive")
        self._keys = tuple(secret_key(s) for s in given)
        self.tolerance = float(tolerance)

    def __repr__(self) -> str:
        return f"Verifier(secrets=<{len(self._keys)}>, tolerance={self.tolerance:g})"

    def verify(
        self, body: bytes | str, headers: Mapping[str, str], *, now: float | None = None
    ) -> dict[str, Any]:
        """The parsed JSON body when the request verifies; :class:`WebhookVerificationError` otherwise."""
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        lower = {k.lower(): v for k, v in headers.items()}
        msg_id = lower.get("webhook-id", "")
        stamp = lower.get("webhook-timestamp", "")
        signatures = lower.get("webhook-signature", "")
        if not (msg_id and stamp and signatures):
            raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
        if len(msg_id) > MAX_ID_LENGTH:
            raise WebhookVerificationError("webhook-id is too long")
        if not stamp.isdigit() or len(stamp) > 12:
            raise WebhookVerificationError("webhook-timestamp is not a number of seconds")
        timestamp = int(stamp)
        current = time.time() if now is None else now
        if timestamp < current - self.tolerance:
            raise WebhookVerificationError("webhook-timestamp is too old")
        if timestamp > current + self.tolerance:
            raise WebhookVerificationError("webhook-timestamp is too far in the future")
        content = _signed_content(msg_id, timestamp, raw)
        expected = [hmac.new(key, content, hashlib.sha256).digest() for key in self._keys]
        if not any(
            hmac.compare_digest(candidate, wanted)
            for candidate in _v1_signatures(signatures)
            for wanted in expected
        ):
            raise WebhookVerificationError("no signature matches")
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise WebhookVerificationError("the body is not JSON") from None
        if not isinstance(payload, dict):
            raise WebhookVerificationError("the body is not a JSON object")
        return payload

    def verify_event(
        self, body: bytes | str, headers: Mapping[str, str], *, now: float | None = None
    ) -> Event:
        """:meth:`verify`, then :func:`parse_event`."""
        return parse_event(self.verify(body, headers, now=now))


def _v1_signatures(header: str) -> list[bytes]:
    found: list[bytes] = []
    for part in header.split(" ")[:MAX_SIGNATURES]:
        version, _, value = part.partition(",")
        if version != "v1" or not value:
            continue
        try:
            found.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def parse_event(payload: Mapping[str, Any]) -> Event:
    """The :class:`~engine.models.Event` a webhook body carries (the inverse of ``Event.payload()``)."""
    try:
        data = dict(payload["data"])
        event_id = uuid.UUID(str(data.pop("eventId")))
        sequence = int(data.pop("sequence"))
        owner_id = str(data.pop("ownerId"))
        credential = data.get("credential")
        credential_id = uuid.UUID(str(credential["credentialId"])) if isinstance(credential, dict) else None
        return Event(
            event_id=event_id,
            type=str(payload["type"]),
            owner_id=owner_id,
            credential_id=credential_id,
            sequence=sequence,
            timestamp_ms=int(payload["timestamp"]),
            data=data,
        )
    except (KeyError, TypeError, ValueError):
        raise WebhookVerificationError("the body is not a credential-engine event") from None


class RecentIds:
    """The last ``capacity`` webhook ids seen (oldest forgotten first): bounded memory for deduplication."""

    __slots__ = ("_ids", "capacity")

    def __init__(self, capacity: int = DEDUPE_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, msg_id: str) -> None:
        self._ids[msg_id] = None
        self._ids.move_to_end(msg_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def aiohttp_handler(
    secrets: str | Sequence[str],
    callback: Callback,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    capacity: int = DEDUPE_CAPACITY,
    max_body: int = MAX_BODY,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler that verifies each request, drops duplicate ids and calls ``callback(event)``.

    Answers: 200 handled (or a duplicate of a recent id), 401 does not verify, 409 the same id is being handled
    right now, 413 body larger than ``max_body``, 500 ``callback`` raised (the sender will retry).
    """
    verifier = Verifier(secrets, tolerance=tolerance)
    seen = RecentIds(capacity)
    in_flight: set[str] = set()

    async def handle(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > max_body:
            return web.Response(status=413, text="body too large")
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > max_body:
                return web.Response(status=413, text="body too large")
        try:
            event = verifier.verify_event(bytes(body), request.headers)
        except WebhookVerificationError as exc:
            log.info("webhook_rejected", reason=exc.message)
            return web.Response(status=401, text=exc.message)
        msg_id = request.headers["webhook-id"]
        if msg_id in seen:
            return web.Response(status=200, text="duplicate")
        if msg_id in in_flight:
            return web.Response(status=409, text="already being handled")
        in_flight.add(msg_id)
        try:
            await callback(event)
        except Exception as exc:  # the user's code failed: answer 500 so the sender tries again later
            log.warning("webhook_callback_failed", event_type=event.type, error=type(exc).__name__)
            return web.Response(status=500, text="callback failed")
        finally:
            in_flight.discard(msg_id)
        seen.add(msg_id)
        return web.Response(status=200, text="ok")

    return handle
