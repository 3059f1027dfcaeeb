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

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sipcore.message as message_module
from sipcore import accel, digest
from sipcore.errors import SipParseError
from sipcore.headers import _NAME_CACHE, CSeq, NameAddr, Via
from sipcore.message import Request, Response, parse_message
from sipcore.transport_types import Peer
from tests.sipcore.test_message_props import SEEDS, requests
from tests.support import require_accelerator

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
    b'f: <sip:alice@atlanta.example.com>;tag=1928301774;x="a b=c"\r\n'
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
# A response whose first Via field holds both values, as SIPp's [last_Via:] and many UAs
# write it: the top Via is the first value, the rest is read when asked for.
RINGING_LIST_VIA = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKdad1907f0f71.1;rport , "
    b"SIP/2.0/UDP 127.0.0.1:49743;branch=z9hG4bK-3935-1-0;rport=49743;received=127.0.0.1\r\n"
    b"From: <sip:caller1@bench.invalid>;tag=3935SIPpTag001\r\n"
    b"To: <sip:callee@localhost>;tag=3934SIPpTag011\r\n"
    b"Call-ID: 1-3935@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Record-Route: <sip:127.0.0.1:5060;lr>\r\n"
    b"Contact: <sip:127.0.0.1:57324;transport=UDP>\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)
COMMON = [INVITE, OK_200, REGISTER, RINGING_LIST_VIA]

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("SIPBILL_PURE_PYTHON")), reason="SIPBILL_PURE_PYTHON=1: no accelerator"
)


@pytest.fixture(scope="module", autouse=True)
def _needs_accelerator() -> None:
    require_accelerator("_fastparse", message_module.ACCELERATED)


def _path_result(data: bytes, stream: bool, accelerated: bool) -> Any:
    saved = message_module._fast_parse, message_module._fast_splice
    if not accelerated:
        message_module._fast_parse = message_module._fast_splice = None
    try:
        return _snapshot(data, stream)
    finally:
        message_module._fast_parse, message_module._fast_splice = saved


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


