"""A worker process SIGKILLed in the middle of a webhook attempt: the attempt is made again, same webhook-id.

Run as a script, this file is that worker process: an engine with workers on, until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from engine import CredentialEngine, EngineConfig, webhooks
from engine.testing import FakeVenue

LEASE = 1.0  # seconds: how soon a dead worker's job is taken back


def worker_config(database_url: str, master_keys: str, data_dir: Path, **overrides: Any) -> EngineConfig:
    settings: dict[str, Any] = {
        "database_url": database_url,
        "master_keys": master_keys,
        "data_dir": data_dir,
        "workers": 2,
        "lease_seconds": LEASE,
        "poll_interval": 0.1,
        "allow_private_webhook_urls": True,
        "webhook_retry_schedule": (0.0, 0.05, 0.05),
    }
    settings.update(overrides)
    return EngineConfig(**settings)


async def child(database_url: str, master_keys: str, data_dir: str) -> None:
    """The worker process: run jobs until SIGKILL."""
    async with CredentialEngine(
        worker_config(database_url, master_keys, Path(data_dir)), probes=FakeVenue().probes()
    ):
        print("ready", flush=True)
        await asyncio.Event().wait()


async def wait_for_line(stream: asyncio.StreamReader, wanted: bytes) -> None:
    """Read the child's stdout (structlog writes there too) until the line ``wanted``."""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"the child exited before printing {wanted!r}")
        if line.strip() == wanted:
            return


if __name__ == "__main__":
    asyncio.run(child(*sys.argv[1:4]))
else:
    from test_webhooks_support import OWNER, Receiver, new_credential, settle_until

    from engine.webhooks.models import DeliveryState

    async def test_worker_killed_mid_delivery_leads_to_redelivery_with_the_same_id(
        database_url: str, master_keys: str, tmp_path: Path, fake: FakeVenue
    ) -> None:
        """SIGKILL of the worker process while the receiver holds the request: after the lease expires
        another process makes the attempt again with the same webhook-id, and it verifies."""
        async with Receiver(hang=asyncio.Event()) as rx:
            config = worker_config(database_url, master_keys, tmp_path, workers=0)
            async with CredentialEngine(config, probes=fake.probes()) as eng:
                ep = await eng.add_webhook_endpoint(OWNER, rx.url, event_types=["credential.created"])
                assert ep.secret is not None
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, database_url, master_keys, str(tmp_path / "child"),
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                try:
                    assert proc.stdout is not None
                    await asyncio.wait_for(wait_for_line(proc.stdout, b"ready"), 30)
                    await new_credential(eng, fake, "crash-1")
                    await asyncio.wait_for(rx.got_request.wait(), 30)  # the child is mid-attempt
                    os.kill(proc.pid, signal.SIGKILL)
                    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                hung = rx.hang
                rx.hang = None  # from now on the receiver answers at once
                assert hung is not None
                hung.set()
                await settle_until(eng, lambda: len(rx.requests) >= 2, within=20)
                first, second = rx.requests[:2]
                assert first.webhook_id == second.webhook_id
                assert first.body == second.body
                assert int(second.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"])
                webhooks.Verifier(ep.secret).verify(second.body, second.headers)
                (delivery,) = (await eng.list_webhook_deliveries(OWNER)).items
                assert delivery.state is DeliveryState.DELIVERED
                assert [(a.attempt, a.outcome) for a in delivery.attempts] == [(1, "delivered")]
