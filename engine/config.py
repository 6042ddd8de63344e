"""Configuration: frozen keyword-only dataclasses passed in explicitly, with one ``from_env()``.

Environment variables (all optional; README's configuration table lists every one): one per field, read by
the one loop of :mod:`engine.environment` (``ENGINE_<FIELD>``, converted by the field's type, within its
bounds; a bad value is a ``ConfigurationError`` naming the variable). The names that differ from the rule
are the documented ones: ``DATABASE_URL`` (or libpq's ``PG*`` variables; none: the embedded server in
``ENGINE_DATA_DIR``), ``ENGINE_POLICY_ALLOW_WITHDRAW`` (the opposite of ``reject_withdraw``),
``ENGINE_QUOTA_VERIFY_PER_HOUR``, and the KMS settings (``ENGINE_MASTER_KEYS_KMS``, ``..._KMS_FILE``,
``ENGINE_KMS_*``: engine/keys/providers.py). The secrets ``DATABASE_URL`` and ``ENGINE_LISTEN_DATABASE_URL``
may instead be given as ``<VAR>_FILE``; ``ENGINE_MASTER_KEYS``'s file form is ``ENGINE_MASTER_KEYS_FILE``
(the key file provider, with its permission checks). The BROKER settings (``ENGINE_ROTATION_*``,
``ENGINE_BROKER_*``, ``ENGINE_MINT_IP_ALLOWLIST``) are in engine/broker/settings.py.

Secret-bearing settings (``database_url``, ``master_keys``) are kept as :mod:`engine.sensitive` strings:
``repr(config)`` shows the DSN with its password masked and the master keys as their versions only, and so
does a traceback rendered with frame locals. :meth:`EngineConfig.from_env` reads only the variables it
knows, secrets masked, so a failure while it runs never shows the environment.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from engine import environment, errors, liveness, logs
from engine.bounds import retention
from engine.broker.settings import BrokerSettings
from engine.environment import settings_view
from engine.keys import KmsSettings
from engine.sensitive import MasterKeysText, SecretDsn
from venues.base import Permissions, ProbeResult, Venue

DAY_MS = 86_400_000
AT_LEAST_ONE = environment.Bound(minimum=1)
_EGRESS_GROUP = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # an egress group name
DB_POOLERS = ("none", "session", "transaction")
DEFAULT_STATEMENT_CACHE_SIZE = 100  # asyncpg's own default
# Svix's published schedule: delay before each attempt of a webhook delivery (the first is immediate)
WEBHOOK_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True, kw_only=True)
class VerificationPolicy:
    """What a verified key must satisfy. The best practices of docs/api-dialect.md §10: never allow withdrawals."""

    reject_withdraw: bool = True
    require_trade: bool = False
    require_ip_allowlist: bool = False
    expiry_warning_days: int = 7

    ENV: ClassVar[environment.Section] = environment.Section(
        prefix="ENGINE_POLICY_",
        names={"reject_withdraw": "ENGINE_POLICY_ALLOW_WITHDRAW"},  # documented as the permission
        inverted=frozenset({"reject_withdraw"}),
    )

    def __post_init__(self) -> None:
        days = self.expiry_warning_days
        if isinstance(days, bool) or not isinstance(days, int) or days < 0:
            raise errors.ConfigurationError(
                "expiry_warning_days must be an integer >= 0 (0: no warning before a key expires)",
                field="expiry_warning_days",
            )

    def evaluate(
        self, result: ProbeResult, *, now_ms: int | None = None
    ) -> tuple[str | None, tuple[str, ...]]:
        """(rejection reason naming the rule, or None; warnings). Reasons are stable identifiers."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        perms: Permissions = result.permissions
        warnings: list[str] = []
        if perms.expires_at_ms is not None and perms.expires_at_ms <= now:
            return "KEY_EXPIRED", ()
        if self.reject_withdraw and perms.withdraw:
            return "POLICY_WITHDRAW_ENABLED", ()
        if self.require_trade and not perms.trade:
            return "POLICY_TRADE_REQUIRED", ()
        if self.require_ip_allowlist and not perms.ip_restricted:
            return "POLICY_IP_ALLOWLIST_REQUIRED", ()
        if perms.expires_at_ms is not None and perms.expires_at_ms - now <= self.expiry_warning_days * DAY_MS:
            days = max(0, (perms.expires_at_ms - now) // DAY_MS)
            warnings.append(f"KEY_EXPIRING: expires in {days} day(s)")
        if result.details.get("permissions") == "unknown":
            warnings.append("PERMISSIONS_UNKNOWN: the venue does not report this key's permissions")
        if not perms.ip_restricted:
            warnings.append("NO_IP_ALLOWLIST: the key is not restricted to IP addresses")
        return None, tuple(warnings)


@dataclass(frozen=True, kw_only=True)
class Quotas:
    """What one owner may hold and do, enforced by the engine (library, CLI and REST API alike) under a
    per-owner lock, so concurrent calls in any number of processes cannot exceed them (``engine.bounds.quotas``).
    0 means no quota of that kind."""

    credentials: int = 10_000  # credentials not REVOKED (revoked ones hold no keys and do not count)
    webhook_endpoints: int = 50
    verify_requests_per_hour: int = 1_000  # verify_credential calls in any rolling hour

    ENV: ClassVar[environment.Section] = environment.Section(
        prefix="ENGINE_QUOTA_", names={"verify_requests_per_hour": "ENGINE_QUOTA_VERIFY_PER_HOUR"}
    )

    def __post_init__(self) -> None:
        for name in ("credentials", "webhook_endpoints", "verify_requests_per_hour"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise errors.ConfigurationError(
                    f"quota {name} must be an integer >= 0 (0: no quota)", field=name
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Quotas:
        """The ``ENGINE_QUOTA_*`` variables (unset: the defaults above)."""
        return environment.build(cls, settings_view(env))


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything the engine needs; no I/O happens when it is built.

    ``database_url`` and ``master_keys`` may be given as plain strings; they are stored as
    :class:`~engine.sensitive.SecretDsn` and :class:`~engine.sensitive.MasterKeysText` (still ``str``), so
    the ``repr`` shows ``postgresql://user:***@host/db`` and ``<master keys: versions 1, 2>``.
    """

    database_url: str | None = None
    data_dir: Path | None = None
    master_keys: str | None = None
    master_keys_file: Path | None = None  # a file holding the spec (engine/keys/providers.py KeyFile)
    kms: KmsSettings | None = None  # the spec encrypted by AWS KMS (engine/keys/providers.py AwsKmsKeys)
    venue_urls: Mapping[Venue, str] = field(default_factory=dict)
    probe_timeout: float = 10.0
    # honour the venues' documented limits client side; off only against simulators and test servers
    venue_rate_limits: bool = True
    # the processes leaving through one public IP share the venues' per-IP budgets (engine/bounds/budgets.py); give
    # each egress IP its own group name. shared_venue_budgets=False: each process keeps them alone (one per IP)
    egress_group: str = "default"
    shared_venue_budgets: bool = True
    policy: VerificationPolicy = field(default_factory=VerificationPolicy)
    quotas: Quotas = field(default_factory=Quotas)
    # minted credentials: the rotation policy, the grace periods, the IP allow-list (engine/broker/settings.py)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    workers: int = 10  # concurrent jobs in this process; 0 = this process runs no workers
    claim_batch_size: int = 50
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    max_attempts: int = 20
    backoff_base: float = 1.0
    backoff_max: float = 600.0
    shutdown_timeout: float = 10.0
    job_timeout: float = 300.0  # seconds a handler of a kind without its own timeout may run
    job_timeouts: Mapping[str, float] = field(default_factory=dict)  # job kind -> seconds (overrides)
    reverify_interval: float = 86_400.0
    job_retention: float = 7 * 86_400.0  # done and cancelled jobs are purged this long after they finished
    # the retention purge (engine/bounds/retention.py): seconds each kind of row is kept, 0 = for ever
    event_retention: float = retention.DEFAULT_EVENT_RETENTION  # and only once read by every live bus
    delivery_retention: float = retention.DEFAULT_DELIVERY_RETENTION  # delivered webhook deliveries
    dead_delivery_retention: float = retention.DEFAULT_DEAD_DELIVERY_RETENTION
    key_access_retention: float = retention.DEFAULT_KEY_ACCESS_RETENTION
    retention_interval: float = retention.DEFAULT_INTERVAL  # seconds between purge runs
    # LISTEN connections (event bus, queue) are checked with SELECT 1 this often, replaced past the timeout
    listen_check_interval: float = liveness.DEFAULT_INTERVAL
    listen_check_timeout: float = liveness.DEFAULT_TIMEOUT
    # key leases (engine/live): each on_change callback's bound, and the period of the re-check of every leased
    # credential (one query) that backs up the event bus (it also runs after every lost LISTEN or failed read)
    key_lease_callback_timeout: float = 10.0
    key_lease_recheck_interval: float = 30.0
    pool_min_size: int = 2
    pool_max_size: int = 10
    pool_acquire_timeout: float = 10.0  # a starved pool answers StorageError (503) after this, never hangs
    db_command_timeout: float = 60.0  # per SQL statement (asyncpg command_timeout), row-lock waits included
    # what sits between the engine and PostgreSQL: "none", "session" (a session pooler: nothing changes) or
    # "transaction" (PgBouncer pool_mode=transaction: server connections change between transactions, so no
    # named prepared statements, and LISTEN needs listen_database_url)
    db_pooler: str = "none"
    # asyncpg's prepared-statement cache per connection; None: 0 with db_pooler="transaction", else 100
    db_statement_cache_size: int | None = None
    # a direct DSN (same database, no transaction pooler) for the LISTEN connections; None: database_url
    listen_database_url: str | None = None
    allow_private_webhook_urls: bool = False
    webhook_timeout: float = 15.0  # seconds per webhook attempt
    webhook_retry_schedule: tuple[float, ...] = WEBHOOK_RETRY_SCHEDULE
    webhook_disable_after: float = 5 * 86_400.0  # an endpoint failing this long is disabled
    webhook_secret_grace: float = 86_400.0  # a rotated-out webhook secret keeps signing this long
    log_level: str = "INFO"
    log_json: bool = False

    # the variables of the fields (engine/environment.py): ENGINE_<FIELD> unless named here; README lists them
    ENV: ClassVar[environment.Section] = environment.Section(
        prefix="ENGINE_",
        names={"database_url": "DATABASE_URL"},
        secrets=frozenset({"database_url", "master_keys", "listen_database_url"}),
        own_file=frozenset({"master_keys"}),  # its file form is master_keys_file (ENGINE_MASTER_KEYS_FILE)
        choices={"db_pooler": DB_POOLERS, "log_level": logs.LEVELS},
        bounds={
            **{
                name: environment.POSITIVE
                for name in (
                    "probe_timeout",
                    "lease_seconds",
                    "poll_interval",
                    "job_timeout",
                    "job_timeouts",
                    "reverify_interval",
                    "retention_interval",
                    "listen_check_interval",
                    "listen_check_timeout",
                    "pool_acquire_timeout",
                    "db_command_timeout",
                    "webhook_timeout",
                    "webhook_disable_after",
                    "key_lease_callback_timeout",
                    "key_lease_recheck_interval",
                )
            },
            "claim_batch_size": AT_LEAST_ONE,
            "max_attempts": AT_LEAST_ONE,
            "pool_max_size": AT_LEAST_ONE,
        },
    )

    def __post_init__(self) -> None:
        # first, so that a validation error below, rendered with frame locals, shows only masked values
        if self.database_url is not None:
            object.__setattr__(self, "database_url", SecretDsn(self.database_url))
        if self.master_keys is not None:
            object.__setattr__(self, "master_keys", MasterKeysText(self.master_keys))
        if self.listen_database_url is not None:
            object.__setattr__(self, "listen_database_url", SecretDsn(self.listen_database_url))
        if self.db_pooler not in DB_POOLERS:
            raise errors.ConfigurationError(
                f"db_pooler must be one of {', '.join(DB_POOLERS)}", field="db_pooler"
            )
        cache = self.db_statement_cache_size
        if cache is not None and (isinstance(cache, bool) or not isinstance(cache, int) or cache < 0):
            raise errors.ConfigurationError(
                "db_statement_cache_size must be an integer >= 0 (0: no prepared-statement cache)",
                field="db_statement_cache_size",
            )
        if self.workers < 0:
            raise errors.ConfigurationError("workers must be >= 0", field="workers")
        if self.backoff_max < self.backoff_base:
            raise errors.ConfigurationError("backoff_max must be >= backoff_base", field="backoff_max")
        schedule = self.webhook_retry_schedule
        if not schedule or schedule[0] != 0 or any(d < 0 for d in schedule):
            raise errors.ConfigurationError(
                "webhook_retry_schedule: delays >= 0, the first one 0 (immediately)",
                field="webhook_retry_schedule",
            )
        if self.webhook_timeout <= 0 or self.webhook_disable_after <= 0 or self.webhook_secret_grace < 0:
            raise errors.ConfigurationError(
                "webhook timeouts and periods must be positive", field="webhook_timeout"
            )
        if not 0 < self.job_timeout < math.inf:
            raise errors.ConfigurationError("job_timeout must be positive and finite", field="job_timeout")
        for kind, seconds in self.job_timeouts.items():
            if not 0 < seconds < math.inf:
                raise errors.ConfigurationError(
                    f"job_timeouts[{kind}] must be positive and finite", field="job_timeouts"
                )
        if self.pool_max_size < 1 or self.pool_min_size < 0:
            raise errors.ConfigurationError(
                "pool sizes: pool_max_size at least 1, pool_min_size 0 or more", field="pool_max_size"
            )
        if self.pool_min_size > self.pool_max_size:  # a small pool keeps fewer idle connections too
            object.__setattr__(self, "pool_min_size", self.pool_max_size)
        for name in ("pool_acquire_timeout", "db_command_timeout"):  # finite: every wait has a bound
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise errors.ConfigurationError(f"{name} must be a positive number of seconds", field=name)
        for name in ("key_lease_callback_timeout", "key_lease_recheck_interval"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise errors.ConfigurationError(f"{name} must be a positive number of seconds", field=name)
        if self.reverify_interval <= 0:
            raise errors.ConfigurationError("reverify_interval must be positive", field="reverify_interval")
        if not _EGRESS_GROUP.fullmatch(self.egress_group):
            raise errors.ConfigurationError(
                "egress_group: 1 to 64 letters, digits and ._:- (one name per egress IP)",
                field="egress_group",
            )
        retention.check_settings(self)
        liveness.check_bounds(self.listen_check_interval, self.listen_check_timeout)
        _check_venue_urls(self.venue_urls)

    @property
    def statement_cache_size(self) -> int:
        """asyncpg's ``statement_cache_size`` for every connection: the setting, else what the pooler implies
        (0 through a transaction pooler, whose server connections do not keep named prepared statements)."""
        if self.db_statement_cache_size is not None:
            return self.db_statement_cache_size
        return 0 if self.db_pooler == "transaction" else DEFAULT_STATEMENT_CACHE_SIZE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineConfig:
        """Build from environment variables, one per field (``engine.environment``: names, types, bounds,
        ``*_FILE`` secrets); keyword overrides win. Only ``PG*`` variables and no ``DATABASE_URL``: a libpq
        DSN (``postgresql://``, which asyncpg completes from them)."""
        env = settings_view(os.environ if env is None else env)  # a failure below shows no other variable
        kwargs = environment.build_kwargs(cls, env)
        if "database_url" not in kwargs and any(env.get(k) for k in ("PGHOST", "PGDATABASE", "PGSERVICE")):
            kwargs["database_url"] = "postgresql://"
        return environment.construct(cls, kwargs, overrides)


def parse_venue_urls(spec: str) -> dict[Venue, str]:
    """``"BINANCE=http://h:1,OKX=http://h:2"`` -> {Venue.BINANCE: ..., ...} (as ``ENGINE_VENUE_URLS`` is read)."""
    (variable,) = (v for v in environment.variables(EngineConfig) if v.path == ("venue_urls",))
    urls: dict[Venue, str] = environment.convert(spec, variable)
    _check_venue_urls(urls)
    return urls


def _check_venue_urls(urls: Mapping[Venue, str]) -> None:
    for venue, url in urls.items():
        if not isinstance(venue, Venue):
            raise errors.ConfigurationError(f"venue_urls key {venue!r} is not a Venue", field="venue_urls")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise errors.ConfigurationError(
                "venue_urls entries look like VENUE=http(s)://host:port", field="venue_urls"
            )
