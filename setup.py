"""Build step for the optional native code: the C accelerators and the mypyc-compiled core.

Everything else about the package is in pyproject.toml.  Two kinds of native code, both
optional: where there is no C compiler (the slim container image) the build skips them and
sipcore runs its pure-Python code, which gives the same results.

* The hand-written C accelerators: the SIP parser's (sipcore/_fastparse.c) and batched UDP
  sends (sipcore/_udpsend.c).  The SHA-256 of each C source is compiled in, and sipcore.accel
  only uses a built module whose hash matches the source next to it, so a stale build left
  over from an older source is never used.
* The sans-IO core modules listed in ``sipcore.COMPILED``, compiled with mypyc (the mypy
  project's compiler for type-annotated Python; the code is ``mypy --strict`` clean, which is
  what it needs).  The request path spends much of its time in them.  They form one group
  (``sipcore._native__mypyc``, the shared library, plus one small module per source file).
  After building them, ``build_ext`` writes ``sipcore/_native.json``: the SHA-256 of each
  compiled source.  ``sipcore/__init__.py`` uses the compiled modules only when every hash
  there matches the source next to it, so after an edit the package runs the edited Python
  until the next build, never a stale binary.  ``SIPBILL_NO_MYPYC=1`` at build time skips the
  compile.  Why only those modules: see ``sipcore/__init__.py``.
"""

import ast
import hashlib
import json
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
NATIVE_GROUP = "sipcore._native"
MANIFEST = "_native.json"


def accelerator(name: str) -> Extension:
    source = f"sipcore/{name}.c"
    digest = hashlib.sha256((HERE / source).read_bytes()).hexdigest()
    return Extension(
        f"sipcore.{name}",
        [source],
        define_macros=[("SOURCE_HASH", f'"{digest}"')],
        extra_compile_args=["-O2"],
        optional=True,
    )


def native_sources() -> list[str]:
    """``sipcore.COMPILED``, read from the source (setup.py must not import the package)."""
    tree = ast.parse((HERE / "sipcore" / "__init__.py").read_text())
    for node in tree.body:
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id == "COMPILED" and node.value is not None):
            return [f"sipcore/{name}.py" for name in ast.literal_eval(node.value)]
    raise RuntimeError("sipcore/__init__.py has no COMPILED list")


def compiled_core() -> list[Extension]:
    if os.environ.get("SIPBILL_NO_MYPYC"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # no mypy in this build environment: run the pure-Python core
        return []
    sources = native_sources()
    cwd = os.getcwd()
    os.chdir(HERE)  # mypyc names modules after the paths it is given
    try:
        extensions: list[Extension] = mypycify(sources, opt_level="3", group_name=NATIVE_GROUP)
    finally:
        os.chdir(cwd)
    for ext in extensions:
        ext.optional = True  # no C compiler: sipcore runs as Python
    return extensions


#: The setup.py commands that build extensions (pip's build hooks run one of them).
_BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


class BuildExt(build_ext):  # type: ignore[misc]
    """build_ext that compiles the core with mypyc too, and records its sources' hashes.

    mypyc runs here rather than at import, and only for a command that builds: setup.py is
    also run for metadata only, and type-checking the core and generating its C takes half a
    minute.
    """

    def finalize_options(self) -> None:
        # egg_info (metadata, asked first by pip) also finalizes build_ext, to list sources.
        building = set(self.distribution.commands) & _BUILDING
        self.native = compiled_core() if building else []
        self.distribution.ext_modules = [*(self.distribution.ext_modules or []), *self.native]
        super().finalize_options()

    def run(self) -> None:
        # Where the compiled modules land, and in an editable install (pip install -e) also
        # the source tree, where setuptools copies the built extensions.
        manifests = {Path(self.get_ext_fullpath(f"{NATIVE_GROUP}__mypyc")).parent / MANIFEST}
        if self.inplace or getattr(self, "editable_mode", False):
            manifests.add(HERE / "sipcore" / MANIFEST)
        for manifest in manifests:
            manifest.unlink(missing_ok=True)  # until this build proves complete
        native = self.native
        super().run()
        if not native or not all(os.path.exists(self.get_ext_fullpath(e.name)) for e in native):
            return  # no or a partial build: sipcore/__init__.py finds no manifest
        modules = {
            Path(src).stem: hashlib.sha256((HERE / src).read_bytes()).hexdigest()
            for src in native_sources()
        }
        text = json.dumps({"modules": modules}, indent=1, sort_keys=True) + "\n"
        for manifest in manifests:
            manifest.write_text(text)


setup(
    ext_modules=[accelerator("_fastparse"), accelerator("_udpsend")],
    cmdclass={"build_ext": BuildExt},
)