def _slot_names(cls: type) -> list[str]:
    """Every __slots__ entry of cls and its bases."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend((slots,) if isinstance(slots, str) else slots)
    return names


def _slots(obj: object) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in _slot_names(type(obj))}


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
    # Last, every slot (the lazy ones are filled by now on both paths; the C accelerator
    # fills _routes at parse time when it can).
    return (*fields, forwarded, _slots(msg))


def _assert_same(data: bytes) -> None:
    for stream in (False, True):
        fast = _path_result(data, stream, accelerated=True)
        slow = _path_result(data, stream, accelerated=False)
        assert fast == slow, data


def _scan(data: bytes, stream: bool = False) -> Any:
    """What the C accelerator makes of data: a message, or None (declined)."""
    parse = message_module._fast_parse
    assert parse is not None
    limits = (
        message_module.MAX_LINE_LENGTH,
        message_module.MAX_HEADERS,
        message_module.MAX_MESSAGE_SIZE,
    )
    return parse(data, stream, *limits, _NAME_CACHE)


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

    monkeypatch.setattr(accel, "Path", OtherSource)
    assert message_module._load_accelerator() is None


def test_unfitting_build_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from sipcore import _fastparse

    def refuse(*_: object) -> None:
        raise TypeError("Request._lines is not a __slots__ member")

    monkeypatch.setattr(_fastparse, "configure", refuse)
    assert message_module._load_accelerator() is None
    monkeypatch.delattr(_fastparse, "configure")
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


def test_every_slot_is_filled() -> None:
    """The accelerator writes slots directly: none may be left unset (a slot added to a
    class but not to _fastparse.c would be), and each object has the right class."""
    for data in COMMON:
        msg = _scan(data)
        assert type(msg) in (Request, Response)
        objects: list[object] = [msg, msg.cseq, msg.top_via, msg.from_addr, msg.to_addr]
        objects.extend(msg._routes or ())
        for obj in objects:
            for name in _slot_names(type(obj)):
                assert hasattr(obj, name), (type(obj).__name__, name)
        assert type(msg.cseq) is CSeq
        assert type(msg.top_via) is Via
        assert type(msg.from_addr) is NameAddr


def test_bytes_like_input_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    parse = message_module._fast_parse
    assert parse is not None

    def spy(data: bytes, *args: Any) -> Any:
        seen.append(type(data))
        return parse(data, *args)

    monkeypatch.setattr(message_module, "_fast_parse", spy)
    expected = _slots(parse_message(INVITE))
    for data in (bytearray(INVITE), memoryview(INVITE)):
        msg = parse_message(data)
        assert type(msg.raw) is bytes
        assert _slots(msg) == expected
    assert seen == [bytes, bytes, bytes]


def test_lone_route_is_parsed_up_front() -> None:
    msg = _scan(INVITE)
    assert msg._routes == [NameAddr(None, "sip:proxy.example.com;lr", {})]
    # Several Route fields, or a value outside the common shape: left to the lazy accessor.
    msg = _scan(INVITE.replace(b"Route: <sip:proxy.example.com;lr>", b"Route: <sip:a>, <sip:b>"))
    assert msg is not None and msg._routes is None
    msg = _scan(INVITE.replace(b"Route:", b"Route: <sip:a>\r\nRoute:"))
    assert msg is not None and msg._routes is None
    msg = _scan(INVITE.replace(b"Route: <sip:proxy.example.com;lr>", b"Route: <sip:p>;tag"))
    assert msg is not None and msg._routes == [NameAddr(None, "sip:p", {"tag": None})]


def test_configure_checks_the_classes() -> None:
    from sipcore import _fastparse

    class NoSlots:
        pass

    with pytest.raises(TypeError):
        _fastparse.configure(NoSlots, Response, Via, NameAddr, CSeq)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _fastparse.configure(Request, Response, Via, NameAddr, tuple)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _fastparse.configure(Request, Response, Via, NameAddr, Via)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _fastparse.configure(Request, Response, Via, NameAddr)  # type: ignore[call-arg]
    # The failed calls changed nothing.
    assert type(_scan(INVITE)) is Request


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
    b",",
    b", SIP/2.0/UDP h;branch=z9hG4bKy",
    b'"q,"',
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
                [
                    ";rport",
                    ";rport=5060",
                    ";branch=z9hG4bKa",
                    ";received=192.0.2.9",
                    ";ttl=3",
                    ";maddr=x",
                    ";alias",
                    ";branch",
                    ";x=[::1]",
                ]
            ),
            max_size=3,
        )
    )
    display = draw(st.sampled_from(["", '"Alice" ', '"" ', "Bob ", "Bob  B\t", '"a\\b" ', "A<"]))
    fields = [
        (
            draw(st.sampled_from(["Via", "v", "V"])),
            f"SIP/2.0/{draw(_tok)} {host}{port}" + "".join(via_params),
        ),
        (draw(st.sampled_from(["To", "t"])), f"<sip:{draw(_tok)}@h>" + draw(_header_params(True))),
        (
            draw(st.sampled_from(["From", "f"])),
            f"{display}<sip:a@h>;tag={draw(_tok)}" + draw(_header_params(True)),
        ),
        (
            draw(st.sampled_from(["Call-ID", "i"])),
            draw(_tok) + draw(st.sampled_from(["", "@h", "@", "@h@h"])),
        ),
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


_ROUTE_PIECES = [
    "<sip:p.example.com;lr>",
    "<sip:p>",
    "<sips:[2001:db8::1]:5061;lr;transport=tcp>",
    '"Proxy" <sip:p;lr>',
    '"" <sip:p>',
    '"a\\b" <sip:p>',
    "Edge  Proxy\t<sip:p>",
    "<sip:p>;tag",
    '<sip:p>;tag=1;x = "a b"',
    "<sip:p> ; lr",
    "<sip:a,b>",
    "<tel:+1234>",
    "<sip:p>,<sip:q>",
    "sip:p;lr",
    "<sip:p",
    "<>",
    "<sip:>",
    "<1ip:p>",
    "<sip:p>x",
    " ",
    "",
    "*",
]


@st.composite
def routed_requests(draw: st.DrawFn) -> bytes:
    """INVITE with 0-2 Route fields holding generated values (the accelerator parses a lone
    one in the common shape, and leaves every other to the lazy accessor)."""
    fields = []
    for _ in range(draw(st.integers(0, 2))):
        value = draw(
            st.sampled_from(_ROUTE_PIECES)
            | st.builds(
                lambda d, u, p: f"{d}<{u}>{p}",
                st.sampled_from(["", '"P" ', "P ", "P Q "]),
                st.sampled_from(["sip:p", "sip:u@h:5060;lr", "x-s:a"]) | _gv.map("sip:".__add__),
                _header_params(True),
            )
        )
        name = draw(st.sampled_from(["Route", "route", "ROUTE"]))
        fields.append(f"{name}:{draw(_ws)}{value}{draw(_ws)}\r\n".encode())
    return INVITE.replace(b"Route: <sip:proxy.example.com;lr>\r\n", b"".join(fields))


@PROPS
@given(routed_requests())
def test_routes_agree(data: bytes) -> None:
    _assert_same(data)


@st.composite
def framed_messages(draw: st.DrawFn) -> bytes:
    """Common messages with leading CRLFs, a Content-Length near the body's real length,
    or none, and bytes after the body: every way _set_body frames or rejects."""
    data = draw(st.sampled_from(COMMON))
    head, _, body = data.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"l:", b"content-length:"))
    ]
    body = draw(st.sampled_from([b"", body, b"v=0\r\n", b"\r\n\r\n"]))
    length = draw(st.none() | st.integers(max(0, len(body) - 2), len(body) + 2))
    if length is not None:
        lines.insert(draw(st.integers(1, len(lines))), b"Content-Length: %d" % length)
    lead = draw(st.sampled_from([b"", b"\r\n", b"\r\n\r\n", b"\n", b"\r"]))
    tail = draw(st.sampled_from([b"", b"x", b"\r\n"]))
    return lead + b"\r\n".join(lines) + b"\r\n\r\n" + body + tail


@PROPS
@given(framed_messages())
def test_framing_agrees(data: bytes) -> None:
    _assert_same(data)


@pytest.mark.parametrize("limit", ["MAX_MESSAGE_SIZE", "MAX_LINE_LENGTH", "MAX_HEADERS"])
def test_limits_agree_at_their_edges(limit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caps are passed to the accelerator at each call; around each edge both paths
    must accept and reject alike (the accelerator by declining)."""
    for data in COMMON:
        head = data[: data.find(b"\r\n\r\n")]
        edge = {
            "MAX_MESSAGE_SIZE": len(data),
            "MAX_LINE_LENGTH": max(map(len, head.split(b"\r\n"))),
            "MAX_HEADERS": head.count(b"\r\n"),
        }[limit]
        for value in range(max(0, edge - 5), edge + 6):
            monkeypatch.setattr(message_module, limit, value)
            _assert_same(data)
            _assert_same(b"\r\n\r\n" + data)


