"""PostgreSQL access: the pool, named SQL queries, LISTEN, and the one place asyncpg errors are translated.

This is the only module that imports asyncpg. Everything else speaks in named queries
(``await conn.fetch("claim_jobs", ...)``) whose SQL lives in ``engine/*.sql`` files, in blocks::

    -- name_of_query --
    -- One line saying what it does.
    SELECT ...;

Errors: every asyncpg/OS error raised while talking to the server becomes :class:`errors.StorageError`
(:class:`UniqueViolation` for unique-constraint conflicts, carrying the constraint name) raised ``from None``,
because driver errors can carry query arguments (ciphertexts, fingerprints) in their text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import asyncpg
import structlog

from engine import errors

log = structlog.get_logger("engine.db")

Record = Mapping[str, Any]

_BLOCK = re.compile(r"^--\s*([a-z_][a-z0-9_]*)\s*--\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a SQL file into named blocks. A block starts at ``-- name --`` and runs to the next one.

    Comment lines inside a block are kept (PostgreSQL ignores them); duplicate names are an error.
    """
    queries: dict[str, str] = {}
    matches = list(_BLOCK.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sql = text[match.end() : end].strip()
        name = match.group(1)
        if name in queries:
            raise ValueError(f"duplicate query name {name!r}")
        if not sql or all(line.lstrip().startswith("--") for line in sql.splitlines() if line.strip()):
            raise ValueError(f"query {name!r} has no SQL")
        queries[name] = sql
    return queries


def load_queries(*files: str) -> dict[str, str]:
    """Named queries from SQL files shipped inside the ``engine`` package (paths relative to it, ``/``-separated:
    ``webhooks/webhooks.sql`` is in the ``engine.webhooks`` subpackage)."""
    merged: dict[str, str] = {}
    for name in files:
        text = importlib.resources.files("engine").joinpath(*name.split("/")).read_text(encoding="utf-8")
        for key, sql in parse_queries(text).items():
            if key in merged:
                raise ValueError(f"query {key!r} defined twice ({name})")
            merged[key] = sql
    return merged


def schema_sql() -> str:
    """The whole schema (idempotent), as shipped in the wheel."""
    return importlib.resources.files("engine").joinpath("schema.sql").read_text(encoding="utf-8")


def schema_digest() -> str:
    """SHA-256 of the shipped schema.sql: what ``engine_schema`` records once it is applied."""
    return hashlib.sha256(schema_sql().encode()).hexdigest()


QUERY_FILES = ("queries.sql", "queue.sql", "webhooks/webhooks.sql", "tenants.sql")


class UniqueViolation(errors.StorageError):
    """A unique constraint refused a row; ``constraint`` names it so callers map it to a domain error."""

    def __init__(self, constraint: str) -> None:
        super().__init__(f"unique constraint {constraint} refused the change")
        self.constraint = constraint


class LockNotAvailable(errors.StorageError):
    """A row or table lock was not granted within the transaction's ``lock_timeout`` (SQLSTATE 55P03)."""

    def __init__(self) -> None:
        super().__init__("a lock was not granted in time (lock_timeout)")


def _translate(exc: BaseException) -> errors.StorageError:
    if isinstance(exc, asyncpg.UniqueViolationError):
        return UniqueViolation(exc.constraint_name or "unknown")
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return LockNotAvailable()
    if isinstance(exc, asyncpg.PostgresError):
        # sqlstate and class only: the message may quote values of the row
        return errors.StorageError(f"database error {exc.sqlstate} ({type(exc).__name__})")
    return errors.StorageError(f"database unreachable ({type(exc).__name__})")


_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # not an InterfaceError: a pooled connection still reading a server's shutdown message raises this
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)


