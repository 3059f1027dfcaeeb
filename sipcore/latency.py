"""Fixed-bucket latency histograms kept as plain counters (exported by the metrics module).

The SIP core must not depend on prometheus-client or pay a lock per observation; a
:class:`LatencyHistogram` is a list of integers per label that the Prometheus collector turns
into a histogram family at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

__all__ = ["DEFAULT_BUCKETS", "LatencyHistogram"]

#: Seconds; a SIP request handled in memory takes well under a millisecond, one that waits for
#: the database a few milliseconds, and anything near a second is trouble.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class LatencyHistogram:
    """Counts per label and bucket (``le`` upper bounds, cumulative only when exported)."""

    __slots__ = ("buckets", "counts", "sums")

    def __init__(self, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, label: str, seconds: float) -> None:
        counts = self.counts.get(label)
        if counts is None:
            counts = self.counts[label] = [0] * (len(self.buckets) + 1)
            self.sums[label] = 0.0
        counts[bisect_left(self.buckets, seconds)] += 1
        self.sums[label] += seconds

    def cumulative(self) -> Iterator[tuple[str, list[tuple[str, int]], float]]:
        """(label, [(le, cumulative count) ... ("+Inf", total)], sum) per label."""
        for label, counts in self.counts.items():
            running = 0
            out: list[tuple[str, int]] = []
            for le, n in zip(self.buckets, counts, strict=False):
                running += n
                out.append((repr(le), running))
            running += counts[-1]
            out.append(("+Inf", running))
            yield label, out, self.sums[label]
