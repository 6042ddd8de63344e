"""The BROKER parts wired together: minting, automatic rotation, reconciliation, the verification's sub-account
discovery, the job handlers with their timeouts and the periodic sweeps."""

from __future__ import annotations

from engine import queue as queuemod
from engine.broker.context import Context
from engine.broker.discovery import Discovery
from engine.broker.minting import Minting
from engine.broker.payloads import (
    BROKER_CLEANUP,
    BROKER_MINT,
    BROKER_RECONCILE_SUB,
    BROKER_ROTATE,
    BROKER_SWEEP,
)
from engine.broker.reconcile import Reconciler
from engine.broker.rotation import Rotation
from engine.config import EngineConfig
from venues.base import MAX_SEQUENTIAL_REQUESTS

KINDS = (BROKER_MINT, BROKER_ROTATE, BROKER_CLEANUP, BROKER_RECONCILE_SUB, BROKER_SWEEP)
PURGE_BATCH = 5000  # settled intents deleted per sweep at most
VENUE_JOB_MARGIN = 30.0  # seconds on top of a minting job's requests: rate limiters, the database work


class Broker:
    """``minting``, ``rotation``, ``reconciler`` and ``discovery``; ``handlers()`` and ``schedule()``."""

    def __init__(self, ctx: Context, config: EngineConfig) -> None:
        self.ctx = ctx
        self.minting = Minting(ctx, config.quotas)
        self.rotation = Rotation(ctx)
        self.reconciler = Reconciler(ctx)
        self.discovery = Discovery(ctx.managers)
        self._config = config

    def handlers(self) -> dict[str, queuemod.Handler]:
        return {
            BROKER_MINT: self.minting.run,
            BROKER_ROTATE: self.rotation.run,
            BROKER_CLEANUP: self.reconciler.cleanup,
            BROKER_RECONCILE_SUB: self.reconciler.reconcile_sub,
            BROKER_SWEEP: self.sweep,
        }

    async def sweep(self, job: queuemod.Job) -> None:
        """``broker_sweep`` (periodic): the rotation policy, then a reconciliation of every sub-account, then the
        settled venue operations older than ``job_retention`` (and than the retry delay, which reads them)."""
        await self.rotation.sweep(job)
        await self.reconciler.sweep(job)
        keep = max(self._config.job_retention, self.ctx.settings.rotation_retry_after)
        await self.ctx.db.execute("broker_purge_intents", keep, PURGE_BATCH)

    def timeouts(self) -> dict[str, float]:
        """A minting job makes a few venue requests (the master key's create, a discard); the others list and
        delete keys one after another and get ``job_timeout``."""
        cfg = self._config
        minting = cfg.probe_timeout * MAX_SEQUENTIAL_REQUESTS + VENUE_JOB_MARGIN
        timeouts = {kind: cfg.job_timeout for kind in KINDS}
        timeouts[BROKER_MINT] = timeouts[BROKER_ROTATE] = minting
        return timeouts

    def schedule(self, queue: queuemod.JobQueue) -> None:
        """The periodic sweep (one job: the rotation policy and the reconciliation)."""
        queue.every(BROKER_SWEEP, self.ctx.settings.sweep_interval)
