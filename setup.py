"""Build step for the optional C accelerator of the SIP parser (sipcore/_fastparse.c).

Everything else about the package is in pyproject.toml.  The extension is optional: where
there is no C compiler (the slim container image) the build skips it and sipcore.message
runs its pure-Python parser, which gives the same results.  The SHA-256 of the C source is
compiled in, and sipcore.message only uses a built module whose hash matches the source
next to it, so a stale build left over from an older source is never used.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "sipcore/_fastparse.c"
DIGEST = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "sipcore._fastparse",
            [SOURCE],
            define_macros=[("SOURCE_HASH", f'"{DIGEST}"')],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
