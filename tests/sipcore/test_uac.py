"""The server's own user agent client: request building sans-IO, then real loopback sockets.

The loopback tests run a real :class:`SipStack` (transaction layer, UDP/TCP transports) and
a plain socket playing the far end, so retransmission, matching and timeouts are the real
ones (with a small T1 so Timer F fires in well under a second).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from sipcore.location import Binding
from sipcore.message import Request, Response, build_response, parse_message
from sipcore.stack import SipStack
from sipcore.transaction import TimerSettings, TransactionLayer
from sipcore.transport import Transports
from sipcore.transport_types import Peer
from sipcore.uac import (
    Destination,
    UacTimeout,
    UacTransportError,
    UserAgentClient,
    build_uac_request,
)

PHONE = Peer("UDP", "198.51.100.7", 40123)


class FixedIdentity:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def sent_by(self, transport: str) -> tuple[str, int]:
        return self.host, self.port


def _parse_request(data: bytes) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


# ------------------------------------------------------------------------------ sans-IO


def test_request_has_every_mandatory_header() -> None:
    dest = Destination("sip:bob@198.51.100.7:40123", PHONE,
                       ("<sip:edge.example.net;lr>", "<sip:edge2.example.net;lr>"))
    data = build_uac_request(
        "MESSAGE", dest, sent_by=("192.0.2.1", 5060),
        from_addr='"Alice" <sip:alice@example.com>', to_addr="<sip:bob@example.com>",
        call_id="c1@192.0.2.1", cseq=7, headers=[("Date", "Sat, 13 Nov 2010 23:29:00 GMT")],
        body=b"hi \x00\xff", content_type="text/plain;charset=utf-8",
    )
    req = _parse_request(data)
    assert req.method == "MESSAGE"
    assert req.uri == "sip:bob@198.51.100.7:40123"
    via = req.top_via
    assert (via.transport, via.host, via.port) == ("UDP", "192.0.2.1", 5060)
    assert via.branch is not None and via.branch.startswith("z9hG4bK")
    assert "rport" in via.params
    assert req.max_forwards == 70
    assert [r.uri for r in req.routes] == ["sip:edge.example.net;lr", "sip:edge2.example.net;lr"]
    assert req.from_addr.display == "Alice"
    assert req.from_addr.uri == "sip:alice@example.com"
    assert req.from_addr.tag
    assert req.to_addr.uri == "sip:bob@example.com" and req.to_addr.tag is None
    assert req.call_id == "c1@192.0.2.1"
    assert (req.cseq.number, req.cseq.method) == (7, "MESSAGE")
    assert req.header("Date") == "Sat, 13 Nov 2010 23:29:00 GMT"
    assert req.content_type == "text/plain;charset=utf-8"
    assert req.body == b"hi \x00\xff"
    assert not req.contacts


def test_branches_and_tags_are_fresh_and_given_tags_kept() -> None:
    dest = Destination("sip:bob@198.51.100.7", PHONE)
    kw: dict[str, Any] = {"sent_by": ("192.0.2.1", 5060),
                          "to_addr": "<sip:bob@example.com>;tag=remote", "call_id": "c@h"}
    a = _parse_request(build_uac_request("NOTIFY", dest, from_addr="<sip:a@example.com>", **kw))
    b = _parse_request(build_uac_request("NOTIFY", dest, from_addr="<sip:a@example.com>", **kw))
    assert a.top_via.branch != b.top_via.branch
    assert a.from_addr.tag != b.from_addr.tag
    c = _parse_request(build_uac_request("NOTIFY", dest, from_addr="<sip:a@example.com>",
                                         from_tag="mine", contact="<sip:192.0.2.1:5060>", **kw))
    assert c.from_addr.tag == "mine"
    assert c.to_addr.tag == "remote"
    assert c.contacts[0].uri == "sip:192.0.2.1:5060"
    d = _parse_request(build_uac_request("NOTIFY", dest, from_addr="<sip:a@example.com>;tag=x",
                                         **kw))
    assert d.from_addr.tag == "x"


def test_destination_of_binding_follows_source_and_path() -> None:
    b = Binding("sip:bob@example.com", "sip:bob@10.0.0.5:5062;transport=tcp",
                Peer("TCP", "198.51.100.9", 61000), 1e12, path=("<sip:edge.example.net;lr>",))
    d = Destination.of_binding(b)
    assert d == Destination("sip:bob@10.0.0.5:5062;transport=tcp",
                            Peer("TCP", "198.51.100.9", 61000), ("<sip:edge.example.net;lr>",))


# ------------------------------------------------------------------------------ loopback


class FarEnd(asyncio.DatagramProtocol):
    """A UDP phone: records requests and answers with ``statuses`` (popped per request)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[Request] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        req = _parse_request(data)
        self.requests.append(req)
        if not self.statuses:
            return  # silent phone: the client transaction times out
        assert self.transport is not None
        status = self.statuses.pop(0)
        self.transport.sendto(build_response(req, status, to_tag="far"), addr)


