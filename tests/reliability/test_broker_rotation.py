"""Zero-touch rotation under fire (issue 15): minted credentials auto-rotated while 30 % of the venue's answers
fail and worker processes are SIGKILLed at random moments, while a trading backend signs with key leases.

Bybit in the simulator, one minted credential per sub-account of one master account (15 in the short run, 100
with --reliability-full). Once every credential is minted and verified, a separate engine process
(``lease_signer.py``: no workers, only leases) holds a lease on every credential for the whole run and signs
requests with each lease's keys of the moment, several under way per lease. Then the simulator answers 30 % of
Bybit requests with a server error, a rate limit or a hang longer than the probe timeout (the request is still
served afterwards: a key may be created at the venue after the engine gave up on the answer, and a request signed
just before a swap reaches the venue seconds later), and every credential is rotated automatically while a worker
process is SIGKILLed (and replaced) every second or two. No lease may ever hold a deleted key: the simulator
refuses no request signed with a lease's keys as unknown (its signing log), each lease swapped to the new key
before the venue deleted the old one, and each lease ends on the credential's current key. Afterwards, faults off
and one reconciliation run: every credential is VERIFIED on a new key, its sub-account holds exactly that one key
at the simulator (no orphan: the registry is compared key by key), no job is dead and the invariants hold.

The grace (``ENGINE_ROTATION_GRACE``) is what makes this hold: with a grace of 0 the old key is deleted about a
second after the promotion, while requests signed with it just before the swap still hang at the venue, and the
signing log shows them refused (HTTP 401).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from reliability_support import PROJECT_ROOT, WorkerProcess, fetch, wait_until

from engine import CredentialEngine, CredentialStatus, Venue
from engine.broker.labels import label_for
from engine.testing import broken_invariants, unfinished_jobs
from venues import build_probe
from venues.base import ProbeFailure
from venues.simulator import Faults, Simulator
from venues.simulator.faults import RATE_LIMITED, SERVER_ERROR, TIMEOUT
from venues.subaccounts import KeyGrant, build_sub_account_keys

OWNER = "broker-desk"
VENUE = Venue.BYBIT
LEASE = 3.0
WORKERS = 2
CONCURRENCY = 6
PROBE_TIMEOUT = 2.0
HANG = 2.5  # seconds a "timeout" fault holds a request before the simulator serves it
GRACE = 5.0  # seconds a rotated-out key keeps working: longer than a swap plus a request under way (HANG)
ORPHAN_GRACE = 6.0  # longer than one venue call of a minting job (the probe timeout plus the database work)
SIGNER = Path(__file__).resolve().parent / "lease_signer.py"
SIGNED_PATH = "/v5/order/realtime"  # what the lease signer calls (the engine never does)


class Workers:
    """The worker processes: started, SIGKILLed at random (busy ones first) and replaced, stopped at the end."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.all: list[WorkerProcess] = []
        self.kills = 0

    @property
    def live(self) -> list[WorkerProcess]:
        return [w for w in self.all if w.alive]

    async def spawn(self) -> None:
        for attempt in range(3):
            worker = WorkerProcess(self.env, self.folder / f"worker-{len(self.all)}.stderr")
            self.all.append(worker)
            try:
                await worker.start()
                return
            except AssertionError:
                if attempt == 2:
                    raise

    async def kill_one(self, dsn: str, rng: random.Random) -> None:
        rows = await fetch(dsn, "SELECT DISTINCT worker_id FROM queue_jobs WHERE state = 'running'")
        busy = {r["worker_id"] for r in rows}
        candidates = [w for w in self.live if w.worker_id in busy] or self.live
        await rng.choice(candidates).kill()
        self.kills += 1
        await self.spawn()


class LeaseSigner:
    """``lease_signer.py`` in its own process: leases on every credential, signing until :meth:`stop`."""

    def __init__(self, settings: dict[str, Any], stderr_path: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "LEASE_SIGNER": json.dumps(settings)}
        self.stderr_path = stderr_path
        self.lines: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self, timeout: float = 120.0) -> dict[str, int]:  # noqa: ASYNC109 - start-up deadline
        """Start it; the secret version each lease opened on, once every lease is open."""
        with self.stderr_path.open("ab") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SIGNER), env=self.env, cwd=PROJECT_ROOT,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"the lease signer did not open its leases; see {self.stderr_path}"
            ) from None
        return dict(self.of("ready")[0]["ready"])

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.lines.append(json.loads(line))
            if "ready" in self.lines[-1]:
                self._ready.set()
        self._ready.set()  # ended: start() looks at what it said

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if kind in line]

    async def stop(self, timeout: float = 60.0) -> dict[str, Any]:  # noqa: ASYNC109 - shutdown deadline
        """Close its stdin: it stops signing, waits for its requests and reports; its ``final`` line."""
        assert self.proc is not None and self.proc.stdin is not None and self._reader is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        assert self.proc.returncode == 0, (
            f"lease signer exited {self.proc.returncode}; see {self.stderr_path}"
        )
        finals = self.of("final")
        assert len(finals) == 1, self.lines[-5:]
        return finals[0]

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=10)


