"""The rate limiter's parts (engine/api/limits.py): token buckets on an injected clock, bounded memory, the
client address, the division among processes, and the settings (with the quotas' settings, engine/config.py)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from engine import errors
from engine.api import ApiConfig
from engine.api.limits import RateLimiter, RateLimits, TokenBuckets, client_address, parse_networks
from engine.config import EngineConfig, Quotas


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    """Burst 3 at 2/s: three at once, then one per half second; never more than the burst after a pause."""
    clock = Clock()
    buckets = TokenBuckets(10, clock)
    assert [buckets.take("a", 2.0, 3.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", 2.0, 3.0) == pytest.approx(0.5)
    clock.now += 0.25
    assert buckets.take("a", 2.0, 3.0) == pytest.approx(0.25)  # refused requests take nothing
    clock.now += 0.25
    assert buckets.take("a", 2.0, 3.0) == 0.0
    assert buckets.take("b", 2.0, 3.0) == 0.0  # another key has its own bucket
    clock.now += 1000
    assert [buckets.take("a", 2.0, 3.0) for _ in range(4)][-1] > 0  # full again: 3, not 2000


def test_buckets_stay_bounded_under_a_flood_of_distinct_keys() -> None:
    """200,000 distinct keys through a table of 1,000: never more than 1,000 buckets (least recently used out);
    memory stays flat; a key seen recently keeps its (empty) bucket."""
    clock = Clock()
    buckets = TokenBuckets(1_000, clock)
    for _ in range(3):
        buckets.take("hot", 1.0, 3.0)
    tracemalloc.start()
    try:
        for i in range(200_000):
            buckets.take(f"flood-{i}", 1.0, 3.0)
            if i % 500 == 0:
                buckets.take("hot", 1.0, 3.0)  # keeps it recently used
            if i == 10_000:
                baseline, _ = tracemalloc.get_traced_memory()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(buckets) <= 1_000
    assert current < baseline + 256 * 1024  # flat after the table filled up
    assert buckets.take("hot", 1.0, 3.0) > 0  # still empty: not evicted, so not handed a fresh burst


def test_refilled_buckets_are_forgotten() -> None:
    """Buckets that have refilled are dropped from the old end as new requests come (expiry, not only LRU)."""
    clock = Clock()
    buckets = TokenBuckets(1_000, clock)
    for i in range(100):
        buckets.take(f"k{i}", 10.0, 5.0)
    clock.now += 1.0  # all refilled
    for i in range(60):
        buckets.take(f"new{i}", 10.0, 5.0)
    assert len(buckets) < 100


class Members:
    def __init__(self, count: int) -> None:
        self.count = count


def test_limits_are_divided_by_the_live_process_count() -> None:
    """With 4 live API processes each keeps a quarter of rate and burst (at least one request of burst)."""
    clock = Clock()
    limiter = RateLimiter(RateLimits(owner_rate=4.0, owner_burst=20.0), Members(4), clock)  # type: ignore[arg-type]
    for _ in range(5):
        limiter.check_owner("o")
    with pytest.raises(errors.RateLimited) as refused:
        limiter.check_owner("o")
    assert refused.value.retry_after == 1 and refused.value.http_status == 429
    assert "limit 4 per second, bursts of 20" in refused.value.message  # the service-wide settings
    tiny = RateLimiter(RateLimits(owner_rate=1.0, owner_burst=2.0), Members(8), clock)  # type: ignore[arg-type]
    tiny.check_owner("o")
    with pytest.raises(errors.RateLimited) as slow:
        tiny.check_owner("o")
    assert slow.value.retry_after == 8


def test_a_rate_of_zero_turns_a_limit_off() -> None:
    limiter = RateLimiter(RateLimits(owner_rate=0.0, address_rate=0.0), None, Clock())
    for _ in range(1_000):
        limiter.check_owner("o")
        limiter.check_address("192.0.2.1")


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("192.0.2.7", [], "", "192.0.2.7"),
        ("192.0.2.7", ["203.0.113.1"], "", "192.0.2.7"),  # not a trusted proxy: header ignored
        ("::ffff:192.0.2.7", [], "", "192.0.2.7"),  # IPv4-mapped peer of a dual-stack socket
        ("2001:db8:1:2:aaaa::1", [], "", "2001:db8:1:2::/64"),  # IPv6 by /64
        ("2001:db8:1:2:bbbb::9", [], "", "2001:db8:1:2::/64"),
        (None, [], "", "local"),  # Unix socket
        ("10.0.0.2", ["203.0.113.1"], "10.0.0.0/8", "203.0.113.1"),
        ("10.0.0.2", ["198.51.100.1, 203.0.113.1"], "10.0.0.0/8", "203.0.113.1"),  # left part: the client's
        ("10.0.0.2", ["203.0.113.1, 10.0.0.9"], "10.0.0.0/8", "203.0.113.1"),  # through two proxies
        ("10.0.0.2", ["203.0.113.1", "10.0.0.9"], "10.0.0.0/8", "203.0.113.1"),  # two header lines
        ("10.0.0.2", ["junk, 10.0.0.9"], "10.0.0.0/8", "10.0.0.9"),  # junk: the last trusted hop
        ("10.0.0.2", [], "10.0.0.0/8", "10.0.0.2"),
        ("10.0.0.2", ["[2001:db8::5]:4711"], "10.0.0.0/8", "2001:db8::/64"),
        ("10.0.0.2", ["192.0.2.9:4711"], "10.0.0.0/8", "192.0.2.9"),
    ],
)
def test_client_address(peer: str | None, forwarded: list[str], trusted: str, expected: str) -> None:
    assert client_address(peer, forwarded, parse_networks(trusted)) == expected


def test_rate_limit_settings_from_env() -> None:
    """ENGINE_API_* rate settings reach ApiConfig.rate_limits; bad values name the variable."""
    env = {
        "ENGINE_API_JWT_SECRET": "s" * 32,
        "ENGINE_API_RATE_LIMIT": "7.5",
        "ENGINE_API_RATE_BURST": "30",
        "ENGINE_API_ADDRESS_RATE_LIMIT": "0",
        "ENGINE_API_RATE_LIMIT_KEYS": "1000",
        "ENGINE_API_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1 ,fd00::/8",
    }
    limits = ApiConfig.from_env(env).rate_limits
    assert (limits.owner_rate, limits.owner_burst, limits.address_rate, limits.max_keys) == (7.5, 30, 0, 1000)
    assert [str(n) for n in limits.trusted_proxies] == ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]
    assert ApiConfig.from_env({"ENGINE_API_JWT_SECRET": "s" * 32}).rate_limits == RateLimits()
    for key, value in (
        ("ENGINE_API_RATE_LIMIT", "fast"),
        ("ENGINE_API_RATE_LIMIT", "-1"),
        ("ENGINE_API_RATE_LIMIT", "nan"),
        ("ENGINE_API_RATE_BURST", "0.5"),
        ("ENGINE_API_RATE_LIMIT_KEYS", "0"),
        ("ENGINE_API_TRUSTED_PROXIES", "10.0.0.0/8,proxy.example"),
    ):
        with pytest.raises(errors.ConfigurationError):
            ApiConfig.from_env({"ENGINE_API_JWT_SECRET": "s" * 32, key: value})


def test_quota_settings_from_env() -> None:
    """ENGINE_QUOTA_* reach EngineConfig.quotas; 0 is allowed (no quota); bad values name the variable."""
    config = EngineConfig.from_env(
        {
            "ENGINE_QUOTA_CREDENTIALS": "25",
            "ENGINE_QUOTA_WEBHOOK_ENDPOINTS": "0",
            "ENGINE_QUOTA_VERIFY_PER_HOUR": "9",
        }
    )
    assert config.quotas == Quotas(credentials=25, webhook_endpoints=0, verify_requests_per_hour=9)
    assert EngineConfig.from_env({}).quotas == Quotas()
    bad: list[dict[str, Any]] = [{"ENGINE_QUOTA_CREDENTIALS": "many"}, {"ENGINE_QUOTA_VERIFY_PER_HOUR": "-1"}]
    for env in bad:
        with pytest.raises(errors.ConfigurationError) as refused:
            EngineConfig.from_env(env)
        assert refused.value.field is not None
