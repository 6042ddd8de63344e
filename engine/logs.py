"""Logging: structlog for the engine, the standard library (aiohttp, asyncpg) through the same processors,
and a redaction step that every record passes through before it is rendered.

:func:`configure_logging` is opt-in (an embedding application may keep its own setup). It routes structlog
through :mod:`logging` and puts one handler on the root logger. Both kinds of record run the same steps::

    contextvars, logger name, level, ISO timestamp
    exception -> text (console) or dicts (JSON), never frame locals
    redact                                                    (this module)
    ConsoleRenderer | JSONRenderer (one JSON object per line)

structlog events run the first three steps in structlog's own chain, so the event dict that reaches
:mod:`logging` is already redacted: any other handler on the root logger (an application's, pytest's) sees
only redacted values too. Standard-library records (aiohttp, asyncpg) run them in the handler's
``ProcessorFormatter``; other handlers see those records as the library wrote them.

Exceptions are rendered to text/dicts *before* :func:`redact`, so exception messages are scrubbed too.
Frame locals are never rendered: ``dict_tracebacks``' default shows them, and they hold secrets.

Redaction (:func:`redact`) never raises; it replaces

* values of sensitive keys (``secret``, ``passphrase``, ``password``, ``signature``, ``token``,
  ``authorization``, ``cookie``, ``private_key``, ``sign``, ``master``, ``kek``, ``keys``, ``jwt``, ... anywhere
  in the name, case-insensitive, in nested dicts and lists too) with ``***``; names that describe a secret
  rather than hold it (``secret_version``, ``token_type``, ``master_key_versions``, ``masked_api_key``) are
  kept;
* values of DSN keys (``dsn``, ``database_url``, ``db_url``) with the DSN, its password masked
  (:func:`engine.sensitive.mask_dsn`);
* ``api_key``-like values (``api_key``, ``X-MBX-APIKEY``, ``OK-ACCESS-KEY``) with their masked form;
* :class:`~engine.sensitive.SecretText` values (the configuration's master keys, DSN, JWT secret) anywhere,
  whatever the key, with their masked form; :class:`~venues.base.ApiKeys` anywhere with its redacted
  ``repr``; bytes with ``<N bytes>``;
* in every string: registered secret values (:func:`register_secret`, :func:`secret_scope`), URL/DSN
  passwords (``scheme://user:PASSWORD@host``, up to the last ``@`` of the authority), ``password=...``,
  ``"secret": "..."`` and ``Authorization: ...``-style pairs (quoted values too), bearer and basic
  credentials, JWTs, ``whsec_`` secrets, 32-byte keys in base64 (a master key's form) and PEM private keys.

Module-level state, all of it: ``_registry`` (the registered secret values, created empty at import so
values registered before configuration are honoured), and what :func:`configure_logging` installs into
structlog's global configuration and the root logger (one handler, replaced on each call; other handlers
are left alone).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from engine import errors
from engine.sensitive import SecretText, mask_dsn
from venues.base import ApiKeys, mask_api_key

__all__ = [
    "REDACTED",
    "SecretRegistry",
    "configure_logging",
    "redact",
    "register_secret",
    "secret_scope",
    "unregister_secret",
]

REDACTED = "***"
MAX_REGISTERED_SECRETS = 1024  # each registered value costs one substring search per logged string
MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary words; names and patterns still apply
MAX_DEPTH = 8  # nesting below this is not walked: it is replaced, not rendered
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SecretRegistry:
    """Secret values to scrub from every logged string, each with its replacement.

    Bounded: at most ``capacity`` distinct values; beyond that the oldest registration is forgotten (FIFO)
    and that value is then protected only by the name and pattern rules. ``str`` cannot be weakly
    referenced, so the registry holds its values: register them for the duration of the work that uses
    them (:func:`secret_scope`, reference-counted) so they leave when it ends. Thread-safe; readers take
    an immutable snapshot and never lock.
    """

    __slots__ = ("_capacity", "_entries", "_lock", "_snapshot")

    def __init__(self, capacity: int = MAX_REGISTERED_SECRETS) -> None:
        self._capacity = capacity
        self._entries: dict[str, tuple[str, int]] = {}  # value -> (replacement, references), oldest first
        self._lock = threading.Lock()
        self._snapshot: tuple[tuple[str, str], ...] | None = ()  # None: stale, rebuilt by the next scrub

    def add(self, value: str, replacement: str = REDACTED) -> None:
        if len(value) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            _, references = self._entries.pop(value, (replacement, 0))
            self._entries[value] = (replacement, references + 1)  # re-inserted: now the newest
            while len(self._entries) > self._capacity:
                del self._entries[next(iter(self._entries))]
            self._refresh()

    def discard(self, value: str) -> None:
        with self._lock:
            entry = self._entries.get(value)
            if entry is None:
                return
            if entry[1] > 1:
                self._entries[value] = (entry[0], entry[1] - 1)
            else:
                del self._entries[value]
            self._refresh()

    def _refresh(self) -> None:
        # lazily: every probe registers and drops its keys, but only a log line needs the sorted snapshot
        # (re-sorting on each change cost 3 ms per probe with 3,000 live secrets: bench/lifecycle.py)
        self._snapshot = None

    def _sorted(self) -> tuple[tuple[str, str], ...]:
        snapshot = self._snapshot
        if snapshot is None:
            with self._lock:
                if self._snapshot is None:
                    # longest first, so a secret that contains another one is replaced whole
                    pairs = ((value, replacement) for value, (replacement, _) in self._entries.items())
                    self._snapshot = tuple(sorted(pairs, key=lambda pair: -len(pair[0])))
                snapshot = self._snapshot
        return snapshot

    def scrub(self, text: str) -> str:
        for value, replacement in self._sorted():
            if value in text:
                text = text.replace(value, replacement)
        return text

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"SecretRegistry({len(self._entries)} values, capacity {self._capacity})"


_registry = SecretRegistry()


def register_secret(value: str) -> None:
    """Scrub ``value`` from every logged string until :func:`unregister_secret` (or eviction)."""
    _registry.add(value)


def unregister_secret(value: str) -> None:
    """Drop one registration of ``value`` (registrations are counted)."""
    _registry.discard(value)


@contextlib.contextmanager
def secret_scope(*values: str | ApiKeys | None) -> Iterator[None]:
    """Scrub these values from logs while the block runs. An :class:`ApiKeys` registers its secret and
    passphrase (shown as ``***``) and its API key (shown masked)."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        if isinstance(value, ApiKeys):
            pairs.append((value.api_key, mask_api_key(value.api_key)))
            pairs.append((value.api_secret, REDACTED))
            if value.api_passphrase is not None:
                pairs.append((value.api_passphrase, REDACTED))
        elif value is not None:
            pairs.append((value, REDACTED))
    for value, replacement in pairs:
        _registry.add(value, replacement)
    try:
        yield
    finally:
        for value, _ in pairs:
            _registry.discard(value)


