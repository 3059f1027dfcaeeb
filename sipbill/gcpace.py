"""Collect the young generations of the cyclic garbage collector on a clock.

Theory of operation
-------------------
CPython starts a young collection when the number of container objects *allocated minus
deallocated* since the last one passes a threshold.  A SIP server under steady load breaks that
trigger: every answered non-INVITE request leaves a transaction lingering for Timer J (32 s on
UDP), so once the load has lasted 32 s each new lingering transaction is matched by one that
ends, the count barely moves, and the young generation -- every object allocated since the
last collection that is still alive -- keeps growing until a chance surplus of allocations
trips the threshold.  Measured under ``bench/sip_load.py`` at 1,600 REGISTERs/s: young
collections every 3 s taking 6-18 ms during the first 30 s, then every 9-12 s taking 40-60 ms
(CPU time, not preemption), each one stalling every request that arrived meanwhile.

:class:`GcPacer` takes the decision away from the allocation count: every ``interval``
seconds it collects the young generation (what survived those 0.1 s: a millisecond or two),
every ``middle_every`` young collections the middle one too (what survived the last second),
and every ``full_every`` middle collections the whole heap (bounded by the objects created
since start-up: :func:`sipbill.app.tune_gc` froze the start-up heap).  CPython's own trigger
stays armed, so a burst of allocations between two ticks is still collected at once; its
collections count towards the same generation counters (``gc.get_count()``) as ours.  The
total collection work is about what CPython's schedule does (the same objects are walked,
only sooner); what changes is that no single pause grows with how long the load has lasted.

Every collection's duration goes into :attr:`GcPacer.pauses` by generation, exported as
``sipbill_gc_pause_seconds``.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Final

from sipcore.latency import LatencyHistogram

__all__ = ["GcPacer"]

#: Seconds between young collections, young collections per middle one, middle ones per full.
INTERVAL: Final = 0.1
MIDDLE_EVERY: Final = 10
FULL_EVERY: Final = 1200  # at one middle collection a second: every 20 minutes

_GENERATIONS: Final = ("0", "1", "2")


class GcPacer:
    """Runs the collector's young and middle generations on a timer; see the module doc."""

    def __init__(self, interval: float = INTERVAL, middle_every: int = MIDDLE_EVERY,
                 full_every: int = FULL_EVERY) -> None:
        if interval <= 0 or middle_every < 1 or full_every < 1:
            raise ValueError("interval must be positive, middle_every and full_every >= 1")
        self.interval = interval
        self.middle_every = middle_every
        self.full_every = full_every
        self.pauses = LatencyHistogram()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = 0.0

    def start(self) -> None:
        """Begin on the running loop (and time every collection from now on)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._on_gc)
        self._handle = self._loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._loop = None

    def _tick(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._handle = loop.call_later(self.interval, self._tick)
        if not gc.isenabled():
            return  # whoever disabled the collector wants no collections
        _, young_done, middle_done = gc.get_count()
        if middle_done >= self.full_every:
            gc.collect(2)
        elif young_done >= self.middle_every:
            gc.collect(1)
        else:
            gc.collect(0)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.observe(_GENERATIONS[info["generation"]],
                                time.perf_counter() - self._started)
