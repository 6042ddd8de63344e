"""Crash: worker processes are SIGKILLed at random points while credentials go through their whole lifecycle.

The test process creates, rotates, connects and revokes (an engine without workers) and listens; the jobs run in
separate worker processes (tests/reliability/worker_process.py) probing the exchange simulator over loopback
HTTP. A killer SIGKILLs a worker that holds running jobs, at random moments, and starts a replacement. Afterwards
nothing may be stuck or lost: every job finished, every credential reached exactly the state its plan says, with
exactly the events its plan says, the invariants of docs/design.md §4 hold, and the listener heard every event, gapless.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from reliability_support import EventLog, WebhookReceiver, WorkerProcess, fetch, stored_events, wait_until

from engine import CredentialEngine, Venue, errors
from engine.testing import broken_invariants, unfinished_jobs
from venues.simulator import Faults, Simulator, TestKey

OWNER = "owner-crash"
LEASE = 3.0  # seconds: a killed worker's jobs come back this long after its last heartbeat
WORKERS = 2  # worker processes alive at any time
CONCURRENCY = 8  # jobs each worker process runs at once
LATENCY = 0.05  # seconds the simulator adds to every request, so that kills land mid-probe

VERIFIED, FAILED = "credential.verified", "credential.verification_failed"
ROTATED, ROTATION_FAILED = "credential.rotated", "credential.rotation_failed"


@dataclass
class Plan:
    """What happens to one credential, and therefore how it must end."""

    key: TestKey
    bad: bool  # the venue does not know the key: FAILED
    connect: bool  # a trading account is connected once VERIFIED
    rotation: str | None  # "staged" (same account), "mismatch" (another account), "immediate" (same account)
    new_key: TestKey | None
    revoke: bool
    credential_id: uuid.UUID | None = None

    def expected_events(self) -> list[str]:
        types = ["credential.created", FAILED if self.bad else VERIFIED]
        if self.connect:
            types.append("trading_account.connected")
        if self.rotation is not None:
            types.append("credential.rotation_started")
            types.append(
                {"staged": ROTATED, "mismatch": ROTATION_FAILED, "immediate": VERIFIED}[self.rotation]
            )
        if self.revoke:
            if self.connect:
                types.append("trading_account.disconnected")
            types.append("credential.revoked")
        return types

    def expected_final(self) -> tuple[str, int]:
        if self.revoke:
            return "REVOKED", 0
        return ("FAILED" if self.bad else "VERIFIED"), (2 if self.rotation in ("staged", "immediate") else 1)


def make_plans(sim: Simulator, count: int, rng: random.Random) -> list[Plan]:
    plans = []
    venues = list(Venue)
    for i in range(count):
        venue = venues[i % len(venues)]
        key = sim.add_key(venue)
        bad = i % 10 == 3
        if bad:
            sim.remove_key(key.api_key)  # well-formed material the venue does not know
        draw = rng.random()
        rotation = None if bad else "staged" if draw < 0.45 else "mismatch" if draw < 0.6 else None
        if not bad and 0.6 <= draw < 0.8:
            rotation = "immediate"
        new_key = None
        if rotation is not None:
            new_key = sim.add_key(venue, uid=None if rotation == "mismatch" else key.uid)
        plans.append(
            Plan(
                key=key,
                bad=bad,
                connect=not bad and rng.random() < 0.3,
                rotation=rotation,
                new_key=new_key,
                revoke=rng.random() < 0.3,
            )
        )
    return plans


class Producer:
    """The test's engine, whose calls would be retried if PostgreSQL aborted them as a deadlock victim (40P01:
    rolled back, so a retry is safe). Worker starts used to cause them (test_engine_opens_while_another_process_
    writes); they are counted, and the test asserts there were none."""

    def __init__(self, engine: CredentialEngine) -> None:
        self.engine = engine
        self.deadlocks = 0

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        for _ in range(10):
            try:
                return await getattr(self.engine, method)(*args, **kwargs)
            except errors.StorageError as exc:
                if "40P01" not in str(exc):
                    raise
                self.deadlocks += 1
        raise AssertionError(f"{method}: deadlocked 10 times in a row")


async def drive(producer: Producer, log: EventLog, plan: Plan, wait: float) -> None:
    """Take one credential through its plan, each step once the previous one's outcome event was heard."""
    key = plan.key
    cred = await producer.call(
        "create_credential",
        OWNER,
        venue=key.venue,
        api_key=key.api_key,
        api_secret=key.api_secret,
        api_passphrase=key.api_passphrase,
    )
    cid = plan.credential_id = cred.credential_id
    outcome = await log.next_of(cid, {VERIFIED, FAILED}, timeout=wait)
    seq = outcome.sequence
    if plan.connect:
        await producer.call("connect_trading_account", OWNER, credential_id=cid)
        seq = (await log.next_of(cid, {"trading_account.connected"}, after=seq, timeout=wait)).sequence
    if plan.rotation is not None:
        assert plan.new_key is not None
        new = plan.new_key
        await producer.call(
            "rotate_credential",
            OWNER,
            cid,
            api_key=new.api_key,
            api_secret=new.api_secret,
            api_passphrase=new.api_passphrase,
            immediate=plan.rotation == "immediate",
        )
        started = await log.next_of(cid, {"credential.rotation_started"}, after=seq, timeout=wait)
        done = await log.next_of(
            cid, {ROTATED, ROTATION_FAILED, VERIFIED, FAILED}, after=started.sequence, timeout=wait
        )
        seq = done.sequence
    if plan.revoke:
        await producer.call("revoke_credential", OWNER, cid)


