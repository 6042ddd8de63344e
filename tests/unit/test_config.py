"""Configuration from the environment, and the verification policy."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine import EngineConfig, VerificationPolicy, errors
from engine.config import parse_venue_urls
from venues.base import Permissions, ProbeResult, Venue

DAY = 86_400_000


def result(**perms: object) -> ProbeResult:
    return ProbeResult(
        venue=Venue.BINANCE,
        venue_account_id="1",
        permissions=Permissions(**perms),
        identities=("spot",),  # type: ignore[arg-type]
    )


def test_from_env_reads_every_setting() -> None:
    """from_env maps DATABASE_URL, data dir, master keys, venue URLs, numbers and policy flags."""
    cfg = EngineConfig.from_env(
        {
            "DATABASE_URL": "postgresql://u@h/db",
            "ENGINE_DATA_DIR": "/srv/ce",
            "ENGINE_MASTER_KEYS": "1:abc",
            "ENGINE_VENUE_URLS": "binance=http://127.0.0.1:9001, OKX=http://127.0.0.1:9002",
            "ENGINE_WORKERS": "0",
            "ENGINE_REVERIFY_INTERVAL": "3600",
            "ENGINE_POLICY_ALLOW_WITHDRAW": "1",
            "ENGINE_POLICY_REQUIRE_TRADE": "true",
            "ENGINE_ALLOW_PRIVATE_WEBHOOK_URLS": "yes",
        }
    )
    assert cfg.database_url == "postgresql://u@h/db"
    assert cfg.data_dir == Path("/srv/ce")
    assert cfg.master_keys == "1:abc"
    assert cfg.venue_urls == {Venue.BINANCE: "http://127.0.0.1:9001", Venue.OKX: "http://127.0.0.1:9002"}
    assert (cfg.workers, cfg.reverify_interval) == (0, 3600.0)
    assert cfg.policy.reject_withdraw is False
    assert cfg.policy.require_trade is True
    assert cfg.allow_private_webhook_urls is True


def test_egress_group_and_budget_sharing_from_env() -> None:
    """The processes of one egress IP share its venue budgets: the group name, sharing on by default."""
    default = EngineConfig.from_env({})
    assert (default.egress_group, default.shared_venue_budgets) == ("default", True)
    cfg = EngineConfig.from_env({"ENGINE_EGRESS_GROUP": "eu-nat-1", "ENGINE_SHARED_VENUE_BUDGETS": "0"})
    assert (cfg.egress_group, cfg.shared_venue_budgets) == ("eu-nat-1", False)
    with pytest.raises(errors.ConfigurationError) as info:
        EngineConfig(egress_group="")
    assert info.value.field == "egress_group"


def test_from_env_libpq_variables_and_defaults() -> None:
    """Only PG* variables: a libpq DSN; nothing at all: no DSN (the embedded server)."""
    assert EngineConfig.from_env({"PGHOST": "db.internal"}).database_url == "postgresql://"
    empty = EngineConfig.from_env({})
    assert empty.database_url is None
    assert empty.policy == VerificationPolicy()


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"ENGINE_WORKERS": "many"}, "ENGINE_WORKERS"),
        ({"ENGINE_POLICY_REQUIRE_TRADE": "maybe"}, "ENGINE_POLICY_REQUIRE_TRADE"),
        ({"ENGINE_VENUE_URLS": "FTX=http://x"}, "ENGINE_VENUE_URLS"),
        ({"ENGINE_VENUE_URLS": "BINANCE=ftp://x"}, "ENGINE_VENUE_URLS"),
        ({"ENGINE_EGRESS_GROUP": "two words"}, "ENGINE_EGRESS_GROUP"),
        ({"ENGINE_EGRESS_GROUP": "x" * 65}, "ENGINE_EGRESS_GROUP"),
        ({"ENGINE_SHARED_VENUE_BUDGETS": "sometimes"}, "ENGINE_SHARED_VENUE_BUDGETS"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], field: str) -> None:
    """A bad value raises ConfigurationError naming the variable."""
    with pytest.raises(errors.ConfigurationError) as info:
        EngineConfig.from_env(env)
    assert info.value.field == field


def test_pool_settings_from_env_and_their_bounds() -> None:
    """Pool size, acquire timeout and statement timeout come from the environment; defaults are bounded; a
    value that is no bound (0, negative, NaN, infinite) or a pool of no connection is refused, naming it."""
    cfg = EngineConfig.from_env(
        {"ENGINE_POOL_MAX_SIZE": "1", "ENGINE_POOL_ACQUIRE_TIMEOUT": "2.5", "ENGINE_DB_COMMAND_TIMEOUT": "30"}
    )
    assert (cfg.pool_max_size, cfg.pool_min_size) == (1, 1)  # a small pool keeps fewer idle connections
    assert (cfg.pool_acquire_timeout, cfg.db_command_timeout) == (2.5, 30.0)
    default = EngineConfig()
    assert (default.pool_max_size, default.pool_acquire_timeout, default.db_command_timeout) == (
        10,
        10.0,
        60.0,
    )
    for name in ("pool_acquire_timeout", "db_command_timeout"):
        for bad in (0, -1.0, float("nan"), float("inf")):
            with pytest.raises(errors.ConfigurationError) as info:
                EngineConfig(**{name: bad})
            assert info.value.field == name
    assert EngineConfig(pool_max_size=1).pool_min_size == 1
    with pytest.raises(errors.ConfigurationError) as info:
        EngineConfig(pool_max_size=0)
    assert info.value.field == "pool_max_size"
    with pytest.raises(errors.ConfigurationError) as info:
        EngineConfig.from_env({"ENGINE_POOL_ACQUIRE_TIMEOUT": "soon"})
    assert info.value.field == "ENGINE_POOL_ACQUIRE_TIMEOUT"


def test_venue_urls_parse() -> None:
    """Venue names are case-insensitive; blanks between entries are fine."""
    assert parse_venue_urls(" kraken=https://k.example ,") == {Venue.KRAKEN: "https://k.example"}


def test_policy_rules_name_the_rule() -> None:
    """Withdraw, trade, IP and expiry rules each reject with their own reason; the default only withdraw."""
    now = int(time.time() * 1000)
    default = VerificationPolicy()
    assert default.evaluate(result(read=True, withdraw=True))[0] == "POLICY_WITHDRAW_ENABLED"
    assert default.evaluate(result(read=True))[0] is None
    assert default.evaluate(result(read=True, expires_at_ms=now - 1), now_ms=now)[0] == "KEY_EXPIRED"
    strict = VerificationPolicy(require_trade=True, require_ip_allowlist=True)
    assert strict.evaluate(result(read=True, ip_restricted=True))[0] == "POLICY_TRADE_REQUIRED"
    assert strict.evaluate(result(read=True, trade=True))[0] == "POLICY_IP_ALLOWLIST_REQUIRED"
    assert strict.evaluate(result(read=True, trade=True, ip_restricted=True))[0] is None


def test_policy_warns_before_expiry_and_without_allowlist() -> None:
    """A key expiring inside the window, or with no IP allow-list, passes with warnings."""
    now = int(time.time() * 1000)
    reason, warnings = VerificationPolicy(expiry_warning_days=7).evaluate(
        result(read=True, expires_at_ms=now + 3 * DAY + 1000), now_ms=now
    )
    assert reason is None
    assert warnings[0] == "KEY_EXPIRING: expires in 3 day(s)"
    assert any(w.startswith("NO_IP_ALLOWLIST") for w in warnings)


def test_job_timeouts_from_env() -> None:
    """ENGINE_JOB_TIMEOUT is the default handler timeout; ENGINE_JOB_TIMEOUTS sets it per job kind."""
    cfg = EngineConfig.from_env(
        {"ENGINE_JOB_TIMEOUT": "120", "ENGINE_JOB_TIMEOUTS": " verify=60, purge_jobs=900.5 ,"}
    )
    assert cfg.job_timeout == 120.0
    assert cfg.job_timeouts == {"verify": 60.0, "purge_jobs": 900.5}
    assert EngineConfig.from_env({}).job_timeout == 300.0


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"ENGINE_JOB_TIMEOUT": "soon"}, "ENGINE_JOB_TIMEOUT"),
        ({"ENGINE_JOB_TIMEOUT": "0"}, "ENGINE_JOB_TIMEOUT"),
        ({"ENGINE_JOB_TIMEOUT": "inf"}, "ENGINE_JOB_TIMEOUT"),
        ({"ENGINE_JOB_TIMEOUTS": "verify"}, "ENGINE_JOB_TIMEOUTS"),
        ({"ENGINE_JOB_TIMEOUTS": "verify=-1"}, "ENGINE_JOB_TIMEOUTS"),
        ({"ENGINE_JOB_TIMEOUTS": "verify=nan"}, "ENGINE_JOB_TIMEOUTS"),
        ({"ENGINE_JOB_TIMEOUTS": "=5"}, "ENGINE_JOB_TIMEOUTS"),
    ],
)
def test_bad_job_timeouts_name_the_setting(env: dict[str, str], field: str) -> None:
    """A timeout that is not a positive finite number of seconds is refused, naming the setting."""
    with pytest.raises(errors.ConfigurationError) as info:
        EngineConfig.from_env(env)
    assert info.value.field == field


def test_pooler_settings_from_env_and_what_they_imply() -> None:
    """ENGINE_DB_POOLER=transaction turns asyncpg's statement cache off unless ENGINE_DB_STATEMENT_CACHE_SIZE says
    otherwise; ENGINE_LISTEN_DATABASE_URL is a secret DSN (password masked); bad values name the setting."""
    assert EngineConfig().statement_cache_size == 100
    assert EngineConfig(db_pooler="session").statement_cache_size == 100
    cfg = EngineConfig.from_env(
        {
            "DATABASE_URL": "postgresql://app:pw1@bouncer:6432/engine",
            "ENGINE_DB_POOLER": "Transaction",
            "ENGINE_LISTEN_DATABASE_URL": "postgresql://app:listen-pw@db:5432/engine",
        }
    )
    assert (cfg.db_pooler, cfg.statement_cache_size) == ("transaction", 0)
    assert cfg.listen_database_url == "postgresql://app:listen-pw@db:5432/engine"
    assert "listen-pw" not in repr(cfg) and "postgresql://app:***@db:5432/engine" in repr(cfg)
    explicit = EngineConfig.from_env(
        {"ENGINE_DB_POOLER": "transaction", "ENGINE_DB_STATEMENT_CACHE_SIZE": "20"}
    )
    assert explicit.statement_cache_size == 20
    assert EngineConfig.from_env({"ENGINE_DB_STATEMENT_CACHE_SIZE": "0"}).statement_cache_size == 0
    for kwargs, field in (
        ({"db_pooler": "pgpool"}, "db_pooler"),
        ({"db_statement_cache_size": -1}, "db_statement_cache_size"),
    ):
        with pytest.raises(errors.ConfigurationError) as info:
            EngineConfig(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(errors.ConfigurationError) as info:
        EngineConfig.from_env({"ENGINE_DB_STATEMENT_CACHE_SIZE": "lots"})
    assert info.value.field == "ENGINE_DB_STATEMENT_CACHE_SIZE"
