"""Counting recent failures per key, in bounded memory, sans-IO.

The registrar uses it to slow down password guessing against digest authentication (RFC 7616
§5 on online dictionary attacks, RFC 3261 §26.3.2.4 on denial of service): one counter keyed
by source address, one by user, and it refuses or stops challenging once ``blocked`` says so.
What counts as a failure and what to do about it is the caller's policy; this only counts.

Theory of operation
-------------------
Each key keeps the times of its recent failures in a deque, oldest first.  ``count`` is how
many fall inside the last ``window`` seconds (a true sliding window, not fixed buckets, so a
burst straddling a bucket edge cannot double the allowance).  Memory is bounded twice:

* per key, at most ``max_events`` times are kept -- counting beyond the largest limit anyone
  asks about buys nothing, so ``blocked`` refuses a larger limit;
* across keys, at most ``max_keys`` keys are kept, in least-recently-failed order; a new key
  past the bound evicts the stalest one, and keys whose newest failure has left the window are
  dropped as ``record`` walks past them.

An attacker who can forge many source addresses can push genuine keys out early.  That only
makes the counter forget, never block someone wrongly, and the per-user key still counts.
The caller passes ``now``: seconds on a monotonic clock.
"""

from __future__ import annotations

from collections import OrderedDict, deque

__all__ = ["FailureCounter"]


class FailureCounter:
    """Failures per key within a sliding ``window`` of seconds."""

    def __init__(self, window: float, *, max_keys: int = 100_000, max_events: int = 64) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        if max_keys < 1 or max_events < 1:
            raise ValueError("max_keys and max_events must be positive")
        self.window = window
        self.max_keys = max_keys
        self.max_events = max_events
        # key -> failure times, oldest first; the dict itself in least-recently-failed order.
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def record(self, key: str, now: float) -> int:
        """Count one failure for ``key`` at ``now``; return the count within the window."""
        self._forget_stale(now)
        events = self._events.get(key)
        if events is None:
            events = deque(maxlen=self.max_events)
            self._events[key] = events
            if len(self._events) > self.max_keys:
                self._events.popitem(last=False)
        else:
            self._events.move_to_end(key)
            self._trim(events, now)
        events.append(now)
        return len(events)

    def count(self, key: str, now: float) -> int:
        """Failures for ``key`` within the last ``window`` seconds (at most ``max_events``)."""
        events = self._events.get(key)
        if events is None:
            return 0
        self._trim(events, now)
        if not events:
            del self._events[key]
            return 0
        return len(events)

    def blocked(self, key: str, now: float, limit: int) -> bool:
        """Whether ``key`` has reached ``limit`` failures within the window."""
        if not 1 <= limit <= self.max_events:
            raise ValueError(f"limit must be in 1..{self.max_events} (max_events)")
        return self.count(key, now) >= limit

    def reset(self, key: str) -> None:
        """Forget ``key``'s failures (e.g. after it authenticates successfully)."""
        self._events.pop(key, None)

    def __len__(self) -> int:
        """Keys currently remembered (for a gauge)."""
        return len(self._events)

    def _trim(self, events: deque[float], now: float) -> None:
        cutoff = now - self.window
        while events and events[0] <= cutoff:
            events.popleft()

    def _forget_stale(self, now: float) -> None:
        # The least recently failed keys are at the front; stop at the first one still
        # inside the window, so each call does work proportional to what it removes.
        cutoff = now - self.window
        while self._events:
            key, events = next(iter(self._events.items()))
            if events and events[-1] > cutoff:
                break
            del self._events[key]