class Workers:
    """The worker processes of the run: started, SIGKILLed and replaced, finally stopped."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.all: list[WorkerProcess] = []
        self.kills: list[dict[str, Any]] = []
        self.start_failures = 0

    @property
    def live(self) -> list[WorkerProcess]:
        return [w for w in self.all if w.alive]

    async def spawn(self, attempts: int = 3) -> WorkerProcess:
        """Start a worker; as a process supervisor would, start again when it fails to open (counted: see
        test_engine_opens_while_another_process_writes for why a start can fail on a busy database)."""
        for attempt in range(attempts):
            worker = WorkerProcess(self.env, self.folder / f"worker-{len(self.all)}.stderr")
            self.all.append(worker)
            try:
                await worker.start()
                return worker
            except AssertionError:
                self.start_failures += 1
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    async def kill_one(self, dsn: str, rng: random.Random) -> None:
        """SIGKILL a worker that holds running jobs (a random live one if none does within 5 s), then replace it."""
        victim = None
        deadline = time.monotonic() + 5.0
        while victim is None and time.monotonic() < deadline:
            rows = await fetch(
                dsn, "SELECT worker_id, count(*) AS n FROM queue_jobs WHERE state = 'running' GROUP BY 1"
            )
            busy = {r["worker_id"]: int(r["n"]) for r in rows}
            candidates = [w for w in self.live if busy.get(w.worker_id)]
            if candidates:
                victim = rng.choice(candidates)
            else:
                await asyncio.sleep(0.05)
        if victim is None:
            victim = rng.choice(self.live)
            busy = {}
        await victim.kill()
        self.kills.append({"worker": victim.worker_id, "running_jobs": busy.get(victim.worker_id, 0)})
        await self.spawn()


@pytest.mark.slow
async def test_sigkilled_workers_lose_nothing(
    make_engine: Any, database_url: str, master_keys: str, tmp_path: Path, size: Any, report: Any
) -> None:
    """SIGKILLing worker processes mid-job leaves no job stuck, no credential off its plan, no event missing."""
    count, kills, spread, kill_gap = size((100, 3, 6.0, (1.0, 2.5)), (1000, 20, 80.0, (2.0, 5.5)))
    rng = random.Random(6)
    started = time.monotonic()
    receiver = WebhookReceiver(status=lambda _path, n: 503 if n % 7 == 0 else 200)  # some attempts fail
    await receiver.start()
    async with Simulator(seed=6, enforce_rate_limits=False) as sim:
        for venue in Venue:
            sim.set_faults(venue, Faults(latency=LATENCY))
        plans = make_plans(sim, count, rng)
        producer: CredentialEngine = await make_engine(
            probes={}, venue_urls=sim.urls, workers=0, poll_interval=0.5
        )
        log = EventLog()
        producer.subscribe(log)
        hook = await producer.add_webhook_endpoint(OWNER, receiver.url + "/hooks")
        env = {
            "DATABASE_URL": database_url,
            "ENGINE_MASTER_KEYS": master_keys,
            "ENGINE_DATA_DIR": str(tmp_path),
            "ENGINE_VENUE_URLS": ",".join(f"{v.value}={url}" for v, url in sim.urls.items()),
            "ENGINE_WORKERS": str(CONCURRENCY),
            "ENGINE_LEASE_SECONDS": str(LEASE),
            "ENGINE_LOG_LEVEL": "INFO",
            "ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS": "1",
            "RELIABILITY_OVERRIDES": '{"poll_interval": 0.5, "backoff_base": 0.05, "backoff_max": 0.5, '
            '"venue_rate_limits": false, "probe_timeout": 5.0, "webhook_retry_schedule": [0, 0.2, 0.5, 1, 1, 1, 1, 1]}',
        }
        workers = Workers(env, tmp_path)
        try:
            await asyncio.gather(*(workers.spawn() for _ in range(WORKERS)))
            gate = asyncio.Semaphore(64)

            async def paced(index: int, plan: Plan) -> None:
                await asyncio.sleep(spread * index / count)
                async with gate:
                    await drive(calls, log, plan, wait=60.0 + 2 * LEASE)

            async def killer() -> None:
                for _ in range(kills):
                    await asyncio.sleep(rng.uniform(*kill_gap))
                    await workers.kill_one(database_url, rng)

            calls = Producer(producer)
            async with asyncio.TaskGroup() as group:
                group.create_task(killer())
                for i, plan in enumerate(plans):
                    group.create_task(paced(i, plan))
            await wait_until(
                lambda: _quiet(producer),
                timeout=120,
                interval=0.25,
                what="every job finished (none running or due)",
            )
            await producer.run_until_idle()  # the listener has every committed event
            codes = [await w.stop() for w in workers.live]
        finally:
            for worker in workers.all:
                await worker.kill()
            await receiver.close()
    elapsed = time.monotonic() - started

    assert hook.endpoint_id is not None
    assert len(workers.kills) == kills
    assert codes == [0] * WORKERS, "a surviving worker did not shut down cleanly"
    assert await unfinished_jobs(producer) == []
    dead = await fetch(database_url, "SELECT id, kind, last_error FROM queue_jobs WHERE state = 'dead'")
    assert dead == []
    assert await broken_invariants(producer) == {}
    finals = {
        r["id"]: (r["status"], r["secret_version"])
        for r in await fetch(database_url, "SELECT id, status, secret_version FROM credentials")
    }
    stored = await stored_events(database_url)
    off_plan = {}
    for plan in plans:
        assert plan.credential_id is not None
        got = (finals[plan.credential_id], [t for _, t, _ in stored[plan.credential_id]])
        if got != (plan.expected_final(), plan.expected_events()):
            off_plan[plan.credential_id] = (got, (plan.expected_final(), plan.expected_events()))
    assert off_plan == {}
    assert log.sequence_problems() == {}
    heard = {cid: [e.event_id for e in events] for cid, events in log.by_credential.items()}
    assert heard == {cid: [event_id for _, _, event_id in rows] for cid, rows in stored.items()}
    # webhooks: every event delivered at least once (same webhook-id on a re-delivery), in order per credential
    event_ids = {str(event_id) for rows in stored.values() for _, _, event_id in rows}
    assert event_ids - receiver.delivered_ids("/hooks") == set()
    undelivered = await fetch(
        database_url,
        "SELECT state, count(*) AS n FROM webhook_deliveries WHERE state <> 'delivered' GROUP BY 1",
    )
    assert undelivered == []
    sequence_of = {str(event_id): (cid, seq) for cid, rows in stored.items() for seq, _, event_id in rows}
    first_delivered: dict[uuid.UUID, list[int]] = {}
    seen: set[str] = set()
    for _, headers, _, status in receiver.requests:
        webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        if 200 <= status < 300 and webhook_id not in seen:
            seen.add(webhook_id)
            cid, seq = sequence_of[webhook_id]
            first_delivered.setdefault(cid, []).append(seq)
    assert {cid: seqs for cid, seqs in first_delivered.items() if seqs != sorted(seqs)} == {}
    duplicates = sum(1 for *_, status in receiver.requests if 200 <= status < 300) - len(seen)
    taken_back = await fetch(
        database_url, "SELECT count(*) AS n FROM queue_jobs WHERE last_error LIKE 'LeaseExpired%'"
    )
    report(
        "crash",
        credentials=count,
        sigkills=len(workers.kills),
        jobs_running_at_kills=sum(k["running_jobs"] for k in workers.kills),
        jobs_taken_back=taken_back[0]["n"],
        worker_start_failures=workers.start_failures,
        calls_deadlocked_by_a_worker_start=calls.deadlocks,
        webhooks_delivered=len(seen),
        webhook_redeliveries=duplicates,
        events=sum(len(v) for v in stored.values()),
        seconds=elapsed,
    )
    # schema DDL runs only when schema.sql changed: a worker joining a busy database deadlocks with nothing
    assert workers.start_failures == 0
    assert calls.deadlocks == 0


async def _quiet(engine: CredentialEngine) -> bool:
    # the horizon outlasts the test's webhook retry delays (<= 1 s): a retry after a 503 is not "finished"
    return await unfinished_jobs(engine, horizon=5.0) == []


async def test_engine_opens_while_another_process_writes(make_engine: Any, database_url: str) -> None:
    """A new engine process opens on a database where another one is mid-transaction (read a credential, then write)."""
    import asyncpg

    busy = await asyncpg.connect(database_url)
    try:
        tx = busy.transaction()
        await tx.start()
        await busy.fetch("SELECT * FROM credential_view LIMIT 1")  # a job reading its credential ...
        opening = asyncio.create_task(make_engine())
        await asyncio.sleep(0.5)
        # ... then writing it, as every lifecycle transaction does
        await asyncio.wait_for(busy.execute("UPDATE credentials SET nickname = nickname"), 10)
        await tx.commit()
        await asyncio.wait_for(opening, 10)
    finally:
        await busy.close()
