"""Unit tests for the message layer: parsing, lazy header access, Via / name-addr / CSeq,
compact forms, folding, list splitting, limits, forwarding splices and builders."""

from __future__ import annotations

import pytest

import sipcore.message as message_module
from sipcore.errors import SipParseError
from sipcore.headers import (
    NameAddr,
    Via,
    canonical_name,
    parse_cseq,
    parse_name_addr,
    parse_name_addrs,
    parse_params,
    parse_via,
    quote_string,
    split_values,
    unfold,
    unquote,
)
from sipcore.message import (
    Request,
    Response,
    build_request,
    build_response,
    parse_message,
    stateless_error_reply,
)
from sipcore.transport_types import Peer

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)

OK = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1, "
    b"SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;received=192.0.2.1\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def req(data: bytes = INVITE, **kwargs: bool) -> Request:
    msg = parse_message(data, **kwargs)
    assert isinstance(msg, Request)
    return msg


def resp(data: bytes = OK) -> Response:
    msg = parse_message(data)
    assert isinstance(msg, Response)
    return msg


def minimal(extra: bytes = b"", method: bytes = b"OPTIONS", start: bytes | None = None) -> bytes:
    first = start if start is not None else method + b" sip:u@example.com SIP/2.0"
    return (
        first + b"\r\n"
        b"Via: SIP/2.0/UDP h.example.com;branch=z9hG4bK1\r\n"
        b"To: <sip:u@example.com>\r\n"
        b"From: <sip:a@example.com>;tag=1\r\n"
        b"Call-ID: c1\r\n"
        b"CSeq: 1 " + method + b"\r\n" + extra + b"\r\n"
    )


def rejected(data: bytes, status: int = 400, **kwargs: bool) -> SipParseError:
    with pytest.raises(SipParseError) as info:
        parse_message(data, **kwargs)
    assert info.value.status == status, info.value.reason
    assert info.value.__cause__ is None
    return info.value


# --------------------------------------------------------------------------- parsing


def test_request_fields() -> None:
    msg = req()
    assert msg.method == "INVITE"
    assert msg.uri == "sip:bob@biloxi.example.com"
    assert msg.request_uri.host == "biloxi.example.com"  # type: ignore[union-attr]
    assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert msg.cseq == (314159, "INVITE")
    assert msg.max_forwards == 70
    assert msg.from_addr.tag == "1928301774"
    assert msg.from_addr.display == "Alice"
    assert msg.to_addr.tag is None
    assert msg.to_addr.display == "Bob"
    assert msg.top_via.branch == "z9hG4bK776asdhds"
    assert msg.top_via.has_rport and msg.top_via.rport is None
    assert [r.uri for r in msg.routes] == ["sip:p1.example.com;lr", "sip:p2.example.com;lr"]
    assert msg.record_routes == []
    assert [c.uri for c in msg.contacts] == ["sip:alice@pc33.atlanta.example.com"]
    assert msg.content_type == "application/sdp"
    assert msg.expires is None
    assert msg.body == b"v=0\n" and msg.content_length == 4
    assert msg.raw == INVITE and msg.to_bytes() == INVITE and bytes(msg) == INVITE
    assert "INVITE" in repr(msg)


def test_response_fields() -> None:
    msg = resp()
    assert (msg.status, msg.reason) == (200, "OK")
    assert msg.to_addr.tag == "a6c85cf"
    assert [v.host for v in msg.vias] == ["proxy.example.com", "pc33.atlanta.example.com"]
    assert msg.vias[0] is msg.top_via
    assert msg.vias[1].received == "192.0.2.1"
    assert msg.max_forwards is None
    assert "200" in repr(msg)


