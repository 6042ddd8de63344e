"""Memory of an engine process: peak RSS with 100,000 stored credentials, 10,000 queued jobs and 1,000 in flight,
and how it moves with the number of credentials stored.

    python -m bench.memory [--stored 0,10000,100000] [--queued 10000] [--in-flight 1000]

The engine under test is its own process (``python -m bench.memory --engine``), so that its RSS is the engine's
alone: ``in_flight`` workers, and every venue's probe is a gate that holds each verification until the process is
told to stop (no exchange answers while we measure). The parent loads credentials straight into the database
(binary COPY) as rows the engine reads like any other: key material sealed by the engine's own vault, fingerprinted
with its HMAC key. ``in_flight + queued + claim batch`` of them are PENDING and get a verify job each; the others are
VERIFIED and idle.

For each level of idle stored credentials (0, 10,000, 100,000 by default; the working set is stored too), a fresh
engine process opens; its RSS is sampled idle, then the jobs are enqueued (one statement) and the RSS is sampled
while ``in_flight`` verifications wait in their probes and ``queued`` jobs wait in the database. The process
reports its own peak (``ru_maxrss``) when it stops. Target: peak under 200 MB, flat in the number of
credentials stored (here: less than 10 % growth from the first level to the last).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
import uuid
from typing import Any

import asyncpg

from bench import common
from engine import jobs
from engine.engine import CredentialEngine
from venues.base import ApiKeys, Permissions, ProbeResult, Venue

CONFIG_ENV = "BENCH_MEMORY_CONFIG"
TARGET_MB = 200.0
FLAT_GROWTH = 0.10  # at most this much more peak RSS at the last level than at the first
SAMPLE_SECONDS = 3.0
SAMPLE_EVERY = 0.05
LOAD_CHUNK = 10_000  # credentials sealed and copied per batch (keeps the parent's own memory small)
WAIT_TIMEOUT = 180.0


# ---- the engine process ------------------------------------------------------------------------------------


class GatedProbe:
    """Every venue's probe in the engine process: verifications wait at one gate; ``waiting`` counts them."""

    def __init__(self, venue: Venue, gate: asyncio.Event, waiting: list[int]) -> None:
        self.venue = venue
        self._gate = gate
        self._waiting = waiting

    def check_keys(self, keys: ApiKeys) -> None:
        return None

    async def probe(self, keys: ApiKeys) -> ProbeResult:
        self._waiting[0] += 1
        try:
            await self._gate.wait()
        finally:
            self._waiting[0] -= 1
        return ProbeResult(
            venue=self.venue,
            venue_account_id="uid-bench",
            permissions=Permissions(read=True, trade=True, ip_restricted=True, ip_allowlist=("127.0.0.1",)),
            identities=("spot",),
        )


