"""Configuration: frozen keyword-only dataclasses passed in explicitly, with one ``from_env()``.

Environment variables (all optional):

    DATABASE_URL / PG* (libpq)   the PostgreSQL server; none -> the embedded server in ENGINE_DATA_DIR
    ENGINE_DATA_DIR              zero-config state (embedded PostgreSQL, generated master key)
    ENGINE_MASTER_KEYS           "1:<base64 32 bytes>,2:<...>" versioned master keys (see engine/crypto.py)
    ENGINE_VENUE_URLS            "BINANCE=http://127.0.0.1:9001,OKX=..." base URL per venue (sandbox, simulator)
    ENGINE_WORKERS               jobs run concurrently per process (0 = run no workers in this process)
    ENGINE_REVERIFY_INTERVAL     seconds between re-verifications of VERIFIED credentials (default 86400)
    ENGINE_PROBE_TIMEOUT         seconds per venue request (default 10)
    ENGINE_JOB_RETENTION         seconds finished jobs are kept before the hourly purge (default 7 days)
    ENGINE_POOL_MAX_SIZE         most pool connections of this process (default 10; 1 + 4 with workers outside it)
    ENGINE_POOL_ACQUIRE_TIMEOUT  seconds a request waits for a pool connection before a 503 (default 10)
    ENGINE_DB_COMMAND_TIMEOUT    seconds one SQL statement may take, lock waits included (default 60)
    ENGINE_POLICY_ALLOW_WITHDRAW, ENGINE_POLICY_REQUIRE_TRADE, ENGINE_POLICY_REQUIRE_IP_ALLOWLIST   1/0
    ENGINE_POLICY_EXPIRY_WARNING_DAYS   warn this many days before a known expiry (default 7)
    ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS   1 to allow http:// and private addresses for webhooks (tests, sandbox)
    ENGINE_LOG_LEVEL, ENGINE_LOG_JSON
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import errors
from venues.base import Permissions, ProbeResult, Venue

DAY_MS = 86_400_000
# Svix's published schedule: delay before each attempt of a webhook delivery (the first is immediate)
WEBHOOK_RETRY_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True, kw_only=True)
class VerificationPolicy:
    """What a verified key must satisfy. The seeds' best practices: never allow withdrawals."""

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
class EngineConfig:
    """Everything the engine needs; no I/O happens when it is built."""

    database_url: str | None = None
    data_dir: Path | None = None
    master_keys: str | None = None
    venue_urls: Mapping[Venue, str] = field(default_factory=dict)
    probe_timeout: float = 10.0
    # honour the venues' documented limits client side; off only against simulators and test servers
    venue_rate_limits: bool = True
    policy: VerificationPolicy = field(default_factory=VerificationPolicy)
    workers: int = 10  # concurrent jobs in this process; 0 = this process runs no workers
    claim_batch_size: int = 50
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    max_attempts: int = 20
    backoff_base: float = 1.0
    backoff_max: float = 600.0
    shutdown_timeout: float = 10.0
    reverify_interval: float = 86_400.0
    job_retention: float = 7 * 86_400.0  # done and cancelled jobs are purged this long after they finished
    pool_min_size: int = 2
    pool_max_size: int = 10
    pool_acquire_timeout: float = 10.0  # a starved pool answers StorageError (503) after this, never hangs
    db_command_timeout: float = 60.0  # per SQL statement (asyncpg command_timeout), row-lock waits included
    allow_private_webhook_urls: bool = False
    webhook_timeout: float = 15.0  # seconds per webhook attempt
    webhook_retry_schedule: tuple[float, ...] = WEBHOOK_RETRY_SCHEDULE
    webhook_disable_after: float = 5 * 86_400.0  # an endpoint failing this long is disabled
    webhook_secret_grace: float = 86_400.0  # a rotated-out webhook secret keeps signing this long
    log_level: str = "INFO"
    log_json: bool = False

    def __post_init__(self) -> None:
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
        for venue in self.venue_urls:
            if not isinstance(venue, Venue):
                raise errors.ConfigurationError(
                    f"venue_urls key {venue!r} is not a Venue", field="venue_urls"
                )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineConfig:
        """Build from environment variables (see the module docstring); keyword overrides win."""
        env = os.environ if env is None else env
        kwargs: dict[str, Any] = {}
        dsn = env.get("DATABASE_URL")
        if not dsn and (env.get("PGHOST") or env.get("PGDATABASE") or env.get("PGSERVICE")):
            dsn = "postgresql://"  # libpq variables fill in the rest (asyncpg honours them)
        if dsn:
            kwargs["database_url"] = dsn
        if env.get("ENGINE_DATA_DIR"):
            kwargs["data_dir"] = Path(env["ENGINE_DATA_DIR"])
        if env.get("ENGINE_MASTER_KEYS"):
            kwargs["master_keys"] = env["ENGINE_MASTER_KEYS"]
        if env.get("ENGINE_VENUE_URLS"):
            kwargs["venue_urls"] = parse_venue_urls(env["ENGINE_VENUE_URLS"])
        for name, key, conv in (
            ("workers", "ENGINE_WORKERS", int),
            ("reverify_interval", "ENGINE_REVERIFY_INTERVAL", float),
            ("probe_timeout", "ENGINE_PROBE_TIMEOUT", float),
            ("lease_seconds", "ENGINE_LEASE_SECONDS", float),
            ("job_retention", "ENGINE_JOB_RETENTION", float),
            ("pool_max_size", "ENGINE_POOL_MAX_SIZE", int),
            ("pool_acquire_timeout", "ENGINE_POOL_ACQUIRE_TIMEOUT", float),
            ("db_command_timeout", "ENGINE_DB_COMMAND_TIMEOUT", float),
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
        kwargs["allow_private_webhook_urls"] = _flag(env, "ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS", False)
        if env.get("ENGINE_LOG_LEVEL"):
            kwargs["log_level"] = env["ENGINE_LOG_LEVEL"]
        kwargs["log_json"] = _flag(env, "ENGINE_LOG_JSON", False)
        kwargs.update(overrides)
        return cls(**kwargs)


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