def test_header_access_is_case_insensitive_and_understands_compact_forms() -> None:
    data = (
        b"OPTIONS sip:u@example.com SIP/2.0\r\n"
        b"v: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"t: <sip:u@example.com>\r\n"
        b"f: <sip:a@example.com>;tag=1\r\n"
        b"i: c1\r\n"
        b"CSEQ: 1 OPTIONS\r\n"
        b"m: <sip:a@h>\r\n"
        b"c: text/plain\r\n"
        b"k: path, gruu\r\n"
        b"s: hello, world\r\n"
        b"o: presence\r\n"
        b"u: dialog\r\n"
        b"r: <sip:x@y>\r\n"
        b"b: <sip:z@y>\r\n"
        b"x: 1800\r\n"
        b"y: abc\r\n"
        b"e: gzip\r\n"
        b"l: 0\r\n"
        b"\r\n"
    )
    msg = req(data)
    assert msg.call_id == "c1"
    assert msg.header("Call-ID") == msg.header("i") == msg.header("CALL-ID") == "c1"
    assert msg.header("Supported") == "path"  # list header: first element
    assert msg.header_values("supported") == ["path", "gruu"]
    assert msg.header("Subject") == "hello, world"  # free text: never split
    for long, value in [
        ("Event", "presence"),
        ("Allow-Events", "dialog"),
        ("Refer-To", "<sip:x@y>"),
        ("Referred-By", "<sip:z@y>"),
        ("Session-Expires", "1800"),
        ("Identity", "abc"),
        ("Content-Encoding", "gzip"),
        ("Content-Type", "text/plain"),
        ("Content-Length", "0"),
        ("Contact", "<sip:a@h>"),
    ]:
        assert msg.header(long) == value, long
    assert msg.has_header("TO") and not msg.has_header("Route")
    assert msg.header("Route") is None and msg.header_values("Route") == []
    assert msg.header("not a token!") is None


def test_canonical_names() -> None:
    assert canonical_name("v") == canonical_name("VIA") == canonical_name("Via ") == "via"
    assert canonical_name("X-Custom-Thing") == "x-custom-thing"
    with pytest.raises(SipParseError):
        canonical_name("Bad Name")


def test_folding_and_whitespace() -> None:
    data = (
        b"OPTIONS sip:u@example.com SIP/2.0\r\n"
        b"Via  : SIP  /   2.0\r\n /UDP\r\n    h.example.com;branch=z9hG4bK1\r\n"
        b"TO :\r\n sip:u@example.com ;   tag    = 77\r\n"
        b"From: <sip:a@example.com>;tag=1\r\n"
        b"Call-ID: c1\r\n"
        b"cseq: 0009\r\n  OPTIONS\r\n"
        b"Subject: first part\r\n\t second   part  \r\n"
        b"MaX-fOrWaRdS: 0068\r\n"
        b"\r\n"
    )
    msg = req(data)
    assert msg.top_via.host == "h.example.com" and msg.top_via.transport == "UDP"
    assert msg.to_addr.tag == "77"
    assert msg.cseq == (9, "OPTIONS")
    assert msg.max_forwards == 68
    assert msg.header("subject") == "first part second   part"
    assert msg.raw == data
    assert unfold("  a \r\n   b\r\n\tc  ") == "a b c"


def test_folds_inside_quoted_display_names_read_as_one_space() -> None:
    # The fast paths match values as written; a fold inside a quoted string is still LWS.
    data = (
        b"INVITE sip:b@h SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"To: <sip:b@h>\r\n"
        b'From: "a\r\n b" <sip:a@h>;tag=1;x="p\r\n q"\r\n'
        b"Call-ID: c1\r\n"
        b"CSeq: 1 INVITE\r\n"
        b'Contact: "c\r\n\td" <sip:c@h>\r\n'
        b'Route: "r\r\n r" <sip:r@h;lr>\r\n'
        b"\r\n"
    )
    msg = req(data)
    assert msg.from_addr.display == "a b" and msg.from_addr.params["x"] == '"p q"'
    assert msg.contacts[0].display == "c d"
    assert msg.routes[0].display == "r r"


