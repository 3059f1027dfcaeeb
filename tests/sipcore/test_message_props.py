"""Property tests (hypothesis) for the message layer.

1. Robustness: arbitrary bytes, and valid messages mutated at random, never make
   ``parse_message``, the lazy accessors, ``request_checks`` or the stream framer raise
   anything but SipParseError -- and never one wrapping an internal error.
2. Linear time: pathological inputs (runs of quotes, commas, "<", folds, backslashes,
   parameters, escapes, headers) cost time proportional to their size.
3. Round trips: generated valid messages parse back to the generated fields,
   ``parse(raw).raw == raw``, and ``Request.forward`` changes exactly the Via list,
   Max-Forwards and Record-Route, leaving every other header line byte-identical.
4. The regex fast paths for Via / name-addr / CSeq agree with the general parsers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sipcore.message as message_module
from sipcore.checks import request_checks
from sipcore.errors import SipParseError
from sipcore.framing import StreamFramer
from sipcore.headers import (
    _parse_name_addr,
    _parse_via,
    parse_cseq,
    parse_name_addr,
    parse_via,
)
from sipcore.message import Request, Response, SipMessage, parse_message

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TORTURE = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "rfc4475"
SEEDS: list[bytes] = (
    [path.read_bytes() for path in sorted(TORTURE.glob("*.dat"))] if TORTURE.is_dir() else []
)
SEEDS.append(
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP h.example.com:5060;branch=z9hG4bK1;rport, SIP/2.0/TCP g;branch=z9hG4bK2\r\n"
    b"Max-Forwards: 70\r\n"
    b"Route: <sip:p1;lr>,\r\n <sip:p2;lr>\r\n"
    b'To: "Bob, B" <sip:bob@example.com>\r\n'
    b"f: Alice <sip:alice@example.com>;tag=1\r\n"
    b"i: abc@h\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:a@h>;expires=60, *\r\n"
    b"Expires: 60\r\n"
    b"Proxy-Require: foo\r\n"
    b"l: 3\r\n"
    b"\r\n"
    b"abc"
)


def exercise(data: bytes, stream: bool = False) -> SipMessage | None:
    """Parse and touch everything lazy; return the message or None if rejected."""
    try:
        msg = parse_message(data, stream=stream)
    except SipParseError as exc:
        assert exc.__cause__ is None, f"internal error wrapped: {exc.__cause__!r}"
        assert 100 <= exc.status <= 699
        return None
    for access in (
        lambda: msg.vias,
        lambda: msg.routes,
        lambda: msg.record_routes,
        lambda: msg.contacts,
        lambda: msg.expires,
        lambda: msg.header_items(),
        lambda: msg.header_values("accept"),
        lambda: msg.header("content-type"),
        lambda: [c.parsed_uri for c in msg.contacts],
        lambda: msg.to_addr.parsed_uri,
        lambda: msg.request_uri if isinstance(msg, Request) else None,
        lambda: request_checks(msg) if isinstance(msg, Request) else None,
    ):
        try:
            access()
        except SipParseError as exc:
            assert exc.__cause__ is None, f"internal error wrapped: {exc.__cause__!r}"
    assert msg.to_bytes() == msg.raw
    # Forwarding a message that parsed gives one that parses (its lazily checked headers
    # may still be bad, which is SipParseError too).
    try:
        if isinstance(msg, Request) and msg.max_forwards != 0:
            parse_message(msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKp"))
        elif isinstance(msg, Response) and len(msg.vias) > 1:
            parse_message(msg.forward())
    except SipParseError as exc:
        assert exc.__cause__ is None, f"internal error wrapped: {exc.__cause__!r}"
    return msg


# --------------------------------------------------------------------------- 1. robustness


@PROPS
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    exercise(data)
    exercise(data, stream=True)
    framer = StreamFramer()
    try:
        for framed in framer.feed(data):
            exercise(framed, stream=True)
    except SipParseError as exc:
        assert exc.__cause__ is None


_SPICE = [
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
    b"%",
    b"%0",
    b"=",
    b" ",
    b"\t",
    b"\x00",
    b"\xff",
    b"SIP/2.0",
    b"sip:",
    b"tel:",
    b"0",
    b"99999999999",
    b"-1",
    b"z9hG4bK",
    b";tag=",
    b"Via: ",
    b"l: ",
    b"*",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0:
            data[pos:pos] = draw(st.sampled_from(_SPICE))
        elif op == 1:
            data[pos : pos + draw(st.integers(1, 20))] = b""
        elif op == 2 and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        else:
            data[pos:pos] = draw(st.binary(max_size=8))
    return bytes(data)


@PROPS
@given(mutated())
def test_mutated_valid_messages(data: bytes) -> None:
    exercise(data)
    exercise(data, stream=True)
    framer = StreamFramer()
    out: list[bytes] = []
    try:
        for i in range(0, len(data), 37):
            out += framer.feed(data[i : i + 37])
    except SipParseError as exc:
        assert exc.__cause__ is None
    for framed in out:
        exercise(framed, stream=True)


# --------------------------------------------------------------------------- 2. linear time


def _base(extra: bytes) -> bytes:
    return (
        b"OPTIONS sip:u@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"To: <sip:u@example.com>\r\n"
        b"From: <sip:a@example.com>;tag=1\r\n"
        b"Call-ID: c\r\n"
        b"CSeq: 1 OPTIONS\r\n" + extra + b"\r\n"
    )


PATHOLOGICAL: dict[str, Callable[[int], bytes]] = {
    "quotes in To": lambda n: _base(b"").replace(b"To: <", b"To: " + b'"' * n + b" <"),
    "escaped quotes": lambda n: _base(b"").replace(b"To: <", b'To: "' + b'\\"' * n + b'" <'),
    "backslashes": lambda n: _base(b"Contact: " + b'"' + b"\\" * n + b"\r\n"),
    "commas in Route": lambda n: _base(b"Route: " + b"," * n + b"<sip:x>\r\n"),
    "quoted commas": lambda n: _base(b"Contact: " + b'"a,",' * n + b"<sip:x>\r\n"),
    "nested <": lambda n: _base(b"Contact: " + b"<" * n + b"sip:x" + b">" * n + b"\r\n"),
    "open <": lambda n: _base(b"Record-Route: " + b"<sip:x>,<" * n + b"\r\n"),
    "folds": lambda n: _base(b"Subject: a" + b"\r\n b" * n + b"\r\n"),
    "fold in Via": lambda n: _base(b"").replace(b"SIP/2.0/UDP", b"SIP/2.0/UDP" + b"\r\n " * n),
    "spaces": lambda n: _base(b"").replace(b"Call-ID: c", b"Call-ID:" + b" " * n + b"c"),
    "tabs in display": lambda n: _base(b"").replace(b"To: <", b"To: a" + b"\t" * n + b"b <"),
    "via params": lambda n: _base(b"").replace(b"z9hG4bK1", b"z9hG4bK1" + b";a=1" * n),
    "semicolons": lambda n: _base(b"").replace(b"tag=1", b"tag=1" + b";" * n),
    "uri escapes": lambda n: _base(b"Contact: <sip:" + b"%41" * n + b"@h>\r\n"),
    "uri params": lambda n: _base(b"Contact: <sip:u@h" + b";p" * n + b">\r\n"),
    "many headers": lambda n: _base(b"X-A: 1\r\n" * (n // 8)),
    "many vias": lambda n: _base(b"Via: SIP/2.0/UDP h;branch=z9hG4bK2\r\n" * (n // 36)),
    "long token": lambda n: _base(b"").replace(b"Call-ID: c", b"Call-ID: " + b"c" * n),
    "no colon": lambda n: _base(b"X" * n + b"\r\n"),
    "bare CRs": lambda n: _base(b"X: " + b"\ra" * n + b"\r\n"),
    "crlf run": lambda n: b"\r\n" * n + _base(b""),
    "angle in addr-spec": lambda n: _base(b"Contact: sip:x@h;p=" + b"<" * n + b"\r\n"),
}


def _run_once(data: bytes) -> float:
    start = time.perf_counter()
    exercise(data)
    framer = StreamFramer(max_message_size=1 << 22)
    with contextlib.suppress(SipParseError):
        framer.feed(data + b"l: 0\r\n")
    return time.perf_counter() - start


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_linear_time(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lift the caps so the parser really has to walk the whole input.
    monkeypatch.setattr(message_module, "MAX_MESSAGE_SIZE", 1 << 22)
    monkeypatch.setattr(message_module, "MAX_LINE_LENGTH", 1 << 22)
    monkeypatch.setattr(message_module, "MAX_HEADERS", 1 << 20)
    make = PATHOLOGICAL[name]
    small, large = make(2_000), make(16_000)
    # Interleaved, best of 5: the machine is shared and its speed drifts.
    t_small = t_large = float("inf")
    for _ in range(5):
        t_small = min(t_small, _run_once(small))
        t_large = min(t_large, _run_once(large))
    # 8x the input: linear costs ~8x; quadratic would cost ~64x.
    assert t_large / max(t_small, 20e-6) < 24, (name, t_small, t_large)


# --------------------------------------------------------------------------- 3. round trips

TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
tokens = st.text(TOKEN, min_size=1, max_size=12)
labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
hostnames = st.lists(labels, min_size=1, max_size=3).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.sampled_from(["[2001:db8::1]", "[::1]", "[fe80::a:b:c]"])
hosts = st.one_of(hostnames, ipv4, ipv6)
ports = st.none() | st.integers(1, 65535)
users = st.text(TOKEN.replace("%", "") + "&=+$,;?/", min_size=1, max_size=10)
methods = st.sampled_from(["INVITE", "OPTIONS", "MESSAGE", "REGISTER", "SUBSCRIBE", "X-FOO"])
lws = st.sampled_from(["", " ", "  ", "\t", "\r\n ", " \r\n\t"])
ws1 = st.sampled_from([" ", "  ", "\t", "\r\n ", " \r\n\t"])
display_text = st.text(
    st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\r\n"), max_size=12
)


def hostport(host: str, port: int | None) -> str:
    return host if port is None else f"{host}:{port}"


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def via_values(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    transport = draw(st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS"]))
    host, port = draw(hosts), draw(ports)
    params = {"branch": "z9hG4bK" + draw(tokens)}
    if draw(st.booleans()):
        params["rport"] = None  # type: ignore[assignment]
    typed = {"branch", "rport", "ttl", "received", "maddr"}
    generic = tokens.map(str.lower).filter(lambda k: k not in typed)
    params.update(draw(st.dictionaries(generic, tokens, max_size=2)))
    sep = draw(st.sampled_from([";", " ;", "; ", " ; "]))
    text = f"SIP/2.0/{transport} {hostport(host, port)}" + "".join(
        f"{sep}{k}" if v is None else f"{sep}{k}={v}" for k, v in params.items()
    )
    return text, {"transport": transport, "host": host, "port": port, "params": params}


@st.composite
def addresses(draw: st.DrawFn, tag: bool) -> tuple[str, dict[str, object]]:
    user, host = draw(users), draw(hostnames)
    uri = f"sip:{user}@{host}"
    params: dict[str, str | None] = {}
    if tag:
        params["tag"] = draw(tokens)
    form = draw(st.sampled_from(["quoted", "tokens", "bare-angle", "addr-spec"]))
    if form == "addr-spec" and any(c in user for c in ",;?"):
        form = "bare-angle"
    display: str | None
    if form == "quoted":
        display = draw(display_text)
        text = quote(display) + draw(lws) + f"<{uri}>"
    elif form == "tokens":
        words = draw(st.lists(tokens, min_size=1, max_size=3))
        display = " ".join(words)
        text = " ".join(words) + draw(lws) + f"<{uri}>"
    elif form == "bare-angle":
        display = None
        text = f"<{uri}>"
    else:
        display = None
        text = uri
    text += "".join(f"{draw(lws)};{draw(lws)}{k}={v}" for k, v in params.items())
    return text, {"display": display, "uri": uri, "params": params}


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, object]]:
    """A valid request with random header spelling, order, compact forms and LWS folds."""
    method = draw(methods)
    ruri = f"sip:{draw(users)}@{hostport(draw(hosts), draw(ports))}"
    vias = draw(st.lists(via_values(), min_size=1, max_size=3))
    to_text, to = draw(addresses(tag=draw(st.booleans())))
    from_text, frm = draw(addresses(tag=True))
    call_id = draw(tokens) + draw(st.sampled_from(["", "@example.com"]))
    cseq = draw(st.integers(0, 2**32 - 1))
    mf = draw(st.none() | st.integers(1, 255))
    body = draw(st.binary(max_size=40))

    def name(*spellings: str) -> str:
        return draw(st.sampled_from(spellings))

    others = [
        (name("To", "t", "TO "), to_text),
        (name("From", "f", "fRoM"), from_text),
        (name("Call-ID", "i", "call-id"), call_id),
        (name("CSeq", "cseq", "CSEQ  "), f"{cseq}{draw(ws1)}{method}"),
        *draw(st.lists(st.tuples(tokens.map(lambda t: "X-" + t), tokens), max_size=3)),
    ]
    if mf is not None:
        others.append((name("Max-Forwards", "max-forwards"), str(mf)))
    if draw(st.booleans()):
        others.append(("Record-Route", "<sip:rr.example.com;lr>"))
    others = draw(st.permutations(others))
    if draw(st.booleans()):
        via_fields = [(name("Via", "v", "VIA", "via "), ", ".join(v for v, _ in vias))]
    else:
        via_fields = [(name("Via", "v", "VIA", "via "), v) for v, _ in vias]
    at = draw(st.integers(0, len(others)))
    fields = others[:at] + via_fields + others[at:]
    head = f"{method} {ruri} SIP/2.0\r\n" + "".join(f"{n}:{draw(lws)}{v}\r\n" for n, v in fields)
    head += f"{name('Content-Length', 'l')}: {len(body)}\r\n\r\n"
    expected = {
        "method": method,
        "uri": ruri,
        "vias": [fields for _, fields in vias],
        "to": to,
        "from": frm,
        "call_id": call_id,
        "cseq": (cseq, method),
        "max_forwards": mf,
        "body": body,
    }
    return head.encode() + body, expected


def header_fields(raw: bytes) -> list[bytes]:
    """Header fields as raw bytes (continuation lines kept with their field)."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    fields: list[bytes] = []
    for line in head:
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