@contextlib.contextmanager
def translated() -> Any:
    """Translate driver errors raised inside the block (the one choke point)."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        raise _translate(exc) from None


class Conn:
    """One connection (possibly inside a transaction) that runs named queries."""

    __slots__ = ("_conn", "_queries")

    def __init__(self, conn: Any, queries: Mapping[str, str]) -> None:
        self._conn = conn
        self._queries = queries

    async def fetch(self, name: str, *args: Any) -> list[Record]:
        with translated():
            rows: list[Record] = await self._conn.fetch(self._queries[name], *args)
            return rows

    async def fetchrow(self, name: str, *args: Any) -> Record | None:
        with translated():
            row: Record | None = await self._conn.fetchrow(self._queries[name], *args)
            return row

    async def fetchval(self, name: str, *args: Any) -> Any:
        with translated():
            return await self._conn.fetchval(self._queries[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        with translated():
            status: str = await self._conn.execute(self._queries[name], *args)
            return status

    async def executemany(self, name: str, args: Sequence[Sequence[Any]]) -> None:
        with translated():
            await self._conn.executemany(self._queries[name], args)

    async def execute_script(self, sql: str) -> None:
        """Run literal SQL (schema application, tests). Never built from user input."""
        with translated():
            await self._conn.execute(sql)

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[Conn]:
        with translated():
            async with self._conn.transaction():
                yield self


async def _keep_session(conn: Any) -> None:
    """Pool release without the reset query (``UNLISTEN *; RESET ALL; ...``: one more round trip per release,
    about 6 % of a busy engine's CPU in a py-spy profile). Safe because pool connections carry no session
    state: LISTEN happens on dedicated connections, nothing runs SET, and every advisory lock is
    transaction-scoped (``pg_advisory_xact_lock``). asyncpg still rolls back an open transaction first."""


async def _init_connection(conn: Any) -> None:
    # jsonb <-> Python objects, so queries pass dicts and get dicts back
    import json

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """The pool and the named queries. Owns the pool only when it opened it."""

    def __init__(self, pool: Any, *, owns_pool: bool, queries: Mapping[str, str] | None = None) -> None:
        self._pool = pool
        self._owns_pool = owns_pool
        self.queries: Mapping[str, str] = queries if queries is not None else load_queries(*QUERY_FILES)

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> Database:
        with translated():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                reset=_keep_session,
                command_timeout=60,
            )
        return cls(pool, owns_pool=True)

    @classmethod
    def from_pool(cls, pool: Any) -> Database:
        """Use a pool the caller made (and closes). It must have the jsonb codec; see ``init_connection``."""
        return cls(pool, owns_pool=False)

    init_connection = staticmethod(_init_connection)

    @property
    def dsn_kwargs(self) -> Mapping[str, Any]:
        """Connection arguments of the pool, for dedicated connections (LISTEN)."""
        args: Mapping[str, Any] = self._pool._connect_kwargs
        return args

    async def close(self) -> None:
        if self._owns_pool:
            with translated():
                await self._pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        with translated():
            async with self._pool.acquire() as raw:
                yield Conn(raw, self.queries)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        with translated():
            async with self._pool.acquire() as raw, raw.transaction():
                yield Conn(raw, self.queries)

    async def fetch(self, name: str, *args: Any) -> list[Record]:
        with translated():
            rows: list[Record] = await self._pool.fetch(self.queries[name], *args)
            return rows

    async def fetchrow(self, name: str, *args: Any) -> Record | None:
        with translated():
            row: Record | None = await self._pool.fetchrow(self.queries[name], *args)
            return row

    async def fetchval(self, name: str, *args: Any) -> Any:
        with translated():
            return await self._pool.fetchval(self.queries[name], *args)

    async def execute(self, name: str, *args: Any) -> str:
        with translated():
            status: str = await self._pool.execute(self.queries[name], *args)
            return status

    async def apply_schema(self, *, force: bool = False) -> bool:
        """Apply schema.sql (idempotent) unless the database already holds this exact schema; True if applied.

        The DDL takes locks on live tables (SHARE on each, ACCESS EXCLUSIVE on the view it replaces): run at
        every start it deadlocked with running transactions when a worker joined a busy database. So the
        digest of the applied schema is kept and compared first, and again under the advisory lock that
        keeps concurrent starters from racing. ``force`` (``credential-engine migrate``) applies regardless.
        """
        text = schema_sql()
        digest = schema_digest()
        if not force and await self._schema_digest() == digest:
            return False
        async with self.transaction() as conn:
            await conn.execute_script("SELECT pg_advisory_xact_lock(774411)")
            if not force and await self._schema_digest(conn) == digest:
                return False  # another starter applied it while we waited
            await conn.execute_script(text)
            await conn.execute("set_schema_digest", digest)
        return True

    async def _schema_digest(self, conn: Conn | None = None) -> str | None:
        runner: Conn | Database = conn or self
        if not await runner.fetchval("schema_table_exists"):
            return None
        value = await runner.fetchval("schema_digest")
        return str(value) if value is not None else None

    async def ping(self) -> bool:
        try:
            async with self.connection() as conn:
                await conn.execute_script("SELECT 1")
        except errors.StorageError:
            return False
        return True

    async def open_listener(self) -> RawListener:
        """A dedicated connection for LISTEN (never from the pool: it must stay open)."""
        with translated():
            # the DSN is a positional argument of the pool, the rest keyword arguments
            raw = await asyncpg.connect(*self._pool._connect_args, **self.dsn_kwargs)
        return RawListener(raw)


class RawListener:
    """A LISTEN connection. ``add(channel, callback)``; it reports loss through ``on_lost``."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.lost = asyncio.Event()
        raw.add_termination_listener(lambda _conn: self.lost.set())

    async def add(self, channel: str, callback: Callable[[str], None]) -> None:
        def _cb(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        with translated():
            await self._raw.add_listener(channel, _cb)

    async def ping(self) -> None:
        with translated():
            await self._raw.execute("SELECT 1")

    async def close(self) -> None:
        with contextlib.suppress(*_DRIVER_ERRORS):
            await self._raw.close(timeout=2)

    @property
    def closed(self) -> bool:
        return bool(self._raw.is_closed())


async def notify(conn: Conn, channel: str, payload: str) -> None:
    """pg_notify through a named query-less call (channel names are constants, never user input)."""
    with translated():
        await conn._conn.execute("SELECT pg_notify($1, $2)", channel, payload)