def test_list_headers_split_outside_quotes_and_angle_brackets() -> None:
    data = minimal(
        b'Contact: "Doe, John" <sip:j@h;a=1,2>;q=0.5, <sip:k@h>\r\n'
        b"Contact: sip:l@h;expires=60\r\n"
        b"Accept: application/sdp,\r\n  text/plain , ,\r\n"
        b'WWW-Authenticate: Digest realm="a, b", nonce="x"\r\n'
        b'Authorization: Digest username="u", realm="r"\r\n'
        b"Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n"
        b"X-Unknown: a, b\r\n"
        b"X-Unknown: c\r\n"
    )
    msg = req(data)
    assert [(c.display, c.uri, c.params) for c in msg.contacts] == [
        ("Doe, John", "sip:j@h;a=1,2", {"q": "0.5"}),
        (None, "sip:k@h", {}),
        (None, "sip:l@h", {"expires": "60"}),
    ]
    assert msg.contacts[2].expires == 60
    assert msg.header_values("accept") == ["application/sdp", "text/plain"]
    assert msg.header_values("www-authenticate") == ['Digest realm="a, b", nonce="x"']
    assert msg.header("authorization") == 'Digest username="u", realm="r"'
    assert msg.header_values("date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]
    assert msg.header_values("x-unknown") == ["a, b", "c"]
    assert msg.header_values("x-unknown", split=True) == ["a", "b", "c"]
    assert msg.header_values("accept", split=False) == ["application/sdp, text/plain , ,"]
    assert split_values('a, "b,c", <d,e>, f') == ["a", '"b,c"', "<d,e>", "f"]
    assert split_values("a,,b", keep_empty=True) == ["a", "", "b"]


def test_header_items_in_order() -> None:
    items = req().header_items()
    assert items[0] == ("via", "SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport")
    assert [name for name, _ in items][-2:] == ["content-type", "content-length"]


def test_contact_star() -> None:
    msg = req(minimal(b"Contact: *\r\nExpires: 0\r\n", method=b"REGISTER"))
    assert len(msg.contacts) == 1 and msg.contacts[0].is_star and str(msg.contacts[0]) == "*"
    assert msg.expires == 0
    bad = req(minimal(b"Contact: *\r\nContact: <sip:a@b>\r\n", method=b"REGISTER"))
    with pytest.raises(SipParseError):
        _ = bad.contacts


def test_expires_bounds() -> None:
    assert req(minimal(b"Expires: 4294967295\r\n")).expires == 2**32 - 1
    for value in (b"4294967296", b"-1", b"abc", b"99999999999"):
        with pytest.raises(SipParseError):
            _ = req(minimal(b"Expires: " + value + b"\r\n")).expires


def test_non_ascii_headers_decode_as_utf8_and_keep_bytes() -> None:
    data = minimal(
        "Subject: Grüße\r\nX-Bin: \xff\xfe\r\n".encode("latin-1").replace(
            "Grüße".encode("latin-1"), "Grüße".encode()
        )
    )
    msg = req(data)
    assert msg.header("subject") == "Grüße"
    assert msg.header("x-bin") == "\udcff\udcfe"  # not UTF-8: surrogate escapes, no error
    out = msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKx")
    assert "Subject: Grüße\r\n".encode() in out and b"X-Bin: \xff\xfe\r\n" in out


# --------------------------------------------------------------------------- start line


@pytest.mark.parametrize(
    ("start", "status"),
    [
        (b"OPTIONS sip:u@example.com SIP/2.1", 505),
        (b"OPTIONS sip:u@example.com SIP/7.0", 505),
        (b"OPTIONS sip:u@example.com sip/2.0", None),  # case-insensitive version: accepted
        (b"OPTIONS sip:u@example.com HTTP/1.1", 400),
        (b"OPTIONS sip:u@example.com", 400),
        (b"OPTIONS  sip:u@example.com SIP/2.0", 400),
        (b"OPTIONS sip:u@example.com SIP/2.0 ", 400),
        (b"OPTIONS sip:u@example.com; lr SIP/2.0", 400),
        (b"OPTIONS <sip:u@example.com> SIP/2.0", 400),
        (b"OPTIONS sip:u@example.com?Route=x SIP/2.0", 400),
        (b"OPTIONS http://example.com SIP/2.0", 416),
        (b"OPTIONS urn:service:sos SIP/2.0", 416),
        (b"OPTIONS 1x:foo SIP/2.0", 400),
        (b"OPTIONS nocolon SIP/2.0", 400),
        (b"OPT{IONS sip:u@example.com SIP/2.0", 400),
        (b"OPTIONS tel:+12015550123 SIP/2.0", None),
    ],
)
def test_request_line(start: bytes, status: int | None) -> None:
    method = start.split(b" ")[0]
    data = minimal(method=method, start=start)
    if status is None:
        assert req(data).method == method.decode()
    else:
        rejected(data, status)


def test_request_uri_may_be_parsed_lazily_and_fail() -> None:
    msg = req(minimal(start=b"OPTIONS sip:u@bad_host!.example.com SIP/2.0"))
    with pytest.raises(SipParseError):
        _ = msg.request_uri


@pytest.mark.parametrize(
    ("start", "status"),
    [
        (b"SIP/2.0 180 Ringing", 180),
        (b"SIP/2.0 100 ", 100),
        (b"SIP/2.0 100", 100),
        (b"SIP/2.0 699 x", 699),
    ],
)
def test_status_line_ok(start: bytes, status: int) -> None:
    data = OK.replace(b"SIP/2.0 200 OK", start)
    assert resp(data).status == status


@pytest.mark.parametrize(
    ("start", "status"),
    [
        (b"SIP/2.0 4294967301 big", 400),
        (b"SIP/2.0 700 x", 400),
        (b"SIP/2.0 099 x", 400),
        (b"SIP/2.0 20 x", 400),
        (b"SIP/2.0 2OO OK", 400),
        (b"SIP/3.0 200 OK", 505),
        (b"SIP/x 200 OK", 400),
    ],
)
def test_status_line_bad(start: bytes, status: int) -> None:
    rejected(OK.replace(b"SIP/2.0 200 OK", start), status)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("drop", "missing"),
    [(b"Call-ID", "Call-ID"), (b"To", "To"), (b"From", "From"), (b"CSeq", "CSeq"), (b"Via", "Via")],
)
def test_missing_mandatory(drop: bytes, missing: str) -> None:
    lines = [line for line in minimal().split(b"\r\n") if not line.startswith(drop + b":")]
    error = rejected(b"\r\n".join(lines))
    assert error.reason == f"Missing {missing}"


