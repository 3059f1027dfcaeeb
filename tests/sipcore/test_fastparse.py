"""The optional C accelerator of the parser (sipcore/_fastparse.c) against the pure-Python path.

``sipcore._fastparse.scan`` recognises common-shape header blocks and declines (None) the
rest, which the pure-Python parser then handles; it never decides a verdict.  So the two
paths must agree exactly: on every message, parse_message with and without the accelerator
gives the same fields, the same lazily parsed headers, the same forwarded bytes, or the same
SipParseError status.  Checked on the RFC 4475 messages, on common-shape messages mutated
at random, and on generated requests.

The pure-Python path also keeps its own run of the message tests (``SIPBILL_PURE_PYTHON=1``,
see test_pure_python_message_tests), so neither path goes untested whichever is in use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sipcore.message as message_module
from sipcore.errors import SipParseError
from sipcore.headers import _NAME_CACHE
from sipcore.message import Request, Response, parse_message
from tests.sipcore.test_message_props import SEEDS, requests

ROOT = Path(__file__).resolve().parents[2]
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Route: <sip:proxy.example.com;lr>\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com:5060;transport=udp>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\r\n"
)
OK_200 = (
    b"SIP/2.0 200 OK\r\n"
    b"v: SIP/2.0/TCP [2001:db8::1]:5061;branch=z9hG4bK2d4790.1;received=192.0.2.10\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport=5060\r\n"
    b"Record-Route: <sip:proxy.example.com;lr>\r\n"
    b"t: Bob B <sip:bob@biloxi.example.com> ; tag = a6c85cf\r\n"
    b"f: <sip:alice@atlanta.example.com>;tag=1928301774;x=\"a b=c\"\r\n"
    b"i: a84b4c76e66710\r\n"
    b"CSeq:\t314159\tINVITE \r\n"
    b"l: 0\r\n"
    b"\r\n"
)
REGISTER = (
    b"REGISTER sips:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TLS 192.0.2.4;branch=z9hG4bKnashds7;alias\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=456248\r\n"
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b"Contact: <sip:alice@192.0.2.4>;expires=7200\r\n"
    b"Expires: 7200\r\n"
    b"\r\n"
)
COMMON = [INVITE, OK_200, REGISTER]

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("SIPBILL_PURE_PYTHON")), reason="SIPBILL_PURE_PYTHON=1: no accelerator"
)


def _compiler_available() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return shutil.which(cc) is not None and headers.is_file()


@pytest.fixture(scope="module", autouse=True)
def _needs_accelerator() -> None:
    if not message_module.ACCELERATED:
        if _compiler_available():
            pytest.fail(
                "sipcore._fastparse is missing or stale although a C compiler exists: "
                "rebuild it (make install, or pip install -e .)"
            )
        pytest.skip("no C compiler or Python headers: the pure-Python parser is in use")


def _path_result(data: bytes, stream: bool, accelerated: bool) -> Any:
    saved = message_module._scan
    if not accelerated:
        message_module._scan = None
    try:
        return _snapshot(data, stream)
    finally:
        message_module._scan = saved


def _attempt(func: Callable[[], Any]) -> Any:
    try:
        return ("ok", func())
    except SipParseError as exc:
        assert exc.__cause__ is None, repr(exc.__cause__)
        return ("error", exc.status, exc.reason)
    except ValueError as exc:  # forward() refusing (Max-Forwards 0, single Via)
        return ("value-error", str(exc))


def _na(addr: Any) -> Any:
    return (addr.display, addr.uri, addr.params, addr.is_star)


def _snapshot(data: bytes, stream: bool) -> Any:
    try:
        msg = parse_message(data, stream=stream)
    except SipParseError as exc:
        assert exc.__cause__ is None, repr(exc.__cause__)
        return ("error", exc.status, exc.reason)
    start: tuple[object, ...]
    if isinstance(msg, Request):
        start = ("request", msg.method, msg.uri)
    else:
        assert isinstance(msg, Response)
        start = ("response", msg.status, msg.reason)
    fields = (
        start,
        msg.raw,
        msg.body,
        msg._lines,
        msg._names,
        msg._pos,
        msg._ascii,
        msg._offsets(),
        msg._start_blen,
        msg._body_offset,
        msg.call_id,
        tuple(msg.cseq),
        type(msg.cseq),
        msg.top_via,
        _na(msg.from_addr),
        _na(msg.to_addr),
        msg.max_forwards,
        msg.content_length,
        _attempt(lambda: msg.vias),
        _attempt(lambda: [_na(a) for a in msg.routes]),
        _attempt(lambda: [_na(a) for a in msg.record_routes]),
        _attempt(lambda: [_na(a) for a in msg.contacts]),
        _attempt(lambda: msg.expires),
        msg.header_items(),
        msg.to_bytes(),
    )
    if isinstance(msg, Request):
        forwarded = _attempt(
            lambda: msg.forward(
                via="SIP/2.0/UDP p.example.com;branch=z9hG4bKp",
                record_route="<sip:p.example.com;lr>",
                pop_route=True,
            )
        )
    else:
        forwarded = _attempt(lambda: msg.forward())
    return (*fields, forwarded)


def _assert_same(data: bytes) -> None:
    for stream in (False, True):
        fast = _path_result(data, stream, accelerated=True)
        slow = _path_result(data, stream, accelerated=False)
        assert fast == slow, data


def _scan(data: bytes) -> Any:
    scan = message_module._scan
    assert scan is not None
    base = len(data) - len(data.lstrip(b"\r\n"))
    head_end = data.find(b"\r\n\r\n", base)
    limits = (message_module.MAX_LINE_LENGTH, message_module.MAX_HEADERS)
    return scan(data, base, head_end, *limits, _NAME_CACHE)


# --------------------------------------------------------------------------- the module


def test_built_from_this_source() -> None:
    from sipcore import _fastparse

    source = (ROOT / "sipcore" / "_fastparse.c").read_bytes()
    assert hashlib.sha256(source).hexdigest() == _fastparse.SOURCE_HASH


def test_stale_or_disabled_build_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPBILL_PURE_PYTHON", "1")
    assert message_module._load_accelerator() is None
    monkeypatch.delenv("SIPBILL_PURE_PYTHON")
    assert message_module._load_accelerator() is not None

    class OtherSource:
        def __init__(self, *_: object) -> None:
            pass

        def with_name(self, _name: str) -> OtherSource:
            return self

        def read_bytes(self) -> bytes:
            return b"/* some other version */"

    monkeypatch.setattr(message_module, "Path", OtherSource)
    assert message_module._load_accelerator() is None


def test_name_table_agrees_with_the_name_cache() -> None:
    from sipcore import _fastparse

    table = _fastparse.known_names()
    assert table
    for written, canon in table.items():
        assert _NAME_CACHE[written] == canon


def test_common_messages_take_the_fast_path() -> None:
    for data in COMMON:
        assert _scan(data) is not None, data
        _assert_same(data)


@pytest.mark.parametrize(
    "data",
    [
        INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: 256"),
        INVITE.replace(b"CSeq: 314159 INVITE", b"CSeq: 314159 BYE"),
        INVITE.replace(b"CSeq: 314159", b"CSeq: 4294967296"),
        INVITE.replace(b"CSeq: 314159", b"CSeq: 1234567890"),
        INVITE.replace(b";rport", b";rport=70000"),
        INVITE.replace(b";rport", b";ttl=1"),
        INVITE.replace(b";rport", b";branch"),
        INVITE.replace(b":5060;branch", b":65536;branch"),
        INVITE.replace(b";tag=1928301774", b";tag"),
        INVITE.replace(b"Call-ID: a84b4c76e66710@", b"Call-ID: a@b@"),
        INVITE.replace(b"To: Bob", b"To: B\xc3\xb6b"),
        INVITE.replace(b"To: Bob", b"TO: Bob"),
        INVITE.replace(b"To: Bob <sip:bob@biloxi.example.com>\r\n", b""),
        INVITE.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nMax-Forwards: 70\r\n"),
        INVITE.replace(b"Route: <sip:proxy.example.com;lr>\r\n", b"Foo\r\n"),
        INVITE.replace(b"Route: <sip:proxy.example.com;lr>", b"Route: <sip:a>,\r\n <sip:b>"),
        INVITE.replace(b"sip:bob@biloxi.example.com SIP", b"sip:bob@biloxi.example.com?x=y SIP"),
        INVITE.replace(b"SIP/2.0\r\n", b"SIP/2.1\r\n", 1),
        INVITE.replace(b"INVITE sip:", b"INVITE tel:"),
        INVITE.replace(b"Content-Length: 4", b"Content-Length: 5"),
        INVITE.replace(b"Contact:", b"Contact :"),
        INVITE.replace(b"\r\nCSeq", b"\rCSeq"),
        OK_200.replace(b"200 OK", b"700 OK"),
        OK_200.replace(b"200 OK", b"200"),
    ],
)
def test_declined_or_odd_messages_agree(data: bytes) -> None:
    _assert_same(data)


def test_torture_messages_agree() -> None:
    assert SEEDS
    for data in SEEDS:
        _assert_same(data)


_SPICE = [
    b" ",
    b"\t",
    b"  ",
    b"\r\n",
    b"\r\n ",
    b"\r",
    b"\n",
    b":",
    b";",
    b",",
    b'"',
    b"\\",
    b"<",
    b">",
    b"@",
    b"=",
    b"[",
    b"]",
    b"[::1]",
    b"?",
    b"%",
    b"\x00",
    b"\x7f",
    b"\xc3\xa9",
    b"0",
    b"9999999999",
    b"65536",
    b"256",
    b"z9hG4bK",
    b";tag",
    b";tag=",
    b";rport",
    b";rport=1",
    b";ttl=1",
    b";maddr",
    b";received",
    b";branch",
    b";lr",
    b"sip:",
    b"sips:",
    b"tel:",
    b"SIP/2.0",
    b"INVITE",
    b"Via: SIP/2.0/UDP h;branch=z9hG4bKx\r\n",
    b"To: <sip:x@y>\r\n",
    b"CSeq: 1 INVITE\r\n",
    b"Max-Forwards: 1\r\n",
    b"l: 3\r\n",
    b"V: ",
    b"i: ",
    b"CALL-ID: ",
    b"X-Odd-Header: ",
]


@st.composite
def mutated_common(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(COMMON)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(data)))
        if op == 0:
            data[pos:pos] = draw(st.sampled_from(_SPICE))
        elif op == 1:
            data[pos : pos + draw(st.integers(1, 12))] = b""
        elif data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
    return bytes(data)


@PROPS
@given(mutated_common())
def test_mutated_common_messages_agree(data: bytes) -> None:
    _assert_same(data)


@PROPS
@given(requests())
def test_generated_requests_agree(case: tuple[bytes, dict[str, object]]) -> None:
    _assert_same(case[0])


_tok = st.text("abcXYZ019-.!%*_+`'~", min_size=1, max_size=8)
_gv = st.text("abcXYZ019-.!%*_+`'~:[]", min_size=1, max_size=8)
_ws = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def _header_params(draw: st.DrawFn, spaced: bool) -> str:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["tag", "TAG", "lr", "transport", "expires"]) | _tok)
        lws = (lambda: draw(_ws)) if spaced else (lambda: "")
        piece = f"{lws()};{lws()}{name}"
        if draw(st.booleans()):
            value = draw(_gv | _tok.map(lambda t: f'"{t} x=y"'))
            piece += f"{lws()}={lws()}{value}"
        out.append(piece)
    return "".join(out)


@st.composite
def common_requests(draw: st.DrawFn) -> bytes:
    """Requests mostly in the shape the accelerator takes, with random values in it."""
    method = draw(st.sampled_from(["INVITE", "BYE", "OPTIONS", "REGISTER", "MESSAGE"]))
    host = draw(st.sampled_from(["h.example.com", "192.0.2.1", "[2001:db8::1]", "H_1"]))
    port = draw(st.sampled_from(["", ":5060", ":0", ":65535", ":65536", ":123456"]))
    via_params = draw(
        st.lists(
            st.sampled_from(
                [";rport", ";rport=5060", ";branch=z9hG4bKa", ";received=192.0.2.9", ";ttl=3",
                 ";maddr=x", ";alias", ";branch", ";x=[::1]"]
            ),
            max_size=3,
        )
    )
    display = draw(
        st.sampled_from(["", '"Alice" ', '"" ', "Bob ", "Bob  B\t", '"a\\b" ', "A<"])
    )
    fields = [
        (draw(st.sampled_from(["Via", "v", "V"])), f"SIP/2.0/{draw(_tok)} {host}{port}"
         + "".join(via_params)),
        (draw(st.sampled_from(["To", "t"])), f"<sip:{draw(_tok)}@h>" + draw(_header_params(True))),
        (draw(st.sampled_from(["From", "f"])),
         f"{display}<sip:a@h>;tag={draw(_tok)}" + draw(_header_params(True))),
        (draw(st.sampled_from(["Call-ID", "i"])),
         draw(_tok) + draw(st.sampled_from(["", "@h", "@", "@h@h"]))),
        ("CSeq", f"{draw(st.integers(0, 2**33))}{draw(_ws) or ' '}{method}"),
        ("Max-Forwards", str(draw(st.integers(0, 300)))),
        ("Route", "<sip:p;lr>"),
        (draw(st.sampled_from(["User-Agent", "Subject", "s", "Allow"])), draw(_tok)),
    ]
    fields = draw(st.permutations(fields))
    body = draw(st.sampled_from([b"", b"v=0\r\n"]))
    head = f"{method} sip:b@{host} SIP/2.0\r\n" + "".join(
        f"{n}:{draw(_ws)}{v}{draw(_ws)}\r\n" for n, v in fields
    )
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@PROPS
@given(common_requests())
def test_common_shape_requests_agree(data: bytes) -> None:
    _assert_same(data)


# --------------------------------------------------------------------------- pure path


def test_pure_python_message_tests() -> None:
    """The message tests once more with the accelerator off, so the pure-Python parser --
    the one production runs where no C compiler was at hand -- stays tested."""
    env = dict(os.environ, SIPBILL_PURE_PYTHON="1")
    files = [
        "tests/sipcore/test_message.py",
        "tests/sipcore/test_message_props.py",
        "tests/sipcore/test_rfc4475.py",
        "tests/sipcore/test_uri.py",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