def _python_splice(raw: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    msg = parse_message(INVITE)
    msg.raw = raw
    saved = message_module._fast_splice
    message_module._fast_splice = None
    try:
        return msg._splice(list(edits))
    finally:
        message_module._fast_splice = saved


_offsets = st.integers(-2, 40)
_edits = st.lists(st.tuples(_offsets, _offsets, st.binary(max_size=4)), max_size=20)


@PROPS
@given(st.binary(max_size=32), _edits)
def test_splice_agrees(raw: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    """The C splice gives _splice's bytes for well-formed edits (sorted, non-overlapping,
    inside raw) and None, leaving it to the Python loop, for anything else."""
    from sipcore import _fastparse

    given_edits = list(edits)
    spliced = _fastparse.splice(raw, edits)
    assert edits == given_edits  # not sorted in place
    spans = sorted((start, end) for start, end, _ in edits)
    well_formed = all(0 <= a <= b <= len(raw) for a, b in spans) and all(
        spans[k][1] <= spans[k + 1][0] for k in range(len(spans) - 1)
    )
    if well_formed:
        assert spliced == _python_splice(raw, edits)
    else:
        assert spliced is None


def test_splice_declines_odd_arguments() -> None:
    from sipcore import _fastparse

    splice: Any = _fastparse.splice
    assert splice(b"abc", [(0, 1, b"x")]) == b"xbc"
    assert splice(b"abc", [(1, 1, b"x"), (0, 3, b""), (1, 1, b"y")]) is None  # overlap
    assert splice(b"abc", [(1, 1, b"x"), (1, 2, b""), (1, 1, b"y")]) == b"axyc"
    assert splice(b"abc", [(0, 2**70, b"")]) is None
    assert splice(b"abc", [(0, 1, "x")]) is None
    assert splice(b"abc", [[0, 1, b"x"]]) is None
    assert splice(b"abc", [(True, 1, b"x")]) is None
    assert splice(bytearray(b"abc"), []) is None
    assert splice(b"abc", ()) is None
    assert splice(b"abc", [(0, 1, b"x")] * 100) is None
    assert splice(b"abc" * 100, [(k, k, b"x") for k in range(300)]) == b"xaxbxc" * 100


# --------------------------------------------------------------------------- respond


def _both_responses(req: Request, *args: Any, **kwargs: Any) -> tuple[object, object]:
    """build_response with the accelerator's respond and without: bytes or the error."""

    def one() -> object:
        try:
            return message_module.build_response(req, *args, **kwargs)
        except ValueError as exc:
            return f"ValueError: {exc}"

    fast = one()
    saved = message_module._fast_respond
    message_module._fast_respond = None
    try:
        return fast, one()
    finally:
        message_module._fast_respond = saved


def _respond_takes(req: Request, *args: Any, **kwargs: Any) -> bool:
    """Whether the C respond() gives an answer (rather than leaving it to Python)."""
    from sipcore import _fastparse

    reason = kwargs.get("reason") or message_module.REASON_PHRASES.get(args[0], "Unknown")
    return _fastparse.respond(req, args[0], reason, kwargs.get("to_tag"),
                              kwargs.get("headers", ()), kwargs.get("body", b"")) is not None


def test_common_responses_take_the_fast_path() -> None:
    for data in (INVITE, REGISTER):
        req = parse_message(data)
        assert isinstance(req, Request)
        for stamp in (False, True):
            if stamp:
                assert req.stamp_received(Peer("UDP", "192.0.2.7", 5999))
            for status, to_tag in ((100, None), (180, "t1"), (200, "t2"), (401, "t3")):
                headers = [("WWW-Authenticate", 'Digest realm="x"'), ("Server", "sipbill")]
                kwargs: dict[str, Any] = {"to_tag": to_tag, "headers": headers, "body": b"b"}
                assert _respond_takes(req, status, **kwargs)
                fast, slow = _both_responses(req, status, **kwargs)
                assert fast == slow


_ODD_TEXT = st.sampled_from(["", "x", "a b", "caf\u00e9", "a\r\nX: y", "\t", "l", "L",
                             "Content-Length", "content-LENGTH", "X Y", "X:", "<>", ","])


@st.composite
def response_cases(draw: st.DrawFn) -> tuple[Request, dict[str, Any]]:
    data = draw(st.one_of(st.sampled_from(COMMON), mutated_common(), common_requests()))
    try:
        req = parse_message(data)
    except SipParseError:
        req = parse_message(REGISTER)
    if not isinstance(req, Request):
        req = parse_message(INVITE)
    assert isinstance(req, Request)
    if draw(st.booleans()):
        with contextlib.suppress(SipParseError):
            req.stamp_received(Peer("UDP", draw(st.sampled_from(["192.0.2.1", "::1"])), 5070))
    names = st.one_of(_ODD_TEXT, st.sampled_from(["Server", "Contact", "WWW-Authenticate"]))
    case: dict[str, Any] = {
        "status": draw(st.sampled_from([100, 180, 200, 401, 486, 699])),
        "reason": draw(st.one_of(st.none(), _ODD_TEXT)),
        "to_tag": draw(st.one_of(st.none(), _ODD_TEXT, st.just("abc"))),
        "headers": draw(st.lists(st.tuples(names, st.one_of(_ODD_TEXT, st.just("v"))),
                                 max_size=4)),
        "body": draw(st.sampled_from([b"", b"v=0\r\n", b"\xff"])),
    }
    if draw(st.booleans()):
        case["headers"] = tuple(case["headers"])
    return req, case


@PROPS
@given(response_cases())
def test_responses_agree(case: tuple[Request, dict[str, Any]]) -> None:
    req, kwargs = case
    status = kwargs.pop("status")
    fast, slow = _both_responses(req, status, **kwargs)
    assert fast == slow


def test_respond_declines_odd_arguments() -> None:
    from sipcore import _fastparse

    respond: Any = _fastparse.respond
    req = parse_message(REGISTER)
    assert respond(req, 200, "OK", None, [], b"") is not None
    assert respond(object(), 200, "OK", None, [], b"") is None
    assert respond(req, 200.0, "OK", None, [], b"") is None
    assert respond(req, 2**70, "OK", None, [], b"") is None
    assert respond(req, 99, "OK", None, [], b"") is None
    assert respond(req, 200, b"OK", None, [], b"") is None
    assert respond(req, 200, "OK", 7, [], b"") is None
    assert respond(req, 200, "OK", None, [["A", "b"]], b"") is None
    assert respond(req, 200, "OK", None, [("A", "b", "c")], b"") is None
    assert respond(req, 200, "OK", None, iter([]), b"") is None
    assert respond(req, 200, "OK", None, [], bytearray()) is None
    with pytest.raises(TypeError):
        respond(req, 200, "OK")


# --------------------------------------------------------------------------- auth_params


def _python_auth(value: str) -> tuple[str, dict[str, str]] | str:
    """digest._parse_auth_header without the accelerator: its result, or its error."""
    saved = digest._fast_auth
    digest._fast_auth = None
    try:
        return digest._parse_auth_header(value, "credentials")
    except SipParseError as exc:
        return f"error: {exc.reason}"
    finally:
        digest._fast_auth = saved


def _assert_auth_agrees(value: str) -> bool:
    """The C result equals the Python one wherever C gives one; True when it did."""
    from sipcore import _fastparse

    fast = _fastparse.auth_params(value)
    if fast is not None:
        assert fast == _python_auth(value), value
        assert list(fast[1]) == list(_python_auth(value)[1])  # the order too
    return fast is not None


SIPP_AUTH = (
    'Digest username="u1",realm="localhost",uri="sip:127.0.0.1:5060",'
    'nonce="AAAAAGj3c2EAAAAA1234",response="0123456789abcdef0123456789abcdef",'
    'algorithm=MD5,cnonce="6b8b4567",qop=auth,nc=00000001'
)
PJSIP_AUTH = (
    'Digest username="1001", realm="localhost", nonce="abc/def+ghi=", '
    'uri="sip:localhost", response="d41d8cd98f00b204e9800998ecf8427e", algorithm=MD5, '
    'cnonce="x-y.z", opaque="", qop=auth, nc=00000001'
)


@pytest.mark.parametrize(
    "value",
    [
        SIPP_AUTH,
        PJSIP_AUTH,
        "Digest",
        "  digest   realm = x ,, , nonce=\"a,b=c\" ,",
        'Digest realm="", nonce=1',
        'NTLM realm="x"',
    ],
)
def test_common_authorization_values_take_the_fast_path(value: str) -> None:
    assert _assert_auth_agrees(value)


@pytest.mark.parametrize(
    "value",
    [
        'Digest realm="a\\"b"',  # a quoted-pair
        'Digest realm="x",\trealm2=y',  # HTAB
        'Digest realm="caf\u00e9"',  # non-ASCII
        'Digest realm="x", REALM="y"',  # repeated (an error)
        'Digest realm="x" nonce="y"',  # no comma (an error)
        'Digest realm="x',  # unterminated (an error)
        "Digest realm=",  # no value (an error)
        "Digest realm=a\"b",  # an error
        '"Digest" realm=x',  # no scheme (an error)
        "Digest\x00 realm=x",  # a control character (an error)
        "Digest " + "n" * 64 + "=1",  # a long name
        "",
    ],
)
def test_odd_authorization_values_are_left_to_python(value: str) -> None:
    assert not _assert_auth_agrees(value)


_AUTH_SPICE = [
    " ", ",", "=", '"', "\\", "\t", "Digest ", "realm", "nonce=", "x", "\u00e9", "\x7f",
    ', qop=auth', 'uri="sip:a@b;c=d"', ",,", "N",
]


@st.composite
def auth_values(draw: st.DrawFn) -> str:
    value = draw(st.sampled_from([SIPP_AUTH, PJSIP_AUTH, 'Digest realm="r"']))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(value)))
        if draw(st.booleans()):
            value = value[:pos] + draw(st.sampled_from(_AUTH_SPICE)) + value[pos:]
        else:
            value = value[:pos] + value[pos + draw(st.integers(1, 8)):]
    return value


@PROPS
@given(st.one_of(auth_values(), st.text(alphabet=' ,="\\\tazAZ09-~\x00\u00e9', max_size=40)))
def test_authorization_values_agree(value: str) -> None:
    _assert_auth_agrees(value)


@pytest.mark.parametrize("limit", ["MAX_MESSAGE_SIZE", "MAX_LINE_LENGTH", "MAX_HEADERS"])
@pytest.mark.parametrize("value", [1 << 70, -(1 << 70), -1])
def test_absurd_limits_are_left_to_python(
    limit: str, value: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(message_module, limit, value)
    assert _scan(INVITE) is None
    _assert_same(INVITE)


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
