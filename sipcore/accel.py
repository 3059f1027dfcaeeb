"""Loading the optional C accelerators (``sipcore/_fastparse.c``, ``sipcore/_udpsend.c``).

setup.py builds each where a C compiler exists and compiles the SHA-256 of its source into it
as ``SOURCE_HASH``.  A built module is only used when that hash matches the source next to
this file, so a stale build (an older source, an editable install not rebuilt) is never
used; without a usable build the pure-Python code runs, with the same results.
``SIPBILL_PURE_PYTHON=1`` turns every accelerator off.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from types import ModuleType

__all__ = ["load"]


def load(name: str) -> ModuleType | None:
    """``sipcore.<name>`` when it is built from ``sipcore/<name>.c`` as it is now, else None
    (not built, stale, or ``SIPBILL_PURE_PYTHON`` set).  An installed build without its
    source next to it is taken as it is."""
    if os.environ.get("SIPBILL_PURE_PYTHON"):
        return None
    try:
        module = importlib.import_module(f"sipcore.{name}")
    except ImportError:
        return None
    try:
        source = Path(__file__).with_name(f"{name}.c").read_bytes()
    except OSError:
        return module  # an installed build without its source
    if hashlib.sha256(source).hexdigest() != getattr(module, "SOURCE_HASH", None):
        return None  # built from another version of the source: stale
    return module
