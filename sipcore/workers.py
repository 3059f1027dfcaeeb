"""Several worker processes on one SIP port: who owns a message, and the channel between them.

Theory of operation
-------------------
``server.workers = N`` runs N processes (:mod:`sipbill.supervisor` starts them), each a full
server with its own event loop, transaction layer, dialogs and database pool. Every worker
binds its own UDP socket to the SIP port with ``SO_REUSEPORT``; the kernel hashes each
datagram's 4-tuple to one of them, so everything one remote address sends lands on one worker
(the same flow as long as the set of workers does not change). That is enough for requests
that start something: a new transaction is handled wherever it lands. It is not enough for
what comes back to a transaction or dialog that another worker holds:

* a *response* arrives from the downstream's address, which may hash to another worker than
  the one that forwarded the request. Every branch a worker generates ends in ``.w<N>``
  (:func:`branch_suffix`; :func:`sipcore.proxy.new_branch` and :func:`sipcore.uac.new_branch`
  append it), and a response's top Via is ours, so its branch names the owner.
* an *in-dialog request* from the callee arrives from the callee's address. The worker that
  record-routed the dialog put ``;sbw=<N>`` into its Record-Route URI
  (:meth:`sipcore.proxy.LocalIdentity.record_route_uri`), which comes back as the top Route;
  requests to a Contact the server's own user agent handed out (click-to-dial, presence
  NOTIFY dialogs) carry the same parameter in the Request-URI (:meth:`UserAgentClient.contact`).
* *CANCEL* and the *ACK for a non-2xx* repeat the INVITE's branch -- the upstream's branch,
  not ours, so there is nothing to read -- but they are hop-by-hop: the upstream sends them
  from the transport address it sent the INVITE from, to the same server address, so they
  hash to the worker that holds the INVITE server transaction. (Only while the worker set is
  unchanged: when a worker dies or restarts the kernel reshuffles flows, and a CANCEL caught
  in that moment gets 481. The same holds for a retransmitted request.) The ACK for a 2xx is
  an in-dialog request with the Route set and follows the Route rule.

:func:`owner_of` is that rule, a pure function on the raw bytes: two regular-expression
searches over the header block, no full parse (the worker that owns the message parses it).
A message whose owner is another worker is handed to it over :class:`WorkerChannel` together
with the transport address it came from, and that worker processes it exactly as if it had
come from the network; its answers leave through its own socket, which has the same local
address and port. A message that arrived over the channel is never routed again, so there are
no forwarding loops. A marker naming a worker that does not exist (a changed ``workers``
setting, a forged message) means "process it here".

TCP: only worker 0 listens on TCP and so holds every TCP connection. Another worker that must
send to a TCP peer (a phone registered over TCP, a TCP gateway) hands the bytes to worker 0
over the channel (:meth:`WorkerChannel.send_tcp`); when worker 0 cannot deliver them it says so
and the sender's transaction layer hears ``transport_failed`` as it would for its own socket.
What worker 0 receives over TCP for another worker's transaction or dialog is handed on like a
datagram, with the TCP peer as its source, so the answer comes back through worker 0 again.

The channel is one ``AF_UNIX`` datagram socket per worker, ``w<N>.sock`` in a run directory
the supervisor creates. A datagram socket keeps message boundaries, needs no connection set-up
when a worker restarts, and like UDP drops rather than blocks when the receiver is far behind
(counted in :attr:`WorkerChannel.stats`). It also carries the small control traffic of the
node: worker 0 asks the others for their counters (:meth:`WorkerChannel.query`) to report node
totals in ``/metrics`` and the control socket's ``stats``.

Why not share state instead (a transaction table in shared memory, or the database)? Transactions
and dialogs are hot, short-lived, pointer-rich Python objects; routing the rare message that
lands on the wrong worker to its owner costs one local datagram, and keeps every worker's core
single-threaded and unchanged.

The tags are process-wide (:func:`set_worker`): a worker *is* a process, and the branch
generators are module functions used by the proxy and the UAC alike. With one worker nothing
is tagged and nothing is routed, so a single-process server behaves exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, Protocol

from sipcore.transport_types import Peer

log = logging.getLogger("sipcore.workers")

__all__ = [
    "URI_PARAM",
    "WorkerChannel",
    "branch_suffix",
    "owner_of",
    "set_worker",
    "uri_param",
    "worker_index",
]

#: URI parameter naming the worker that owns a dialog (Record-Route) or UA dialog (Contact).
URI_PARAM: Final = "sbw"


class _Tag:
    index: int | None = None
    branch = ""
    uri = ""


_TAG = _Tag()


def set_worker(index: int | None) -> None:
    """Tag what this process generates with worker ``index`` (None: a single process)."""
    _TAG.index = index
    _TAG.branch = "" if index is None else f".w{index}"
    _TAG.uri = "" if index is None else f";{URI_PARAM}={index}"


def worker_index() -> int | None:
    return _TAG.index


def branch_suffix() -> str:
    """Appended to every Via branch this process generates (``.w1``, or nothing)."""
    return _TAG.branch


def uri_param() -> str:
    """Appended to this process's Record-Route and Contact URIs (``;sbw=1``, or nothing)."""
    return _TAG.uri