@pytest.mark.parametrize(
    "extra",
    [
        b"To: <sip:x@y>\r\n",
        b"Call-ID: c2\r\n",
        b"CSeq: 2 OPTIONS\r\n",
        b"f: <sip:q@r>\r\n",
        b"Max-Forwards: 5\r\nMax-Forwards: 6\r\n",
        b"l: 0\r\nContent-Length: 0\r\n",
    ],
)
def test_single_valued_headers_may_not_repeat(extra: bytes) -> None:
    rejected(minimal(extra))


@pytest.mark.parametrize(
    "extra",
    [
        b"Max-Forwards: 256\r\n",
        b"Max-Forwards: -1\r\n",
        b"Max-Forwards: ten\r\n",
        b"Max-Forwards: \r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: 1 2\r\n",
        b"Content-Length: 99999999999\r\n",
        b"Content-Length: 5\r\n",  # more than there is
    ],
)
def test_bad_scalars(extra: bytes) -> None:
    rejected(minimal(extra))


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"CSeq", b"1"),
        (b"CSeq", b"x OPTIONS"),
        (b"CSeq", b"4294967296 OPTIONS"),
        (b"CSeq", b"1 OPTIONS extra"),
        (b"CSeq", b"2 INVITE"),  # method mismatch
        (b"Call-ID", b"a b"),
        (b"Call-ID", b""),
        (b"Call-ID", b"a@b@c"),
        (b"Via", b"SIP/2.0/UDP"),
        (b"Via", b"SIP/2.0/UDP h;;"),
        (b"Via", b"SIP/2.0/UDP h;branch"),
        (b"Via", b"SIP/2.0/UDP h;ttl=300"),
        (b"Via", b"SIP/2.0/UDP h;rport=x"),
        (b"Via", b"SIP/2.0/UDP h:99999"),
        (b"Via", b", SIP/2.0/UDP h"),
        (b"Via", b"SIP/2.0 UDP h"),
        (b"To", b'"unterminated <sip:u@example.com>'),
        (b"To", b"< sip:u@example.com >"),
        (b"To", b"Watson, Thomas <sip:u@example.com>"),
        (b"To", b"sip:u@example.com?x=y"),
        (b"To", b"<sip:u@example.com"),
        (b"To", b"<sip:u@example.com> junk"),
        (b"To", b"u@example.com"),
        (b"From", b"<sip:a@example.com>;tag"),
        (b"From", b"<sip:a@example.com>;tag="),
        (b"From", b"<sip:a@example.com>;;tag=1"),
    ],
)
def test_bad_mandatory_values(header: bytes, value: bytes) -> None:
    data = b"\r\n".join(
        header + b": " + value if line.split(b":")[0] == header else line
        for line in minimal().split(b"\r\n")
    )
    rejected(data)


