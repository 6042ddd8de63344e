"""``CredentialEngine``: the one object an embedding application holds.

It wires the parts and owns their open and close order: the pool, the store, the job queue, the outbox, the
webhook service, the lifecycle jobs, the trading accounts, the HTTP session, the event bus and the key-lease
registry of engine/live (except a pool or session the caller injected: those it uses and never closes). Each
part is built from the parts it uses, never from the engine. It does no I/O in its constructor, opens once
(``async with``), and refuses to reopen after closing. Every credential operation is one transaction that locks
the credential row first, writes the change through the store (which returns the credential as written),
records its event(s) through the outbox and enqueues the job that follows; creating a credential does all of
that in one statement (:mod:`engine.hotpath`), shared by the creations made concurrently
(:mod:`engine.creates`), unless a webhook endpoint wants its event.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver

from engine import crypto, errors, events, hotpath, jobs, lifecycle, validation
from engine import db as dbmod
from engine import metrics as metricsmod
from engine import queue as queuemod
from engine.accounts import TradingAccounts
from engine.bounds import budgets, quotas, retention
from engine.broker.context import Context as BrokerContext
from engine.broker.managers import Managers
from engine.broker.service import Broker
from engine.coalesce import CoalescerStats
from engine.config import EngineConfig
from engine.creates import BatchedCreates
from engine.embedded import default_data_dir, start_embedded
from engine.keys import providers as keyproviders
from engine.keys import rewrap
from engine.live.leases import KeyLease
from engine.live.registry import LeaseRegistry
from engine.models import (
    Credential,
    CredentialStatus,
    CredentialType,
    Event,
    Page,
    TradingAccount,
    TradingAccountStatus,
)
from engine.outbox import Outbox
from engine.payloads import RevokeCascade, RotationVerify, Verify, enqueue, verify_key
from engine.store import Store, credential_from_row
from engine.webhooks import service as webhooks_service
from engine.webhooks.delivery import DELIVER
from engine.webhooks.fanout import FanOut
from engine.webhooks.models import DeliveryState, WebhookDelivery, WebhookEndpoint, WebhookSettings
from venues import build_probe
from venues.base import ApiKeys, KeyFormatProblem, Probe, Venue
from venues.subaccounts import SubAccountKeys, build_sub_account_keys

log = structlog.get_logger("engine")


class _State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"  # jobs still running may finish their work; then everything is released
    CLOSED = "closed"


class _Parts(NamedTuple):
    """What an open engine's operations use."""

    store: Store
    queue: queuemod.JobQueue
    outbox: Outbox
    accounts: TradingAccounts


