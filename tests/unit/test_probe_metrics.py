"""The probe-latency histogram: one count per probe, read as Prometheus' cumulative buckets."""

from __future__ import annotations

from engine.jobs import LATENCY_BUCKETS, ProbeMetrics
from venues.base import Venue


def test_buckets_are_cumulative_and_a_latency_on_a_bound_counts_in_it() -> None:
    metrics = ProbeMetrics()
    for seconds in (0.01, 0.05, 0.07, 0.3, 31.0):  # 0.05 is a bound itself; 31 s is above the last one
        metrics.observe(Venue.OKX, "OK", seconds)
    metrics.observe(Venue.KRAKEN, "INVALID_KEY", 0.2)
    buckets = metrics.latency_buckets
    okx = [buckets[("OKX", bound)] for bound in LATENCY_BUCKETS]
    # bounds: 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 (+Inf is the count)
    assert okx == [2, 3, 3, 4, 4, 4, 4, 4, 4]
    assert metrics.latency_count["OKX"] == 5
    assert [buckets[("KRAKEN", bound)] for bound in LATENCY_BUCKETS] == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert metrics.outcomes == {("OKX", "OK"): 5, ("KRAKEN", "INVALID_KEY"): 1}
    assert abs(metrics.latency_sum["OKX"] - 31.43) < 1e-9


def test_no_probe_no_bucket() -> None:
    assert ProbeMetrics().latency_buckets == {}
