"""PostgreSQL access: the pool, named SQL queries, LISTEN, and the one place asyncpg errors are translated.

This is the only module that imports asyncpg. Everything else speaks in named queries
(``await conn.fetch("claim_jobs", ...)``) whose SQL lives in ``engine/*.sql`` files, in blocks::

    -- name_of_query --
    -- One line saying what it does.
    SELECT ...;

Errors: every asyncpg/OS error raised while talking to the server becomes :class:`errors.StorageError`
(:class:`UniqueViolation` for unique-constraint conflicts, carrying the constraint name) raised ``from None``,
because driver errors can carry query arguments (ciphertexts, fingerprints) in their text.

Every wait is bounded:

- **Pool acquire**: at most ``acquire_timeout`` seconds (``EngineConfig.pool_acquire_timeout``); a starved pool
  raises :class:`PoolExhausted` (a 503 :class:`errors.StorageError` whose ``retry_after`` the REST API sends).
- **Statements**: asyncpg's ``command_timeout`` (``EngineConfig.db_command_timeout``); past it asyncpg cancels
  the statement on the server and the caller gets a :class:`errors.StorageError`. A row-lock wait is a statement.
- **Connecting** (dedicated connections) within ``acquire_timeout``; **closing** the pool within
  ``CLOSE_TIMEOUT``, after which its connections are terminated.

**One pool connection per task.** A task that holds a pool connection (:meth:`Database.transaction` or
:meth:`Database.connection`) and asks the pool for another one raises :class:`errors.PoolReentry` at once:
under load every connection can be held by a task waiting for a second one, and then nothing moves again
(~60 concurrent disconnects of a disabled trading account hung every owner, the workers and
``/readyz``). The holder is recorded in a context variable as the *task* that acquired, not as a flag:
asyncio copies context variables into tasks created inside the block, and such a child task, which does not
hold the connection, may use the pool. (A single statement, ``Database.fetch`` and the like, records no
holder: none of the caller's code runs while the driver holds that connection, only the jsonb codec, which
never touches the pool.) The check is one ``ContextVar.get`` per acquire, so it is always on (tests,
development and production alike). What it cannot see: a holder *awaiting* a child task that waits
for the pool (``asyncio.wait_for`` and ``gather`` run coroutines in tasks of their own); the acquire timeout
ends such a wait with :class:`PoolExhausted` instead of a hang.

**Poolers** (README "Connection poolers"). Through a *transaction* pooler (PgBouncer ``pool_mode =
transaction``) consecutive transactions of one client run on different server connections, so the engine keeps
no session state: every advisory lock is transaction-scoped, the queue's claim sets ``enable_sort`` only
while its function runs (``queue_claim``'s ``SET`` clause, restored when it returns), and
``statement_cache_size=0`` (``EngineConfig.db_pooler``) makes asyncpg use unnamed statements, parsed and run
in one round trip, instead of named prepared statements that live on one server connection (with the cache
on, SQLSTATE 26000 "prepared statement does not exist" and 42P05 "already exists" follow; the error then says
so). LISTEN needs a session of its own: ``listen_dsn`` (a direct DSN)
serves the LISTEN connections, and :meth:`Database.check_listener` finds a LISTEN that hears nothing (it
NOTIFYs itself through the pool), warns once and says why; polling carries on either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import importlib.resources
import re
import secrets
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


QUERY_FILES = (
    "queries.sql",
    "queue/queue.sql",
    "webhooks/webhooks.sql",
    "bounds/tenants.sql",
    "bounds/budgets.sql",
    "bounds/retention.sql",
    "live/live.sql",
    "broker/broker.sql",
)

DEFAULT_ACQUIRE_TIMEOUT = 10.0  # seconds a task waits for a pool connection before PoolExhausted
DEFAULT_COMMAND_TIMEOUT = 60.0  # seconds per statement (asyncpg command_timeout), row-lock waits included
DEFAULT_STATEMENT_CACHE_SIZE = 100  # asyncpg's own default; 0 through a transaction pooler
LISTEN_CHECK_TIMEOUT = 5.0  # seconds a LISTEN connection has to hear the NOTIFY the engine sends itself
LISTEN_DEAF_WARNING = (
    "LISTEN through a transaction pooler receives nothing; "
    "set ENGINE_LISTEN_DATABASE_URL to a direct connection"
)
# SQLSTATEs of named prepared statements lost or doubled by a transaction pooler, and the driver's advice
_POOLER_SQLSTATES = frozenset({"26000", "42P05"})
_POOLER_HINT = (
    "a transaction pooler (PgBouncer pool_mode=transaction) is in front of the server: the driver's hint is "
    "to use statement_cache_size=0; set ENGINE_DB_POOLER=transaction (or ENGINE_DB_STATEMENT_CACHE_SIZE=0)"
)
ATTEMPT_LOST_SQLSTATE = "CE409"  # schema.sql's ce_attempt_lost(): see AttemptLost
CLOSE_TIMEOUT = 10.0  # seconds close() waits for connections in use before terminating them
STATEMENT_TIMED_OUT = "database statement timed out"  # asyncpg's command_timeout ran out

# the task that holds a pool connection in this context (see the module docstring), None when none does
_HOLDER: contextvars.ContextVar[asyncio.Task[Any] | None] = contextvars.ContextVar(
    "ce_pool_holder", default=None
)


class UniqueViolation(errors.StorageError):
    """A unique constraint refused a row; ``constraint`` names it so callers map it to a domain error."""

    def __init__(self, constraint: str) -> None:
        super().__init__(f"unique constraint {constraint} refused the change")
        self.constraint = constraint


class LockNotAvailable(errors.StorageError):
    """A row or table lock was not granted within the transaction's ``lock_timeout`` (SQLSTATE 55P03)."""

    def __init__(self) -> None:
        super().__init__("a lock was not granted in time (lock_timeout)")


