"""A worker process for tests/integration/test_queue_processes.py: it starts a JobQueue whose ``block`` handler
never returns, so the test can kill it with SIGKILL while it holds a job.

Usage: python queue_blocking_worker.py <dsn> <lease_seconds>
"""

from __future__ import annotations

import asyncio
import sys

from engine import db as dbmod
from engine import queue


async def main(dsn: str, lease: float) -> None:
    database = await dbmod.Database.connect(dsn, min_size=1, max_size=4)

    async def block(job: queue.Job) -> None:
        await asyncio.Event().wait()  # until SIGKILL

    settings = queue.QueueSettings(lease_seconds=lease, heartbeat_interval=lease / 4, poll_interval=0.1)
    jobs = queue.JobQueue(database, {"block": block}, settings, worker_id="doomed-worker")
    await jobs.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
