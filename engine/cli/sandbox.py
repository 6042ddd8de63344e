"""Sandbox mode: the exchange simulator (with ready test accounts), the engine and the API in one process.

``credential-engine serve --sandbox`` (``make run``) and ``python -m engine.cli.demo`` use it::

    async with sandbox.running(EngineConfig.from_env(), port=8080) as live:
        print(sandbox.banner(live))     # URL, a development token, test keys, curl examples

What it sets up:

* a :class:`~venues.simulator.Simulator` on loopback with ``seed_demo_accounts()``, every venue's base URL
  pointed at it (nothing leaves the machine);
* the database: the configured DSN as is, or (zero-config) a database of its own on the embedded server,
  dropped and made again at each start, because the simulator's keys are new each time;
* a JWT secret (``ENGINE_API_JWT_SECRET`` or a fresh random one) and a token for ``SANDBOX_OWNER``;
* ``sandbox.json`` (0600) in the data folder while it runs: URL, token and simulator admin URL, so that
  ``make demo`` can drive a running sandbox. Removed at exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engine import db as dbmod
from engine import environment, errors
from engine.api import ApiConfig, ApiServer, auth
from engine.config import EngineConfig
from engine.embedded import default_data_dir, start_embedded
from engine.engine import CredentialEngine
from engine.environment import settings_view
from venues.base import Venue
from venues.simulator import Simulator, TestKey

SANDBOX_OWNER = "sandbox-user"
SANDBOX_DATABASE = "credential_engine_sandbox"
TOKEN_TTL = 7 * 86_400.0  # a development token for a week of tinkering
INFO_FILE = "sandbox.json"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Live:
    """A running sandbox."""

    url: str
    owner: str
    token: str = field(repr=False)  # a bearer token: a credential, never in a repr
    simulator: Simulator
    keys: tuple[TestKey, ...]
    engine: CredentialEngine
    server: ApiServer
    info_path: Path | None

    @property
    def admin_url(self) -> str:
        return self.simulator.admin_url


def with_database(dsn: str, database: str) -> str:
    """The same server, another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def fresh_database(server_dsn: str, database: str) -> str:
    """Drop and create ``database`` on the server of ``server_dsn``; its DSN."""
    if not _DB_NAME.match(database):
        raise errors.ConfigurationError("sandbox database names are lower-case identifiers", field="database")
    admin = await dbmod.Database.connect(server_dsn, min_size=1, max_size=1)
    try:
        async with admin.connection() as conn:
            # identifiers cannot be bind parameters; the name matched _DB_NAME above
            await conn.execute_script(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            await conn.execute_script(f"CREATE DATABASE {database}")
    finally:
        await admin.close()
    return with_database(server_dsn, database)


@contextlib.asynccontextmanager
async def running(
    base: EngineConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    database: str = SANDBOX_DATABASE,
    owner: str = SANDBOX_OWNER,
    jwt_secret: str | None = None,
    write_info: bool = True,
) -> AsyncIterator[Live]:
    """Simulator, engine (with workers) and API, stopped in reverse order at exit."""
    given = environment.setting(ApiConfig, ("jwt_secret",), settings_view(os.environ))  # or ..._FILE
    secret = jwt_secret or given or auth.generate_secret()
    api_config = ApiConfig(jwt_secret=secret, host=host, port=port)
    data_dir = base.data_dir or default_data_dir()
    async with Simulator() as sim:
        keys = tuple(sim.seed_demo_accounts())
        dsn = base.database_url or await fresh_database(await start_embedded(data_dir), database)
        config = dataclasses.replace(
            base,
            database_url=dsn,
            data_dir=data_dir,
            venue_urls=dict(sim.urls),
            allow_private_webhook_urls=True,
            workers=base.workers or 4,
        )
        async with CredentialEngine(config) as eng:
            server = ApiServer(eng, api_config)
            await server.start()
            info_path = data_dir / INFO_FILE if write_info else None
            live = Live(
                url=server.url,
                owner=owner,
                token=auth.mint_token(secret, owner, ttl=TOKEN_TTL),
                simulator=sim,
                keys=keys,
                engine=eng,
                server=server,
                info_path=info_path,
            )
            try:
                if info_path is not None:
                    _write_info(info_path, live)
                yield live
            finally:
                if info_path is not None:
                    info_path.unlink(missing_ok=True)
                await server.close()


def _write_info(path: Path, live: Live) -> None:
    document = {
        "url": live.url,
        "owner": live.owner,
        "token": live.token,
        "admin": live.admin_url,
        "pid": os.getpid(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(document, out)


def read_info(data_dir: Path | None = None) -> dict[str, Any] | None:
    """What a running sandbox wrote (None if there is none or its process is gone)."""
    path = (data_dir or default_data_dir()) / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)  # signal 0: is it alive?
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info, dict) else None


# ---- what `make run` prints ---------------------------------------------------------------------------------


def _first(keys: tuple[TestKey, ...], venue: Venue, label: str = "demo-good") -> TestKey:
    return next(k for k in keys if k.venue is venue and k.label == label)


def _curl(url: str, path: str, body: dict[str, Any] | None = None) -> str:
    method = "-X POST " if body is not None else ""
    lines = [f"curl -s {method}{shlex.quote(url + path)} \\", '  -H "Authorization: Bearer $TOKEN"']
    if body is not None:
        lines[-1] += " \\"
        lines.append('  -H "Content-Type: application/json" \\')
        lines.append(f"  -d {shlex.quote(json.dumps(body))}")
    return "\n".join(lines)


def banner(live: Live) -> str:
    """The URL, token, test keys and copy-paste curl examples for the flows of docs/api-dialect.md §3."""
    out = [
        "credential-engine sandbox is running (Ctrl-C stops it)",
        "",
        f"  API        {live.url}   (OpenAPI {live.url}/openapi.json, metrics {live.url}/metrics)",
        f"  owner      {live.owner}",
        f"  token      {live.token}",
        f"  simulator  admin {live.admin_url}  (POST /keys makes more test keys)",
        "",
        "Test keys (simulator accounts; the Coinbase CDP secrets are PEM keys, shown JSON-escaped):",
    ]
    for key in live.keys:
        parts = [
            f"  {key.venue.value:<9}{key.label or '':<15}apiKey={key.api_key}",
            f"apiSecret={json.dumps(key.api_secret)}",
        ]
        if key.api_passphrase:
            parts.append(f"apiPassphrase={key.api_passphrase}")
        out.append("  ".join(parts))
    binance = _first(live.keys, Venue.BINANCE)
    okx = _first(live.keys, Venue.OKX)
    coinbase = next(k for k in live.keys if k.venue is Venue.COINBASE and k.label == "demo-exchange")
    out += [
        "",
        "Try (docs/api-dialect.md §3):",
        f"  export TOKEN={live.token}",
        "",
        "# create a credential (docs/api-dialect.md §4)",
        _curl(
            live.url,
            "/api/v3/credential/create",
            {
                "venue": "BINANCE",
                "apiKey": binance.api_key,
                "apiSecret": binance.api_secret,
                "name": "My Binance API Key",
            },
        ),
        "",
        "# OKX needs its passphrase (docs/api-dialect.md §4)",
        _curl(
            live.url,
            "/api/v3/credential/create",
            {
                "venue": "OKX",
                "credentialType": "EXCHANGE",
                "apiKey": okx.api_key,
                "apiSecret": okx.api_secret,
                "apiPassphrase": okx.api_passphrase,
                "nickname": "My OKX API",
            },
        ),
        "",
        "# list verified credentials (docs/api-dialect.md §6)",
        _curl(live.url, "/api/v3/credential/list?credentialStatus=VERIFIED"),
        "",
        "# connect a Coinbase account with its keys in one call (docs/api-dialect.md §8)",
        _curl(
            live.url,
            "/api/v3/tradingAccount/connect",
            {
                "venue": "COINBASE",
                "apiKey": coinbase.api_key,
                "apiSecret": coinbase.api_secret,
                "apiPassphrase": coinbase.api_passphrase,
                "name": "My Coinbase Account",
            },
        ),
        "",
        "# then: /api/v3/credential/rotate, /api/v3/credential/revoke, /api/v3/tradingAccount/list (see /openapi.json)",
        "# the whole lifecycle with a webhook receiver: make demo",
    ]
    return "\n".join(out)
