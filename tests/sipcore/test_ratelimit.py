"""Tests for sipcore.ratelimit.FailureCounter: sliding window, bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipcore.ratelimit import FailureCounter


def test_counts_within_a_sliding_window() -> None:
    counter = FailureCounter(window=60)
    assert counter.count("192.0.2.1", 0) == 0
    assert [counter.record("192.0.2.1", t) for t in (0, 10, 20)] == [1, 2, 3]
    assert counter.count("192.0.2.1", 59) == 3
    assert counter.count("192.0.2.1", 60) == 2  # the failure at 0 has left the window
    assert counter.count("192.0.2.1", 80) == 0
    assert counter.count("other", 80) == 0


def test_blocked_at_the_limit_and_released_when_failures_age_out() -> None:
    counter = FailureCounter(window=60)
    for t in range(5):
        counter.record("alice@example.com", t)
    assert counter.blocked("alice@example.com", 5, limit=5)
    assert not counter.blocked("alice@example.com", 5, limit=6)
    assert not counter.blocked("alice@example.com", 60.5, limit=5)  # t=0 aged out
    assert not counter.blocked("bob@example.com", 5, limit=1)


def test_reset_forgets_a_key() -> None:
    counter = FailureCounter(window=60)
    counter.record("k", 0)
    counter.reset("k")
    counter.reset("never-seen")
    assert counter.count("k", 1) == 0
    assert len(counter) == 0


def test_memory_per_key_is_bounded() -> None:
    counter = FailureCounter(window=1000, max_events=8)
    for t in range(100):
        counter.record("k", t)
    assert counter.count("k", 100) == 8
    assert counter.blocked("k", 100, limit=8)
    with pytest.raises(ValueError):
        counter.blocked("k", 100, limit=9)
    with pytest.raises(ValueError):
        counter.blocked("k", 100, limit=0)


def test_number_of_keys_is_bounded_and_stalest_goes_first() -> None:
    counter = FailureCounter(window=1000, max_keys=3)
    for t, key in enumerate(["a", "b", "c", "a", "d"]):
        counter.record(key, t)
    assert len(counter) == 3
    assert counter.count("b", 5) == 0  # least recently failed: evicted for "d"
    assert (counter.count("a", 5), counter.count("c", 5), counter.count("d", 5)) == (2, 1, 1)


def test_idle_keys_are_dropped_as_time_passes() -> None:
    counter = FailureCounter(window=10)
    for i in range(100):
        counter.record(f"198.51.100.{i}", i * 0.01)
    assert len(counter) == 100
    counter.record("203.0.113.9", 50)
    assert len(counter) == 1


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        FailureCounter(window=0)
    with pytest.raises(ValueError):
        FailureCounter(window=1, max_keys=0)
    with pytest.raises(ValueError):
        FailureCounter(window=1, max_events=0)


@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.floats(min_value=0, max_value=5)),
        max_size=60,
    )
)
def test_matches_a_naive_count(steps: list[tuple[str, float]]) -> None:
    roomy = FailureCounter(window=10, max_events=4)
    tight = FailureCounter(window=10, max_keys=3, max_events=4)
    now = 0.0
    history: dict[str, list[float]] = {}
    for key, delta in steps:
        now += delta
        roomy.record(key, now)
        tight.record(key, now)
        history.setdefault(key, []).append(now)
        assert len(tight) <= 3
        for other, times in history.items():
            truth = min(sum(1 for t in times if t > now - 10), 4)
            # Exact while there is room for every key; with too many keys it may forget,
            # which errs towards not blocking, but never counts more than happened.
            assert roomy.count(other, now) == truth
            assert tight.count(other, now) <= truth
        assert tight.count(key, now) >= 1