class AttemptLost(errors.StorageError):
    """A statement that wrote for a job attempt found that the attempt no longer owns its job (SQLSTATE
    ``CE409``, raised by ``ce_attempt_lost()``, schema.sql): the statement, and all it wrote, was undone. The
    caller turns it into the queue's ``StaleAttempt``."""

    def __init__(self) -> None:
        super().__init__("the job attempt no longer owns its job; the statement was undone")


class PoolExhausted(errors.StorageError):
    """No pool connection came free within the acquire timeout (the pool is exhausted). A 503 StorageError;
    ``retry_after`` (whole seconds) is what the REST API's ``Retry-After`` header says."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"database pool exhausted: no connection came free within {timeout:g} s")
        self.retry_after = max(1, round(timeout))


def holds_pool_connection() -> bool:
    """Whether the current task holds a pool connection (an open transaction or ``Database.connection``)."""
    holder = _HOLDER.get()
    return holder is not None and holder is asyncio.current_task()


def refuse_second_connection() -> None:
    """Raise :class:`errors.PoolReentry` when the current task holds a pool connection."""
    if holds_pool_connection():
        raise errors.PoolReentry(
            "this task holds a pool connection (an open transaction) and asked the pool for another one; "
            "use the connection it holds"
        )


def _translate(exc: BaseException) -> errors.StorageError:
    if isinstance(exc, asyncpg.UniqueViolationError):
        return UniqueViolation(exc.constraint_name or "unknown")
    if isinstance(exc, asyncpg.LockNotAvailableError):
        return LockNotAvailable()
    if isinstance(exc, asyncpg.PostgresError) and exc.sqlstate == ATTEMPT_LOST_SQLSTATE:
        return AttemptLost()
    if isinstance(exc, asyncpg.PostgresError):
        # sqlstate and class only: the message may quote values of the row
        text = f"database error {exc.sqlstate} ({type(exc).__name__})"
        if exc.sqlstate in _POOLER_SQLSTATES:  # the driver's hint, as a fixed text: it names no value
            text += f": {_POOLER_HINT}"
        return errors.StorageError(text)
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


def _raise_statement_failure(exc: BaseException) -> None:
    """Raise the typed error of a statement's failure ``exc`` (a TimeoutError, an OSError, is asyncpg's
    ``command_timeout`` and is said so; driver errors are translated); return when ``exc`` is not the driver's
    (the caller re-raises it as it is)."""
    if isinstance(exc, TimeoutError):
        raise errors.StorageError(STATEMENT_TIMED_OUT) from None
    if isinstance(exc, _DRIVER_ERRORS):
        raise _translate(exc) from None


@contextlib.contextmanager
def _statement() -> Any:
    """:func:`translated` for one statement (:func:`_raise_statement_failure`). Only around the driver's own
    calls: the body of a transaction or connection block is the caller's code, whose exceptions pass through as
    they are (the ``Conn`` methods translate their own)."""
    try:
        yield
    except Exception as exc:
        _raise_statement_failure(exc)
        raise


class Conn:
    """One connection (possibly inside a transaction) that runs named queries."""

    __slots__ = ("_conn", "_queries")

    def __init__(self, conn: Any, queries: Mapping[str, str]) -> None:
        self._conn = conn
        self._queries = queries

    # the statement methods translate in a plain try (_run): they run for every statement, and a
    # generator-based context manager costs more than the try it wraps

    async def _run(self, method: str, name: str, args: tuple[Any, ...]) -> Any:
        try:
            return await getattr(self._conn, method)(self._queries[name], *args)
        except Exception as exc:
            _raise_statement_failure(exc)
            raise

    async def fetch(self, name: str, *args: Any) -> list[Record]:
        rows: list[Record] = await self._run("fetch", name, args)
        return rows

    async def fetchrow(self, name: str, *args: Any) -> Record | None:
        row: Record | None = await self._run("fetchrow", name, args)
        return row

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self._run("fetchval", name, args)

    async def execute(self, name: str, *args: Any) -> str:
        status: str = await self._run("execute", name, args)
        return status

    async def executemany(self, name: str, args: Sequence[Sequence[Any]]) -> None:
        with _statement():
            await self._conn.executemany(self._queries[name], args)

    async def execute_script(self, sql: str) -> None:
        """Run literal SQL (schema application, tests). Never built from user input."""
        with _statement():
            await self._conn.execute(sql)

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[Conn]:
        with translated():
            async with self._conn.transaction():
                yield self


async def _keep_session(conn: Any) -> None:
    """Pool release without the reset query (``UNLISTEN *; RESET ALL; ...``: one more round trip per release,
    about 6 % of a busy engine's CPU in a py-spy profile). Safe because pool connections carry no session
    state: LISTEN happens on dedicated connections, nothing runs a session SET (only ``SET LOCAL``), and every
    advisory lock is transaction-scoped (``pg_advisory_xact_lock``). asyncpg still rolls back an open
    transaction first. The same holds through a transaction pooler (module docstring)."""


async def _init_connection(conn: Any) -> None:
    # jsonb <-> Python objects, so queries pass dicts and get dicts back
    import json

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """The pool and the named queries. Owns the pool only when it opened it.

    Every pool acquire waits at most ``acquire_timeout`` seconds (:class:`PoolExhausted` past it) and refuses,
    at once, a task that already holds a pool connection (:class:`errors.PoolReentry`; module docstring).
    ``listen_dsn`` (a direct DSN to the same database) serves the LISTEN connections; None: the pool's DSN.
    """

    def __init__(
        self,
        pool: Any,
        *,
        owns_pool: bool,
        queries: Mapping[str, str] | None = None,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        listen_dsn: str | None = None,
    ) -> None:
        if not acquire_timeout > 0:
            raise errors.ConfigurationError("acquire_timeout must be positive", field="pool_acquire_timeout")
        self._pool = pool
        self._owns_pool = owns_pool
        self.acquire_timeout = float(acquire_timeout)
        self.queries: Mapping[str, str] = queries if queries is not None else load_queries(*QUERY_FILES)
        self._listen_dsn = listen_dsn
        # whether a LISTEN connection heard the engine's own NOTIFY: None until checked (check_listener)
        self.listen_works: bool | None = None
        self._deaf_warned = False

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        statement_cache_size: int = DEFAULT_STATEMENT_CACHE_SIZE,
        listen_dsn: str | None = None,
    ) -> Database:
        """Open a pool. ``statement_cache_size=0`` through a transaction pooler (module docstring); the
        dedicated connections (:meth:`connect_dedicated`) use the same setting."""
        with translated():
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                init=_init_connection,
                reset=_keep_session,
                command_timeout=command_timeout,
                statement_cache_size=statement_cache_size,
            )
        return cls(pool, owns_pool=True, acquire_timeout=acquire_timeout, listen_dsn=listen_dsn)

    @classmethod
    def from_pool(
        cls, pool: Any, *, acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT, listen_dsn: str | None = None
    ) -> Database:
        """Use a pool the caller made (and closes). It must have the jsonb codec; see ``init_connection``."""
        return cls(pool, owns_pool=False, acquire_timeout=acquire_timeout, listen_dsn=listen_dsn)

    init_connection = staticmethod(_init_connection)

    @property
    def dsn_kwargs(self) -> Mapping[str, Any]:
        """Connection arguments of the pool, for dedicated connections (LISTEN, the queue's own)."""
        args: Mapping[str, Any] = self._pool._connect_kwargs
        return args

    async def close(self) -> None:
        """Close the pool (when this Database opened it), waiting at most ``CLOSE_TIMEOUT`` seconds for the
        connections in use to come back; past that asyncpg terminates them."""
        if not self._owns_pool:
            return
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
        except TimeoutError:  # asyncpg terminated the pool when the wait cancelled close()
            log.warning("db_pool_close_timeout", seconds=CLOSE_TIMEOUT)
            self._pool.terminate()
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from None

    async def _acquire(self) -> Any:
        """A raw pool connection: refused when this task holds one, bounded by acquire_timeout. The caller
        gives it back with :meth:`_release`."""
        refuse_second_connection()
        try:
            # asyncio.timeout, not acquire(timeout=...): the driver's wait_for runs each acquire in a task of
            # its own (Python 3.11), a task per statement on the hot path
            async with asyncio.timeout(self.acquire_timeout):
                return await self._pool.acquire()
        except TimeoutError:  # before the driver errors: TimeoutError is an OSError
            raise PoolExhausted(self.acquire_timeout) from None
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from None

    async def _release(self, raw: Any, *, settled: bool = False) -> None:
        """Give ``raw`` back to the pool; the release's own wait (a rollback left open, a cancelled statement
        being cancelled on the server) keeps the acquire's bound. ``settled``: a statement outside any
        transaction has just completed on ``raw``, so the release has nothing to wait for (no rollback, no
        cancellation) and sets no timer; should a transaction be open after all, the bound applies."""
        timeout = None if settled and not raw.is_in_transaction() else self.acquire_timeout
        try:
            await self._pool.release(raw, timeout=timeout)
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from None

    @contextlib.asynccontextmanager
    async def _hold(self) -> AsyncIterator[Any]:
        """A raw pool connection for the block (this task is its holder: module docstring)."""
        raw = await self._acquire()
        token = _HOLDER.set(asyncio.current_task())
        try:
            yield raw
        finally:
            _HOLDER.reset(token)
            await self._release(raw)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """One pool connection, outside a transaction (each statement commits by itself)."""
        async with self._hold() as raw:
            yield Conn(raw, self.queries)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """One pool connection in a transaction: committed when the block ends, rolled back when it raises.

        Inside the block this task may not use the pool (:class:`errors.PoolReentry`): pass the ``Conn``."""
        async with self._hold() as raw:
            tx = raw.transaction()
            with _statement():
                await tx.start()
            try:
                yield Conn(raw, self.queries)
            except BaseException:
                try:
                    with _statement():
                        await tx.rollback()
                except errors.StorageError:
                    raw.terminate()  # state unknown: never hand it to the next user; the pool opens another
                except asyncio.CancelledError:
                    raw.terminate()
                    raise
                raise
            with _statement():
                await tx.commit()

    # One statement on a pool connection of its own (it commits by itself): _single, a plain try rather than
    # _hold() and _statement(): two generator-based context managers per statement cost more than the
    # statement's own Python. The task is not recorded as the connection's holder: no code of its own runs
    # while the driver works, so it cannot ask the pool for a second connection meanwhile.

    async def _single(self, method: str, name: str, args: tuple[Any, ...]) -> Any:
        sql = self.queries[name]
        raw = await self._acquire()
        try:
            result = await getattr(raw, method)(sql, *args)
        except BaseException as exc:
            await self._release(raw)
            _raise_statement_failure(exc)
            raise
        await self._release(raw, settled=True)
        return result

    async def fetch(self, name: str, *args: Any) -> list[Record]:
        rows: list[Record] = await self._single("fetch", name, args)
        return rows

    async def fetchrow(self, name: str, *args: Any) -> Record | None:
        row: Record | None = await self._single("fetchrow", name, args)
        return row

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self._single("fetchval", name, args)

    async def execute(self, name: str, *args: Any) -> str:
        status: str = await self._single("execute", name, args)
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
        """Whether the database answers a query, a pool connection included (False on a starved pool too)."""
        try:
            async with self.connection() as conn:
                await conn.execute("ping")
        except errors.StorageError:
            return False
        return True

    async def connect_dedicated(self, *, application_name: str | None = None, listen: bool = False) -> Any:
        """A new raw connection outside the pool (LISTEN, :class:`DedicatedConnection`), with the pool's
        arguments and codecs; connecting waits at most ``acquire_timeout`` seconds. ``application_name``
        names it in ``pg_stat_activity``. ``listen``: to the LISTEN DSN when there is one."""
        kwargs = {**self.dsn_kwargs, "timeout": self.acquire_timeout}
        if application_name:
            kwargs["server_settings"] = {
                **(kwargs.get("server_settings") or {}),
                "application_name": application_name,
            }
        try:
            # the DSN is a positional argument of the pool, the rest keyword arguments
            args = (self._listen_dsn,) if listen and self._listen_dsn else tuple(self._pool._connect_args)
            raw = await asyncpg.connect(*args, **kwargs)
        except TimeoutError:  # before the driver errors: TimeoutError is an OSError
            raise errors.StorageError("database unreachable (connect timed out)") from None
        except _DRIVER_ERRORS as exc:
            raise _translate(exc) from None
        try:
            with _statement():
                await _init_connection(raw)
        except BaseException:
            raw.terminate()
            raise
        return raw

    async def open_listener(self, *, application_name: str | None = None) -> RawListener:
        """A dedicated connection for LISTEN (never from the pool: it must stay open), to the LISTEN DSN when
        there is one."""
        return RawListener(await self.connect_dedicated(application_name=application_name, listen=True))

    async def check_listener(
        self, listener: RawListener, *, within: float = LISTEN_CHECK_TIMEOUT
    ) -> bool | None:
        """Whether ``listener`` hears a NOTIFY sent through the pool: it LISTENs on a private channel, the pool
        NOTIFYs it, and it must arrive within ``within`` seconds. A transaction pooler forwards LISTEN to
        whichever server connection is free and then moves on, so nothing arrives: that is warned once per
        Database, with the reason (:data:`LISTEN_DEAF_WARNING`); the callers keep polling either way.
        Records the answer in :attr:`listen_works`. None, and nothing recorded, when the pool could not send
        the NOTIFY (a starved pool must not keep a LISTEN connection from starting: the next one checks).
        An error of the LISTEN connection itself raises :class:`errors.StorageError`."""
        channel = f"ce_listen_check_{secrets.token_hex(8)}"
        heard = asyncio.Event()
        await listener.add(channel, lambda _payload: heard.set())
        try:
            try:
                async with self.connection() as conn:
                    await notify(conn, channel, "")
            except errors.StorageError as exc:
                log.info("listen_check_skipped", error=str(exc))
                return None
            try:
                async with asyncio.timeout(within):
                    await heard.wait()
                works = True
            except TimeoutError:
                works = False
        finally:
            await listener.remove(channel)
        self.listen_works = works
        if not works and not self._deaf_warned:
            self._deaf_warned = True
            log.warning(
                "listen_receives_nothing",
                reason=LISTEN_DEAF_WARNING,
                waited_seconds=within,
                listen_dsn_set=self._listen_dsn is not None,
            )
        return works


class DedicatedConnection:
    """A connection of its own, outside the pool, for a task that must never wait behind the pool: the job
    queue's fetcher, flusher and heartbeat (API load must not starve job leases).

    Opened on first use and opened afresh when lost: a session whose block raises drops the connection (it
    may be broken, or cancelled mid-statement), and the next session connects again. It carries no session
    state (no session SET: through a transaction pooler that would reach other clients). One user at a time
    (an asyncio lock). ``name`` is its ``application_name`` in ``pg_stat_activity``.
    """

    def __init__(self, db: Database, name: str) -> None:
        self._db = db
        self.name = name
        self._raw: Any = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.opened = 0  # connections opened so far: 1 + reconnects

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Conn]:
        async with self._lock:
            if self._closed:
                raise errors.EngineClosed(f"the {self.name} connection is closed")
            conn = await self._open()
            try:
                yield conn
            except BaseException:
                self._drop()
                raise

    async def _open(self) -> Conn:
        if self._raw is not None and not self._raw.is_closed():
            return Conn(self._raw, self._db.queries)
        self._drop()
        raw = await self._db.connect_dedicated(application_name=self.name)
        self._raw = raw
        self.opened += 1
        return Conn(raw, self._db.queries)

    def _drop(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None and not raw.is_closed():
            raw.terminate()

    @property
    def backend_pid(self) -> int | None:
        """The server process of the open connection (None when none is open): for tests and diagnostics."""
        return None if self._raw is None or self._raw.is_closed() else int(self._raw.get_server_pid())

    async def close(self) -> None:
        """Close for good (idempotent); a later session raises :class:`errors.EngineClosed`."""
        self._closed = True
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(*_DRIVER_ERRORS, TimeoutError):
                await raw.close(timeout=2)


class RawListener:
    """A LISTEN connection. ``add(channel, callback)``; it reports loss through ``on_lost``."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.lost = asyncio.Event()
        self._callbacks: dict[str, Callable[..., None]] = {}
        # one statement at a time on the connection: a liveness check may run while a channel is added
        self._busy = asyncio.Lock()
        raw.add_termination_listener(lambda _conn: self.lost.set())

    async def add(self, channel: str, callback: Callable[[str], None]) -> None:
        def _cb(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            callback(payload)

        async with self._busy:
            with _statement():
                await self._raw.add_listener(channel, _cb)
        self._callbacks[channel] = _cb

    async def remove(self, channel: str) -> None:
        """UNLISTEN ``channel`` (a no-op for a channel not added, or on a lost connection)."""
        cb = self._callbacks.pop(channel, None)
        if cb is None or self._raw.is_closed():
            return
        async with self._busy:
            with _statement():
                await self._raw.remove_listener(channel, cb)

    async def ping(self) -> None:
        async with self._busy:
            with _statement():
                await self._raw.execute("SELECT 1")

    def terminate(self) -> None:
        """Drop the connection at once, without the closing handshake (its peer stopped answering)."""
        self._raw.terminate()

    async def close(self) -> None:
        with contextlib.suppress(*_DRIVER_ERRORS, TimeoutError):
            await self._raw.close(timeout=2)

    @property
    def closed(self) -> bool:
        return bool(self._raw.is_closed())


async def notify(conn: Conn, channel: str, payload: str) -> None:
    """pg_notify through a named query-less call (channel names are constants, never user input)."""
    with _statement():
        await conn._conn.execute("SELECT pg_notify($1, $2)", channel, payload)