async def quiet(engine: CredentialEngine) -> bool:
    return await unfinished_jobs(engine, horizon=2.0) == []


@pytest.mark.slow
async def test_minted_credentials_rotate_under_faults_and_kills_with_one_key_each_and_no_orphan(
    make_engine: Any, database_url: str, master_keys: str, tmp_path: Path, size: Any, report: Any
) -> None:
    count, kill_gap = size((15, (1.0, 2.0)), (100, (1.0, 3.0)))
    rng = random.Random(15)
    async with Simulator(seed=15, enforce_rate_limits=False) as sim:
        master = sim.add_master_account(VENUE, sub_accounts=count)
        producer: CredentialEngine = await make_engine(
            probes={}, venue_urls=sim.urls, workers=0, poll_interval=0.5
        )
        env = {
            "DATABASE_URL": database_url,
            "ENGINE_MASTER_KEYS": master_keys,
            "ENGINE_DATA_DIR": str(tmp_path),
            "ENGINE_VENUE_URLS": ",".join(f"{v.value}={url}" for v, url in sim.urls.items()),
            "ENGINE_WORKERS": str(CONCURRENCY),
            "ENGINE_LEASE_SECONDS": str(LEASE),
            "ENGINE_LOG_LEVEL": "INFO",
            "ENGINE_ROTATION_GRACE": str(GRACE),
            "ENGINE_BROKER_ORPHAN_GRACE": str(ORPHAN_GRACE),
            "ENGINE_MINT_IP_ALLOWLIST": "127.0.0.1",
            "RELIABILITY_OVERRIDES": json.dumps(
                {
                    "poll_interval": 0.5,
                    "backoff_base": 0.05,
                    "backoff_max": 0.5,
                    "venue_rate_limits": False,
                    "probe_timeout": PROBE_TIMEOUT,
                    "max_attempts": 60,
                }
            ),
        }
        workers = Workers(env, tmp_path)
        leases: LeaseSigner | None = None
        try:
            await asyncio.gather(*(workers.spawn() for _ in range(WORKERS)))
            keys = master.key.api_keys
            parent = await producer.create_credential(
                OWNER, venue=VENUE, api_key=keys.api_key, api_secret=keys.api_secret, credential_type="BROKER"
            )
            await producer.wait_for_status(
                OWNER, parent.credential_id, {CredentialStatus.VERIFIED}, timeout=60
            )
            minted = [
                (
                    await producer.mint_credential(OWNER, parent.credential_id, sub_account=sub.sub_id)
                ).credential_id
                for sub in master.sub_accounts
            ]
            sub_of = dict(zip(minted, (s.sub_id for s in master.sub_accounts), strict=True))
            for cid in minted:
                await producer.wait_for_status(OWNER, cid, {CredentialStatus.VERIFIED}, timeout=120)
            first = {cid: (await producer.reveal_keys(OWNER, cid)).api_key for cid in minted}
            leases = LeaseSigner(
                {
                    "database_url": database_url,
                    "master_keys": master_keys,
                    "data_dir": str(tmp_path),
                    "owner": OWNER,
                    "credentials": [str(cid) for cid in minted],
                    "url": sim.urls[VENUE],
                    "interval": max(0.15, count / 100),  # about 100 requests a second in all
                    "in_flight": 4,
                    "timeout": HANG + 5.0,
                },
                tmp_path / "lease-signer.stderr",
            )
            opened = await leases.start()
            assert opened == {str(cid): 1 for cid in minted}

            sim.set_faults(
                VENUE,
                Faults(
                    error_rate=0.3, kinds=(SERVER_ERROR, RATE_LIMITED, TIMEOUT), retry_after=0.2, hang=HANG
                ),
            )
            stop = asyncio.Event()

            async def killer() -> None:
                while not stop.is_set():
                    await asyncio.sleep(rng.uniform(*kill_gap))
                    if not stop.is_set():
                        await workers.kill_one(database_url, rng)

            async def rotated_all() -> bool:
                rows = await fetch(
                    database_url,
                    "SELECT count(*) AS n FROM credentials c WHERE c.id = ANY($1::uuid[]) AND c.secret_version >= 2"
                    " AND c.status = 'VERIFIED' AND NOT EXISTS (SELECT 1 FROM credential_secrets s"
                    " WHERE s.credential_id = c.id AND s.state = 'PENDING') AND NOT EXISTS (SELECT 1 FROM"
                    " broker_intents i WHERE i.credential_id = c.id AND i.state IN ('OPEN', 'STAGED'))",
                    minted,
                )
                return int(rows[0]["n"]) == len(minted)

            async def planter() -> None:
                """Keys made at the venue that no credential records, as a process killed between the venue's
                answer and its commit leaves them (the hangs and kills above make some too, by chance)."""
                async with aiohttp.ClientSession() as session:
                    manager = build_sub_account_keys(
                        VENUE, session, base_url=sim.urls[VENUE], rate_limited=False
                    )
                    for cid in rng.sample(minted, max(2, count // 5)):
                        grant = KeyGrant(ip_allowlist=("127.0.0.1",), label=label_for(cid))
                        for _ in range(20):  # the faults are on: a lost answer may have made it already
                            try:
                                await manager.create_key(keys, sub_of[cid], grant)
                                break
                            except ProbeFailure as failure:
                                if not failure.transient:
                                    raise
                        planted.append(str(cid))

            planted: list[str] = []
            tasks = [
                asyncio.create_task(killer()),
                asyncio.create_task(planter()),
            ]
            for cid in minted:
                await producer.rotate_credential(OWNER, cid, automatic=True)
                await asyncio.sleep(rng.uniform(0, 0.1))
            await wait_until(
                rotated_all, timeout=size(180, 600), interval=0.5, what="every credential rotated"
            )
            stop.set()
            await asyncio.gather(*tasks)

            sim.clear_faults()
            await asyncio.sleep(max(GRACE, ORPHAN_GRACE) + 1.0)  # graces over: what is left over is an orphan
            await producer.reconcile_broker_keys()
            await wait_until(lambda: quiet(producer), timeout=120, interval=0.5, what="every job finished")

            async def retired_gone() -> bool:
                return not await fetch(database_url, "SELECT 1 FROM broker_retired_keys")

            await wait_until(retired_gone, timeout=60, interval=0.5, what="every retired key deleted")
            await wait_until(lambda: quiet(producer), timeout=120, interval=0.5, what="every job finished")
            final = await leases.stop()  # it signed through every grace and every deletion
            codes = [await w.stop() for w in workers.live]
        finally:
            if leases is not None:
                await leases.kill()
            for worker in workers.all:
                await worker.kill()

        assert codes == [0] * WORKERS
        assert workers.kills >= 1
        assert len(planted) == max(2, count // 5)
        # no lease ever held a deleted key: the venue refused no request signed with a lease's keys as unknown
        swaps = leases.of("swap")
        held_keys = set(first.values()) | {swap["new"] for swap in swaps}
        unknown = [
            e.as_dict()
            for e in sim.signed_requests(VENUE, authenticated=False)
            if e.path == SIGNED_PATH and e.api_key in held_keys and e.status == 401
        ]
        assert unknown == [], unknown[:5]
        assert leases.of("refused") == [], leases.of("refused")[:5]  # nor for any other reason
        answers = final["answers"]
        assert answers.get("ok", 0) > 0 and answers.get("fault", 0) > 0, answers
        # each lease swapped to the new key before the venue deleted the old one (after the grace)
        margins = []
        for swap in swaps:
            removed = sim.key_removed_at(swap["old"])
            assert removed is not None, swap  # every rotated-out key is gone by now
            assert swap["at"] < removed, (swap, removed)
            margins.append(removed - swap["at"])
        assert {swap["swap"] for swap in swaps} == {str(cid) for cid in minted}  # every lease followed
        dead = await fetch(database_url, "SELECT id, kind, last_error FROM queue_jobs WHERE state = 'dead'")
        assert dead == []
        assert await broken_invariants(producer) == {}
        held: dict[str, str] = {}
        async with aiohttp.ClientSession() as session:
            probe = build_probe(VENUE, session, base_url=sim.urls[VENUE], timeout=5.0, rate_limited=False)
            for cid in minted:
                cred = await producer.get_credential(OWNER, cid)
                assert cred.status is CredentialStatus.VERIFIED and cred.secret_version >= 2
                current = await producer.reveal_keys(OWNER, cid)
                assert current.api_key != first[cid]
                at_venue = [k.api_key for k in sim.sub_account_keys(VENUE, master.key.uid, sub_of[cid])]
                assert at_venue == [current.api_key], (cid, at_venue)  # exactly one live key, the held one
                await probe.probe(current)  # and it works
                held[current.api_key] = str(cid)
                ended = final["final"][str(cid)]  # the lease ends on the credential's current key
                assert ended == {"api_key": current.api_key, "version": cred.secret_version, "revoked": False}
        every = {k.api_key for k in sim.sub_account_keys(VENUE, master.key.uid)}
        assert every == set(held)  # no orphan anywhere under the master account
        report(
            "broker rotation with leases",
            credentials=count,
            kills=workers.kills,
            signed=final["sent"],
            answered_ok=answers.get("ok", 0),
            swaps=len(swaps),
            min_swap_to_delete_s=min(margins),
        )
