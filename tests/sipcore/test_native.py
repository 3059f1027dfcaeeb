"""The mypyc-compiled core (setup.py, sipcore/__init__.py): used when built from the sources
next to it, never stale, never where it is known to break."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import sipcore
from sipbill.settings import MODULE_SECTIONS, Settings
from tests.support import compiler_available

PACKAGE = Path(sipcore.__file__).parent
PROBE = (
    "import json, sipcore, sipcore.transaction as t, sipcore.digest as d; "
    "print(json.dumps([sipcore.NATIVE, sipcore.NATIVE_STATUS, t.__file__, d.__file__]))"
)


def _probe(path: Path, **env: str) -> tuple[bool, str, str, str]:
    """Import sipcore from ``path`` in a fresh interpreter: (NATIVE, status, files...)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(path), **env}, cwd=path,
    ).stdout
    native, status, tx_file, digest_file = json.loads(out)
    return native, status, tx_file, digest_file


def test_the_compiled_core_is_in_use_where_it_can_be_built() -> None:
    if not compiler_available():
        pytest.skip("no C compiler or Python headers: the pure-Python core is in use")
    assert sipcore.NATIVE, (f"the mypyc build is not in use ({sipcore.NATIVE_STATUS}): "
                            "rebuild it (make install)")
    for name in sipcore.COMPILED:
        module = importlib.import_module(f"sipcore.{name}")
        assert not str(module.__file__).endswith(".py"), name
    manifest = json.loads((PACKAGE / "_native.json").read_text())["modules"]
    assert sorted(manifest) == sorted(sipcore.COMPILED)


def test_compiled_modules_have_no_coroutines() -> None:
    # mypyc's coroutines crash on caught exceptions (see sipcore/__init__.py).
    for name in sipcore.COMPILED:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        found = [
            f"{name}.py:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncWith | ast.AsyncFor)
        ]
        assert found == [], f"compiled modules must not define coroutines: {found}"


#: Dataclasses of compiled modules built once, not per message: the decorator's __init__ will do.
_BUILT_ONCE = {"Gateway", "ProxySettings", "TimerSettings", "TransactionStats"}


def test_per_message_dataclasses_of_compiled_modules_write_their_own_init() -> None:
    # The dataclass decorator writes __init__ as Python at import time, also in a compiled
    # module: each instance built per message would run interpreted code (and eq=False with a
    # hand-written __eq__/__hash__ keeps a dict key's hash compiled, as Peer does).
    for name in sipcore.COMPILED:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        with_init: set[str] = set()  # classes of the module that write __init__ (or inherit it)
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            if any(isinstance(s, ast.FunctionDef) and s.name == "__init__" for s in node.body) \
                    or any(getattr(base, "id", "") in with_init for base in node.bases):
                with_init.add(node.name)
            if node.name in _BUILT_ONCE:
                continue
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == "dataclass":
                    options = {k.arg: ast.literal_eval(k.value) for k in deco.keywords}
                    assert options.get("init") is False and node.name in with_init, \
                        f"{name}.{node.name}"
    if sipcore.NATIVE:
        from sipcore.transport_types import Peer
        for method in (Peer.__init__, Peer.__eq__, Peer.__hash__):
            assert not isinstance(method, types.FunctionType), method


def _sections() -> list[type]:
    seen: list[type] = []
    todo: list[type] = [Settings, *MODULE_SECTIONS.values()]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for arg in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                    todo.append(arg)
    return seen


def test_config_sections_are_not_compiled() -> None:
    # A compiled dataclass keeps only erased annotations: configschema could not check values.
    sections = _sections()
    assert len(sections) > 10
    for cls in sections:
        module = sys.modules[cls.__module__]
        assert str(module.__file__).endswith(".py"), f"{cls.__qualname__} is compiled"
        assert cls.__module__.rpartition(".")[2] not in sipcore.COMPILED


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """sipcore as built, copied (sources, compiled modules, manifest) under tmp_path."""
    if not (PACKAGE / "_native.json").is_file():
        if compiler_available():
            pytest.fail("no sipcore/_native.json although a C compiler exists: rebuild")
        pytest.skip("no C compiler: there is no compiled core to test")
    shutil.copytree(PACKAGE, tmp_path / "sipcore",
                    ignore=shutil.ignore_patterns("__pycache__", "migrations"))
    return tmp_path


def test_a_build_matching_its_sources_is_used(package_copy: Path) -> None:
    native, status, tx_file, digest_file = _probe(package_copy)
    assert native, status
    assert status == f"compiled with mypyc ({len(sipcore.COMPILED)} modules)"
    assert not tx_file.endswith(".py") and not digest_file.endswith(".py")


def test_an_edited_source_turns_the_whole_compiled_core_off(package_copy: Path) -> None:
    digest_py = package_copy / "sipcore" / "digest.py"
    digest_py.write_text(digest_py.read_text() + "\n# edited after the build\n")
    native, status, tx_file, digest_file = _probe(package_copy)
    assert not native
    assert status == "sipcore/digest.py changed since the build"
    # Not only the edited module: compiled modules call each other directly.
    assert tx_file == str(package_copy / "sipcore" / "transaction.py")
    assert digest_file == str(digest_py)


def test_a_missing_or_broken_manifest_means_python(package_copy: Path) -> None:
    manifest = package_copy / "sipcore" / "_native.json"
    manifest.write_text("{not json")
    native, status, tx_file, _ = _probe(package_copy)
    assert not native and status.startswith("sipcore/_native.json unreadable")
    assert tx_file.endswith("transaction.py")
    manifest.unlink()
    native, status, tx_file, _ = _probe(package_copy)
    assert (native, status) == (False, "not compiled (no sipcore/_native.json from a build)")
    assert tx_file.endswith("transaction.py")


def test_a_manifest_for_modules_that_were_not_built_is_refused(package_copy: Path) -> None:
    manifest = package_copy / "sipcore" / "_native.json"
    modules = json.loads(manifest.read_text())["modules"]
    for path in (package_copy / "sipcore").glob("uri.*.so"):
        path.unlink()
    source = (package_copy / "sipcore" / "uri.py").read_bytes()
    assert modules["uri"] == hashlib.sha256(source).hexdigest()
    native, status, tx_file, _ = _probe(package_copy)
    assert (native, status) == (False, "no compiled module for uri")
    assert tx_file.endswith("transaction.py")


def test_the_environment_can_turn_it_off(package_copy: Path) -> None:
    native, status, tx_file, digest_file = _probe(package_copy, SIPBILL_PURE_PYTHON="1")
    assert (native, status) == (False, "SIPBILL_PURE_PYTHON is set")
    assert tx_file.endswith("transaction.py") and digest_file.endswith("digest.py")
