"""asyncio transports on real loopback sockets: UDP, TCP framing, reuse, limits, idle timeout."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sipcore import transport
from sipcore.errors import SipParseError
from sipcore.transport import TransportLimits, Transports
from sipcore.transport_types import Peer

OPTIONS = (
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-%d\r\n"
    b"From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
    b"Call-ID: c%d\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, Peer, bool]] = []
        self.failed: list[Peer] = []
        self.errors: list[SipParseError] = []
        self.event = asyncio.Event()

    def message_received(self, data: bytes, peer: Peer, stream: bool) -> None:
        self.messages.append((data, peer, stream))
        self.event.set()

    def transport_failed(self, peer: Peer) -> None:
        self.failed.append(peer)
        self.event.set()

    def stream_error(self, error: SipParseError, peer: Peer) -> None:
        self.errors.append(error)
        self.event.set()

    async def wait_for(self, n: int, timeout: float = 3.0) -> None:
        async def loop() -> None:
            while len(self.messages) < n:
                self.event.clear()
                await self.event.wait()
        await asyncio.wait_for(loop(), timeout)


async def test_udp_sources_share_one_peer_within_a_bounded_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "_PEER_CACHE_SIZE", 2)
    sink = Sink()
    t = Transports(sink)
    host, port = await t.listen_udp("127.0.0.1", 0)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        order = [0, 0, 1, 2, 0]  # the third source fills the cache: it starts again
        for n, i in enumerate(order, 1):
            socks[i].sendto(OPTIONS % (n, n), (host, port))
            await sink.wait_for(n)
        peers = [peer for _, peer, _ in sink.messages]
        assert [p.port for p in peers] == [socks[i].getsockname()[1] for i in order]
        assert peers[0] is peers[1]          # same source: the same Peer object
        assert peers[0] == peers[4] and peers[4] is not peers[0]  # rebuilt after the clear
        assert peers[2] != peers[3]
    finally:
        for s in socks:
            s.close()
        await t.close()


async def test_udp_roundtrip() -> None:
    sink = Sink()
    t = Transports(sink)
    host, port = await t.listen_udp("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            got.set_result(data)

    tr, _ = await loop.create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0))
    tr.sendto(OPTIONS % (1, 1), (host, port))
    await sink.wait_for(1)
    data, peer, stream = sink.messages[0]
    assert data == OPTIONS % (1, 1) and peer.transport == "UDP" and not stream
    t.send(b"pong", peer)  # back to the source address (rport behaviour)
    assert await asyncio.wait_for(got, 2) == b"pong"
    tr.close()
    await t.close()


async def test_tcp_partial_and_pipelined_and_reuse() -> None:
    sink = Sink()
    t = Transports(sink)
    host, port = await t.listen_tcp("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    two = OPTIONS % (1, 1) + OPTIONS % (2, 2)
    # Byte by byte for the first half, then the rest plus a third message in one write.
    for b in two[:50]:
        writer.write(bytes([b]))
        await writer.drain()
    writer.write(two[50:] + OPTIONS % (3, 3))
    await writer.drain()
    await sink.wait_for(3)
    assert [m[0] for m in sink.messages] == [OPTIONS % (i, i) for i in (1, 2, 3)]
    peer = sink.messages[0][1]
    assert all(m[1] == peer and m[2] for m in sink.messages)
    # A reply to that peer reuses the connection it came in on.
    t.send(b"SIP/2.0 200 OK\r\n\r\n", peer)
    assert await asyncio.wait_for(reader.readexactly(18), 2) == b"SIP/2.0 200 OK\r\n\r\n"
    assert t.stats["tcp_connections_opened"] == 1
    writer.close()
    await t.close()


async def test_tcp_keepalive_ping_gets_pong() -> None:
    sink = Sink()
    t = Transports(sink)
    host, port = await t.listen_tcp("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(2), 2) == b"\r\n"  # RFC 5626 pong
    writer.close()
    await t.close()


async def test_tcp_framing_error_closes_connection() -> None:
    sink = Sink()
    t = Transports(sink)
    host, port = await t.listen_tcp("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    no_length = (OPTIONS % (1, 1)).replace(b"Content-Length: 0\r\n", b"")
    writer.write(OPTIONS % (9, 9) + no_length)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
    assert [m[0] for m in sink.messages] == [OPTIONS % (9, 9)]  # the good one still arrived
    assert sink.errors and sink.errors[0].status == 400
    await t.close()


async def test_tcp_buffer_cap_and_connection_limit() -> None:
    sink = Sink()
    t = Transports(sink, TransportLimits(max_tcp_connections=1, max_tcp_buffer=4096,
                                         max_message_size=2048))
    host, port = await t.listen_tcp("127.0.0.1", 0)
    r1, w1 = await asyncio.open_connection(host, port)
    await asyncio.sleep(0.05)
    r2, _w2 = await asyncio.open_connection(host, port)
    assert await asyncio.wait_for(r2.read(), 3) == b""  # over the connection limit
    assert t.stats["tcp_refused_limit"] == 1
    # A header block that never ends is cut off at the cap instead of buffering forever.
    w1.write(b"OPTIONS sip:x SIP/2.0\r\nX: " + b"a" * 10000)
    await w1.drain()
    assert await asyncio.wait_for(r1.read(), 3) == b""
    assert sink.errors
    await t.close()


async def test_tcp_idle_timeout_and_connect_failure() -> None:
    sink = Sink()
    t = Transports(sink, TransportLimits(tcp_idle_timeout=1.0))
    host, port = await t.listen_tcp("127.0.0.1", 0)
    reader, _writer = await asyncio.open_connection(host, port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # idle connection closed
    assert t.stats["tcp_idle_closed"] >= 1
    # Sending to a TCP peer nobody listens on reports a transport failure, never raises.
    dead = Peer("TCP", "127.0.0.1", 1)
    t.send(b"x", dead)
    async def failed() -> None:
        while dead not in sink.failed:
            await asyncio.sleep(0.02)
    await asyncio.wait_for(failed(), 5)
    await t.close()