@PROPS
@given(requests())
def test_generated_requests_round_trip(case: tuple[bytes, dict[str, object]]) -> None:
    data, expected = case
    msg = parse_message(data, stream=True)
    assert isinstance(msg, Request)
    assert msg.raw == data and parse_message(msg.raw).raw == data
    assert msg.method == expected["method"] and msg.uri == expected["uri"]
    assert msg.call_id == expected["call_id"]
    assert tuple(msg.cseq) == expected["cseq"]
    assert msg.max_forwards == expected["max_forwards"]
    assert msg.body == expected["body"]
    got_vias = [
        {"transport": v.transport, "host": v.host, "port": v.port, "params": v.params}
        for v in msg.vias
    ]
    assert got_vias == expected["vias"]
    for addr, want in ((msg.to_addr, expected["to"]), (msg.from_addr, expected["from"])):
        assert {"display": addr.display, "uri": addr.uri, "params": addr.params} == want
    # Forward: exactly Via, Max-Forwards and Record-Route change.
    new_via = "SIP/2.0/UDP proxy.invalid;branch=z9hG4bKfwd"
    new_rr = "<sip:proxy.invalid;lr>"
    out = msg.forward(via=new_via, record_route=new_rr)
    fwd = parse_message(out, stream=True)
    assert str(fwd.vias[0]) == new_via
    assert [v.params for v in fwd.vias[1:]] == [v.params for v in msg.vias]
    assert fwd.max_forwards == (70 if msg.max_forwards is None else msg.max_forwards - 1)
    assert fwd.record_routes[0].uri == "sip:proxy.invalid;lr"
    assert fwd.body == msg.body
    before = header_fields(data)
    after = header_fields(out)
    via_line = b"Via: " + new_via.encode()
    new_lines = {via_line, b"Record-Route: " + new_rr.encode()}

    def is_mf(field: bytes) -> bool:
        return field.lower().startswith(b"max-forwards")

    assert [f for f in after if f not in new_lines and not is_mf(f)] == [
        f for f in before if not is_mf(f)
    ]
    # The new Via sits right above the first old one (with Max-Forwards after it when that
    # had to be added).
    first_via = next(f for f in before if f.split(b":")[0].strip().lower() in (b"via", b"v"))
    following = [f for f in after[after.index(via_line) + 1 :] if not is_mf(f)]
    assert following[0] == first_via