# -- redaction -------------------------------------------------------------------------------------

_SENSITIVE_PARTS = (
    "secret",
    "passphrase",
    "password",
    "passwd",
    "privatekey",
    "signature",
    "authorization",
    "token",
    "cookie",
)
_SENSITIVE_WORDS = frozenset(
    {"sign", "pwd", "auth", "jwt", "kek", "dek", "otp", "bearer", "master", "keys", "credentials"}
)
_DSN_NAMES = frozenset({"dsn", "databaseurl", "dburl", "postgresurl", "postgresqlurl", "pgurl", "conninfo"})
# a trailing word that makes the name describe a secret instead of holding it (secret_version)
_METADATA_WORDS = frozenset(
    {"version", "versions", "id", "ids", "count", "at", "ms", "length", "len", "type", "kind", "state"}
)

_SENSITIVE_NAME_PATTERN = (
    r"[\w-]*(?:password|passwd|passphrase|secret|signature|token|apikey|api_key|api-key|private_?key"
    r"|master_?keys?|kek|jwt)|pwd|sign"
)
_VALUE = r"""(?:"(?:[^"\\]|\\.)*"?|'(?:[^'\\]|\\.)*'?|[^\s&;,'"}\])]+)"""
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S),
        REDACTED,
    ),
    # a JWS/JWT in compact form: base64url JSON header ("eyJ") and payload, then the signature
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    # URL userinfo password: up to the last "@" before the path, so an unencoded "@" in it is covered
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/?#@\s:]*:)[^\s/?#]*@"), r"\1" + REDACTED + "@"),
    # Authorization: <scheme> <credentials> (headers as text, header dicts rendered into a message)
    (
        re.compile(r"(?i)\b((?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)(?:[A-Za-z-]+\s+)?[^\s'\",;]+"),
        r"\1" + REDACTED,
    ),
    # name=value and "name": "value" pairs whose name ends like a secret (jwt_secret, ENGINE_MASTER_KEYS, ...)
    (
        re.compile(rf"(?i)(?<![\w-])({_SENSITIVE_NAME_PATTERN})(['\"]?\s*[:=]\s*){_VALUE}"),
        r"\1\2" + REDACTED,
    ),
    (re.compile(r"(?i)\b(bearer\s+|basic\s+)[A-Za-z0-9\-._~+/]{8,}=*"), r"\1" + REDACTED),
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), "whsec_" + REDACTED),
    # 32 bytes in base64 (43 characters and one "="): the form of a master key in ENGINE_MASTER_KEYS
    (re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{43}=(?![A-Za-z0-9+/=_-])"), REDACTED),
)