def test_cseq_limit_and_method_case() -> None:
    data = minimal().replace(b"CSeq: 1 OPTIONS", b"CSeq: 4294967295 OPTIONS")
    assert req(data).cseq.number == 2**32 - 1
    rejected(minimal().replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 options"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"OPTIONS sip:u@example.com SIP/2.0\r\n",
        minimal().replace(b"Call-ID: c1\r\n", b"Call-ID c1\r\n"),
        minimal().replace(b"Call-ID: c1\r\n", b": c1\r\n"),
        minimal().replace(b"Call-ID: c1\r\n", b"Call ID: c1\r\n"),
        minimal().replace(b"Call-ID: c1\r\n", b"Call-ID: c1\nX-Injected: 1\r\n"),
        minimal().replace(b"Call-ID: c1\r\n", b"Call-ID: c1\rX: 1\r\n"),
        b" continuation first\r\n" + minimal(),
        minimal().replace(b"Via:", b" Via:", 1),
    ],
)
def test_malformed_framing(data: bytes) -> None:
    rejected(data)


def test_leading_crlf_skipped_and_extra_bytes_dropped_on_datagrams() -> None:
    msg = req(b"\r\n\r\n" + INVITE + b"garbage")
    assert msg.raw == INVITE and msg.body == b"v=0\n"


def test_without_content_length_the_datagram_rest_is_the_body() -> None:
    data = minimal() + b"hello"
    msg = req(data)
    assert msg.body == b"hello"
    assert msg.raw == data


def test_stream_mode_requires_exact_content_length() -> None:
    assert req(INVITE, stream=True).body == b"v=0\n"
    rejected(minimal(), stream=True)  # no Content-Length
    rejected(INVITE + b"x", stream=True)


def test_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_module, "MAX_MESSAGE_SIZE", 600)
    monkeypatch.setattr(message_module, "MAX_HEADERS", 12)
    monkeypatch.setattr(message_module, "MAX_LINE_LENGTH", 100)
    assert req(minimal()).call_id == "c1"
    rejected(minimal(b"X-Long: " + b"a" * 200 + b"\r\n"), 513)
    rejected(minimal(start=b"OPTIONS sip:" + b"u" * 200 + b"@example.com SIP/2.0"), 414)
    rejected(minimal(b"".join(b"X-%d: 1\r\n" % i for i in range(10))), 513)
    rejected(minimal(b"Content-Length: 500\r\n") + b"x" * 500, 413)
    rejected(minimal() + b"x" * 600, 513)
    # The cap is on the message: bytes after Content-Length in a datagram are dropped, not
    # counted.
    assert req(minimal(b"Content-Length: 0\r\n") + b"x" * 1000).body == b""


# --------------------------------------------------------------------------- header values


def test_parse_via_variants() -> None:
    via = parse_via(
        "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;received=192.0.2.9;rport=5070;"
        "maddr=224.2.0.1;ttl=16;x"
    )
    assert via.transport == "UDP" and via.sent_by == ("192.0.2.1", 5060)
    assert (via.branch, via.received, via.rport, via.maddr, via.ttl) == (
        "z9hG4bKabc",
        "192.0.2.9",
        5070,
        "224.2.0.1",
        16,
    )
    assert via.params["x"] is None
    assert via.rfc3261_branch
    assert str(via) == (
        "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKabc;received=192.0.2.9;"
        "rport=5070;maddr=224.2.0.1;ttl=16;x"
    )
    v6 = parse_via("SIP/2.0/TCP [2001:db8::1]:5061;received=2001:db8::2;branch=z9hG4bKq")
    assert v6.host == "[2001:db8::1]" and v6.port == 5061 and v6.received == "2001:db8::2"
    lws = parse_via("SIP / 2.0 / tls  host.example.com : 5061 ; BRANCH = z9hG4bKw")
    assert (lws.transport, lws.port, lws.branch) == ("TLS", 5061, "z9hG4bKw")
    quoted = parse_via('SIP/2.0/UDP h;x="a;b,c"')
    assert quoted.params == {"x": '"a;b,c"'}
    assert str(Via("UDP", "h", None, {"branch": "z9hG4bK1"})) == "SIP/2.0/UDP h;branch=z9hG4bK1"
    assert not parse_via("SIP/2.0/UDP h;branch=z9hG4bK").rfc3261_branch
    assert not parse_via("SIP/2.0/UDP h;branch=1234").rfc3261_branch