@pytest.fixture
async def uac() -> AsyncIterator[UserAgentClient]:
    layer = TransactionLayer(TimerSettings(T1=0.01, T2=0.04, T4=0.05))
    stack = SipStack(lambda st: Transports(st), layer)
    host, port = await stack.transports.listen_udp("127.0.0.1", 0)
    try:
        yield UserAgentClient(stack, FixedIdentity(host, port), user_agent="sipbill-test")
    finally:
        await stack.close()


async def _far_end(statuses: list[int]) -> tuple[FarEnd, Peer]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: FarEnd(statuses), local_addr=("127.0.0.1", 0))
    host, port = transport.get_extra_info("sockname")[:2]
    return proto, Peer("UDP", host, port)


async def test_final_response_resolves_the_future(uac: UserAgentClient) -> None:
    far, peer = await _far_end([202])
    try:
        dest = Destination(f"sip:bob@{peer.host}:{peer.port}", peer)
        response = await asyncio.wait_for(uac.request(
            "MESSAGE", dest, from_addr="<sip:alice@example.com>", to_addr="<sip:bob@example.com>",
            body=b"hello", content_type="text/plain"), 5)
        assert isinstance(response, Response)
        assert response.status == 202
        got = far.requests[0]
        assert got.body == b"hello"
        assert got.header("User-Agent") == "sipbill-test"
        assert got.top_via.sent_by == uac.identity.sent_by("UDP")
        assert uac.stats["final"] == 1
    finally:
        assert far.transport is not None
        far.transport.close()


async def test_error_response_is_a_response_not_an_exception(uac: UserAgentClient) -> None:
    far, peer = await _far_end([486])
    try:
        response = await asyncio.wait_for(uac.request(
            "MESSAGE", Destination(f"sip:bob@{peer.host}:{peer.port}", peer),
            from_addr="<sip:a@example.com>", to_addr="<sip:bob@example.com>"), 5)
        assert response.status == 486
    finally:
        assert far.transport is not None
        far.transport.close()


async def test_silence_is_a_timeout_after_retransmissions(uac: UserAgentClient) -> None:
    far, peer = await _far_end([])
    try:
        with pytest.raises(UacTimeout):
            await asyncio.wait_for(uac.request(
                "MESSAGE", Destination(f"sip:bob@{peer.host}:{peer.port}", peer),
                from_addr="<sip:a@example.com>", to_addr="<sip:bob@example.com>"), 5)
        assert len(far.requests) > 1  # Timer E retransmitted over UDP
        assert len({r.top_via.branch for r in far.requests}) == 1
        assert uac.stats["timeout"] == 1
    finally:
        assert far.transport is not None
        far.transport.close()


async def test_tcp_connect_refused_is_a_transport_error(uac: UserAgentClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: the connect is refused
        peer = Peer("TCP", "127.0.0.1", port)
        with pytest.raises(UacTransportError):
            await asyncio.wait_for(uac.request(
                "MESSAGE", Destination(f"sip:bob@127.0.0.1:{port};transport=tcp", peer),
                from_addr="<sip:a@example.com>", to_addr="<sip:bob@example.com>"), 5)
    assert uac.stats["transport"] == 1


async def test_provisional_responses_go_to_the_callback(uac: UserAgentClient) -> None:
    far, peer = await _far_end([183, 200])
    seen: list[int] = []
    try:
        out = uac.build("MESSAGE", Destination(f"sip:bob@{peer.host}:{peer.port}", peer),
                        from_addr="<sip:a@example.com>", to_addr="<sip:bob@example.com>")
        fut = uac.send(out, on_response=lambda r: seen.append(r.status))
        # The far end answers each copy it gets: the 183 first, then 200 to a retransmission.
        response = await asyncio.wait_for(fut, 5)
        assert response.status == 200
        assert seen == [183]
    finally:
        assert far.transport is not None
        far.transport.close()
