"""Build step for the optional C accelerators: the SIP parser's (sipcore/_fastparse.c) and
batched UDP sends (sipcore/_udpsend.c).

Everything else about the package is in pyproject.toml.  The extensions are optional: where
there is no C compiler (the slim container image) the build skips them and sipcore runs its
pure-Python code, which gives the same results.  The SHA-256 of each C source is compiled
in, and sipcore.accel only uses a built module whose hash matches the source next to it, so a
stale build left over from an older source is never used.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup


def accelerator(name: str) -> Extension:
    source = f"sipcore/{name}.c"
    digest = hashlib.sha256((Path(__file__).parent / source).read_bytes()).hexdigest()
    return Extension(
        f"sipcore.{name}",
        [source],
        define_macros=[("SOURCE_HASH", f'"{digest}"')],
        extra_compile_args=["-O2"],
        optional=True,
    )


setup(ext_modules=[accelerator("_fastparse"), accelerator("_udpsend")])