# ---------------------------------------------------------------------------- routing rule

# The first Via header line (full or compact name), the first Route header line, and the
# markers inside them. Header names are case-insensitive (RFC 3261 §7.3.1).
_VIA_LINE: Final = re.compile(rb"\n(?:via|v)[ \t]*:([^\r\n]*)", re.IGNORECASE)
_ROUTE_LINE: Final = re.compile(rb"\nroute[ \t]*:([^\r\n]*)", re.IGNORECASE)
_BRANCH_TAG: Final = re.compile(
    rb";[ \t]*branch[ \t]*=[ \t]*z9hG4bK[^;,\s]*\.w([0-9]{1,2})(?![^;,\s])", re.IGNORECASE)
_URI_TAG: Final = re.compile(rb";" + URI_PARAM.encode() + rb"=([0-9]{1,2})(?![^;>?\s])",
                             re.IGNORECASE)


def owner_of(data: bytes, workers: int) -> int | None:
    """The worker that owns the SIP message ``data``, or None if any worker may take it.

    Sans-IO and cheap (module docstring): a response belongs to the worker named by its top
    Via branch; a request to the worker named by its top Route value, else by its
    Request-URI. Everything else -- new requests, markers naming no existing worker, bytes
    that are no SIP at all -- is None: the receiving worker handles it (and its parser judges
    it).
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = len(data)
    if data.startswith(b"SIP/"):
        via = _VIA_LINE.search(data, 0, end)
        if via is None:
            return None
        value = via.group(1)
        comma = value.find(b",")
        m = _BRANCH_TAG.search(value, 0, comma if comma >= 0 else len(value))
    else:
        route = _ROUTE_LINE.search(data, 0, end)
        m = None
        if route is not None:
            value = route.group(1)
            close = value.find(b">")
            m = _URI_TAG.search(value, 0, close if close >= 0 else len(value))
        if m is None:
            line_end = data.find(b"\n", 0, end)
            m = _URI_TAG.search(data, 0, line_end if line_end >= 0 else end)
    if m is None:
        return None
    index = int(m.group(1))
    return index if index < workers else None


# ---------------------------------------------------------------------------- the channel

class ChannelSink(Protocol):
    """What the channel drives in its worker (:class:`sipcore.stack.SipStack` fits)."""

    def receive(self, data: bytes, peer: Peer, stream: bool) -> None:
        """Process a message as if it had arrived from ``peer`` on the network."""

    def transport_failed(self, peer: Peer) -> None: ...


class TcpSender(Protocol):
    """Worker 0's transports: send with a failure callback."""

    def send(self, data: bytes, peer: Peer,
             on_failure: Callable[[], None] | None = None) -> None: ...


QueryHandler = Callable[[], Awaitable[Any]]

# kind(1) origin(1) stream(1) port(2) transport length(1) host length(1), then transport,
# host and the payload.
_ADDR_HEADER: Final = struct.Struct(">cBBHBB")
_MESSAGE: Final = b"M"     # a SIP message from peer, for the receiver to process
_SEND_TCP: Final = b"S"    # to worker 0: send payload to the TCP peer
_TCP_FAILED: Final = b"F"  # from worker 0: the TCP peer could not be reached
_QUERY: Final = b"Q"       # JSON {"id", "what"}: run the receiver's handler "what"
_REPLY: Final = b"R"       # JSON {"id", "result"}

#: Datagram sockets are charged per message; big buffers let bursts queue instead of drop.
_SOCKET_BUFFER: Final = 4 * 1024 * 1024


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"w{index}.sock"