# --------------------------------------------------------------------------- 4. fast paths


def outcome(func: Callable[[str], object], text: str) -> object:
    try:
        return ("ok", func(text))
    except SipParseError as exc:
        assert exc.__cause__ is None
        return ("error", exc.status)


_VIA_ALPHABET = 'SIP/2.0UDPTCPabc.:;=[]z9hG4bK," \t-_1x'
_NA_ALPHABET = 'abc<>"@:;=,?sip \t.\\%tag1'


@PROPS
@given(st.one_of(via_values().map(lambda v: v[0]), st.text(_VIA_ALPHABET, max_size=40)))
def test_via_fast_path_agrees(text: str) -> None:
    assume("\r" not in text)
    assert outcome(parse_via, text) == outcome(_parse_via, text)


@PROPS
@given(
    st.one_of(
        addresses(tag=True).map(lambda a: a[0].replace("\r\n", "")),
        st.text(_NA_ALPHABET, max_size=40),
    )
)
def test_name_addr_fast_path_agrees(text: str) -> None:
    def slow(value: str) -> object:
        return _parse_name_addr(value.strip(" \t"))

    fast = outcome(parse_name_addr, text)
    general = outcome(slow, text)
    if fast[0] == "ok" and general[0] == "ok":
        a, b = fast[1], general[1]
        assert (a.display, a.uri, a.params) == (b.display, b.uri, b.params)  # type: ignore[attr-defined]
    else:
        assert fast == general


@PROPS
@given(st.text("0123456789 \tINVITE%x", max_size=16))
def test_cseq_fast_path_agrees(text: str) -> None:
    from sipcore.headers import _CSEQ_FAST

    if _CSEQ_FAST.fullmatch(text) is None:
        return
    number, method = text.split(" ")
    if int(number) > 2**32 - 1:
        assert outcome(parse_cseq, text) == ("error", 400)
    else:
        assert parse_cseq(text) == (int(number), method)
