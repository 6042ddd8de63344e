"""A loopback TCP proxy in front of PostgreSQL for the LISTEN liveness tests (no tests here).

It forwards bytes both ways and can be told to *stall* a connection: from then on it reads and drops
everything in both directions, without closing either socket, as a NAT or firewall that lost the mapping, or a
stuck pooler, does. Connections are told apart by the ``application_name`` in their startup message (the
engine names its LISTEN connections ``ce-events-listen`` and ``ce-queue-listen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import parse_qs, urlsplit, urlunsplit

_APP_NAME = re.compile(rb"application_name\x00([^\x00]*)\x00")
HEAD_LIMIT = 8192  # bytes of a connection's first client data searched for the application_name


@dataclass
class Piped:
    """One proxied connection."""

    application_name: str | None = None
    stalled: bool = False
    head: bytes = b""
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class PgProxy:
    """``async with PgProxy(dsn) as proxy``: ``proxy.dsn`` reaches the same database through the proxy."""

    def __init__(self, dsn: str) -> None:
        self._upstream_dsn = dsn
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = (query.get("host") or [parts.hostname or "127.0.0.1"])[0]
        port = (query.get("port") or [str(parts.port or 5432)])[0]
        self._unix: str | None = None
        self._tcp: tuple[str, int] | None = None
        if host.startswith("/"):
            wanted = os.path.join(host, f".s.PGSQL.{port}")
            found = (
                [wanted] if os.path.exists(wanted) else sorted(glob.glob(os.path.join(host, ".s.PGSQL.*")))
            )
            self._unix = next(p for p in found if not p.endswith(".lock"))
        else:
            self._tcp = (host, int(port))
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections: list[Piped] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def dsn(self) -> str:
        parts = urlsplit(self._upstream_dsn)
        user = parts.username or "postgres"
        password = f":{parts.password}" if parts.password else ":"
        query = "&".join(f"{k}={v[0]}" for k, v in parse_qs(parts.query).items() if k not in ("host", "port"))
        return urlunsplit(("postgresql", f"{user}{password}@127.0.0.1:{self.port}", parts.path, query, ""))

    def stall(self, application_name: str) -> int:
        """Stop forwarding (silently, sockets left open) on every connection named ``application_name``."""
        hit = 0
        for piped in self.connections:
            if piped.application_name == application_name and not piped.stalled:
                piped.stalled = True
                hit += 1
        return hit

    def count(self, application_name: str, *, stalled: bool | None = None) -> int:
        return sum(
            1
            for p in self.connections
            if p.application_name == application_name and (stalled is None or p.stalled == stalled)
        )

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix is not None:
            return await asyncio.open_unix_connection(self._unix)
        assert self._tcp is not None
        return await asyncio.open_connection(*self._tcp)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        piped = Piped(writers=[writer])
        self.connections.append(piped)
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError:
            writer.close()
            return
        piped.writers.append(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer, piped, sniff=True),
            self._pump(up_reader, writer, piped, sniff=False),
            return_exceptions=True,
        )
        for w in piped.writers:
            w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, piped: Piped, *, sniff: bool
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                if not piped.stalled:  # a stalled connection never shows its end either
                    writer.close()
                return
            if sniff and piped.application_name is None and len(piped.head) < HEAD_LIMIT:
                piped.head += data
                match = _APP_NAME.search(piped.head)
                if match:
                    piped.application_name = match.group(1).decode()
            if piped.stalled:
                continue  # dropped: the black hole
            writer.write(data)
            await writer.drain()

    async def __aenter__(self) -> PgProxy:
        def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.create_task(self._client(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._server = await asyncio.start_server(spawn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        for piped in self.connections:
            for w in piped.writers:
                w.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
