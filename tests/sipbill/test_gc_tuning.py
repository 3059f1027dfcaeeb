"""The server's garbage-collector tuning (sipbill.app.tune_gc), in a fresh interpreter so the
test process's own heap is not frozen: start-up objects go to the permanent generation and
the young generation is collected less often (the event-loop pauses it removes are measured
in bench/sip_load.py, not asserted here)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc
from sipbill.app import GC_THRESHOLD, tune_gc
assert gc.get_freeze_count() == 0
tune_gc()
assert gc.get_threshold() == GC_THRESHOLD
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
garbage = []
garbage.append(garbage)  # a cycle made after start-up is still collected
del garbage
assert gc.collect() >= 1
print("ok")
"""


def test_tune_gc_freezes_start_up_objects_and_keeps_collecting_new_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


PACER = """
import asyncio, gc, weakref
from sipbill.gcpace import GcPacer

gc.set_threshold(10**9)  # CPython's allocation trigger never fires: only the pacer collects


class Node:
    pass


def cycle():
    node = Node()
    node.me = node
    return node, weakref.ref(node)


async def main():
    pacer = GcPacer(interval=0.01, middle_every=3, full_every=3)
    done = lambda generation: sum(pacer.pauses.counts.get(generation, [0]))

    async def until(condition, what):
        for _ in range(500):
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(what)

    pacer.start()
    # Young garbage goes at the next tick, however few objects were allocated.
    node, ref = cycle()
    del node
    await until(lambda: ref() is None, "a young cycle was not collected")
    # A cycle that survived a young collection is in the middle generation: it goes with the
    # next middle collection, not with young ones.
    node, ref = cycle()
    young = done("0")
    await until(lambda: done("0") > young, "no young collection")
    del node
    middle = done("1")
    await until(lambda: done("1") > middle, "no middle collection")
    assert ref() is None, "the middle collection missed a cycle"
    # One that survived a middle collection waits for the full one.
    node, ref = cycle()
    middle = done("1")
    await until(lambda: done("1") > middle, "no middle collection")
    del node
    full = done("2")
    await until(lambda: done("1") > middle + 1 or done("2") > full, "no collection")
    if done("2") == full:
        assert ref() is not None, "a middle collection walked the oldest generation"
    await until(lambda: done("2") > full, "no full collection")
    assert ref() is None, "the full collection missed a cycle"
    pacer.stop()
    assert pacer._on_gc not in gc.callbacks
    timed = sum(sum(c) for c in pacer.pauses.counts.values())
    await asyncio.sleep(0.05)
    gc.collect()
    assert sum(sum(c) for c in pacer.pauses.counts.values()) == timed, "ticks after stop()"
    print("ok")


asyncio.run(main())
"""


def test_pacer_collects_each_generation_on_its_clock() -> None:
    # In a fresh interpreter: the test turns CPython's own trigger off.
    out = subprocess.run([sys.executable, "-c", PACER], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
