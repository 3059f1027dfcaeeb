"""Stream framing (RFC 3261 §18.3, §7.5) and CRLF keep-alives (RFC 5626 §3.5.1)."""

from __future__ import annotations

import time

import pytest

from sipcore.errors import SipParseError
from sipcore.framing import StreamFramer, is_keepalive
from sipcore.message import parse_message


def message(
    body: bytes = b"", *, call_id: bytes = b"c1", cl_header: bytes = b"Content-Length"
) -> bytes:
    return (
        b"MESSAGE sip:u@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/TCP h.example.com;branch=z9hG4bK1\r\n"
        b"To: <sip:u@example.com>\r\n"
        b"From: <sip:a@example.com>;tag=1\r\n"
        b"Call-ID: " + call_id + b"\r\n"
        b"CSeq: 1 MESSAGE\r\n" + cl_header + b": %d\r\n\r\n" % len(body) + body
    )


A = message(b"hello", call_id=b"a")
B = message(b"", call_id=b"b")
C = message(b"\r\n\r\nbody with blank lines\r\n\r\n", call_id=b"c")


def test_whole_and_pipelined_messages() -> None:
    framer = StreamFramer()
    assert framer.feed(A) == [A]
    assert framer.feed(A + B + C) == [A, B, C]
    assert framer.buffered == 0
    for data in (A, B, C):
        parse_message(data, stream=True)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 50])
def test_partial_reads(chunk: int) -> None:
    stream = b"\r\n\r\n" + A + b"\r\n" + B + C + b"\r\n\r\n"
    framer = StreamFramer()
    out: list[bytes] = []
    for i in range(0, len(stream), chunk):
        out += framer.feed(stream[i : i + chunk])
    assert out == [A, B, C]
    assert framer.take_pings() == 2
    assert framer.pings == 0


def test_pings_and_pongs() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == []
    assert framer.pings == 1
    assert framer.feed(b"\r\n\r\n\r\n\r\n") == []
    assert framer.pings == 3
    framer.pings = 0  # what the transport does after writing the pongs
    # A double CRLF split over two reads is still one ping.
    assert framer.feed(b"\r\n") == []
    assert framer.pings == 0
    assert framer.feed(b"\r\n") == []
    assert framer.pings == 1
    # A lone CRLF (say, a pong from the peer) followed by a message is just skipped.
    assert framer.feed(b"\r\n" + A) == [A]
    assert framer.pings == 1
    # "\r\n\r" then "\n": one ping.
    framer.pings = 0
    framer.feed(b"\r\n\r")
    framer.feed(b"\n")
    assert framer.pings == 1


def test_body_bytes_that_look_like_crlf_are_body() -> None:
    framer = StreamFramer()
    assert framer.feed(C) == [C]
    assert framer.pings == 0


def test_compact_and_folded_content_length() -> None:
    compact = message(b"xy", cl_header=b"l")
    folded = compact.replace(b"l: 2", b"Content-Length:\r\n 2")
    assert StreamFramer().feed(compact + folded) == [compact, folded]


@pytest.mark.parametrize(
    "data",
    [
        message(b"x").replace(b"Content-Length: 1\r\n", b""),
        message(b"x").replace(b"Content-Length: 1", b"Content-Length: -1"),
        message(b"x").replace(b"Content-Length: 1", b"Content-Length: one"),
        message(b"x").replace(b"Content-Length: 1", b"Content-Length: 1\r\nl: 1"),
        b"\n" + A,
        b"\rX" + A,
    ],
)
def test_unframeable_streams_fail_for_good(data: bytes) -> None:
    framer = StreamFramer()
    with pytest.raises(SipParseError) as info:
        framer.feed(data)
    assert info.value.status == 400
    assert framer.failed is info.value
    with pytest.raises(SipParseError):
        framer.feed(A)


def test_messages_before_a_framing_error_are_delivered() -> None:
    framer = StreamFramer()
    broken = message(b"x").replace(b"Content-Length: 1\r\n", b"")
    assert framer.feed(A + broken) == [A]
    assert framer.failed is not None
    with pytest.raises(SipParseError):
        framer.feed(b"")


def test_size_caps() -> None:
    framer = StreamFramer(max_message_size=1000)
    with pytest.raises(SipParseError) as info:
        framer.feed(b"OPTIONS sip:x SIP/2.0\r\nX: " + b"a" * 1000)
    assert info.value.status == 513
    framer = StreamFramer(max_message_size=1000)
    with pytest.raises(SipParseError) as info:
        framer.feed(message(b"x" * 900))
    assert info.value.status == 413
    # The cap is checked as the header block grows, not only when it ends.
    framer = StreamFramer(max_message_size=1000)
    framer.feed(b"OPTIONS sip:x SIP/2.0\r\n")
    with pytest.raises(SipParseError):
        for _ in range(100):
            framer.feed(b"X-Pad: " + b"p" * 20 + b"\r\n")
    # max_buffer bounds what is held for an incomplete message.
    framer = StreamFramer(max_message_size=10_000, max_buffer=300)
    with pytest.raises(SipParseError) as info:
        framer.feed(message(b"x" * 1000)[:400])
    assert info.value.status == 513
    # ... while complete messages of any number pass through.
    assert len(StreamFramer(max_buffer=300).feed(A * 20)) == 20


def test_byte_by_byte_feeding_is_linear() -> None:
    """The header search resumes where it stopped and the body is not rescanned, so feeding a
    message one byte at a time costs time linear in its size."""

    def run(size: int) -> float:
        data = message(b"b" * size).replace(b"Call-ID", b"X-Pad: " + b"p" * size + b"\r\nCall-ID")
        framer = StreamFramer(max_message_size=10 * size + 1000)
        start = time.perf_counter()
        out = []
        for i in range(len(data)):
            out += framer.feed(data[i : i + 1])
        elapsed = time.perf_counter() - start
        assert out == [data]
        return elapsed

    small = min(run(2000) for _ in range(3))
    large = min(run(16000) for _ in range(3))
    assert large / small < 8 * 3  # 8x the input; quadratic would be ~64x


def test_is_keepalive() -> None:
    assert is_keepalive(b"\r\n\r\n") and is_keepalive(b"\r\n") and is_keepalive(b"")
    assert not is_keepalive(A)


def test_anything_fed_raises_only_sip_parse_error() -> None:
    samples = [
        b"\x00" * 10,
        b"\r\n\r\n\r",
        b"SIP/2.0 200 OK\r\n\r\n",
        bytes(range(256)) * 4,
        b"A\r\n\r\n",
        b"X: 1\r\nl: 99999999999\r\n\r\n",
    ]
    for sample in samples:
        framer = StreamFramer()
        try:
            for message_bytes in framer.feed(sample):
                assert isinstance(message_bytes, bytes)
        except SipParseError:
            pass