class WorkerChannel:
    """This worker's ``AF_UNIX`` datagram socket to the other workers (module docstring).

    :meth:`divert` is the stack's router: True when it handed a message to its owner.
    """

    def __init__(self, index: int, workers: int, run_dir: Path, sink: ChannelSink,
                 *, max_message: int = 65535,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.index = index
        self.workers = workers
        self.run_dir = Path(run_dir)
        self.sink = sink
        self.loop = loop or asyncio.get_running_loop()
        #: Worker 0's transports, for the TCP sends of the other workers.
        self.tcp: TcpSender | None = None
        self.handlers: dict[str, QueryHandler] = {}
        self._recv_size = max_message + 1024
        self._sock: socket.socket | None = None
        self._paths = [str(socket_path(self.run_dir, i)) for i in range(workers)]
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[Any], int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {k: 0 for k in (
            "diverted", "received", "tcp_relayed", "tcp_sent_for_others", "tcp_failed_notices",
            "send_failed", "queries", "bad_packets",
        )}
        #: Messages this worker handed to each owner (index -> count).
        self.diverted_to: dict[int, int] = {}

    # -- life cycle
    def start(self) -> None:
        """Bind ``w<index>.sock``; the supervisor takes its appearance as "ready"."""
        path = self._paths[self.index]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        sock.setblocking(False)
        tmp = path + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._readable)
        os.rename(tmp, path)  # appears complete: the supervisor never sees a half-bound socket

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._paths[self.index])
        for fut, _ in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the stack's router and the transports' TCP relay
    def divert(self, data: bytes, peer: Peer, stream: bool) -> bool:
        """Hand ``data`` to the worker that owns it; False when it is ours to process."""
        owner = owner_of(data, self.workers)
        if owner is None or owner == self.index:
            return False
        self.stats["diverted"] += 1
        self.diverted_to[owner] = self.diverted_to.get(owner, 0) + 1
        self._send(owner, self._pack(_MESSAGE, peer, stream) + data)
        return True

    def send_tcp(self, data: bytes, peer: Peer,
                 on_failure: Callable[[], None] | None = None) -> None:
        """Ask worker 0, which holds the TCP connections, to send ``data`` to ``peer``."""
        self.stats["tcp_relayed"] += 1
        if not self._send(0, self._pack(_SEND_TCP, peer, True) + data):
            if on_failure is not None:
                on_failure()
            else:
                self.sink.transport_failed(peer)

    # -- node-wide queries (worker 0 asks, the others answer)
    async def query(self, what: str, timeout: float = 1.0) -> dict[int, Any]:
        """Run handler ``what`` on every other worker; their answers by index (a worker that
        does not answer in ``timeout`` -- restarting, overloaded -- is left out)."""
        futures: dict[int, asyncio.Future[Any]] = {}
        for i in range(self.workers):
            if i == self.index:
                continue
            qid = next(self._ids)
            fut: asyncio.Future[Any] = self.loop.create_future()
            body = json.dumps({"id": qid, "what": what}).encode()
            if self._send(i, _QUERY + bytes([self.index]) + body):
                self._waiting[qid] = (fut, i)
                futures[i] = fut
            else:
                fut.cancel()
        self.stats["queries"] += len(futures)
        if futures:
            await asyncio.wait(futures.values(), timeout=timeout)
        out: dict[int, Any] = {}
        for i, fut in futures.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                out[i] = fut.result()
            else:
                fut.cancel()
        self._waiting = {k: v for k, v in self._waiting.items() if not v[0].done()}
        return out

    # -- wire format
    def _pack(self, kind: bytes, peer: Peer, stream: bool) -> bytes:
        transport = peer.transport.encode()
        host = peer.host.encode()
        return _ADDR_HEADER.pack(kind, self.index, int(stream), peer.port, len(transport),
                                 len(host)) + transport + host

    def _send(self, index: int, packet: bytes) -> bool:
        sock = self._sock
        if sock is None or not 0 <= index < self.workers:
            return False
        try:
            sock.sendto(packet, self._paths[index])
        except OSError:
            # The owner is restarting (no socket), far behind (queue full), or the message
            # is larger than a local datagram may be: dropped, as the network would.
            self.stats["send_failed"] += 1
            return False
        return True

    def _readable(self) -> None:
        sock = self._sock
        for _ in range(256):  # then let the loop serve the network socket too
            if sock is None:
                return
            try:
                packet = sock.recv(self._recv_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.stats["bad_packets"] += 1
                return
            try:
                self._dispatch(packet)
            except Exception:
                self.stats["bad_packets"] += 1
                log.exception("event=worker_packet_failed")
            sock = self._sock

    def _dispatch(self, packet: bytes) -> None:
        kind = packet[:1]
        if kind in (_QUERY, _REPLY):
            self._dispatch_json(kind, packet[1], json.loads(packet[2:]))
            return
        _, origin, stream, port, tlen, hlen = _ADDR_HEADER.unpack_from(packet)
        start = _ADDR_HEADER.size
        transport = packet[start:start + tlen].decode()
        host = packet[start + tlen:start + tlen + hlen].decode()
        payload = packet[start + tlen + hlen:]
        peer = Peer(transport, host, port)
        if kind == _MESSAGE:
            self.stats["received"] += 1
            self.sink.receive(payload, peer, bool(stream))
        elif kind == _SEND_TCP:
            self.stats["tcp_sent_for_others"] += 1
            if self.tcp is None:
                self._tcp_failed(origin, peer)
            else:
                self.tcp.send(payload, peer, lambda: self._tcp_failed(origin, peer))
        elif kind == _TCP_FAILED:
            self.sink.transport_failed(peer)
        else:
            self.stats["bad_packets"] += 1

    def _tcp_failed(self, origin: int, peer: Peer) -> None:
        self.stats["tcp_failed_notices"] += 1
        self._send(origin, self._pack(_TCP_FAILED, peer, True))

    def _dispatch_json(self, kind: bytes, origin: int, body: dict[str, Any]) -> None:
        if kind == _REPLY:
            waiting = self._waiting.pop(int(body["id"]), None)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_result(body.get("result"))
            return
        task = self.loop.create_task(self._answer(origin, int(body["id"]), str(body["what"])))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, origin: int, qid: int, what: str) -> None:
        handler = self.handlers.get(what)
        result: Any = None
        if handler is not None:
            try:
                result = await handler()
            except Exception:
                log.exception("event=worker_query_failed what=%s", what)
        body = json.dumps({"id": qid, "result": result}, default=str).encode()
        self._send(origin, _REPLY + bytes([self.index]) + body)
