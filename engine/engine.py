"""``CredentialEngine``: the one object an embedding application holds.

It owns the pool, the HTTP session, the workers and the event bus (except a pool or session the caller
injected: those it uses and never closes), does no I/O in its constructor, opens once (``async with``),
and refuses to reopen after closing. Every lifecycle operation is one transaction that locks the credential
row first, applies the guarded change, writes its outbox event(s) and enqueues the job that follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver

from engine import crypto, errors, events, jobs, lifecycle, quotas, retention, rewrap, validation
from engine import db as dbmod
from engine import queue as queuemod
from engine.config import EngineConfig
from engine.embedded import default_data_dir, start_embedded
from engine.models import (
    Credential,
    CredentialStatus,
    CredentialType,
    Event,
    Page,
    TradingAccount,
    TradingAccountStatus,
)
from engine.store import Store, account_from_row, credential_from_row
from engine.webhooks import service as webhooks_service
from engine.webhooks.models import DeliveryState, WebhookDelivery, WebhookEndpoint
from venues import build_probe
from venues.base import ApiKeys, KeyFormatProblem, Probe, Venue, mask_api_key

log = structlog.get_logger("engine")


class _State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"  # jobs still running may finish their work; then everything is released
    CLOSED = "closed"


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
    ) -> None:
        self.config = config if config is not None else EngineConfig()
        self._injected_pool = pool
        self._injected_session = http_session
        self._probes: dict[Venue, Probe] = dict(probes or {})
        self._state = _State.NEW
        self.bus = events.EventBus(
            poll_interval=self.config.poll_interval,
            listen_check_interval=self.config.listen_check_interval,
            listen_check_timeout=self.config.listen_check_timeout,
        )
        self._db: dbmod.Database | None = None
        self._store: Store | None = None
        self._queue: queuemod.JobQueue | None = None
        self._session: aiohttp.ClientSession | None = None
        self._jobs: jobs.LifecycleJobs | None = None
        # webhook endpoints and deliveries; webhook_resolver replaces DNS lookups (the SSRF guard still applies)
        self.webhooks = webhooks_service.WebhookService(self, resolver=webhook_resolver)

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
            self._db = dbmod.Database.from_pool(self._injected_pool, acquire_timeout=cfg.pool_acquire_timeout)
        else:
            dsn = cfg.database_url or await start_embedded(self.data_dir)
            self._db = await dbmod.Database.connect(
                dsn,
                min_size=cfg.pool_min_size,
                max_size=cfg.pool_max_size,
                acquire_timeout=cfg.pool_acquire_timeout,
                command_timeout=cfg.db_command_timeout,
            )
        await self._db.apply_schema()
        if cfg.master_keys:
            keyring = crypto.MasterKeyring.from_spec(cfg.master_keys)
        else:
            keyring = await asyncio.to_thread(
                crypto.MasterKeyring.load_or_create, self.data_dir / "master.keys"
            )
        await rewrap.check_keyring(self._db, keyring)  # no start with a master key version missing
        self._store = Store(self._db, crypto.Vault(keyring))
        await self._store.load_fingerprint_key()
        self._session = self._injected_session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, ttl_dns_cache=300)
        )
        self._jobs = jobs.LifecycleJobs(self)
        self.retention = retention.Retention(self._db, retention.RetentionSettings.of(cfg))
        handlers = {**self._jobs.handlers(), **self.webhooks.handlers(), **self.retention.handlers()}
        unknown = sorted(set(cfg.job_timeouts) - set(handlers))
        if unknown:
            raise errors.ConfigurationError(
                f"job_timeouts names no job kind: {', '.join(unknown)} (kinds: {', '.join(sorted(handlers))})",
                field="job_timeouts",
            )
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
            handler_timeouts={
                **jobs.handler_timeouts(cfg),
                **self.webhooks.handler_timeouts(),
                **cfg.job_timeouts,
            },
        )
        self._queue = queuemod.JobQueue(self._db, handlers, settings)
        self._queue.every(jobs.REVERIFY_SWEEP, jobs.sweep_period(cfg.reverify_interval))
        self._queue.every(jobs.PURGE_JOBS, jobs.PURGE_PERIOD)
        self._queue.every(retention.RETENTION_PURGE, cfg.retention_interval)
        await self.webhooks.start()
        await self.bus.start(self._db)
        if cfg.workers > 0:
            await self._queue.start()

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
        if self._queue is not None:
            await self._queue.stop()
        await self.webhooks.close()
        await self.bus.stop()
        if self._session is not None and self._injected_session is None:
            await self._session.close()
        if self._db is not None:
            await self._db.close()

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir or default_data_dir()

    def _ready(self) -> tuple[Store, queuemod.JobQueue]:
        # CLOSING still serves: the jobs the queue lets finish during shutdown use the store and the queue
        if self._state not in (_State.OPEN, _State.CLOSING) or self._store is None or self._queue is None:
            raise errors.EngineClosed("the engine is not open (use `async with CredentialEngine(...)`)")
        return self._store, self._queue

    @property
    def db(self) -> dbmod.Database:
        if self._db is None:
            raise errors.EngineClosed("the engine is not open")
        return self._db

    @property
    def store(self) -> Store:
        return self._ready()[0]

    @property
    def queue(self) -> queuemod.JobQueue:
        return self._ready()[1]

    @property
    def probe_metrics(self) -> jobs.ProbeMetrics:
        """Verification outcomes and probe latencies seen by this process (the REST API's /metrics)."""
        if self._jobs is None:
            raise errors.EngineClosed("the engine is not open")
        return self._jobs.metrics

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
            )
            self._probes[venue] = probe
        return probe

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
        store, queue = self._ready()
        owner = validation.owner(owner_id)
        the_venue = validation.venue(venue)
        ctype = validation.credential_type(credential_type)
        name = validation.nickname(nickname)
        keys = validation.api_keys(the_venue, api_key, api_secret, api_passphrase)
        self._check_keys(the_venue, keys)
        credential_id = uuid.uuid4()
        async with self.db.transaction() as conn:
            await quotas.check_credentials(conn, owner, self.config.quotas)  # first: the owner's lock
            await store.insert_credential(
                conn,
                credential_id=credential_id,
                owner_id=owner,
                venue=the_venue,
                credential_type=ctype,
                nickname=name,
                keys=keys,
            )
            # the new row already holds event sequence 1 (insert_credential): no separate bump
            cred = await self._emit(conn, owner, credential_id, "credential.created", sequence=1)
            await queue.enqueue(
                jobs.VERIFY,
                {"credentialId": str(credential_id), "version": 1},
                conn=conn,
                dedupe_key=jobs.verify_key(credential_id),
                fair_key=owner,
            )
        self.bus.poke()
        return cred

    async def get_credential(self, owner_id: str, credential_id: uuid.UUID | str) -> Credential:
        store, _ = self._ready()
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
        store, _ = self._ready()
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
        store, queue = self._ready()
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        async with self.db.transaction() as conn:
            await quotas.take_verify_request(conn, owner, self.config.quotas)  # first: the owner's lock
            row = await store.lock(conn, owner, cid)
            if not lifecycle.allowed("verify_succeeded", row["status"]):
                raise errors.InvalidTransition("verify", row["status"])
            await queue.enqueue(
                jobs.VERIFY,
                {"credentialId": str(cid), "version": int(row["secret_version"])},
                conn=conn,
                dedupe_key=jobs.verify_key(cid),
                fair_key=owner,
            )
            return credential_from_row(row)  # the row read under the lock; enqueueing changed none of it

    async def rotate_credential(
        self,
        owner_id: str,
        credential_id: uuid.UUID | str,
        *,
        api_key: str,
        api_secret: str,
        api_passphrase: str | None = None,
        immediate: bool = False,
    ) -> Credential:
        """Stage new keys; they replace the old ones only once verified on the same venue account.

        ``immediate=True`` is the compromised-key path: the old material is destroyed now and the credential
        is PENDING until the new keys verify.
        """
        store, queue = self._ready()
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        async with self.db.transaction() as conn:
            row = await store.lock(conn, owner, cid)
            the_venue = Venue(row["venue"])
            trigger = "rotate_immediately" if immediate else "rotate"
            lifecycle.target(trigger, row["status"])  # InvalidTransition for REVOKED
            keys = validation.api_keys(the_venue, api_key, api_secret, api_passphrase)
            self._check_keys(the_venue, keys)
            old_version = int(row["secret_version"])
            if immediate:
                # a verification still queued for the old keys would swallow (dedupe) the one enqueued below
                await queue.cancel_keys([jobs.verify_key(cid)], conn=conn)
                await conn.fetch("delete_pending_secrets", cid)
                await conn.execute("delete_secret", cid, old_version)
                moved = await conn.fetchrow(
                    "rotate_immediately", cid, lifecycle.sources(trigger), old_version, _masked(keys)
                )
                assert moved is not None  # the row is locked and its status was checked
                version, sequence = int(moved["secret_version"]), int(moved["event_seq"])
                state, extra = "CURRENT", {"immediate": True, "previousStatus": row["status"]}
                job_kind, dedupe_key = jobs.VERIFY, jobs.verify_key(cid)
                # the new keys must reach the credential's pinned venue account (checked by the verify job)
                payload = {"credentialId": str(cid), "version": version}
            else:
                if row["pending_version"] is not None:
                    raise errors.RotationPending(
                        "a rotation is already waiting for verification", field="credentialId"
                    )
                staged = await conn.fetchrow("stage_rotation", cid, lifecycle.sources(trigger), old_version)
                assert staged is not None
                version, sequence = int(staged["last_secret_version"]), int(staged["event_seq"])
                state, extra = "PENDING", {"immediate": False}
                job_kind, dedupe_key = jobs.ROTATION_VERIFY, jobs.rotation_key(cid, version)
                payload = {"credentialId": str(cid), "version": version}
            await store.insert_secret(
                conn,
                credential_id=cid,
                owner_id=owner,
                venue=the_venue,
                version=version,
                state=state,
                keys=keys,
            )
            cred = await self._emit(
                conn, owner, cid, "credential.rotation_started", sequence=sequence, extra=extra
            )
            await queue.enqueue(job_kind, payload, conn=conn, dedupe_key=dedupe_key, fair_key=owner)
        self.bus.poke()
        return cred

    async def revoke_credential(
        self, owner_id: str, credential_id: uuid.UUID | str, *, cascade: bool = True
    ) -> Credential:
        """Revoke for good: destroy all key material and disconnect trading accounts, in one transaction.

        With ``cascade=False`` a credential that still has ACTIVE accounts is refused (409).
        """
        store, queue = self._ready()
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        async with self.db.transaction() as conn:
            row = await store.lock(conn, owner, cid)
            lifecycle.target("revoke", row["status"])
            active = int(await conn.fetchval("count_active_accounts", cid))
            if active and not cascade:
                raise errors.ActiveAccountsExist(
                    f"the credential has {active} ACTIVE trading account(s); disconnect them or revoke with cascade",
                    field="credentialId",
                )
            for account_row in await conn.fetch("disable_credential_accounts", cid):
                account = account_from_row(account_row)
                await self._emit(
                    conn,
                    owner,
                    cid,
                    "trading_account.disconnected",
                    extra={"tradingAccount": account.public_dict(), "reason": "CREDENTIAL_REVOKED"},
                )
            await conn.execute("delete_all_secrets", cid)
            revoked = await conn.fetchrow("mark_revoked", cid, owner, lifecycle.sources("revoke"))
            assert revoked is not None
            cred = await self._emit(
                conn,
                owner,
                cid,
                "credential.revoked",
                sequence=int(revoked["event_seq"]),
                extra={"previousStatus": revoked["previous_status"]},
            )
            cancel = [jobs.verify_key(cid)]
            if row["pending_version"] is not None:
                cancel.append(jobs.rotation_key(cid, int(row["pending_version"])))
            await queue.enqueue(
                jobs.REVOKE_CASCADE,
                {"credentialId": str(cid), "cancelKeys": cancel},
                conn=conn,
                fair_key=owner,
            )
        self.bus.poke()
        return cred

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
        store, _ = self._ready()
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
            await conn.execute("insert_key_access", cid, owner, secret.version, reason)
        log.info("keys_revealed", credential_id=str(cid), secret_version=secret.version)
        return keys

    async def list_events(self, owner_id: str, credential_id: uuid.UUID | str) -> list[Event]:
        """Every event of one credential, in sequence order (the outbox is kept)."""
        owner = validation.owner(owner_id)
        cid = validation.uuid_value(credential_id, "credentialId")
        await self.get_credential(owner, cid)
        rows = await self.db.fetch("list_events", cid, owner)
        return [events.event_from_row(r) for r in rows]

    # ---- trading accounts ----------------------------------------------------------------------------------

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
        store, _ = self._ready()
        owner = validation.owner(owner_id)
        wanted_type = validation.account_type(account_type)
        account_name = validation.nickname(name, "name")
        if credential_id is None:
            cid = await self._credential_for_keys(
                owner, venue, api_key, api_secret, api_passphrase, wait_timeout
            )
        else:
            cid = validation.uuid_value(credential_id, "credentialId")
        async with self.db.transaction() as conn:
            row = await store.lock(conn, owner, cid)
            if row["status"] != CredentialStatus.VERIFIED:
                raise errors.Conflict(
                    f"the credential must be VERIFIED to connect accounts (it is {row['status']})",
                    field="credentialId",
                )
            cred = credential_from_row(row)
            chosen = wanted_type or (cred.identities[0] if cred.identities else "default")
            if cred.identities and chosen not in cred.identities:
                raise errors.InvalidRequest(
                    "accountType", f"this credential reaches {', '.join(cred.identities)}, not {chosen}"
                )
            try:  # a unique violation aborts the transaction anyway: no savepoint needed to report it
                account_row = await conn.fetchrow(
                    "insert_trading_account",
                    uuid.uuid4(),
                    owner,
                    cid,
                    cred.venue.value,
                    account_name,
                    chosen,
                )
            except dbmod.UniqueViolation:
                raise errors.Conflict(
                    f"a {chosen} account of this credential is already connected", field="accountType"
                ) from None
            assert account_row is not None
            account = account_from_row(account_row)
            await self._emit(
                conn, owner, cid, "trading_account.connected", extra={"tradingAccount": account.public_dict()}
            )
        self.bus.poke()
        return account

    async def _credential_for_keys(
        self,
        owner: str,
        venue: Venue | str | None,
        api_key: str | None,
        api_secret: str | None,
        api_passphrase: str | None,
        wait_timeout: float,
    ) -> uuid.UUID:
        store, _ = self._ready()
        the_venue = validation.venue(venue)
        keys = validation.api_keys(the_venue, api_key, api_secret, api_passphrase)
        existing = await store.find_by_fingerprint(owner, the_venue, keys.api_key)
        if existing is not None:
            cid = existing
        else:
            cred = await self.create_credential(
                owner,
                venue=the_venue,
                api_key=keys.api_key,
                api_secret=keys.api_secret,
                api_passphrase=keys.api_passphrase,
            )
            cid = cred.credential_id
        done = await self.wait_for_status(
            owner, cid, {CredentialStatus.VERIFIED, CredentialStatus.FAILED}, timeout=wait_timeout
        )
        if done.status is CredentialStatus.FAILED:
            if existing is None:  # do not keep keys that failed, created only for this call
                await self.revoke_credential(owner, cid)
            raise errors.VerificationFailed(
                f"Invalid API credentials for {the_venue.value}", reason=done.failure_reason
            )
        return cid

    async def disconnect_trading_account(
        self, owner_id: str, trading_account_id: uuid.UUID | str
    ) -> TradingAccount:
        store, _ = self._ready()
        owner = validation.owner(owner_id)
        aid = validation.uuid_value(trading_account_id, "tradingAccountId")
        current = await store.get_account(owner, aid)
        async with self.db.transaction() as conn:
            await store.lock(conn, owner, current.credential_id)
            row = await conn.fetchrow("disable_trading_account", aid, owner)
            if row is None:  # already DISABLED: idempotent. Read on this transaction's connection: the pool
                return await store.get_account(owner, aid, conn=conn)  # refuses a task that holds one
            account = account_from_row(row)
            await self._emit(
                conn,
                owner,
                account.credential_id,
                "trading_account.disconnected",
                extra={"tradingAccount": account.public_dict(), "reason": "DISCONNECTED"},
            )
        self.bus.poke()
        return account

    async def get_trading_account(self, owner_id: str, trading_account_id: uuid.UUID | str) -> TradingAccount:
        store, _ = self._ready()
        return await store.get_account(
            validation.owner(owner_id), validation.uuid_value(trading_account_id, "tradingAccountId")
        )

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
        store, _ = self._ready()
        offset, limit = validation.page(offset, limit)
        return await store.list_accounts(
            validation.owner(owner_id),
            credential_id=None
            if credential_id is None
            else validation.uuid_value(credential_id, "credentialId"),
            status=validation.account_status(status),
            venue=validation.venue(venue) if venue is not None else None,
            offset=offset,
            limit=limit,
        )

    # ---- events, jobs, keys --------------------------------------------------------------------------------

    def subscribe(self, listener: events.Listener, types: Collection[str] | None = None) -> Any:
        """Hear every event committed from now on by any engine process on this database; returns unsubscribe."""
        return self.bus.subscribe(listener, types)

    async def run_until_idle(self, timeout: float | None = None) -> int:  # noqa: ASYNC109 - arq-style API
        """Run every due job and deliver every event to listeners, until nothing is left to do (tests, scripts)."""
        _, queue = self._ready()
        total = 0
        while True:
            ran = await queue.run_until_idle(timeout=timeout)
            await self.bus.drain()
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
        ``complete``; otherwise ``report.left`` names what is still under an old version (engine/rewrap.py).
        """
        store, _ = self._ready()
        runner = rewrap.Rewrapper(
            self.db, store.vault, batch_size=batch_size, lock_timeout=lock_timeout, progress=progress
        )
        return await runner.run()

    # ---- webhooks (engine/webhooks_service.py; Standard Webhooks delivery in engine/webhooks_delivery.py) ------

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

    # ---- helpers -------------------------------------------------------------------------------------------

    async def _emit(
        self,
        conn: dbmod.Conn,
        owner: str,
        cid: uuid.UUID,
        event_type: str,
        *,
        sequence: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Credential:
        """Write one event with the credential's public fields as they are now in this transaction."""
        if sequence is None:
            sequence = int(await conn.fetchval("bump_event_seq", cid))
        cred = await self.store.get(owner, cid, conn=conn)
        data = {"credential": cred.public_dict(), **dict(extra or {})}
        recorded = await events.record(
            conn, type=event_type, owner_id=owner, credential_id=cid, sequence=sequence, data=data
        )
        if recorded.webhooks_wanted:  # deliveries commit with the event (webhooks_service.py)
            await self.webhooks.fan_out(conn, recorded.event)
        return cred


def _masked(keys: ApiKeys) -> str:
    return mask_api_key(keys.api_key)
