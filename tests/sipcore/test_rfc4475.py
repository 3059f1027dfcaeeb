"""RFC 4475 torture messages: every file gets the verdict VERDICTS.tsv gives it.

The messages are used in place from ``../shared/testdata/rfc4475`` next to the repository
(never copied in); the module is skipped when that directory is absent.

What a verdict means here
-------------------------
Each TSV row is ``file, section, verdict, expectation``; the expected status, where the
expectation names one, is the first status-code-like number in it (e.g. "reject (400)",
"416 Unsupported URI Scheme").

* ``valid``: ``parse_message`` (datagram mode) succeeds; every lazily parsed header the
  server uses parses (all Vias, Route, Record-Route, Contact, the Request-URI); a request
  passes :func:`sipcore.checks.request_checks` in the proxy role; ``raw`` re-parses to the
  same message and an untouched message serialises to ``raw``; a request forwarded with
  ``Request.forward`` (a response with ``Response.forward`` when it has a Via to pop)
  re-parses with the expected Via list and Max-Forwards; and the per-file field values in
  ``FIELDS`` hold.
* ``invalid`` / ``semantic``: the message is rejected with the expected status (any
  status when the expectation only says "drop") by the stage :data:`DECIDED_BY` names:

  - ``parser`` (the default): ``parse_message`` raises SipParseError;
  - ``checks``: it parses, and ``request_checks`` (what REQINIT runs) raises;
  - ``registrar``: it parses and passes ``request_checks``; the status is the registrar's
    to give (regaut01: the 401 challenge for an unknown Authorization scheme comes from
    the digest/registrar code, RFC 4475 §3.3.7) -- here we check the parser hands the
    registrar what it needs (the credentials unsplit);
  - ``ignored``: the expectation allows ignoring the bad header (baddate: "reject (400) or
    ignore the Date header"); we ignore it (nothing in the server reads Date), so it
    parses and passes ``request_checks``.

  For a request rejected by the parser, ``stateless_error_reply`` must produce the reply
  (``SIP/2.0 <status>`` with the Via lines), and for a response none (a counted drop).

``TSV_DISAGREEMENTS`` lists rows whose verdict we do not follow, with the reason; the test
asserts both what the TSV says (so a fix to the TSV is noticed) and what we do instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sipcore.checks import request_checks
from sipcore.errors import SipParseError
from sipcore.message import Request, Response, parse_message, stateless_error_reply
from sipcore.uri import SipUri

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "rfc4475"

if not (TESTDATA / "VERDICTS.tsv").is_file():
    pytest.skip(f"RFC 4475 test data not found at {TESTDATA}", allow_module_level=True)


def _rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in (TESTDATA / "VERDICTS.tsv").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, section, verdict, expectation = line.split("\t")
        rows.append((name, section, verdict, expectation))
    return rows


ROWS = _rows()
# A status is written "(400)" or "416 Unsupported ..."; "> 699: drop" names none.
_STATUS = re.compile(r"\(([1-6][0-9][0-9])\)|\b([1-6][0-9][0-9]) [A-Z]")

DECIDED_BY = {
    "regbadct.dat": "checks",  # Contact is parsed lazily; REQINIT's syntax check rejects it
    "bext01.dat": "checks",  # 420 depends on what this proxy supports
    "zeromf.dat": "checks",  # 483 is a proxy decision (an OPTIONS for us may be answered)
    "regaut01.dat": "registrar",
    "baddate.dat": "ignored",
}

TSV_DISAGREEMENTS = {
    # The TSV calls test.dat "a plain INVITE" and valid, but its request line has no
    # SIP-Version ("INVITE sip:alan@jasomi.com"), it has no Via and no CSeq, its To/From
    # are bare "alan@jasomi.com" (no URI scheme) and one line ("Foobar roobar") has no
    # colon.  RFC 3261 §7.1 / §8.1.1 make each of those a 400 on its own.
    "test.dat": ("valid", 400),
}


def _check_expectations(msg: Request | Response, expected: dict[str, Any]) -> None:
    for path, want in expected.items():
        value: Any = msg
        for part in path.split("."):
            value = value[int(part)] if part.isdigit() else getattr(value, part)
        assert value == want, f"{path}: {value!r} != {want!r}"


# Field values the RFC 4475 text spells out (or that the file plainly contains).
FIELDS: dict[str, dict[str, Any]] = {
    "wsinv.dat": {
        "method": "INVITE",
        "to_addr.tag": "1918181833n",
        "to_addr.uri": "sip:vivekg@chair-dnrc.example.com",
        "from_addr.display": 'J Rosenberg \\"',
        "from_addr.tag": "98asjd8",
        "max_forwards": 68,
        "cseq.number": 9,
        "cseq.method": "INVITE",
        "call_id": "wsinv.ndaksdj@192.0.2.1",
        "top_via.host": "192.0.2.2",
        "top_via.branch": "390skdjuw",
        "vias.1.transport": "TCP",
        "vias.1.host": "spindle.example.com",
        "vias.1.branch": "z9hG4bK9ikj8",
        "vias.2.host": "192.168.255.111",
        "vias.2.branch": "z9hG4bK30239",
        "contacts.0.display": 'Quoted string ""',
        "contacts.0.params": {"newparam": "newvalue", "secondparam": None, "q": "0.33"},
        "routes.0.uri": "sip:services.example.com;lr;unknownwith=value;unknown-no-value",
        "content_type": "application/sdp",
        "content_length": 150,
    },
    "intmeth.dat": {
        "method": "!interesting-Method0123456789_*+`.%indeed'~",
        "cseq.method": "!interesting-Method0123456789_*+`.%indeed'~",
        "request_uri.host": "example.com",
        "request_uri.user": "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*",
        "request_uri.password": "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)",
        "to_addr.display": "BEL:\x07 NUL:\x00 DEL:\x7f",
        "from_addr.display": "token1~` token2'+_ token3*%!.-",
        "from_addr.tag": "_token~1'+`*%!-.",
        "call_id": "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{",
        "top_via.branch": "z9hG4bK-.!%66*_+`'~",
        "max_forwards": 255,
    },
    "esc01.dat": {
        "request_uri.user": "sips:user@example.com",
        "request_uri.host": "example.net",
        "to_addr.parsed_uri.user": "user",
        "from_addr.parsed_uri.user": "I have spaces",
        "call_id": "esc01.239409asdfakjkn23onasd0-3234",
        "content_type": "application/sdp",
        "contacts.0.parsed_uri.user": "caller",
        "contacts.0.parsed_uri.params": {"lr": None, "name": "value%41"},
    },
    "escnull.dat": {
        "to_addr.parsed_uri.user": "null-\x00-null",
        "contacts.0.parsed_uri.user": "\x00",
        "contacts.1.parsed_uri.user": "\x00\x00",
        "content_length": 0,
    },
    "esc02.dat": {
        "method": "RE%47IST%45R",
        "cseq.method": "RE%47IST%45R",
        "to_addr.display": "%Z%45",
        "top_via.branch": "z9hG4bK209%fzsnel234",
        # "C%6Fntact" is an unknown header, not Contact.
        "contacts.0.uri": "sip:alias1@host1.example.com",
        "contacts.1.uri": "sip:alias3@host3.example.com",
    },
    "lwsdisp.dat": {"from_addr.display": "caller", "from_addr.tag": "323"},
    "longreq.dat": {
        "cseq.number": 3882340,
        "top_via.host": "sip33.example.com",
        "vias.33.host": "host.example.com",
        "vias.33.received": "192.0.2.5",
        "to_addr.parsed_uri.port": 6000,
        "content_length": 150,
    },
    "dblreq.dat": {"method": "REGISTER", "content_length": 0, "body": b""},
    "semiuri.dat": {
        "request_uri.user": "user;par=u@example.net",
        "request_uri.host": "example.com",
        "request_uri.params": {},
    },
    "transports.dat": {
        "vias.0.transport": "UDP",
        "vias.1.transport": "SCTP",
        "vias.2.transport": "TLS",
        "vias.3.transport": "UNKNOWN",
        "vias.4.transport": "TCP",
    },
    "mpart01.dat": {
        "content_type": "multipart/mixed;boundary=7a9cbec02ceef655",
        "content_length": 553,
        "top_via.rport": None,
        "top_via.has_rport": True,
    },
    "unreason.dat": {
        "status": 200,
        "reason": "= 2**3 * 5**2 но сто девяносто девять - простое",
    },
    "noreason.dat": {"status": 100, "reason": ""},
    "badbranch.dat": {"top_via.branch": "z9hG4bK", "top_via.rfc3261_branch": False},
    "unksm2.dat": {
        "to_addr.uri": "isbn:2983792873",
        "from_addr.uri": "http://www.example.com",
        "contacts.0.uri": "name:John_Smith",
    },
    "invut.dat": {"content_type": "application/unknownformat", "content_length": 40},
    "bcast.dat": {"vias.1.host": "255.255.255.255"},
    "cparam01.dat": {
        "contacts.0.uri": "sip:+19725552222@gw1.example.net",
        "contacts.0.params": {"unknownparam": None},
    },
    "cparam02.dat": {
        "contacts.0.uri": "sip:+19725552222@gw1.example.net;unknownparam",
        "contacts.0.params": {},
    },
    "regescrt.dat": {
        "contacts.0.uri": "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
        "contacts.0.parsed_uri.headers": {"Route": "<sip:sip.example.com>"},
    },
    "sdp01.dat": {"content_type": "application/sdp"},
    "inv2543.dat": {
        "max_forwards": None,
        "top_via.branch": None,
        "top_via.rfc3261_branch": False,
        "to_addr.uri": "sip:+16505552222@ss1.example.net",
        "to_addr.params": {"user": "phone"},
        "from_addr.uri": "sip:+13035551111@ift.client.example.net;user=phone",
        "record_routes.0.uri": "sip:UserB@example.com;maddr=ss1.example.com",
        "content_length": 105,
    },
}


def _expected_status(expectation: str) -> int | None:
    match = _STATUS.search(expectation)
    return int(match.group(1) or match.group(2)) if match else None


def test_tsv_covers_every_file() -> None:
    listed = {row[0] for row in ROWS}
    present = {path.name for path in TESTDATA.glob("*.dat")}
    assert listed == present
    assert set(FIELDS) <= listed
    assert set(DECIDED_BY) <= listed
    assert {row[2] for row in ROWS} <= {"valid", "invalid", "semantic"}


def _exercise_valid(name: str, data: bytes) -> None:
    msg = parse_message(data)
    # Everything the server parses lazily parses here too.
    vias = msg.vias
    assert vias[0] is msg.top_via
    _ = (msg.routes, msg.record_routes, msg.contacts, msg.expires, msg.header_items())
    # Round trip.
    assert msg.to_bytes() == msg.raw
    if name != "dblreq.dat":
        assert msg.raw == data
    again = parse_message(msg.raw)
    assert again.header_items() == msg.header_items()
    assert again.body == msg.body
    if isinstance(msg, Request):
        assert isinstance(msg.request_uri, SipUri)
        request_checks(msg)
        if msg.max_forwards != 0:
            new_via = "SIP/2.0/UDP proxy.example.org;branch=z9hG4bKtorture"
            out = parse_message(msg.forward(via=new_via, record_route="<sip:p.example.org;lr>"))
            assert isinstance(out, Request)
            assert [str(v) for v in out.vias] == [new_via, *(str(v) for v in vias)]
            assert out.max_forwards == (70 if msg.max_forwards is None else msg.max_forwards - 1)
            assert out.record_routes[0].uri == "sip:p.example.org;lr"
            assert out.body == msg.body
    else:
        assert isinstance(msg, Response)
        if len(vias) > 1:
            out = parse_message(msg.forward())
            assert [str(v) for v in out.vias] == [str(v) for v in vias[1:]]
    _check_expectations(msg, FIELDS.get(name, {}))


@pytest.mark.parametrize(
    ("name", "section", "verdict", "expectation"), ROWS, ids=[r[0] for r in ROWS]
)
def test_verdict(name: str, section: str, verdict: str, expectation: str) -> None:
    data = (TESTDATA / name).read_bytes()
    if name in TSV_DISAGREEMENTS:
        tsv_verdict, our_status = TSV_DISAGREEMENTS[name]
        assert verdict == tsv_verdict, "the TSV changed: revisit TSV_DISAGREEMENTS"
        with pytest.raises(SipParseError) as info:
            parse_message(data)
        assert info.value.status == our_status
        return
    if verdict == "valid":
        _exercise_valid(name, data)
        return

    status = _expected_status(expectation)
    stage = DECIDED_BY.get(name, "parser")
    if stage == "parser":
        with pytest.raises(SipParseError) as info:
            parse_message(data)
        assert info.value.__cause__ is None, "an internal error was wrapped"
        if status is not None:
            assert info.value.status == status, info.value.reason
        reply = stateless_error_reply(data, info.value)
        if data.startswith(b"SIP/"):
            assert reply is None  # responses are dropped, never answered
        else:
            assert reply is not None
            assert reply.startswith(f"SIP/2.0 {info.value.status} ".encode())
            for line in data.split(b"\r\n"):
                if line.lower().startswith((b"via:", b"v:")):
                    assert line in reply
        return

    msg = parse_message(data)
    assert isinstance(msg, Request)
    if stage == "checks":
        with pytest.raises(SipParseError) as info:
            request_checks(msg)
        assert info.value.status == status, info.value.reason
    else:
        request_checks(msg)  # nothing for REQINIT to reject
    _STAGE_FOLLOW_UP.get(name, lambda m: None)(msg)


def _bext01(msg: Request) -> None:
    with pytest.raises(SipParseError) as info:
        request_checks(msg)
    assert info.value.headers == (
        ("Unsupported", "noProxiesSupportThis, norDoAnyProxiesSupportThis"),
    )
    # As the UAS it would also refuse the Require tags; supporting everything passes.
    with pytest.raises(SipParseError) as info:
        request_checks(
            msg, supported=["noProxiesSupportThis", "norDoAnyProxiesSupportThis"], local_target=True
        )
    assert info.value.headers == (
        ("Unsupported", "nothingSupportsThis, nothingSupportsThisEither"),
    )
    request_checks(msg, supported=["noproxiessupportthis", "nordoanyproxiessupportthis"])


def _zeromf(msg: Request) -> None:
    assert msg.max_forwards == 0
    request_checks(msg, local_target=True)  # an OPTIONS to this server is answered here
    with pytest.raises(ValueError):
        msg.forward(via="SIP/2.0/UDP p.example.org;branch=z9hG4bKx")


def _regaut01(msg: Request) -> None:
    assert msg.header("Authorization") == "NoOneKnowsThisScheme opaque-data=here"
    assert msg.header_values("authorization") == ["NoOneKnowsThisScheme opaque-data=here"]


def _baddate(msg: Request) -> None:
    assert msg.header("Date") == "Fri, 01 Jan 2010 16:00:00 EST"


def _regbadct(msg: Request) -> None:
    with pytest.raises(SipParseError) as info:
        _ = msg.contacts
    assert info.value.status == 400


_STAGE_FOLLOW_UP: dict[str, Callable[[Request], None]] = {
    "bext01.dat": _bext01,
    "zeromf.dat": _zeromf,
    "regaut01.dat": _regaut01,
    "baddate.dat": _baddate,
    "regbadct.dat": _regbadct,
}


def test_dblreq_second_message_is_ignored_on_datagrams() -> None:
    data = (TESTDATA / "dblreq.dat").read_bytes()
    first = parse_message(data)
    assert first.raw == data[: len(first.raw)]
    assert first.raw.endswith(b"Content-Length: 0\r\n\r\n")


def test_dblreq_on_a_stream() -> None:
    """On a stream both requests are framed.  The file's INVITE body is 3 bytes longer than
    its Content-Length says, so what follows is not a message: the two good ones are still
    delivered and the framer then reports the broken stream."""
    from sipcore.framing import StreamFramer

    framer = StreamFramer()
    framed = framer.feed((TESTDATA / "dblreq.dat").read_bytes())
    assert [parse_message(m, stream=True).cseq.method for m in framed] == ["REGISTER", "INVITE"]
    assert framer.failed is not None and framer.failed.status == 400
    with pytest.raises(SipParseError):
        framer.feed(b"OPTIONS")


def test_clerr_on_a_stream_waits_rather_than_fails() -> None:
    """On a stream a too-large Content-Length just means "more to come" (RFC 3261 §18.3)."""
    from sipcore.framing import StreamFramer

    framer = StreamFramer()
    assert framer.feed((TESTDATA / "clerr.dat").read_bytes()) == []
    assert framer.buffered > 0
