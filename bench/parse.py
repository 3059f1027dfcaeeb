"""Parse/forward micro-benchmark for the sans-IO message layer (not a test).

Prints microseconds per operation for what a stateful proxy does with each message:

* parse a typical INVITE and read the headers the proxy needs (top Via, CSeq, Call-ID, From
  tag, To tag, Max-Forwards, Route);
* the same plus ``Request.forward`` (prepend Via, decrement Max-Forwards, add Record-Route);
* parse a 200 OK and ``Response.forward`` it (drop the top Via).

Run: ``.venv/bin/python bench/parse.py`` (about 10 s; best of several repeats is reported,
which is the figure least disturbed by other processes on a shared machine).  The first line
says which parser ran: the C accelerator for common-shape messages (sipcore/_fastparse.c, built
by ``make install`` where a C compiler exists; it also does the byte splice of ``forward``) or
the pure-Python one (``SIPBILL_PURE_PYTHON=1 .venv/bin/python bench/parse.py`` measures that
one).  bench/fuzz_fastparse.py checks the accelerator under AddressSanitizer and UBSan.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipcore.message import ACCELERATED, Request, Response, parse_message

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
    b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, REFER, NOTIFY, MESSAGE\r\n"
    b"Supported: replaces, timer\r\n"
    b"User-Agent: Example-Phone/1.0\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 149\r\n"
    b"\r\n"
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 pc33.atlanta.example.com\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.101\r\n"
    b"t=0 0\r\n"
    b"m=audio 49172 RTP/AVP 0\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
)

OK_200 = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK2d4790.1;received=192.0.2.10\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport=5060;"
    b"received=192.0.2.101\r\n"
    b"Record-Route: <sip:proxy.example.com;lr>\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:bob@192.0.2.4>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

NEW_VIA = "SIP/2.0/UDP proxy.example.com;branch=z9hG4bK2d4790.1"
RECORD_ROUTE = "<sip:proxy.example.com;lr>"


def parse_and_read() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    msg.top_via.branch  # noqa: B018
    msg.cseq  # noqa: B018
    msg.call_id  # noqa: B018
    msg.from_addr.tag  # noqa: B018
    msg.to_addr.tag  # noqa: B018
    msg.max_forwards  # noqa: B018
    msg.routes  # noqa: B018


def parse_and_forward() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, Request)
    msg.top_via.branch  # noqa: B018
    msg.cseq  # noqa: B018
    msg.call_id  # noqa: B018
    msg.from_addr.tag  # noqa: B018
    msg.to_addr.tag  # noqa: B018
    msg.routes  # noqa: B018
    msg.forward(via=NEW_VIA, record_route=RECORD_ROUTE, pop_route=True)


def forward_only(msg: Request) -> None:
    msg.forward(via=NEW_VIA, record_route=RECORD_ROUTE, pop_route=True)


def response_parse_and_forward() -> None:
    msg = parse_message(OK_200)
    assert isinstance(msg, Response)
    msg.top_via.branch  # noqa: B018
    msg.cseq  # noqa: B018
    msg.forward()


def _calibration() -> None:
    """A fixed pure-Python loop, to compare this machine with others."""
    for _ in range(1000):
        pass


CASES = (
    ("INVITE: parse + Via/CSeq/Call-ID/tags/Max-Forwards/Route", parse_and_read),
    ("INVITE: parse + read + Request.forward (Via, MF, RR, Route)", parse_and_forward),
    ("200 OK: parse + read + Response.forward", response_parse_and_forward),
    ("calibration: `for _ in range(1000): pass`", _calibration),
)


def main() -> None:
    parsed = parse_message(INVITE)
    assert isinstance(parsed, Request)
    cases = [
        *CASES[:1],
        ("INVITE: Request.forward only (already parsed)", lambda: forward_only(parsed)),
        *CASES[1:],
    ]
    # Interleave the cases and keep each one's best round, so that a burst of load from other
    # processes on a shared machine hits all of them alike and is mostly filtered out.
    best = [float("inf")] * len(cases)
    number = 2000
    for _ in range(25):
        for k, (_label, func) in enumerate(cases):
            elapsed = timeit.timeit(func, number=number)
            best[k] = min(best[k], elapsed / number * 1e6)
    parser = "C accelerator (sipcore._fastparse)" if ACCELERATED else "pure Python"
    print(f"Python {sys.version.split()[0]}; {parser}; best of 25 interleaved rounds of {number}")
    for (label, _func), micros in zip(cases, best, strict=True):
        print(f"{label:<62} {micros:7.2f} µs")


if __name__ == "__main__":
    main()
