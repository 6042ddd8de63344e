"""Two engine processes on one database: a listener in this one hears every change the other one makes, in
sequence order per credential with no gap, even when PostgreSQL drops the listener's connection mid-run.

Run as a script, this file is the other process: an engine with workers that creates, verifies, rotates and
revokes credentials, printing a line at each stage.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from engine import CredentialEngine, CredentialStatus, EngineConfig, Event, Venue
from engine.testing import FakeVenue

OWNER = "owner-xproc"
CREDENTIALS = 12


def config(database_url: str, master_keys: str, data_dir: Path, **overrides: Any) -> EngineConfig:
    settings: dict[str, Any] = {
        "database_url": database_url,
        "master_keys": master_keys,
        "data_dir": data_dir,
        "workers": 4,
        "poll_interval": 0.2,
        "lease_seconds": 5.0,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
    }
    settings.update(overrides)
    return EngineConfig(**settings)


async def child(database_url: str, master_keys: str, data_dir: str) -> None:
    """The other process: lifecycle traffic on CREDENTIALS credentials, with its own workers."""
    fake = FakeVenue()
    for i in range(CREDENTIALS):
        fake.add_key(f"xp-{i}", "s", account_id=f"uid-{i}")
        fake.add_key(f"xp-{i}-new", "s", account_id=f"uid-{i}")
    async with CredentialEngine(
        config(database_url, master_keys, Path(data_dir)), probes=fake.probes()
    ) as eng:
        creds = await asyncio.gather(
            *(eng.create_credential(OWNER, venue=Venue.OKX, api_key=f"xp-{i}", api_secret="s", api_passphrase="p")
              for i in range(CREDENTIALS))
        )  # fmt: skip
        print("created", flush=True)
        ids = [c.credential_id for c in creds]
        await asyncio.gather(*(eng.wait_for_status(OWNER, cid, {CredentialStatus.VERIFIED}) for cid in ids))
        print("verified", flush=True)
        await asyncio.gather(
            *(eng.rotate_credential(OWNER, cid, api_key=f"xp-{i}-new", api_secret="s", api_passphrase="p")
              for i, cid in enumerate(ids))
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while [
            c
            for c in await asyncio.gather(*(eng.get_credential(OWNER, cid) for cid in ids))
            if c.pending_rotation
        ]:
            assert time.monotonic() < deadline, "rotations did not finish"
            await asyncio.sleep(0.05)
        print("rotated", flush=True)
        await asyncio.gather(*(eng.revoke_credential(OWNER, cid) for cid in ids[: CREDENTIALS // 2]))
        await eng.run_until_idle()
        print("done", flush=True)


async def read_until(stream: asyncio.StreamReader, wanted: bytes) -> None:
    """Read the child's stdout (structlog writes there too) until the line ``wanted``."""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"the child exited before printing {wanted!r}")
        if line.strip() == wanted:
            return


async def drop_listen_connections(eng: CredentialEngine) -> int:
    """pg_terminate_backend every connection LISTENing for events (ours and the other process's)."""
    async with eng.db.connection() as conn:
        rows = await conn._conn.fetch(
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
            "WHERE datname = current_database() AND query ILIKE 'LISTEN%ce_events%' AND pid <> pg_backend_pid()"
        )
    return sum(1 for r in rows if r["ok"])


async def wait_listening(eng: CredentialEngine, at_least: int) -> None:
    deadline = time.monotonic() + 10.0
    while True:
        async with eng.db.connection() as conn:
            n = await conn._conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query ILIKE 'LISTEN%ce_events%'"
            )
        if n >= at_least:
            return
        assert time.monotonic() < deadline, "the listeners did not come back"
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(child(*sys.argv[1:4]))
else:

    async def test_listener_hears_every_change_of_another_process_across_connection_drops(
        database_url: str, master_keys: str, tmp_path: Path
    ) -> None:
        """Process B (a child) does lifecycle work; A's listener hears all of it, gapless per credential,
        though A's events LISTEN connection is terminated twice while B runs (B's too, the first time)."""
        heard: list[Event] = []

        async def listener(event: Event) -> None:
            heard.append(event)

        async with CredentialEngine(config(database_url, master_keys, tmp_path, workers=0)) as eng:
            eng.subscribe(listener)
            await wait_listening(eng, 1)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, database_url, master_keys, str(tmp_path / "child"),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                await asyncio.wait_for(read_until(proc.stdout, b"created"), 60)
                assert await drop_listen_connections(eng) >= 1
                await asyncio.wait_for(read_until(proc.stdout, b"verified"), 60)
                # ours (B LISTENed while its wait_for_status listened: a bus without listeners does not LISTEN)
                await wait_listening(eng, 1)
                assert await drop_listen_connections(eng) >= 1
                await asyncio.wait_for(read_until(proc.stdout, b"done"), 60)
                assert await asyncio.wait_for(proc.wait(), 30) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            rows = await eng.db.fetch("list_webhook_endpoints", OWNER)  # sanity: named queries still work
            assert rows == []
            expected: dict[uuid.UUID, list[int]] = {}
            async with eng.db.connection() as conn:
                for row in await conn._conn.fetch(
                    "SELECT credential_id, sequence FROM events WHERE owner_id = $1 ORDER BY credential_id, sequence",
                    OWNER,
                ):
                    expected.setdefault(row["credential_id"], []).append(int(row["sequence"]))
            total = sum(len(v) for v in expected.values())
            deadline = time.monotonic() + 15
            while len(heard) < total and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a list
                await asyncio.sleep(0.05)
            assert eng.bus.stats.reconnects >= 2
        got: dict[uuid.UUID, list[int]] = {}
        for event in heard:
            assert event.credential_id is not None
            got.setdefault(event.credential_id, []).append(event.sequence)
        assert len(expected) == CREDENTIALS
        assert got == expected  # every event, once, in sequence order per credential
        for seqs in got.values():
            assert seqs == list(range(1, len(seqs) + 1))
