"""SIP itself: sans-IO message layer, transactions, digest auth, and the asyncio server pieces.

The modules in :data:`COMPILED` are also compiled with mypyc when the package is built
(``setup.py``).  Importing this package decides, once per process, which form runs:

* the compiled modules, when the build left ``_native.json`` and the SHA-256 of every source
  it lists still matches the ``.py`` file next to it;
* otherwise the Python sources, for every compiled module at once (compiled modules call each
  other directly, so a mix of a stale binary and an edited source is never run).  That is the
  case after an edit until the next build, in a build without a C compiler, and when
  ``SIPBILL_PURE_PYTHON`` is set in the environment.

:data:`NATIVE` says which, :data:`NATIVE_STATUS` why (the server logs both at start).

Which modules are compiled, and why not the others:

* **No coroutines.**  mypyc 2.4.1 (the newest) corrupts an exception that a compiled
  coroutine catches from an awaited future when another compiled coroutine awaits it: the
  process crashes (a database error in the location service's flush did it).  Its issue
  tracker has more of that family (mypyc#1177, mypy#12867).  So a module with an ``async def``
  or an ``await`` stays Python (``tests/sipcore/test_native.py`` holds the list to that), and
  the few coroutines of the hot modules live in :mod:`sipcore.coro`, those of the location
  service in :mod:`sipcore.location_io`.
* **message.py and headers.py are compiled, their message classes are not native:** the C
  parser (``_fastparse.c``) builds ``Request``, ``Response``, ``Via`` and ``NameAddr`` by
  filling their ``__slots__`` directly, which a native (mypyc) class does not have.  So those
  classes are marked ``mypyc_attr(native_class=False)``: ordinary Python classes with slots,
  whose methods are compiled.
* **Not settings.py:** config sections must keep their full annotations for
  :mod:`sipbill.configschema`; a compiled dataclass keeps only erased ones.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

__all__ = ["COMPILED", "NATIVE", "NATIVE_STATUS"]

#: What setup.py compiles (it reads this from the source): the request path's modules that
#: have no coroutine (those they need are in :mod:`sipcore.coro` and :mod:`sipcore.location_io`).
COMPILED: Final = (
    "auth", "checks", "digest", "errors", "framing", "gateways", "headers", "latency",
    "location", "message", "pipeline", "proxy", "ratelimit", "registrar", "stack",
    "transaction", "transport_types", "uri",
)

_HERE = Path(__file__).resolve().parent
_MANIFEST = _HERE / "_native.json"


def _compiled_here() -> set[str]:
    """Modules with both a source and an extension module here: the compiled ones (the C
    accelerators have no ``.py`` of their own name, so they are never among them)."""
    names: set[str] = set()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in _HERE.glob("*" + suffix):
            name = path.name[: -len(suffix)]
            if (_HERE / f"{name}.py").is_file():
                names.add(name)
    return names


def _check_build() -> tuple[bool, str]:
    if os.environ.get("SIPBILL_PURE_PYTHON"):
        return False, "SIPBILL_PURE_PYTHON is set"
    try:
        manifest = json.loads(_MANIFEST.read_text())
        modules: dict[str, str] = manifest["modules"]
    except FileNotFoundError:
        return False, "not compiled (no sipcore/_native.json from a build)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"sipcore/_native.json unreadable: {exc}"
    for name, digest in sorted(modules.items()):
        try:
            source = (_HERE / f"{name}.py").read_bytes()
        except OSError:
            return False, f"sipcore/{name}.py is gone since the build"
        if hashlib.sha256(source).hexdigest() != digest:
            return False, f"sipcore/{name}.py changed since the build"
    missing = set(modules) - _compiled_here()
    if missing:
        return False, f"no compiled module for {', '.join(sorted(missing))}"
    return True, f"compiled with mypyc ({len(modules)} modules)"


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Loads the listed ``sipcore`` modules from their ``.py`` file, not the extension module
    the regular path finder would prefer."""

    def __init__(self, names: set[str]) -> None:
        self.names = {f"{__name__}.{n}" for n in names}

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        source = _HERE / (fullname.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_file_location(fullname, source)


NATIVE, NATIVE_STATUS = _check_build()
if not NATIVE:
    _stale = _compiled_here()
    if _stale:
        sys.meta_path.insert(0, _SourceFirst(_stale))
