"""LatencyHistogram: observations land in the right buckets and export cumulatively."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipcore.latency import LatencyHistogram


def test_buckets_and_cumulative_export() -> None:
    h = LatencyHistogram((0.001, 0.01, 0.1))
    for s in (0.0005, 0.001, 0.002, 0.05, 3.0):
        h.observe("INVITE", s)
    ((label, buckets, total),) = list(h.cumulative())
    assert label == "INVITE"
    # le is inclusive (Prometheus semantics): 0.001 counts in the 0.001 bucket.
    assert buckets == [("0.001", 2), ("0.01", 3), ("0.1", 4), ("+Inf", 5)]
    assert total == pytest.approx(3.0535)


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1))
def test_cumulative_is_monotonic_and_counts_everything(values: list[float]) -> None:
    h = LatencyHistogram()
    for v in values:
        h.observe("x", v)
    ((_, buckets, total),) = list(h.cumulative())
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == len(values)
    assert total == pytest.approx(sum(values))