async def engine_process() -> None:
    """Open the engine, report idle RSS, report when ``in_flight`` probes wait, stop when stdin closes."""
    spec = json.loads(os.environ[CONFIG_ENV])
    common.quiet_logs(spec.get("log_level", "INFO"))
    gate = asyncio.Event()
    waiting = [0]
    probes = {venue: GatedProbe(venue, gate, waiting) for venue in Venue}
    config = common.engine_config(
        spec["dsn"], workers=int(spec["workers"]), master_keys=spec["master_keys"], shutdown_timeout=1.0
    )

    def say(document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()

    stop = asyncio.create_task(asyncio.to_thread(sys.stdin.read))  # the parent closes our stdin to stop us
    async with CredentialEngine(config, probes=probes):
        say({"ready": True, "rss_mb": common.rss_mb()})
        while not stop.done():
            if waiting[0] >= spec["workers"]:
                say({"in_flight": waiting[0], "rss_mb": common.rss_mb()})
                break
            await asyncio.sleep(0.05)
        await stop
    say({"stopped": True, "peak_rss_mb": common.peak_rss_mb()})


# ---- the parent --------------------------------------------------------------------------------------------


def bench_keys(prefix: str, index: int) -> ApiKeys:
    """Deterministic key material for credential ``index`` (unique per prefix)."""
    digest = hashlib.sha256(f"{prefix}:{index}".encode()).hexdigest()
    return ApiKeys(api_key=f"{prefix}{index:07d}{digest[:24]}", api_secret=digest + digest[:32])


async def load(
    engine: CredentialEngine, dsn: str, prefix: str, start: int, count: int, *, verified: bool, owners: int
) -> list[uuid.UUID]:
    """Store ``count`` credentials (``prefix`` keys from ``start``) in chunks; returns their ids."""
    venues = list(Venue)
    ids: list[uuid.UUID] = []
    for chunk in range(start, start + count, LOAD_CHUNK):
        items = [
            common.BulkCredential(
                uuid.uuid4(),
                f"{prefix}-owner-{i % owners}",
                venues[i % len(venues)],
                bench_keys(prefix, i),
                verified,
            )
            for i in range(chunk, min(chunk + LOAD_CHUNK, start + count))
        ]
        await common.bulk_load(dsn, engine.store, items)
        ids.extend(item.credential_id for item in items)
    return ids


class EngineProcess:
    """The engine process under test, driven over its stdin/stdout."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.phase = "opening"
        self.peaks: dict[str, float] = {}  # highest RSS seen in each phase (sampled all along)
        self._sampler: asyncio.Task[None] | None = None

    async def _sample_forever(self) -> None:
        assert self.proc is not None
        while True:
            try:
                rss = common.rss_mb(self.proc.pid)
            except Exception:  # the process is gone (psutil.NoSuchProcess)
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            await asyncio.sleep(SAMPLE_EVERY / 5)

    async def start(self) -> dict[str, Any]:
        env = common.child_env()
        env[CONFIG_ENV] = json.dumps(self.spec)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.memory",
            "--engine",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=common.REPO_ROOT,
            env=env,
        )
        self._sampler = asyncio.create_task(self._sample_forever(), name="bench-memory-sampler")
        return await self.read()

    async def read(self, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:  # noqa: ASYNC109
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("the engine process ended (see its stderr above)")
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.phase = "stopping"
        self.proc.stdin.close()
        message = await self.read()
        await self.proc.wait()
        if self._sampler is not None:
            self._sampler.cancel()
        return message


async def one_level(
    engine: CredentialEngine,
    watch: asyncpg.Connection,
    spec: dict[str, Any],
    work_ids: list[uuid.UUID],
    stored: int,
    queued: int,
    in_flight: int,
) -> dict[str, Any]:
    child = EngineProcess(spec)
    ready = await child.start()
    child.phase = "idle"
    await asyncio.sleep(1.0)
    payloads = [{"credentialId": str(cid), "version": 1} for cid in work_ids]
    child.phase = "claiming"
    await engine.queue.enqueue_many(jobs.VERIFY, payloads)
    loaded = await child.read()  # every worker waits in a probe
    child.phase = "loaded"
    await asyncio.sleep(SAMPLE_SECONDS)
    waiting = await watch.fetchval(
        "SELECT count(*) FROM queue_jobs WHERE kind = $1 AND state = 'queued'", jobs.VERIFY
    )
    stopped = await child.stop()
    await engine.queue.cancel_queued(kind=jobs.VERIFY)  # the next level starts from an empty queue
    total = int(await watch.fetchval("SELECT count(*) FROM credentials"))
    return {
        "idle_stored": stored,
        "stored_total": total,
        "in_flight": loaded["in_flight"],
        "queued": int(waiting),
        "rss_idle_mb": max(ready["rss_mb"], child.peaks.get("idle", 0.0)),
        "rss_loaded_mb": max(loaded["rss_mb"], child.peaks.get("loaded", 0.0)),
        "rss_by_phase_mb": dict(child.peaks),
        "peak_rss_mb": stopped["peak_rss_mb"],
        "target_in_flight": in_flight,
        "target_queued": queued,
    }


async def run(
    stored: tuple[int, ...] = (0, 10_000, 100_000),
    queued: int = 10_000,
    in_flight: int = 1000,
    log_level: str = "INFO",
) -> dict[str, Any]:
    common.quiet_logs(log_level)
    levels = sorted(stored)
    rows: list[dict[str, Any]] = []
    async with common.bench_database("memory") as db:
        config = common.engine_config(db.dsn, workers=0)
        spec = {
            "dsn": db.dsn,
            "workers": in_flight,
            "master_keys": config.master_keys,
            "log_level": log_level,
        }
        batch = config.claim_batch_size  # claimed into the local buffer on top of the running ones
        watch = await asyncpg.connect(db.dsn)
        try:
            async with CredentialEngine(config) as engine:  # no workers here: loads, enqueues, watches
                loaded = time.perf_counter()
                work_ids = await load(
                    engine, db.dsn, "work", 0, in_flight + batch + queued, verified=False, owners=100
                )
                have = 0
                load_seconds = time.perf_counter() - loaded
                for level in levels:
                    began = time.perf_counter()
                    await load(engine, db.dsn, "idle", have, level - have, verified=True, owners=1000)
                    load_seconds += time.perf_counter() - began
                    have = level
                    rows.append(await one_level(engine, watch, spec, work_ids, level, queued, in_flight))
        finally:
            await watch.close()
    peak = max(r["peak_rss_mb"] for r in rows)
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    last = rows[-1]
    result: dict[str, Any] = {
        "levels": levels,
        "queued": queued,
        "in_flight": in_flight,
        "rows": rows,
        "peak_rss_mb": peak,
        "growth": growth,
        "load_per_second": (in_flight + batch + queued + levels[-1]) / load_seconds if load_seconds else None,
        "ok": peak < TARGET_MB and growth < FLAT_GROWTH and last["in_flight"] >= in_flight,
    }
    result["summary"] = [
        common.figure(
            f"peak RSS, {last['stored_total']:,} stored, {last['queued']:,} queued, {last['in_flight']:,} in flight",
            last["peak_rss_mb"],
            "MB",
            target=f"< {TARGET_MB:.0f}",
            ok=last["peak_rss_mb"] < TARGET_MB,
        ),
        *[
            common.figure(f"peak RSS, {r['stored_total']:,} stored (loaded)", r["peak_rss_mb"], "MB")
            for r in rows[:-1]
        ],
        common.figure(
            f"peak RSS growth {rows[0]['stored_total']:,} -> {last['stored_total']:,} stored",
            growth * 100,
            "%",
            target=f"< {FLAT_GROWTH * 100:.0f}",
            ok=growth < FLAT_GROWTH,
        ),
        common.figure("idle RSS (engine open, no jobs)", last["rss_idle_mb"], "MB"),
    ]
    return result


def render(result: dict[str, Any]) -> str:
    head = (
        f"memory: engine process with {result['in_flight']:,} verifications in flight and {result['queued']:,} "
        f"jobs queued, by number of credentials stored"
    )
    rows = [
        [
            r["stored_total"],
            r["in_flight"],
            r["queued"],
            r["rss_idle_mb"],
            r["rss_loaded_mb"],
            r["peak_rss_mb"],
        ]
        for r in result["rows"]
    ]
    body = common.table(
        ["stored", "in flight", "queued", "RSS idle MB", "RSS loaded MB", "peak RSS MB"], rows, right=range(6)
    )
    verdict = (
        f"peak {result['peak_rss_mb']:.1f} MB (target < {TARGET_MB:.0f}), growth {result['growth'] * 100:+.1f} % "
        f"(target < {FLAT_GROWTH * 100:.0f} %): {'ok' if result['ok'] else 'MISSED'}"
    )
    return "\n".join([head, body, verdict])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stored", default="0,10000,100000", help="idle stored credentials per level")
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--json", help="also write the full result to this file")
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)  # the process under test
    args = parser.parse_args(argv)
    if args.engine:
        asyncio.run(engine_process())
        return 0
    levels = tuple(int(s) for s in args.stored.split(","))
    result = asyncio.run(run(levels, args.queued, args.in_flight, args.log_level))
    print(render(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
