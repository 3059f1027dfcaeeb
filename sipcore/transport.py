"""asyncio UDP and TCP transports (RFC 3261 §18).

The transports own the sockets and nothing else: they hand every received datagram or framed
stream message to a :class:`TransportSink` together with the :class:`Peer` it came from, and put
bytes on the wire for a peer. Parsing, matching and routing decisions live in the sans-IO core.

TCP (§18.3): each connection has a :class:`~sipcore.framing.StreamFramer` that copes with
partial and pipelined messages; connections are kept in a table keyed by the remote peer so a
response or a later request to the same peer reuses them (§18.2.2, RFC 5923 style reuse), idle
connections are closed after ``tcp_idle_timeout``, and a peer that buffers more than
``max_tcp_buffer`` bytes either way (a flood, or a slow reader) is disconnected. When we must
send to a TCP peer with no connection (a gateway, a contact whose connection dropped) one is
opened; if that fails the sink hears :meth:`TransportSink.transport_failed`.

UDP sends are queued and go out together once the callbacks the event loop is running now are
done: on a busy server one wake-up reads a burst of requests, and their responses then leave
with one ``sendmmsg(2)`` per 64 (the optional C accelerator ``sipcore/_udpsend.c``) instead of
one ``sendto`` each, and the receiver is woken once for several.  Order is kept; a datagram
the accelerator cannot or may not send (no build, a full send buffer, an error, an address it
does not parse) goes through the loop's transport as a single send would, so errors are
reported the same way.

Several worker processes bind the same UDP port (``SO_REUSEPORT``); the kernel spreads the
datagrams over them by 4-tuple. Only worker 0 listens on TCP; the others send to TCP peers
through it (:attr:`Transports.tcp_relay`, see :mod:`sipcore.workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sipcore import accel
from sipcore.errors import SipParseError
from sipcore.framing import StreamFramer
from sipcore.transport_types import Peer

log = logging.getLogger("sipcore.transport")

__all__ = ["TransportLimits", "TransportSink", "Transports"]


class TransportSink(Protocol):
    def message_received(self, data: bytes, peer: Peer, stream: bool) -> None:
        """One datagram, or one framed stream message, arrived from ``peer``."""

    def transport_failed(self, peer: Peer) -> None:
        """Sending to ``peer`` failed (connection refused/reset, ICMP error)."""

    def stream_error(self, error: SipParseError, peer: Peer) -> None:
        """A stream from ``peer`` could not be framed; the connection is being closed."""


@dataclass(frozen=True, slots=True)
class TransportLimits:
    max_message_size: int = 65535
    max_tcp_connections: int = 1024
    max_tcp_buffer: int = 262144
    tcp_idle_timeout: float = 300.0
    connect_timeout: float = 5.0


#: A queued UDP datagram: (data, host, port, peer, who to tell if it fails; None: the sink).
#: The first three are what ``_udpsend.sendmany`` reads.
_Datagram = tuple[bytes, str, int, Peer, "Callable[[], None] | None"]
_SendMany = Callable[[int, int, list[_Datagram], int], int]


def _load_sendmany() -> _SendMany | None:
    module = accel.load("_udpsend")
    return None if module is None else cast(_SendMany, module.sendmany)


#: ``sendmany(fd, family, queue, start)`` of the C accelerator, or None (one send each).
_sendmany: _SendMany | None = _load_sendmany()

#: Sources whose Peer a UDP socket remembers: a phone's requests (and every lingering
#: transaction of them) share one Peer instead of building one per datagram (~2 µs each).
_PEER_CACHE_SIZE = 8192


class _DatagramTransport(Protocol):
    """What asyncio's and uvloop's datagram transports both have (typeshed's
    DatagramTransport lacks the write buffer size)."""

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def get_extra_info(self, name: str, default: object = None) -> object: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Transports) -> None:
        self.owner = owner
        self.transport: _DatagramTransport | None = None
        self.fileno = -1  # the socket the accelerator writes to beside the transport (-1: none)
        self.family = -1
        self._peers: dict[tuple[str | int, ...], Peer] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's classes.
        self.transport = cast(_DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fileno, self.family = sock.fileno(), int(sock.family)

    def connection_lost(self, exc: Exception | None) -> None:
        # The descriptor is closed and its number may be reused (by a database connection,
        # say): the accelerator must never write to it again.
        self.fileno = -1

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        owner = self.owner
        owner.stats["udp_datagrams_in"] += 1
        peers = self._peers
        peer = peers.get(addr)
        if peer is None:
            if len(peers) >= _PEER_CACHE_SIZE:
                peers.clear()
            peer = peers[addr] = Peer("UDP", str(addr[0]), int(addr[1]))
        owner.sink.message_received(data, peer, False)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable etc.; asyncio does not tell us which peer, so only count it.
        self.owner.stats["udp_errors"] += 1


class _TcpConnection(asyncio.Protocol):
    def __init__(self, owner: Transports, outbound_peer: Peer | None = None) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = outbound_peer
        self.framer = StreamFramer(max_message_size=owner.limits.max_message_size,
                                   max_buffer=owner.limits.max_tcp_buffer)
        self.last_activity = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        host, port = transport.get_extra_info("peername")[:2]
        self.peer = Peer("TCP", str(host), int(port))
        self.last_activity = self.owner.loop.time()
        if len(self.owner.connections) >= self.owner.limits.max_tcp_connections:
            self.owner.stats["tcp_refused_limit"] += 1
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=self.owner.limits.max_tcp_buffer)
        self.owner.connections[self.peer] = self
        self.owner.stats["tcp_connections_opened"] += 1

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.transport is not None
        self.last_activity = self.owner.loop.time()
        try:
            messages = self.framer.feed(data)
        except SipParseError as exc:
            self.owner.stats["tcp_framing_errors"] += 1
            self.owner.sink.stream_error(exc, self.peer)
            self.transport.close()
            return
        if self.framer.pings:
            # RFC 5626 §4.4.1: answer each double-CRLF keep-alive with a single CRLF.
            self.transport.write(b"\r\n" * self.framer.pings)
            self.framer.pings = 0
        for message in messages:
            self.owner.sink.message_received(message, self.peer, True)
        if self.framer.failed is not None:
            # Framing broke after the complete messages above: the stream is unusable.
            self.owner.stats["tcp_framing_errors"] += 1
            self.owner.sink.stream_error(self.framer.failed, self.peer)
            self.transport.close()

    def pause_writing(self) -> None:
        # The peer does not read what we send: a slow client must not make us buffer forever.
        self.owner.stats["tcp_slow_peer_closed"] += 1
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and self.owner.connections.get(self.peer) is self:
            del self.owner.connections[self.peer]
            self.owner.stats["tcp_connections_closed"] += 1

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.last_activity = self.owner.loop.time()
        self.transport.write(data)


class Transports:
    """The UDP sockets and the TCP connection table of one server process."""

    def __init__(self, sink: TransportSink, limits: TransportLimits | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sink = sink
        self.limits = limits or TransportLimits()
        self.loop = loop or asyncio.get_running_loop()
        self.connections: dict[Peer, _TcpConnection] = {}
        self._udp: list[_UdpProtocol] = []
        self._udp_out: list[_Datagram] = []  # sent by _flush_udp, in this order
        self._udp_flush: asyncio.Handle | None = None
        self._servers: list[asyncio.Server] = []
        self._connecting: dict[Peer, asyncio.Task[None]] = {}
        # Bytes waiting for a connection, each with who to tell if it fails (None: the sink).
        self._pending: dict[Peer, list[tuple[bytes, Callable[[], None] | None]]] = {}
        #: A worker without TCP listener hands TCP sends to worker 0 through this.
        self.tcp_relay: Callable[[bytes, Peer, Callable[[], None] | None], None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.local: dict[str, tuple[str, int]] = {}  # transport name -> (host, port)
        self.stats: dict[str, int] = {
            key: 0
            for key in (
                "udp_datagrams_in", "udp_datagrams_out", "udp_errors", "tcp_connections_opened",
                "tcp_connections_closed", "tcp_refused_limit", "tcp_framing_errors",
                "tcp_slow_peer_closed", "tcp_idle_closed", "tcp_connect_failed",
            )
        }

    async def listen_udp(
        self, host: str, port: int, *, reuse_port: bool = False
    ) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        # No SO_REUSEADDR: for UDP it would let a second server silently share the port.
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Big buffers absorb bursts (a registration storm) instead of dropping datagrams.
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        sock.bind((host, port))
        sock.setblocking(False)
        _, protocol = await self.loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), sock=sock
        )
        self._udp.append(protocol)
        bound = sock.getsockname()[:2]
        self.local.setdefault("UDP", (str(bound[0]), int(bound[1])))
        return str(bound[0]), int(bound[1])

    async def listen_tcp(
        self, host: str, port: int, *, reuse_port: bool = False
    ) -> tuple[str, int]:
        server = await self.loop.create_server(
            lambda: _TcpConnection(self), host, port, reuse_address=True,
            reuse_port=reuse_port or None, backlog=1024,
        )
        self._servers.append(server)
        # typeshed says a tuple; uvloop's Server gives a list, which this module refused when
        # it was compiled (it is not now: it has coroutines, see sipcore/__init__.py).
        sockets: Sequence[socket.socket] = cast(Any, server).sockets
        bound = sockets[0].getsockname()[:2]
        self.local.setdefault("TCP", (str(bound[0]), int(bound[1])))
        self._arm_sweeper()
        return str(bound[0]), int(bound[1])

    def send(self, data: bytes, peer: Peer,
             on_failure: Callable[[], None] | None = None) -> None:
        """Put ``data`` on the wire for ``peer``; failures surface via the sink (or
        ``on_failure`` when given: worker 0 sending for another worker), never raise."""
        if peer.transport == "UDP":
            if not self._udp or self._udp[0].transport is None:
                self._failed(peer, on_failure)
                return
            self._udp_out.append((data, peer.host, peer.port, peer, on_failure))
            if self._udp_flush is None:
                self._udp_flush = self.loop.call_soon(self._flush_udp)
            return
        if peer.transport != "TCP":
            self._failed(peer, on_failure)
            return
        conn = self.connections.get(peer)
        if conn is not None and not conn.closed:
            conn.write(data)
            return
        if self.tcp_relay is not None:
            self.tcp_relay(data, peer, on_failure)
            return
        self._pending.setdefault(peer, []).append((data, on_failure))
        if peer not in self._connecting:
            self._connecting[peer] = self.loop.create_task(self._connect(peer))

    def _flush_udp(self) -> None:
        """Send the queued datagrams, in order: runs of them with the accelerator while the
        transport has nothing buffered, each other one through the transport."""
        self._udp_flush = None
        queue, self._udp_out = self._udp_out, []
        proto = self._udp[0] if self._udp else None
        transport = proto.transport if proto is not None else None
        if proto is None or transport is None:
            for *_, peer, on_failure in queue:
                self._failed(peer, on_failure)
            return
        # Only while the transport is open: a closing one may have closed its descriptor.
        sendmany = _sendmany if proto.fileno >= 0 and not transport.is_closing() else None
        sent = index = 0
        end = len(queue)
        while index < end:
            # Not past datagrams the transport holds back (EAGAIN): they go first.
            if sendmany is not None and not transport.get_write_buffer_size():
                done = sendmany(proto.fileno, proto.family, queue, index)
                sent += done - index
                index = done
                if index == end:
                    break
            data, host, port, peer, on_failure = queue[index]
            index += 1
            try:
                transport.sendto(data, (host, port))
            except (OSError, ValueError):  # ValueError: not an address of the socket's family
                self._failed(peer, on_failure)
                continue
            sent += 1
        self.stats["udp_datagrams_out"] += sent

    async def _connect(self, peer: Peer) -> None:
        try:
            if len(self.connections) >= self.limits.max_tcp_connections:
                raise OSError("connection limit reached")
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _TcpConnection(self, peer), peer.host, peer.port
                ),
                self.limits.connect_timeout,
            )
        except (TimeoutError, OSError):
            self.stats["tcp_connect_failed"] += 1
            self._connecting.pop(peer, None)
            for _, on_failure in self._pending.pop(peer, []):
                self._failed(peer, on_failure)
            return
        self._connecting.pop(peer, None)
        conn = proto
        # The connection registered itself under its real peer address; make the name we
        # dialled find it too (they are the same unless the host was not a literal).
        self.connections.setdefault(peer, conn)
        for data, _ in self._pending.pop(peer, []):
            conn.write(data)

    def _failed(self, peer: Peer, on_failure: Callable[[], None] | None) -> None:
        if on_failure is not None:
            on_failure()
        else:
            self.sink.transport_failed(peer)

    def has_connection(self, peer: Peer) -> bool:
        conn = self.connections.get(peer)
        return conn is not None and not conn.closed

    def _arm_sweeper(self) -> None:
        if self._sweeper is None:
            period = max(1.0, min(30.0, self.limits.tcp_idle_timeout / 4))
            self._sweeper = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.limits.tcp_idle_timeout
        for conn in list(self.connections.values()):
            if conn.last_activity < deadline and conn.transport is not None:
                self.stats["tcp_idle_closed"] += 1
                conn.transport.close()
        self._arm_sweeper()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for server in self._servers:
            server.close()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self._connecting.values()):
            task.cancel()
        if self._udp_flush is not None:
            self._udp_flush.cancel()
            self._flush_udp()  # what was sent before closing still leaves
        for proto in self._udp:
            if proto.transport is not None:
                proto.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._udp.clear()