class CredentialEngine:
    """Stores exchange API keys encrypted, verifies, rotates and revokes them, and reports every change."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        pool: Any | None = None,
        http_session: aiohttp.ClientSession | None = None,
        probes: Mapping[Venue, Probe] | None = None,
        webhook_resolver: AbstractResolver | None = None,
        key_provider: keyproviders.KeyProvider | None = None,
        sub_accounts: Mapping[Venue, SubAccountKeys] | None = None,
    ) -> None:
        self.config = config if config is not None else EngineConfig()
        self._key_provider = (
            key_provider  # replaces the master keys of the configuration (engine/keys/providers.py)
        )
        self._injected_pool = pool
        self._injected_session = http_session
        self._probes: dict[Venue, Probe] = dict(probes or {})
        # sub-account key managers of BROKER credentials (engine.testing.FakeSubAccounts); None: the venues'
        self._sub_accounts = sub_accounts
        self._broker: Broker | None = None
        self._state = _State.NEW
        self.bus = events.EventBus(
            poll_interval=self.config.poll_interval,
            listen_check_interval=self.config.listen_check_interval,
            listen_check_timeout=self.config.listen_check_timeout,
        )
        self._db: dbmod.Database | None = None
        self._queue: queuemod.JobQueue | None = None
        self._session: aiohttp.ClientSession | None = None
        self._jobs: jobs.LifecycleJobs | None = None
        self._budgets: budgets.SharedBudgets | None = None  # per-IP venue budgets shared by the egress group
        self._creates: BatchedCreates | None = None  # create_credential's statements, in batches
        self._parts: _Parts | None = None
        cfg = self.config
        # key leases (engine/live): one bus subscription for every lease of this process
        self.leases = LeaseRegistry(
            bus=self.bus,
            callback_timeout=cfg.key_lease_callback_timeout,
            recheck_interval=cfg.key_lease_recheck_interval,
            lock_timeout=cfg.pool_acquire_timeout + cfg.db_command_timeout,
        )
        # webhook endpoints and deliveries; webhook_resolver replaces DNS lookups (the SSRF guard still applies)
        self.webhooks = webhooks_service.WebhookService(
            WebhookSettings(
                quotas=cfg.quotas,
                allow_private=cfg.allow_private_webhook_urls,
                timeout=cfg.webhook_timeout,
                retry_schedule=tuple(cfg.webhook_retry_schedule),
                disable_after=cfg.webhook_disable_after,
                secret_grace=cfg.webhook_secret_grace,
            ),
            resolver=webhook_resolver,
        )
        # Prometheus: eng.metrics.registry (engine, process, platform, GC) or eng.metrics.collector (engine only)
        self.metrics = metricsmod.EngineMetrics(self)

    # ---- lifecycle of the object -----------------------------------------------------------------------

    async def __aenter__(self) -> CredentialEngine:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if self._state is not _State.NEW:
            raise errors.EngineClosed("a CredentialEngine opens once; make a new one")
        self._state = _State.OPENING
        try:
            await self._open()
        except BaseException:
            await self._teardown()
            self._state = _State.CLOSED
            raise
        self._state = _State.OPEN
        log.info("engine_open", workers=self.config.workers)

    async def _open(self) -> None:
        cfg = self.config
        if self._injected_pool is not None:
            self._db = dbmod.Database.from_pool(
                self._injected_pool,
                acquire_timeout=cfg.pool_acquire_timeout,
                listen_dsn=cfg.listen_database_url,
            )
        else:
            dsn = cfg.database_url or await start_embedded(self.data_dir)
            self._db = await dbmod.Database.connect(
                dsn,
                min_size=cfg.pool_min_size,
                max_size=cfg.pool_max_size,
                acquire_timeout=cfg.pool_acquire_timeout,
                command_timeout=cfg.db_command_timeout,
                statement_cache_size=cfg.statement_cache_size,
                listen_dsn=cfg.listen_database_url,
            )
        self.metrics.bind(asyncio.get_running_loop())
        await self._db.apply_schema()
        keyring = await keyproviders.load_keyring(self._keys())
        await rewrap.check_keyring(self._db, keyring)  # no start with a master key version missing
        store = Store(self._db, crypto.Vault(keyring))
        await store.load_fingerprint_key()
        self._session = self._injected_session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, ttl_dns_cache=300)
        )
        # shared only by the probes this engine builds (injected ones, such as engine.testing's, keep their own)
        if cfg.venue_rate_limits and cfg.shared_venue_budgets and set(Venue) - set(self._probes):
            self._budgets = budgets.SharedBudgets(self._db, group=cfg.egress_group)
            await self._budgets.start()
        self.retention = retention.Retention(
            self._db, retention.RetentionSettings.of(cfg, verify_window=quotas.VERIFY_WINDOW_SECONDS)
        )
        # the queue first (handlers are registered below), then what records events, then what runs jobs
        settings = queuemod.QueueSettings(
            concurrency=max(1, cfg.workers),
            batch_size=cfg.claim_batch_size,
            lease_seconds=cfg.lease_seconds,
            heartbeat_interval=max(0.05, cfg.lease_seconds / 3),
            poll_interval=cfg.poll_interval,
            max_attempts=cfg.max_attempts,
            backoff_base=cfg.backoff_base,
            backoff_max=cfg.backoff_max,
            shutdown_timeout=cfg.shutdown_timeout,
            listen_check_interval=cfg.listen_check_interval,
            listen_check_timeout=cfg.listen_check_timeout,
            handler_timeout=cfg.job_timeout,
            handler_timeouts=dict(cfg.job_timeouts),  # the operator's overrides win over each kind's own
        )
        queue = self._queue = queuemod.JobQueue(self._db, settings=settings)
        outbox = Outbox(FanOut(queue, self.webhooks.metrics), self.bus.poke)
        await self.webhooks.open(db=self._db, vault=store.vault, queue=queue, outbox=outbox)
        # no venue manager next to an injected probe (a test double): it would call the real exchange
        managers = Managers(
            self._build_sub_account_keys, self._sub_accounts, buildable=set(Venue) - set(self._probes)
        )
        broker = self._broker = Broker(
            BrokerContext(store, self._db, queue, outbox, cfg.broker, managers), cfg
        )
        self._jobs = jobs.LifecycleJobs(
            store=store,
            db=self._db,
            queue=queue,
            outbox=outbox,
            probe=self.probe,
            policy=cfg.policy,
            reverify_interval=cfg.reverify_interval,
            job_retention=cfg.job_retention,
            purge_webhook_secrets=self.webhooks.purge_expired_secrets,
            discover=broker.discovery,
            rotation_hooks=broker.rotation,
        )
        queue.claim_with(jobs.CLAIM_QUERY)  # the verification jobs' reads ride on their claim
        timeouts = jobs.handler_timeouts(cfg)
        for kind, handler in self._jobs.handlers().items():
            queue.register(kind, handler, timeout=timeouts[kind])
        broker_timeouts = broker.timeouts()
        for kind, handler in broker.handlers().items():
            queue.register(kind, handler, timeout=broker_timeouts[kind])
        queue.register(DELIVER, self.webhooks.deliverer.run, timeout=self.webhooks.deliverer.timeout)
        for kind, handler in self.retention.handlers().items():
            queue.register(kind, handler)
        unknown = sorted(set(cfg.job_timeouts) - queue.kinds)
        if unknown:
            raise errors.ConfigurationError(
                f"job_timeouts names no job kind: {', '.join(unknown)} (kinds: {', '.join(sorted(queue.kinds))})",
                field="job_timeouts",
            )
        queue.every(jobs.REVERIFY_SWEEP, jobs.sweep_period(cfg.reverify_interval))
        queue.every(jobs.PURGE_JOBS, jobs.PURGE_PERIOD)
        queue.every(retention.RETENTION_PURGE, cfg.retention_interval)
        broker.schedule(queue)
        accounts = TradingAccounts(store=store, db=self._db, outbox=outbox, credentials=self)
        self._parts = _Parts(store, queue, outbox, accounts)
        self._creates = BatchedCreates(
            store, queue, quota=cfg.quotas.credentials or None, lock_timeout=quotas.LOCK_TIMEOUT
        )
        self.leases.start(self._db, store)  # subscribed before the bus starts: no event of the run is missed
        await self.bus.start(self._db)
        if cfg.workers > 0:
            await queue.start()

    def _keys(self) -> keyproviders.KeyProvider:
        """The key provider given to the constructor, or the one the configuration names (engine/keys/providers.py)."""
        cfg = self.config
        configured = cfg.master_keys or cfg.master_keys_file is not None or cfg.kms is not None
        if self._key_provider is not None:
            if configured:
                raise errors.ConfigurationError(
                    f"a key_provider ({self._key_provider.source}) and master keys in the configuration: "
                    "give only one",
                    field="master_keys",
                )
            return self._key_provider
        return keyproviders.provider_for(
            master_keys=cfg.master_keys,
            master_keys_file=cfg.master_keys_file,
            kms=cfg.kms,
            data_dir=self.data_dir,
        )

    async def close(self) -> None:
        """Finish or hand back running jobs, stop listeners, close what this engine opened. Idempotent."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        self._state = _State.CLOSING
        try:
            await self._teardown()
        finally:
            self._state = _State.CLOSED
        log.info("engine_closed")

    async def _teardown(self) -> None:
        # fixed order: stop taking work, stop telling, then release connections
        if self._creates is not None:  # no new creation; the batch being written ends or is cut off, bounded
            await self._creates.close(timeout=self.config.shutdown_timeout)
        if self._queue is not None:
            await self._queue.stop()
        if self._jobs is not None:  # after the queue: its handlers wait for their batches until it stopped
            await self._jobs.close()
        if self._parts is not None:  # the jobs are done: no read is left to batch (engine/readbatch.py)
            await self._parts.store.reads.close()
        if self._budgets is not None:
            await self._budgets.stop()
        await self.webhooks.close()
        await self.leases.close()  # every lease closed: keys raise LeaseClosed
        await self.bus.stop()
        if self._session is not None and self._injected_session is None:
            await self._session.close()
        if self._db is not None:
            await self._db.close()

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir or default_data_dir()

    def _ready(self) -> _Parts:
        # CLOSING still serves: the jobs the queue lets finish during shutdown use the store and the queue
        if self._state not in (_State.OPEN, _State.CLOSING) or self._parts is None:
            raise errors.EngineClosed("the engine is not open (use `async with CredentialEngine(...)`)")
        return self._parts

    @property
    def db(self) -> dbmod.Database:
        if self._db is None:
            raise errors.EngineClosed("the engine is not open")
        return self._db

    @property
    def store(self) -> Store:
        return self._ready().store

    @property
    def queue(self) -> queuemod.JobQueue:
        return self._ready().queue

    def _batched_creates(self) -> BatchedCreates:
        if self._creates is None:
            raise errors.EngineClosed("the engine is not open")
        return self._creates

    @property
    def create_batches(self) -> CoalescerStats:
        """How create_credential's statements were batched in this process (engine/creates.py): batches, sizes."""
        return self._batched_creates().stats

    @property
    def probe_metrics(self) -> jobs.ProbeMetrics:
        """Verification outcomes and probe latencies seen by this process (the REST API's /metrics)."""
        if self._jobs is None:
            raise errors.EngineClosed("the engine is not open")
        return self._jobs.metrics

    @property
    def venue_budgets(self) -> budgets.SharedBudgets | None:
        """The per-IP venue budgets this process shares with its egress group (None: not shared)."""
        return self._budgets

    @property
    def verify_batches(self) -> CoalescerStats:
        """How the successful verifications' writes were batched in this process (engine/donebatch.py)."""
        if self._jobs is None:
            raise errors.EngineClosed("the engine is not open")
        return self._jobs.done_batch.stats

    def probe(self, venue: Venue) -> Probe:
        """The probe for ``venue`` (injected, or built on first use against ``config.venue_urls``)."""
        probe = self._probes.get(venue)
        if probe is None:
            if self._session is None:
                raise errors.EngineClosed("the engine is not open")
            probe = build_probe(
                venue,
                self._session,
                base_url=self.config.venue_urls.get(venue),
                timeout=self.config.probe_timeout,
                rate_limited=self.config.venue_rate_limits,
                budgets=self._budgets,
            )
            self._probes[venue] = probe
        return probe

    def _build_sub_account_keys(self, venue: Venue) -> SubAccountKeys:
        if self._session is None:
            raise errors.EngineClosed("the engine is not open")
        return build_sub_account_keys(
            venue,
            self._session,
            base_url=self.config.venue_urls.get(venue),
            timeout=self.config.probe_timeout,
            rate_limited=self.config.venue_rate_limits,
            budgets=self._budgets,
        )

    @property
    def broker(self) -> Broker:
        """Minting, automatic rotation and reconciliation of BROKER credentials (engine/broker/)."""
        self._ready()
        if self._broker is None:
            raise errors.EngineClosed("the engine is not open")
        return self._broker

    def _check_keys(self, venue: Venue, keys: ApiKeys) -> None:
        try:
            self.probe(venue).check_keys(keys)
        except KeyFormatProblem as problem:
            raise errors.InvalidKeyFormat(problem.field, problem.reason) from None

    # ---- credentials ---------------------------------------------------------------------------------------

    async def create_credential(
        self,
        owner_id: str,
        *,
        venue: Venue | str,
        api_key: str,
        api_secret: str,
        api_passphrase: str | None = None,
        credential_type: CredentialType | str | None = CredentialType.EXCHANGE,
        nickname: str | None = None,
    ) -> Credential:
        """Store new keys (encrypted) as a PENDING credential and enqueue their verification."""
        store, queue, outbox, _ = self._ready()
        owner = validation.owner(owner_id)
        the_venue = validation.venue(venue)
        ctype = validation.credential_type(credential_type)
        name = validation.nickname(nickname)
        keys = validation.api_keys(the_venue, api_key, api_secret, api_passphrase)
        self._check_keys(the_venue, keys)
        credential_id = uuid.uuid4()
        new = hotpath.creation(
            store,
            credential_id=credential_id,
            owner_id=owner,
            venue=the_venue,
            credential_type=ctype,
            nickname=name,
            keys=keys,
        )
        # one statement, written with the creations made meanwhile, unless an endpoint wants the event
        created = await self._batched_creates().create(new)
        if created is not None:
            outbox.committed()
            return created
        async with self.db.transaction() as conn:
            # first: the owner's lock
            quota = await quotas.lock_for_credential(conn, owner, self.config.quotas)
            cred = await store.insert_credential(
                conn,
                credential_id=credential_id,
                owner_id=owner,
                venue=the_venue,
                credential_type=ctype,
                nickname=name,
                keys=keys,
                quota=quota,
            )
            if cred is None:
                assert quota is not None  # only a quota refuses the insert
                raise quotas.credentials_full(quota)
            # the new row holds event sequence 1, its credential.created
            await outbox.credential_event(conn, cred, "credential.created", sequence=1)
            await enqueue(queue, Verify(credential_id, 1), conn=conn, fair_key=owner)
        outbox.committed()
        return cred

    async def mint_credential(
        self,
        owner_id: str,
        broker_credential_id: uuid.UUID | str,
        *,
        sub_account: str,
        permissions: Mapping[str, Any] | None = None,
        ip_allowlist: list[str] | tuple[str, ...] | None = None,
        nickname: str | None = None,
    ) -> Credential:
        """A new EXCHANGE credential whose key the engine creates for ``sub_account`` through the master key of
        BROKER credential ``broker_credential_id``: PENDING now; the key is minted (``credential.minted``) and
        verified by jobs. ``permissions``: ``{"read": bool, "trade": bool}`` (default both; ``withdraw`` is
        refused); ``ip_allowlist``: default ``broker.ip_allowlist`` (engine/broker/minting.py)."""
        return await self.broker.minting.mint(
            owner_id,
            broker_credential_id,
            sub_account=sub_account,
            permissions=permissions,
            ip_allowlist=ip_allowlist,
            nickname=nickname,
        )

    async def reconcile_broker_keys(self) -> int:
        """Enqueue a reconciliation of every sub-account the engine minted into (engine/broker/reconcile.py):
        keys labelled by the engine that no live credential holds are deleted at the venue. Returns how many
        sub-accounts; ``run_until_idle`` (or the workers) does the rest."""
        return await self.broker.reconciler.sweep()

    async def get_credential(self, owner_id: str, credential_id: uuid.UUID | str) -> Credential:
        store = self._ready().store
        return await store.get(
            validation.owner(owner_id), validation.uuid_value(credential_id, "credentialId")
        )

    async def list_credentials(
        self,
        owner_id: str,
        *,
        status: CredentialStatus | str | None = None,
        credential_type: CredentialType | str | None = None,
        venue: Venue | str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[Credential]:
        store = self._ready().store
        offset, limit = validation.page(offset, limit)
        return await store.list(
            validation.owner(owner_id),
            status=validation.status(status),
            credential_type=validation.credential_type(credential_type)
            if credential_type is not None
            else None,
            venue=validation.venue(venue) if venue is not None else None,
            offset=offset,
            limit=limit,
        )

    async def verify_credential(self, owner_id: str, credential_id: uuid.UUID | str) -> Credential:
        """Enqueue a (re-)verification of the current keys. The status changes when the probe answers."""
        store, queue, _, _ = self._ready()
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        async with self.db.transaction() as conn:
            await quotas.take_verify_request(conn, owner, self.config.quotas)  # first: the owner's lock
            row = await store.lock(conn, owner, cid)
            if not lifecycle.allowed("verify_succeeded", row["status"]):
                raise errors.InvalidTransition("verify", row["status"])
            await enqueue(queue, Verify(cid, int(row["secret_version"])), conn=conn, fair_key=owner)
            return credential_from_row(row)  # the row read under the lock; enqueueing changed none of it

    async def rotate_credential(
        self,
        owner_id: str,
        credential_id: uuid.UUID | str,
        *,
        api_key: str | None = None,
        api_secret: str | None = None,
        api_passphrase: str | None = None,
        immediate: bool = False,
        automatic: bool = False,
    ) -> Credential:
        """Stage new keys; they replace the old ones only once verified on the same venue account.

        ``automatic=True`` (a credential minted through a BROKER credential, no keys given): the engine mints
        the new key for the same sub-account itself, stages, verifies and promotes it, and deletes the old key
        at the venue after ``broker.rotation_grace`` (engine/broker/rotation.py).

        ``immediate=True`` is the compromised-key path: the old material is destroyed now and the credential
        is PENDING until the new keys verify.
        """
        store, queue, outbox, _ = self._ready()
        if automatic:
            for name, value in (
                ("apiKey", api_key),
                ("apiSecret", api_secret),
                ("apiPassphrase", api_passphrase),
            ):
                if value is not None:
                    raise errors.InvalidRequest(
                        name, "must not be given with automatic (the engine mints the key)"
                    )
            if immediate:
                raise errors.InvalidRequest("immediate", "must be false with automatic")
            return await self.broker.rotation.request(owner_id, credential_id)
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        async with self.db.transaction() as conn:
            row = await store.lock(conn, owner, cid)
            the_venue = Venue(row["venue"])
            trigger = "rotate_immediately" if immediate else "rotate"
            lifecycle.target(trigger, row["status"])  # InvalidTransition for REVOKED
            keys = validation.api_keys(the_venue, api_key, api_secret, api_passphrase)
            self._check_keys(the_venue, keys)
            work: Verify | RotationVerify
            if immediate:
                # a verification still queued for the old keys would swallow (dedupe) the one enqueued below
                await queue.cancel_keys([verify_key(cid)], conn=conn)
                # a minted credential's keys at the venue that it no longer holds are deleted there now
                await self.broker.reconciler.settle(conn, cid, the_venue, "IMMEDIATE_ROTATION")
                change = await store.rotate_immediately(conn, row, keys)
                extra: dict[str, Any] = {"immediate": True, "previousStatus": row["status"]}
                # the new keys must reach the credential's pinned venue account (checked by the verify job)
                work = Verify(cid, change.credential.secret_version)
            else:
                if row["pending_version"] is not None:
                    raise errors.RotationPending(
                        "a rotation is already waiting for verification", field="credentialId"
                    )
                change = await store.stage_rotation(conn, row, keys)
                staged = change.credential.pending_rotation
                assert staged is not None  # the statement returns the version it staged
                extra = {"immediate": False}
                work = RotationVerify(cid, staged.secret_version)
            await outbox.credential_event(
                conn, change.credential, "credential.rotation_started", sequence=change.sequence, extra=extra
            )
            await enqueue(queue, work, conn=conn, fair_key=owner)
        outbox.committed()
        return change.credential

    async def revoke_credential(
        self, owner_id: str, credential_id: uuid.UUID | str, *, cascade: bool = True
    ) -> Credential:
        """Revoke for good: destroy all key material and disconnect trading accounts, in one transaction.

        With ``cascade=False`` a credential that still has ACTIVE accounts is refused (409).
        """
        store, queue, outbox, _ = self._ready()
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        async with self.db.transaction() as conn:
            row = await store.lock(conn, owner, cid)
            lifecycle.target("revoke", row["status"])
            if not cascade:
                active = await store.count_active_accounts(conn, cid)
                if active:
                    raise errors.ActiveAccountsExist(
                        f"the credential has {active} ACTIVE trading account(s); disconnect them or revoke with "
                        "cascade",
                        field="credentialId",
                    )
            for account in await store.disconnect_all_accounts(conn, cid):
                disconnected = await store.next_event(conn, cid)
                await outbox.credential_event(
                    conn,
                    disconnected.credential,
                    "trading_account.disconnected",
                    sequence=disconnected.sequence,
                    extra={"tradingAccount": account.public_dict(), "reason": "CREDENTIAL_REVOKED"},
                )
            # a minted credential's keys are deleted at the venue (broker_cleanup), whatever their grace
            await self.broker.reconciler.settle(conn, cid, Venue(row["venue"]), "REVOKED")
            change = await store.revoke(conn, owner, cid)
            await outbox.credential_event(
                conn,
                change.credential,
                "credential.revoked",
                sequence=change.sequence,
                extra={"previousStatus": change.previous_status},
            )
            pending = row["pending_version"]
            cascade_job = RevokeCascade.of(cid, int(pending) if pending is not None else None)
            await enqueue(queue, cascade_job, conn=conn, fair_key=owner)
        outbox.committed()
        return change.credential

    async def wait_for_status(
        self,
        owner_id: str,
        credential_id: uuid.UUID | str,
        statuses: Collection[CredentialStatus | str],
        timeout: float = 30.0,  # noqa: ASYNC109 - the documented public API
    ) -> Credential:
        """Return the credential once its status is one of ``statuses``; :class:`errors.WaitTimeout` otherwise."""
        wanted = {CredentialStatus(str(s)) for s in statuses}
        if not wanted:
            raise errors.InvalidRequest("statuses", "must name at least one status")
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        changed = asyncio.Event()

        async def on_event(event: Event) -> None:
            if event.credential_id == cid:
                changed.set()

        unsubscribe = self.bus.subscribe(on_event)
        deadline = time.monotonic() + timeout
        try:
            while True:
                cred = await self.get_credential(owner, cid)
                if cred.status in wanted:
                    return cred
                if cred.status is CredentialStatus.REVOKED:
                    raise errors.InvalidTransition("wait for " + "/".join(sorted(wanted)), "REVOKED")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise errors.WaitTimeout(
                        f"credential {cid} is still {cred.status.value} after {timeout:g}s",
                        field="credentialId",
                    )
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=min(remaining, 0.5))
        finally:
            unsubscribe()

    async def reveal_keys(
        self, owner_id: str, credential_id: uuid.UUID | str, *, purpose: str | None = None
    ) -> ApiKeys:
        """The decrypted keys, for the trading backend to sign its own requests. Audited; repr redacted."""
        store = self._ready().store
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        reason = validation.nickname(purpose, "purpose")
        async with self.db.transaction() as conn:
            row = await store.lock(conn, owner, cid)
            if row["status"] == CredentialStatus.REVOKED:
                raise errors.InvalidTransition("reveal keys of", "REVOKED")
            if row["status"] == CredentialStatus.FAILED and row["failure_reason"] == jobs.ACCOUNT_MISMATCH:
                # the keys now reach another venue account than the one the credential (and its trading
                # accounts) are pinned to: handing them out would trade on the wrong account
                raise errors.Conflict(
                    "the credential's keys reach another venue account than the one it is pinned to; "
                    "rotate to keys of the pinned account",
                    field="credentialId",
                )
            secret = await store.get_secret(cid, int(row["secret_version"]), conn=conn)
            if secret is None:
                raise errors.Conflict("the credential holds no key material", field="credentialId")
            keys = store.open_secret(secret)
            await store.audit_reveal(conn, cid, owner, secret.version, reason)
        log.info("keys_revealed", credential_id=str(cid), secret_version=secret.version)
        return keys

    @contextlib.asynccontextmanager
    async def lease_keys(
        self,
        owner_id: str,
        credential_id: uuid.UUID | str,
        *,
        purpose: str | None = None,
        allow_pending: bool = False,
    ) -> AsyncIterator[KeyLease]:
        """``async with eng.lease_keys(owner, cid, purpose="market maker") as lease``: the credential's live keys
        for the block (engine/live). ``lease.keys`` is a memory read that follows every rotation (in any engine
        process on the database) and raises :class:`errors.CredentialRevoked` once the credential is revoked.

        The credential must be VERIFIED (``allow_pending``: PENDING too, for tests); a REVOKED one raises
        CredentialRevoked, another status InvalidTransition. Opening is audited once (``key_access_audit``,
        access ``lease_open``: owner, purpose, secret version), every swap too (``lease_swap``).
        """
        self._ready()
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        reason = validation.nickname(purpose, "purpose")
        lease = await self.leases.open(owner, cid, purpose=reason, allow_pending=bool(allow_pending))
        try:
            yield lease
        finally:
            lease.close()

    async def list_events(self, owner_id: str, credential_id: uuid.UUID | str) -> list[Event]:
        """Every event of one credential, in sequence order (the outbox is kept)."""
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        await self.get_credential(owner, cid)
        rows = await self.db.fetch("list_events", cid, owner)
        return [events.event_from_row(r) for r in rows]

    # ---- trading accounts (engine/accounts.py) -------------------------------------------------------------

    async def connect_trading_account(
        self,
        owner_id: str,
        *,
        credential_id: uuid.UUID | str | None = None,
        account_type: str | None = None,
        name: str | None = None,
        venue: Venue | str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
        api_passphrase: str | None = None,
        wait_timeout: float = 30.0,
    ) -> TradingAccount:
        """Connect an account of a VERIFIED credential, or create + verify + connect from keys (api-dialect §8)."""
        return await self._ready().accounts.connect(
            owner_id,
            credential_id=credential_id,
            account_type=account_type,
            name=name,
            venue=venue,
            api_key=api_key,
            api_secret=api_secret,
            api_passphrase=api_passphrase,
            wait_timeout=wait_timeout,
        )

    async def disconnect_trading_account(
        self, owner_id: str, trading_account_id: uuid.UUID | str
    ) -> TradingAccount:
        return await self._ready().accounts.disconnect(owner_id, trading_account_id)

    async def get_trading_account(self, owner_id: str, trading_account_id: uuid.UUID | str) -> TradingAccount:
        return await self._ready().accounts.get(owner_id, trading_account_id)

    async def list_trading_accounts(
        self,
        owner_id: str,
        *,
        credential_id: uuid.UUID | str | None = None,
        status: TradingAccountStatus | str | None = None,
        venue: Venue | str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[TradingAccount]:
        return await self._ready().accounts.list(
            owner_id, credential_id=credential_id, status=status, venue=venue, offset=offset, limit=limit
        )

    async def ccxt_exchange(
        self,
        owner_id: str,
        trading_account_id: uuid.UUID | str,
        *,
        purpose: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Any:
        """A ``ccxt.async_support`` exchange for an ACTIVE trading account, signing with a key lease on its
        credential: a rotation signs the next request with the new keys, a revocation or a disconnection closes
        it (later calls raise :class:`errors.ExchangeClosed`). ``config`` goes to ccxt's constructor (``timeout``,
        ``enableRateLimit``, ``options``); close the exchange when done (it releases the lease). Needs the
        ``ccxt`` extra (engine/live/ccxt.py)."""
        self._ready()
        from engine.live import ccxt as bridge  # the optional extra loads on first use

        return await bridge.open_exchange(
            self,
            owner_id,
            trading_account_id,
            purpose=purpose,
            venue_urls=self.config.venue_urls,
            config=config,
        )

    # ---- events, jobs, keys --------------------------------------------------------------------------------

    def subscribe(self, listener: events.Listener, types: Collection[str] | None = None) -> Any:
        """Hear every event committed from now on by any engine process on this database; returns unsubscribe."""
        return self.bus.subscribe(listener, types)

    async def run_until_idle(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - arq-style API
        """Run every due job, deliver every event to listeners and let the key leases take the keys it brought,
        until nothing is left to do (tests, scripts)."""
        queue = self._ready().queue
        total = 0
        while True:
            ran = await queue.run_until_idle(timeout=timeout)
            await self.bus.drain()
            await self.leases.settle()  # the keys the events brought have reached the leases
            total += ran
            if ran == 0:
                return total

    async def list_dead_jobs(self, limit: int = 100) -> list[Any]:
        return list(await self.queue.list_dead(limit=limit))

    async def retry_job(self, job_id: int) -> bool:
        return await self.queue.retry_dead(job_id)

    async def rewrap_keys(
        self,
        *,
        batch_size: int = rewrap.DEFAULT_BATCH_SIZE,
        progress: rewrap.Progress | None = None,
        lock_timeout: float = rewrap.DEFAULT_LOCK_TIMEOUT,
    ) -> rewrap.RewrapReport:
        """Re-wrap every data key (credential secrets, webhook secrets, engine keys) under the current master key.

        No secret is decrypted. Rows other transactions hold are skipped while passes make progress, then waited
        for (``lock_timeout`` seconds in all). Drop an old master key version only when the report is
        ``complete``; otherwise ``report.left`` names what is still under an old version (engine/keys/rewrap.py).
        """
        store = self._ready().store
        runner = rewrap.Rewrapper(
            self.db, store.vault, batch_size=batch_size, lock_timeout=lock_timeout, progress=progress
        )
        return await runner.run()

    # ---- webhooks (engine/webhooks/service.py; Standard Webhooks delivery in engine/webhooks/delivery.py) ------

    async def add_webhook_endpoint(
        self,
        owner_id: str,
        url: str,
        event_types: Collection[str] | None = None,
        description: str | None = None,
    ) -> WebhookEndpoint:
        """A new endpoint for ``owner_id``'s events (None: every type). ``.secret`` is shown this once."""
        self._ready()
        return await self.webhooks.add_endpoint(owner_id, url, event_types, description)

    async def list_webhook_endpoints(self, owner_id: str) -> list[WebhookEndpoint]:
        self._ready()
        return await self.webhooks.list_endpoints(owner_id)

    async def get_webhook_endpoint(self, owner_id: str, endpoint_id: uuid.UUID | str) -> WebhookEndpoint:
        self._ready()
        return await self.webhooks.get_endpoint(owner_id, endpoint_id)

    async def remove_webhook_endpoint(self, owner_id: str, endpoint_id: uuid.UUID | str) -> None:
        """Delete the endpoint with its secrets, deliveries and attempts."""
        self._ready()
        await self.webhooks.remove_endpoint(owner_id, endpoint_id)

    async def rotate_webhook_secret(self, owner_id: str, endpoint_id: uuid.UUID | str) -> str:
        """A new secret (returned once); the old one keeps signing for ``webhook_secret_grace`` seconds."""
        self._ready()
        return await self.webhooks.rotate_secret(owner_id, endpoint_id)

    async def update_webhook_endpoint(
        self,
        owner_id: str,
        endpoint_id: uuid.UUID | str,
        *,
        enabled: bool | None = None,
        event_types: Collection[str] | None = None,
        url: str | None = None,
    ) -> WebhookEndpoint:
        """Change what is given (``event_types=[]``: every type). Disabling marks pending deliveries dead."""
        self._ready()
        return await self.webhooks.update_endpoint(
            owner_id, endpoint_id, enabled=enabled, types=event_types, url=url
        )

    async def list_webhook_deliveries(
        self,
        owner_id: str,
        endpoint_id: uuid.UUID | str | None = None,
        *,
        state: DeliveryState | str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> Page[WebhookDelivery]:
        """Deliveries, newest first, each with every attempt (status code, latency, error)."""
        self._ready()
        return await self.webhooks.list_deliveries(
            owner_id, endpoint_id, state=state, offset=offset, limit=limit
        )

    async def retry_webhook_delivery(self, owner_id: str, delivery_id: uuid.UUID | str) -> WebhookDelivery:
        """Send a dead delivery again; its retry schedule starts over."""
        self._ready()
        return await self.webhooks.retry_delivery(owner_id, delivery_id)
