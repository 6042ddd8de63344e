"""The simulator's rate-limit budgets and burst statistics cost the same per request however much it has served.

With enforcement off (the benchmarks' simulator) every request is recorded, so Binance's one-minute weight
window holds a minute of traffic far above its limit. Working out the wait used to walk those entries on
every request, so each benchmark pass through one simulator ran slower than the one before; and a budget was
kept for every subject (account, claimed key, IP) ever seen, and a burst window for every key ever heard
from. The work per request is counted here in executed lines of ``ratelimit.py`` (deterministic), never
timed.
"""

from __future__ import annotations

import functools
import random
import sys
from collections import deque
from types import FrameType
from typing import Any

import aiohttp
import pytest

from venues.base import Venue
from venues.simulator import Simulator, ratelimit, stats

MINUTE = ratelimit.Window(10, 60.0)


def _lines_run(call: Any) -> tuple[Any, int]:
    """``call()``'s result and how many lines of ratelimit.py it executed."""
    counted = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal counted
        if frame.f_code.co_filename != ratelimit.__file__:
            return None
        if event == "line":
            counted += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        result = call()
    finally:
        sys.settrace(previous)
    return result, counted


def test_an_unenforced_window_far_over_its_limit_answers_without_walking_its_entries() -> None:
    limits = ratelimit.RateLimits()
    rule = ratelimit.Rule("ip:127.0.0.1:api", MINUTE)
    stamps = [100.0 + i * 0.0005 for i in range(20_000)]
    for stamp in stamps:
        limits.admit([rule], stamp, enforce=False)
    now = stamps[-1] + 0.001
    (exceeded, lines) = _lines_run(lambda: limits.admit([rule], now, enforce=False))
    assert exceeded is not None
    # 20 000 in the window, limit 10: one more fits once 19 991 have left, i.e. when entry 19 990 leaves
    assert exceeded[1] == pytest.approx(stamps[19_990] + 60.0 - now)
    assert lines < 200  # the walk ran tens of thousands


def test_the_work_per_request_stays_flat_as_requests_accumulate() -> None:
    limits = ratelimit.RateLimits()
    rule = ratelimit.Rule("ip:127.0.0.1:api", MINUTE)
    counts = []
    now = 0.0
    for _ in range(4):
        for _ in range(5_000):
            now += 0.001
            limits.admit([rule], now, enforce=False)
        now += 0.001
        counts.append(_lines_run(functools.partial(limits.admit, [rule], now, enforce=False))[1])
    assert max(counts) - min(counts) <= 20, counts


def test_budgets_nobody_draws_from_are_forgotten() -> None:
    """One budget per claimed key ever seen would grow for as long as the simulator runs."""
    limits = ratelimit.RateLimits()
    for i in range(5_000):
        limits.admit([ratelimit.Rule(f"key:{i}", ratelimit.Window(5, 2.0))], 1.0 + i * 1e-4, enforce=False)
        limits.admit(
            [ratelimit.Rule(f"kraken:{i}", ratelimit.Bucket(15, 0.33))], 1.0 + i * 1e-4, enforce=False
        )
    assert len(limits) == 10_000
    later = 1.0 + ratelimit.SWEEP_SECONDS + 60.0
    limits.admit([ratelimit.Rule("key:new", ratelimit.Window(5, 2.0))], later)
    assert len(limits) == 1


def test_a_budget_still_in_use_is_kept_by_the_sweep() -> None:
    limits = ratelimit.RateLimits()
    window = ratelimit.Rule("okx:uid:1", ratelimit.Window(1, 1000.0))
    bucket = ratelimit.Rule("kraken:uid:1", ratelimit.Bucket(capacity=1, rate=0.001))
    assert limits.admit([window, bucket], 0.0) is None
    limits.sweep(ratelimit.SWEEP_SECONDS)
    refused = limits.admit([window, bucket], ratelimit.SWEEP_SECONDS)
    assert refused is not None and refused[0] == window