def test_name_addr_forms() -> None:
    plain = parse_name_addr("sip:alice@example.com;tag=88")
    assert (plain.display, plain.uri, plain.tag) == (None, "sip:alice@example.com", "88")
    quoted = parse_name_addr('"A \\"B\\" \\\\ C" <sip:a@b;lr>;tag=1;x="y z"')
    assert quoted.display == 'A "B" \\ C'
    assert quoted.uri == "sip:a@b;lr" and quoted.params == {"tag": "1", "x": '"y z"'}
    tokens = parse_name_addr("Mr.  J.\tUser<sip:j@b>")
    assert tokens.display == "Mr. J. User"
    utf8 = parse_name_addr('"Алиса" <sip:a@b>')
    assert utf8.display == "Алиса"
    unknown = parse_name_addr("<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>")
    assert unknown.uri.startswith("urn:")
    with pytest.raises(SipParseError) as info:
        _ = unknown.parsed_uri
    assert info.value.status == 416
    tel = parse_name_addr("<tel:+12015550123>;tag=9")
    assert str(tel.parsed_uri) == "tel:+12015550123"
    assert str(quoted) == '"A \\"B\\" \\\\ C" <sip:a@b;lr>;tag=1;x="y z"'
    assert str(NameAddr(None, "sip:x@y")) == "<sip:x@y>"
    assert NameAddr("Bob", "sip:b@h", {"tag": "1"}) == parse_name_addr("Bob <sip:b@h>;tag=1")
    assert parse_name_addrs("<sip:a@b>, <sip:c@d>") == [
        NameAddr(None, "sip:a@b"),
        NameAddr(None, "sip:c@d"),
    ]
    with pytest.raises(SipParseError):
        parse_name_addrs("<sip:a@b>,,<sip:c@d>")


def test_cseq_params_quoting() -> None:
    assert parse_cseq("  12\t INVITE ") == (12, "INVITE")
    assert str(parse_cseq("1 ACK")) == "1 ACK"
    assert parse_params("a=1; B = 2 ;c") == {"a": "1", "b": "2", "c": None}
    assert unquote('"a\\"b"') == 'a"b' and unquote("plain") == "plain"
    assert quote_string('a"b\\c') == '"a\\"b\\\\c"'
    with pytest.raises(SipParseError):
        parse_params("a=<b>")


# --------------------------------------------------------------------------- forwarding


def split_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def test_request_forward_splice() -> None:
    msg = req()
    new_via = "SIP/2.0/UDP proxy.example.org;branch=z9hG4bKnew"
    out = msg.forward(via=new_via, record_route="<sip:proxy.example.org;lr>", pop_route=True)
    lines = split_lines(out)
    assert lines[0] == b"INVITE sip:bob@biloxi.example.com SIP/2.0"
    assert lines[1] == b"Via: " + new_via.encode()
    assert lines[2] == split_lines(INVITE)[1]  # the old Via, untouched
    assert lines[3] == b"Record-Route: <sip:proxy.example.org;lr>"
    assert lines[4] == b"Max-Forwards: 69"
    assert lines[5] == b"Route: <sip:p2.example.com;lr>"
    assert lines[6:] == split_lines(INVITE)[4:]
    assert out.endswith(b"\r\n\r\nv=0\n")
    fwd = req(out, stream=True)
    assert [v.branch for v in fwd.vias] == ["z9hG4bKnew", "z9hG4bK776asdhds"]
    assert fwd.max_forwards == 69
    assert [r.uri for r in fwd.routes] == ["sip:p2.example.com;lr"]
    # The original is untouched and can be forwarded again differently.
    assert msg.raw == INVITE
    again = req(msg.forward(via=new_via, request_uri="sip:bob@192.0.2.4:5060", max_forwards=10))
    assert again.uri == "sip:bob@192.0.2.4:5060" and again.max_forwards == 10
    assert len(again.routes) == 2


def test_forward_inserts_max_forwards_and_content_length_when_absent() -> None:
    msg = req(minimal())
    out = msg.forward(
        via="SIP/2.0/TCP p;branch=z9hG4bKx", pop_route=True, record_route="<sip:p;lr>"
    )
    fwd = req(out, stream=True)
    assert fwd.max_forwards == 70
    assert fwd.header("content-length") == "0"
    assert [str(r) for r in fwd.record_routes] == ["<sip:p;lr>"]
    assert fwd.vias[1].host == "h.example.com"


