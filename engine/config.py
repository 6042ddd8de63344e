"""Configuration: frozen keyword-only dataclasses passed in explicitly, with one ``from_env()``.

Environment variables (all optional):

    DATABASE_URL / PG* (libpq)   the PostgreSQL server; none -> the embedded server in ENGINE_DATA_DIR
    ENGINE_DATA_DIR              zero-config state (embedded PostgreSQL, generated master key)
    ENGINE_MASTER_KEYS           "1:<base64 32 bytes>,2:<...>" versioned master keys (see engine/crypto.py)
    ENGINE_MASTER_KEYS_FILE      or: a file holding that spec (0600, this user's, no symbolic link)
    ENGINE_MASTER_KEYS_KMS, ENGINE_MASTER_KEYS_KMS_FILE, ENGINE_KMS_*   or: the spec encrypted by AWS KMS
                                 (engine/keys/providers.py KmsSettings; at most one of the three ways)
    ENGINE_VENUE_URLS            "BINANCE=http://127.0.0.1:9001,OKX=..." base URL per venue (sandbox, simulator)
    ENGINE_WORKERS               jobs run concurrently per process (0 = run no workers in this process)
    ENGINE_REVERIFY_INTERVAL     seconds between re-verifications of VERIFIED credentials (default 86400)
    ENGINE_PROBE_TIMEOUT         seconds per venue request (default 10)
    ENGINE_EGRESS_GROUP          processes leaving through one public IP share its per-IP venue budgets (default
                                 "default"); ENGINE_SHARED_VENUE_BUDGETS=0 keeps them per process
    ENGINE_JOB_TIMEOUT           seconds a job handler may run before it is cancelled (default 300; verifications
                                 and webhook deliveries derive theirs from their request timeouts)
    ENGINE_JOB_TIMEOUTS          "verify=60,webhook_delivery=45": per job kind, overriding the above
    ENGINE_JOB_RETENTION         seconds finished jobs are kept before the hourly purge (default 7 days)
    ENGINE_POOL_MAX_SIZE         most pool connections of this process (default 10; 1 + 4 with workers outside it)
    ENGINE_POOL_ACQUIRE_TIMEOUT  seconds a request waits for a pool connection before a 503 (default 10)
    ENGINE_DB_COMMAND_TIMEOUT    seconds one SQL statement may take, lock waits included (default 60)
    ENGINE_DB_POOLER             none | session | transaction: what sits between the engine and PostgreSQL
                                 (transaction: PgBouncer pool_mode=transaction; turns the statement cache off)
    ENGINE_DB_STATEMENT_CACHE_SIZE   asyncpg's prepared-statement cache per connection (default 100, 0 with
                                 ENGINE_DB_POOLER=transaction)
    ENGINE_LISTEN_DATABASE_URL   a direct (unpooled) DSN for the LISTEN connections; default: the main DSN
    ENGINE_EVENT_RETENTION       seconds outbox events are kept once every live listener read them and no webhook
                                 delivery needs them (default 30 days; 0 = for ever; engine/bounds/retention.py)
    ENGINE_DELIVERY_RETENTION    seconds delivered webhook deliveries and their attempts are kept (default 30 days)
    ENGINE_DEAD_DELIVERY_RETENTION   seconds dead webhook deliveries are kept (default 90 days)
    ENGINE_KEY_ACCESS_RETENTION  seconds key-access audit rows are kept (default 400 days)
    ENGINE_RETENTION_INTERVAL    seconds between runs of the retention purge (default 300)
    ENGINE_LISTEN_CHECK_INTERVAL seconds between checks (SELECT 1) of each LISTEN connection (default 5)
    ENGINE_LISTEN_CHECK_TIMEOUT  seconds the check may take before the connection is replaced (default 5)
    ENGINE_POLICY_ALLOW_WITHDRAW, ENGINE_POLICY_REQUIRE_TRADE, ENGINE_POLICY_REQUIRE_IP_ALLOWLIST   1/0
    ENGINE_POLICY_EXPIRY_WARNING_DAYS   warn this many days before a known expiry (default 7)
    ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS   1 to allow http:// and private addresses for webhooks (tests, sandbox)
    ENGINE_QUOTA_CREDENTIALS, ENGINE_QUOTA_WEBHOOK_ENDPOINTS, ENGINE_QUOTA_VERIFY_PER_HOUR   per-owner quotas
                                 (see Quotas; 0 = no quota)
    ENGINE_ROTATION_*, ENGINE_BROKER_*, ENGINE_MINT_IP_ALLOWLIST   BROKER credentials: the zero-touch rotation
                                 policy, grace periods and minted keys' IP allow-list (engine/broker/settings.py)
    ENGINE_LOG_LEVEL, ENGINE_LOG_JSON

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

from engine import errors, liveness
from engine.bounds import retention
from engine.broker.settings import BrokerSettings
from engine.keys import KmsSettings
from engine.sensitive import MasterKeysText, SecretDsn, SecretText
from venues.base import Permissions, ProbeResult, Venue

DAY_MS = 86_400_000
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

    ENV: ClassVar[tuple[tuple[str, str], ...]] = (
        ("credentials", "ENGINE_QUOTA_CREDENTIALS"),
        ("webhook_endpoints", "ENGINE_QUOTA_WEBHOOK_ENDPOINTS"),
        ("verify_requests_per_hour", "ENGINE_QUOTA_VERIFY_PER_HOUR"),
    )

    def __post_init__(self) -> None:
        for name, _ in self.ENV:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise errors.ConfigurationError(
                    f"quota {name} must be an integer >= 0 (0: no quota)", field=name
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Quotas:
        """The ``ENGINE_QUOTA_*`` variables (unset: the defaults above)."""
        kwargs: dict[str, int] = {}
        for name, key in cls.ENV:
            if env.get(key):
                try:
                    kwargs[name] = int(env[key])
                except ValueError:
                    raise errors.ConfigurationError(f"{key} must be an integer >= 0", field=key) from None
        return cls(**kwargs)


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
        if self.reverify_interval <= 0:
            raise errors.ConfigurationError("reverify_interval must be positive", field="reverify_interval")
        if not _EGRESS_GROUP.fullmatch(self.egress_group):
            raise errors.ConfigurationError(
                "egress_group: 1 to 64 letters, digits and ._:- (one name per egress IP)",
                field="egress_group",
            )
        retention.check_settings(self)
        liveness.check_bounds(self.listen_check_interval, self.listen_check_timeout)
        for venue in self.venue_urls:
            if not isinstance(venue, Venue):
                raise errors.ConfigurationError(
                    f"venue_urls key {venue!r} is not a Venue", field="venue_urls"
                )

    @property
    def statement_cache_size(self) -> int:
        """asyncpg's ``statement_cache_size`` for every connection: the setting, else what the pooler implies
        (0 through a transaction pooler, whose server connections do not keep named prepared statements)."""
        if self.db_statement_cache_size is not None:
            return self.db_statement_cache_size
        return 0 if self.db_pooler == "transaction" else DEFAULT_STATEMENT_CACHE_SIZE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineConfig:
        """Build from environment variables (see the module docstring); keyword overrides win."""
        env = settings_view(os.environ if env is None else env)  # a failure below shows no other variable
        kwargs: dict[str, Any] = {}
        dsn = env.get("DATABASE_URL")
        if not dsn and (env.get("PGHOST") or env.get("PGDATABASE") or env.get("PGSERVICE")):
            dsn = "postgresql://"  # libpq variables fill in the rest (asyncpg honours them)
        if dsn:
            kwargs["database_url"] = dsn
        if env.get("ENGINE_LISTEN_DATABASE_URL"):
            kwargs["listen_database_url"] = env["ENGINE_LISTEN_DATABASE_URL"]
        if env.get("ENGINE_DB_POOLER"):
            kwargs["db_pooler"] = env["ENGINE_DB_POOLER"].strip().lower()
        if env.get("ENGINE_DATA_DIR"):
            kwargs["data_dir"] = Path(env["ENGINE_DATA_DIR"])
        if env.get("ENGINE_MASTER_KEYS"):
            kwargs["master_keys"] = env["ENGINE_MASTER_KEYS"]
        if env.get("ENGINE_MASTER_KEYS_FILE"):
            kwargs["master_keys_file"] = Path(env["ENGINE_MASTER_KEYS_FILE"])
        kms = KmsSettings.from_env(env)
        if kms is not None:
            kwargs["kms"] = kms
        if env.get("ENGINE_VENUE_URLS"):
            kwargs["venue_urls"] = parse_venue_urls(env["ENGINE_VENUE_URLS"])
        if env.get("ENGINE_JOB_TIMEOUTS"):
            kwargs["job_timeouts"] = parse_job_timeouts(env["ENGINE_JOB_TIMEOUTS"])
        for name, key, conv in (
            ("workers", "ENGINE_WORKERS", int),
            ("reverify_interval", "ENGINE_REVERIFY_INTERVAL", float),
            ("probe_timeout", "ENGINE_PROBE_TIMEOUT", float),
            ("lease_seconds", "ENGINE_LEASE_SECONDS", float),
            ("job_retention", "ENGINE_JOB_RETENTION", float),
            ("job_timeout", "ENGINE_JOB_TIMEOUT", float),
            ("pool_max_size", "ENGINE_POOL_MAX_SIZE", int),
            ("pool_acquire_timeout", "ENGINE_POOL_ACQUIRE_TIMEOUT", float),
            ("db_command_timeout", "ENGINE_DB_COMMAND_TIMEOUT", float),
            ("db_statement_cache_size", "ENGINE_DB_STATEMENT_CACHE_SIZE", int),
            ("event_retention", "ENGINE_EVENT_RETENTION", float),
            ("delivery_retention", "ENGINE_DELIVERY_RETENTION", float),
            ("dead_delivery_retention", "ENGINE_DEAD_DELIVERY_RETENTION", float),
            ("key_access_retention", "ENGINE_KEY_ACCESS_RETENTION", float),
            ("retention_interval", "ENGINE_RETENTION_INTERVAL", float),
            ("listen_check_interval", "ENGINE_LISTEN_CHECK_INTERVAL", float),
            ("listen_check_timeout", "ENGINE_LISTEN_CHECK_TIMEOUT", float),
        ):
            if env.get(key):
                try:
                    kwargs[name] = conv(env[key])
                except ValueError:
                    raise errors.ConfigurationError(f"{key} must be a number", field=key) from None
        policy = VerificationPolicy(
            reject_withdraw=not _flag(env, "ENGINE_POLICY_ALLOW_WITHDRAW", False),
            require_trade=_flag(env, "ENGINE_POLICY_REQUIRE_TRADE", False),
            require_ip_allowlist=_flag(env, "ENGINE_POLICY_REQUIRE_IP_ALLOWLIST", False),
            expiry_warning_days=int(env.get("ENGINE_POLICY_EXPIRY_WARNING_DAYS", "7")),
        )
        kwargs["policy"] = policy
        kwargs["quotas"] = Quotas.from_env(env)
        kwargs["broker"] = BrokerSettings.from_env(env)
        kwargs["allow_private_webhook_urls"] = _flag(env, "ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS", False)
        if env.get("ENGINE_EGRESS_GROUP"):
            if not _EGRESS_GROUP.fullmatch(env["ENGINE_EGRESS_GROUP"]):
                raise errors.ConfigurationError(
                    "ENGINE_EGRESS_GROUP: 1 to 64 letters, digits and ._:-", field="ENGINE_EGRESS_GROUP"
                )
            kwargs["egress_group"] = env["ENGINE_EGRESS_GROUP"]
        kwargs["shared_venue_budgets"] = _flag(env, "ENGINE_SHARED_VENUE_BUDGETS", True)
        if env.get("ENGINE_LOG_LEVEL"):
            kwargs["log_level"] = env["ENGINE_LOG_LEVEL"]
        kwargs["log_json"] = _flag(env, "ENGINE_LOG_JSON", False)
        kwargs.update(overrides)
        return cls(**kwargs)


# variables read by from_env() and the API's configuration (engine/api.py) whose values are secret
SECRET_VARIABLES: dict[str, type[SecretText]] = {
    "DATABASE_URL": SecretDsn,
    "ENGINE_LISTEN_DATABASE_URL": SecretDsn,
    "ENGINE_MASTER_KEYS": MasterKeysText,
}
# any other variable with one of these in its name is shown as *** (ENGINE_API_JWT_SECRET, PGPASSWORD, ...)
_SECRET_NAME_PARTS = ("SECRET", "PASSWORD", "PASSPHRASE", "TOKEN", "KEY")


def settings_view(env: Mapping[str, str]) -> dict[str, str]:
    """The engine's own variables of ``env`` (``DATABASE_URL``, ``PG*``, ``ENGINE_*``), secret ones masked.

    ``os.environ`` holds every secret of the process; a traceback rendered with frame locals would print all
    of it from any frame that holds it. The ``from_env`` builders read this view instead.
    """
    view: dict[str, str] = {}
    for key, value in env.items():
        if key == "DATABASE_URL" or key.startswith(("ENGINE_", "PG")):
            wrap = SECRET_VARIABLES.get(key)
            if wrap is None and any(part in key.upper() for part in _SECRET_NAME_PARTS):
                wrap = SecretText
            view[key] = wrap(value) if wrap is not None else value
    return view


def _flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    value = env.get(key)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise errors.ConfigurationError(f"{key} must be 1 or 0", field=key)


def parse_venue_urls(spec: str) -> dict[Venue, str]:
    """``"BINANCE=http://h:1,OKX=http://h:2"`` -> {Venue.BINANCE: ..., ...}."""
    urls: dict[Venue, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, url = part.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise errors.ConfigurationError(
                "ENGINE_VENUE_URLS entries look like VENUE=http(s)://host:port", field="ENGINE_VENUE_URLS"
            )
        try:
            urls[Venue(name.strip().upper())] = url.strip()
        except ValueError:
            raise errors.ConfigurationError(f"unknown venue {name!r}", field="ENGINE_VENUE_URLS") from None
    return urls


def parse_job_timeouts(spec: str) -> dict[str, float]:
    """``"verify=60,webhook_delivery=45"`` -> {"verify": 60.0, ...} (seconds per job kind)."""
    timeouts: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, value = part.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not sep or not kind.strip() or not 0 < seconds < math.inf:
            raise errors.ConfigurationError(
                "ENGINE_JOB_TIMEOUTS entries look like kind=seconds (positive)", field="ENGINE_JOB_TIMEOUTS"
            )
        timeouts[kind.strip()] = seconds
    return timeouts