class _Walk:
    """The walk every answer is checked against: entries oldest first, the wait found by scanning them."""

    def __init__(self) -> None:
        self.entries: deque[tuple[float, float]] = deque()

    def admit(self, limit: ratelimit.Window, now: float, cost: float, enforce: bool) -> float:
        while self.entries and self.entries[0][0] <= now - limit.seconds:
            self.entries.popleft()
        used = sum(entry_cost for _, entry_cost in self.entries)
        wait = 0.0
        if used + cost > limit.limit:
            wait = limit.seconds
            freed = used
            for stamp, entry_cost in self.entries:
                freed -= entry_cost
                if freed + cost <= limit.limit:
                    wait = max(0.001, stamp + limit.seconds - now)
                    break
        if wait == 0.0 or not enforce:
            self.entries.append((now, cost))
        return wait


@pytest.mark.parametrize("enforce", [True, False])
def test_windows_answer_as_the_walk_does(enforce: bool) -> None:
    rng = random.Random(14)
    limit = ratelimit.Window(40, 2.0)
    limits, walk = ratelimit.RateLimits(), _Walk()
    now = 0.0
    for _ in range(20_000):  # enough to cut the expired entries many times
        now += rng.choice((0.0, 0.001, 0.01, 0.05, 0.3))
        cost = float(rng.choice((1, 1, 1, 2, 5, 50)))
        rule = ratelimit.Rule("s", limit, cost=cost)
        got = limits.admit([rule], now, enforce=enforce)
        expected = walk.admit(limit, now, cost, enforce)
        assert (0.0 if got is None else got[1]) == pytest.approx(expected)


def test_burst_windows_of_quiet_keys_are_forgotten_and_peaks_kept() -> None:
    recorder = stats.StatsRecorder(Venue.KRAKEN)
    for i in range(5_000):
        recorder.request(f"key-{i}", 1.0 + i * 1e-4)
        recorder.request(f"key-{i}", 1.0 + i * 1e-4)
    assert recorder.tracked_keys == 5_000
    later = 1.0 + stats.SWEEP_SECONDS + 1.0
    recorder.request("key-0", later)
    recorder.request("key-new", later)
    assert recorder.tracked_keys == 2
    snapshot = recorder.snapshot()
    assert snapshot.requests == 10_002
    assert len(snapshot.max_per_second_by_key) == 5_001
    assert snapshot.max_per_second_by_key["key-4999"] == 2
    assert snapshot.max_per_second_by_key["key-new"] == 1


def test_a_key_heard_from_within_the_second_keeps_its_burst_window() -> None:
    recorder = stats.StatsRecorder(Venue.OKX)
    recorder.request("busy", 0.0)
    recorder.request("busy", stats.SWEEP_SECONDS - 0.5)
    recorder.request("busy", stats.SWEEP_SECONDS)  # the sweep runs first: "busy" is still in its second
    recorder.request("busy", stats.SWEEP_SECONDS + 0.1)
    assert recorder.snapshot().max_per_second_by_key["busy"] == 3


async def test_made_up_keys_grow_no_per_key_figures(session: aiohttp.ClientSession) -> None:
    """2,000 requests, each with another made-up key, then one with a key the simulator holds: only the held
    key has a burst figure (before: one peak per made-up key, kept for ever)."""
    async with Simulator(seed=5, enforce_rate_limits=False) as sim:
        held = sim.add_key(Venue.BINANCE)
        url = f"{sim.urls[Venue.BINANCE]}/api/v3/account"
        for i in range(2_000):
            async with session.get(url, headers={"X-MBX-APIKEY": f"made-up-{i}"}) as resp:
                assert resp.status in (400, 401)
        async with session.get(url, headers={"X-MBX-APIKEY": held.api_key}) as resp:
            await resp.read()
        figures = sim.stats(Venue.BINANCE)
        assert figures.requests == 2_001
        assert dict(figures.max_per_second_by_key) == {held.api_key: 1}
        assert (
            sim._state.stats[Venue.BINANCE].tracked_keys == 1
        )  # the burst windows held, not only the figures