def test_forward_puts_record_route_on_top_of_existing() -> None:
    msg = req(minimal(b"Record-Route: <sip:old;lr>\r\n"))
    fwd = req(msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKx", record_route="<sip:new;lr>"))
    assert [r.uri for r in fwd.record_routes] == ["sip:new;lr", "sip:old;lr"]


def test_forward_add_and_remove_headers() -> None:
    msg = req(minimal(b"Proxy-Authorization: Digest x\r\nX-Keep: 1\r\nl: 0\r\n"))
    out = msg.forward(
        via="SIP/2.0/UDP p;branch=z9hG4bKx",
        add_headers=[("X-Added", "yes"), ("P-Asserted-Identity", "<sip:a@example.com>")],
        remove_headers=["proxy-authorization", "X-Nothing"],
    )
    fwd = req(out)
    assert not fwd.has_header("Proxy-Authorization")
    assert fwd.header("x-added") == "yes" and fwd.header("x-keep") == "1"
    assert split_lines(out)[-2:] == [b"X-Added: yes", b"P-Asserted-Identity: <sip:a@example.com>"]
    with pytest.raises(ValueError):
        msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKx", add_headers=[("X", "a\r\nY: b")])
    with pytest.raises(ValueError):
        msg.forward(via="SIP/2.0/UDP p\r\nX: 1")


def test_forward_refuses_max_forwards_zero() -> None:
    msg = req(minimal(b"Max-Forwards: 0\r\n"))
    with pytest.raises(ValueError):
        msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKx")
    assert req(msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKx", max_forwards=5)).max_forwards == 5


def test_pop_route_from_a_folded_multi_value_line() -> None:
    msg = req(minimal(b"Route: <sip:a;lr>,\r\n <sip:b;lr>\r\n"))
    fwd = req(msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKx", pop_route=True))
    assert [r.uri for r in fwd.routes] == ["sip:b;lr"]


def test_response_forward_removes_only_the_top_via_value() -> None:
    out = resp().forward()
    fwd = resp(out)
    assert [v.host for v in fwd.vias] == ["pc33.atlanta.example.com"]
    assert split_lines(out)[1] == (
        b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;received=192.0.2.1"
    )
    assert split_lines(out)[2:] == split_lines(OK)[2:]
    two_lines = OK.replace(b"z9hG4bKp1, ", b"z9hG4bKp1\r\nVia: ")
    out = resp(two_lines).forward(add_headers=[("X-A", "1")], remove_headers=["x-none"])
    assert split_lines(out)[1:] == [*split_lines(two_lines)[2:], b"X-A: 1"]
    single = OK.replace(b"z9hG4bKp1, ", b"z9hG4bKp1\r\nX-Was-Via: ")
    with pytest.raises(ValueError):
        resp(single).forward()


@pytest.mark.parametrize(
    ("data", "one"),
    [
        (INVITE, True),
        (OK, False),  # two values in one field
        (OK.replace(b"z9hG4bKp1, ", b"z9hG4bKp1\r\nVia: "), False),  # two fields
        (OK.replace(b"z9hG4bKp1, ", b"z9hG4bKp1\r\nv: "), False),  # the compact form
        (OK.replace(b"z9hG4bKp1, ", b"z9hG4bKp1,\r\n "), False),  # folded onto a new line
    ],
)
def test_one_via_agrees_with_the_parsed_vias(data: bytes, one: bool) -> None:
    msg = parse_message(data)
    assert msg.one_via is one
    assert (len(msg.vias) == 1) is one
    assert msg.one_via is one  # the same once they are parsed


def test_stamp_received() -> None:
    msg = req()
    assert msg.stamp_received(Peer("UDP", "192.0.2.99", 5099))
    assert msg.top_via.received == "192.0.2.99" and msg.top_via.rport == 5099
    assert not msg.stamp_received(Peer("UDP", "192.0.2.99", 5099))  # already there
    assert msg.vias[0] is msg.top_via
    stamped = req(msg.to_bytes())
    assert stamped.top_via.params == {
        "branch": "z9hG4bK776asdhds",
        "rport": "5099",
        "received": "192.0.2.99",
    }
    fwd = req(msg.forward(via="SIP/2.0/UDP p;branch=z9hG4bKx"))
    assert fwd.vias[1].received == "192.0.2.99"
    reply = resp(build_response(msg, 200, to_tag="t"))
    assert reply.top_via.rport == 5099
    # sent-by equal to the source and no rport: nothing to add.
    same = req(minimal())
    assert not same.stamp_received(Peer("UDP", "h.example.com", 5060))
    assert same.to_bytes() == same.raw
    # Several values on the first Via line: only the top one changes.
    multi = req(
        OK.replace(b"SIP/2.0 200 OK", b"OPTIONS sip:x@y SIP/2.0").replace(b"INVITE", b"OPTIONS")
    )
    assert multi.stamp_received(Peer("TCP", "10.0.0.1", 1000))
    again = req(multi.to_bytes())
    assert again.vias[0].received == "10.0.0.1" and again.vias[1].received == "192.0.2.1"


# --------------------------------------------------------------------------- builders


def test_build_response_copies_the_right_headers() -> None:
    msg = req(INVITE.replace(b"CSeq:", b"Timestamp: 54\r\nCSeq:"))
    trying = build_response(msg, 100)
    assert split_lines(trying) == [
        b"SIP/2.0 100 Trying",
        *split_lines(INVITE)[1:2],
        split_lines(INVITE)[5],  # From
        split_lines(INVITE)[4],  # To, no tag on a 100
        split_lines(INVITE)[6],  # Call-ID
        b"CSeq: 314159 INVITE",
        b"Timestamp: 54",
        b"Content-Length: 0",
    ]
    ok = build_response(
        msg,
        200,
        to_tag="abc",
        headers=[("Contact", "<sip:b@h>"), ("Content-Length", "99")],
        body=b"body",
    )
    parsed = resp(ok)
    assert (parsed.status, parsed.reason) == (200, "OK")
    assert parsed.to_addr.tag == "abc"
    assert parsed.header("contact") == "<sip:b@h>"
    assert parsed.body == b"body" and parsed.header("content-length") == "4"
    assert not parsed.has_header("timestamp")
    # An existing To tag is kept; unknown codes get a generic phrase.
    tagged = req(minimal().replace(b"To: <sip:u@example.com>", b"To: <sip:u@example.com>;tag=x"))
    assert resp(build_response(tagged, 486, to_tag="y")).to_addr.tag == "x"
    assert resp(build_response(tagged, 499)).reason == "Unknown"
    assert resp(build_response(tagged, 480, "Gone Fishing")).reason == "Gone Fishing"
    with pytest.raises(ValueError):
        build_response(tagged, 99)
    with pytest.raises(ValueError):
        build_response(tagged, 400, "bad\r\nX: y")


def test_build_request() -> None:
    data = build_request(
        "MESSAGE",
        "sip:bob@example.com",
        [
            ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
            ("To", "<sip:bob@example.com>"),
            ("From", "<sip:alice@example.com>;tag=1"),
            ("Call-ID", "m1"),
            ("CSeq", "1 MESSAGE"),
            ("Content-Type", "text/plain"),
        ],
        "héllo".encode(),
    )
    msg = req(data, stream=True)
    assert msg.method == "MESSAGE" and msg.max_forwards == 70
    assert msg.body == "héllo".encode() and msg.content_length == 6
    kept = build_request(
        "OPTIONS",
        "sip:x@y",
        [
            ("Max-Forwards", "0"),
            ("Via", "SIP/2.0/UDP h"),
            ("To", "<sip:x@y>"),
            ("From", "<sip:a@b>"),
            ("Call-ID", "o"),
            ("CSeq", "1 OPTIONS"),
        ],
    )
    assert req(kept).max_forwards == 0
    for bad in (("BAD METHOD", "sip:x@y"), ("OPTIONS", "sip:x y"), ("OPTIONS", "")):
        with pytest.raises(ValueError):
            build_request(bad[0], bad[1], [])


def test_stateless_error_reply() -> None:
    bad = minimal().replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
    error = rejected(bad)
    reply = stateless_error_reply(bad, error, server="sipbill")
    assert reply is not None
    parsed = resp(reply)
    assert parsed.status == 400 and parsed.reason == error.reason
    assert parsed.call_id == "c1" and parsed.to_addr.tag is not None
    assert parsed.header("server") == "sipbill"
    assert stateless_error_reply(bad, error) == stateless_error_reply(bad, error)  # same tag
    ext = SipParseError(420, "Bad Extension", [("Unsupported", "foo")])
    assert resp(stateless_error_reply(minimal(), ext) or b"").header("unsupported") == "foo"
    assert stateless_error_reply(OK, error) is None  # responses are never answered
    ack = minimal(method=b"ACK")
    assert stateless_error_reply(ack, error) is None
    assert stateless_error_reply(b"garbage", error) is None
    assert stateless_error_reply(b"OPTIONS sip:x SIP/2.0\r\nTo: x\r\n\r\n", error) is None
