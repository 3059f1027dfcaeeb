# Stub for the optional C accelerator built from _fastparse.c (see that file and setup.py).

from collections.abc import Callable, Sequence

from sipcore.headers import CSeq, NameAddr, Via
from sipcore.message import Request, Response

SOURCE_HASH: str

# parse(data, stream, max_line, max_headers, max_size, name_cache): the parsed message, or
# None when data is not in the common shape (the pure-Python parser decides then).
Parse = Callable[[bytes, bool, int, int, int, dict[str, str]], Request | Response | None]

def configure(
    request: type[Request],
    response: type[Response],
    via: type[Via],
    name_addr: type[NameAddr],
    cseq: type[CSeq],
    /,
) -> None: ...
def parse(
    data: bytes,
    stream: bool,
    max_line: int,
    max_headers: int,
    max_size: int,
    name_cache: dict[str, str],
    /,
) -> Request | Response | None: ...

# splice(raw, edits): SipMessage._splice's result, or None to leave it to _splice.
Splice = Callable[[bytes, list[tuple[int, int, bytes]]], bytes | None]

def splice(raw: bytes, edits: list[tuple[int, int, bytes]], /) -> bytes | None: ...
def known_names() -> dict[str, str]: ...

# respond(req, status, reason, to_tag, headers, body): build_response's bytes, or None to
# leave it to the Python code.
Respond = Callable[
    [Request, int, str, str | None, Sequence[tuple[str, str]], bytes], bytes | None
]

def respond(
    req: Request,
    status: int,
    reason: str,
    to_tag: str | None,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    /,
) -> bytes | None: ...

# auth_params(value): digest._parse_auth_header's result, or None to leave it to that.
def auth_params(value: str, /) -> tuple[str, dict[str, str]] | None: ...
