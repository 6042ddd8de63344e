"""Secret-bearing settings that never show themselves: strings whose ``repr`` is a masked form.

A setting such as ``ENGINE_MASTER_KEYS``, ``DATABASE_URL`` or ``ENGINE_API_JWT_SECRET`` is a ``str`` the engine
must use as it is, and must never print. Whatever prints it prints its ``repr``: a dataclass's ``repr``
(``repr(EngineConfig(...))``), a traceback rendered with frame locals (``traceback.TracebackException(...,
capture_locals=True)``, what error trackers such as Sentry capture by default), a debugger, a log renderer.
So the engine keeps these values as :class:`SecretText` (or a subclass), a ``str`` subclass whose ``repr``
is masked while every string operation still sees the real value:

    SecretText("hunter2")                                     -> '***'
    SecretDsn("postgresql://app:hunter2@db/prod")            -> 'postgresql://app:***@db/prod'
    MasterKeysText("1:<base64>,2:<base64>*")                  -> '<master keys: versions 1, 2>'

Values derived from one (``.strip()``, slices, ``split``) are plain ``str`` again: code that parses a secret
does so in a helper that returns before anything is raised, so no frame on a traceback holds the pieces
(see ``MasterKeyring.from_spec``). ``str(value)`` is the real value on purpose (drivers and parsers call it);
the log redaction (:mod:`engine.logs`) shows these values masked whatever the field's name.

:func:`mask_dsn` masks the password of a PostgreSQL DSN in both libpq forms (URI and ``key=value``), as
https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING describes them.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "MasterKeysText", "SecretDsn", "SecretText", "mask_dsn"]

REDACTED = "***"

# libpq keyword form: password=value, password = 'quoted value' (single quotes, backslash escapes)
_KEYWORD_PASSWORD = re.compile(r"(?i)(?<![\w.-])((?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']+)")
# URI query parameters that carry a password (libpq accepts every keyword as a query parameter)
_QUERY_PASSWORD = re.compile(r"(?i)(^|&)((?:ssl)?password=)[^&]*")


class SecretText(str):
    """A ``str`` whose ``repr`` is a masked form (``'***'`` here; subclasses show more).

    Equality, hashing, slicing and every other ``str`` behaviour are the real value's. Pickling keeps the
    class, so a copy made for another process stays masked.
    """

    __slots__ = ()

    def masked(self) -> str:
        """What may be shown instead of the value."""
        return REDACTED

    def __repr__(self) -> str:
        return repr(self.masked())


class SecretDsn(SecretText):
    """A PostgreSQL DSN; shown with its password masked (host, port, user and database stay visible)."""

    __slots__ = ()

    def masked(self) -> str:
        return mask_dsn(str(self))


class MasterKeysText(SecretText):
    """An ``ENGINE_MASTER_KEYS`` spec (``"1:<base64>,2:<base64>*"``); shown as its versions only, as
    ``MasterKeyring``'s own ``repr`` does."""

    __slots__ = ()

    def masked(self) -> str:
        versions = []
        for entry in str(self).split(","):
            version = entry.partition(":")[0].strip()
            if entry.strip():
                versions.append(version if version.isascii() and version.isdigit() else "?")
        return f"<master keys: versions {', '.join(versions) or 'none'}>"


def mask_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***``: the URI form's ``user:password@`` and ``?password=``,
    and the keyword form's ``password=...``. A URI that does not parse is masked whole (fail closed)."""
    text = str(dsn)
    if "://" not in text:
        return _KEYWORD_PASSWORD.sub(lambda m: m.group(1) + REDACTED, text)
    try:
        parts = urlsplit(text)
    except ValueError:
        return REDACTED
    userinfo, at, hostinfo = parts.netloc.rpartition(
        "@"
    )  # the last "@" ends the userinfo, as urllib reads it
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{hostinfo}"
    query = _QUERY_PASSWORD.sub(lambda m: m.group(1) + m.group(2) + REDACTED, parts.query)
    if netloc == parts.netloc and query == parts.query:
        return text  # no password (urlunsplit would also drop the "//" of an empty authority)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