@functools.lru_cache(maxsize=1024)
def _key_kind(name: str) -> str | None:
    """``"secret"``, ``"dsn"``, ``"api_key"`` or None for an event-dict key name."""
    words = [word for word in re.split(r"[^a-z0-9]+", name.lower()) if word]
    if not words or words[0] == "masked" or words[-1] in _METADATA_WORDS:
        return None
    joined = "".join(words)
    if joined in _DSN_NAMES or words[-1] == "dsn":
        return "dsn"
    if any(part in joined for part in _SENSITIVE_PARTS) or _SENSITIVE_WORDS.intersection(words):
        return "secret"
    if joined.endswith(("apikey", "accesskey")):
        return "api_key"
    return None


def _scrub(text: str) -> str:
    text = _registry.scrub(text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _clean(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` safe to render: containers walked, strings scrubbed, other objects as text."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, SecretText):
        return value.masked()
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, ApiKeys):
        return repr(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, uuid.UUID):
        return str(value)
    if depth >= MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        return {_clean(key, depth + 1): _clean_item(key, item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        cleaned = [_clean(item, depth + 1) for item in value]
        return tuple(cleaned) if isinstance(value, tuple) else cleaned
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break logging; its text is unknown, so it is dropped
        return f"<unrepresentable {type(value).__name__}>"
    return _scrub(text)


def _clean_item(key: Any, value: Any, depth: int) -> Any:
    kind = _key_kind(key) if isinstance(key, str) else None
    if kind == "secret" and value is not None:
        return REDACTED
    if kind == "dsn" and isinstance(value, str) and not isinstance(value, SecretText):
        return _scrub(mask_dsn(value))
    if kind == "api_key" and isinstance(value, str):
        return mask_api_key(value)
    return _clean(value, depth)


_FORMATTER_META = ("_record", "_from_structlog")  # ProcessorFormatter's own keys, removed before rendering


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """The redaction processor (see the module docstring). Never raises: if cleaning fails, the event is
    replaced by a bare ``log_redaction_failed`` record rather than rendered unredacted."""
    meta = {key: event_dict[key] for key in _FORMATTER_META if key in event_dict}
    try:
        cleaned = {
            _clean(key): _clean_item(key, value, 0)
            for key, value in event_dict.items()
            if key not in _FORMATTER_META
        }
    except Exception as exc:  # fail closed: drop the event's content, keep that it happened
        cleaned = {
            "event": "log_redaction_failed",
            "level": str(event_dict.get("level", method_name)),
            "error": type(exc).__name__,
        }
    cleaned.update(meta)
    return cleaned


# -- configuration ---------------------------------------------------------------------------------


class _EngineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler :func:`configure_logging` installs; its class marks it for replacement."""


def configure_logging(level: str = "INFO", *, json: bool = False, stream: IO[str] | None = None) -> None:
    """Configure structlog and the standard library to write redacted records to ``stream`` (stderr).

    ``json=True`` writes one JSON object per line (structured tracebacks under ``exception``); otherwise
    a console format. May be called again: the previous engine handler is replaced.
    """
    name = level.strip().upper()
    if name not in LEVELS:
        raise errors.ConfigurationError(
            f"log level {level!r} is not one of {', '.join(LEVELS)}", field="log_level"
        )
    out = stream if stream is not None else sys.stderr
    exceptions: Processor
    renderer: Processor
    if json:
        exceptions = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        renderer = structlog.processors.JSONRenderer()
    else:
        exceptions = structlog.processors.format_exc_info  # stdlib traceback text: no locals
        renderer = structlog.dev.ConsoleRenderer(
            colors=_isatty(out), exception_formatter=structlog.dev.plain_traceback
        )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = _EngineHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, exceptions, redact],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _EngineHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            exceptions,
            redact,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # not cached: module-level loggers keep following reconfiguration (and structlog.testing)
        cache_logger_on_first_use=False,
    )


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
