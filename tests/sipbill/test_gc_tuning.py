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
