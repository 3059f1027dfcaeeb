"""Batched UDP sends: the C accelerator (sipcore/_udpsend.c) and Transports' send queue.

Transports queues UDP sends and puts them on the wire together at the end of the loop's
current callbacks, with sendmmsg where the accelerator is built.  These tests send to real
loopback sockets and check what arrives: everything, once, in order, whether the accelerator
sends it, the transport does (no build, a full send buffer, an address the accelerator does
not parse), or both take turns; and failures reach the sink (or the sender's on_failure)
as a single send's would.  They run on asyncio's loop and on uvloop (the server's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from sipcore import accel, transport
from sipcore.transport import Transports
from sipcore.transport_types import Peer
from tests.support import require_accelerator

ROOT = Path(__file__).resolve().parents[2]


def _receiver(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(2.0)
    return s


def _drain(s: socket.socket, n: int) -> list[bytes]:
    return [s.recv(65535) for _ in range(n)]


def _nothing_more(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        s.recv(65535)
    except TimeoutError:
        return True
    return False


@contextlib.contextmanager
def _sockets(*socks: socket.socket) -> Iterator[None]:
    try:
        yield
    finally:
        for s in socks:
            s.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- the C module


@pytest.fixture(scope="module")
def udpsend() -> Any:
    module = accel.load("_udpsend")
    require_accelerator("_udpsend", module is not None)
    return module


def test_built_from_this_source(udpsend: Any) -> None:
    source = (ROOT / "sipcore" / "_udpsend.c").read_bytes()
    assert hashlib.sha256(source).hexdigest() == udpsend.SOURCE_HASH


def test_sends_every_datagram_in_order_across_chunks(udpsend: Any) -> None:
    a, b, sender = _receiver(), _receiver(), _receiver()
    with _sockets(a, b, sender):
        targets = [a.getsockname(), b.getsockname()]
        # 150: more than one sendmmsg's 64, and not a multiple of it.
        queue = [(b"d%03d" % i, *targets[i % 2], "the caller's", None) for i in range(150)]
        assert udpsend.sendmany(sender.fileno(), socket.AF_INET, queue, 0) == 150
        assert _drain(a, 75) == [b"d%03d" % i for i in range(0, 150, 2)]
        assert _drain(b, 75) == [b"d%03d" % i for i in range(1, 150, 2)]
        assert _nothing_more(a) and _nothing_more(b)
        # From a later start: only the rest.
        assert udpsend.sendmany(sender.fileno(), socket.AF_INET, queue, 148) == 150
        assert _drain(a, 1) == [b"d148"] and _drain(b, 1) == [b"d149"]
        assert udpsend.sendmany(sender.fileno(), socket.AF_INET, queue, 150) == 150


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6(udpsend: Any) -> None:
    r, sender = _receiver(socket.AF_INET6, "::1"), _receiver(socket.AF_INET6, "::1")
    with _sockets(r, sender):
        port = r.getsockname()[1]
        queue = [(b"one", "::1", port), (b"two", "0:0:0:0:0:0:0:1", port),
                 (b"v4", "127.0.0.1", port), (b"three", "::1", port)]
        # An IPv4 literal on an IPv6 socket is not sent: the caller's transport decides.
        assert udpsend.sendmany(sender.fileno(), socket.AF_INET6, queue, 0) == 2
        assert udpsend.sendmany(sender.fileno(), socket.AF_INET6, queue, 3) == 4
        assert _drain(r, 3) == [b"one", b"two", b"three"]
        assert _nothing_more(r)


@pytest.mark.parametrize(
    "bad",
    [
        (b"x", "example.invalid", 5060),  # a name: never resolved here
        (b"x", "fe80::1%eth0", 5060),  # an IPv6 literal (with a scope) on an IPv4 socket
        (b"x", "127.0.0.1", 65536),
        (b"x", "127.0.0.1", -1),
        (b"x", "127.0.0.1\x00", 5060),
        (b"", "127.0.0.1", 5060),  # empty: the transport sends nothing for it
        (bytearray(b"x"), "127.0.0.1", 5060),
        ("x", "127.0.0.1", 5060),
        (b"x", "127.0.0.1"),
        "not a tuple",
    ],
)
def test_stops_before_what_it_does_not_send(udpsend: Any, bad: object) -> None:
    r, sender = _receiver(), _receiver()
    with _sockets(r, sender):
        host, port = r.getsockname()
        queue = [(b"first", host, port), bad, (b"last", host, port)]
        assert udpsend.sendmany(sender.fileno(), socket.AF_INET, queue, 0) == 1
        assert udpsend.sendmany(sender.fileno(), socket.AF_INET, queue, 2) == 3
        assert _drain(r, 2) == [b"first", b"last"]
        assert _nothing_more(r)


def test_a_refused_send_is_left_to_the_caller(udpsend: Any) -> None:
    r = _receiver()
    with _sockets(r):
        sender = _receiver()
        fd = sender.fileno()
        sender.close()  # EBADF: the kernel refuses the first of them
        queue = [(b"x", *r.getsockname())]
        assert udpsend.sendmany(fd, socket.AF_INET, queue, 0) == 0
        with pytest.raises(ValueError):
            udpsend.sendmany(fd, socket.AF_INET, queue, -1)


# --------------------------------------------------------------------------- Transports


class Sink:
    def __init__(self) -> None:
        self.failed: list[Peer] = []

    def message_received(self, data: bytes, peer: Peer, stream: bool) -> None:
        pass

    def transport_failed(self, peer: Peer) -> None:
        self.failed.append(peer)

    def stream_error(self, error: object, peer: Peer) -> None:
        pass


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=["accelerated", "pure"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pure":
        monkeypatch.setattr(transport, "_sendmany", None)
    else:
        require_accelerator("_udpsend", transport._sendmany is not None)
    return str(request.param)


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """Run a scenario on a fresh loop of the parametrised kind (not the tests' shared one)."""

    def runner(scenario: Callable[[], Awaitable[None]]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(scenario())  # type: ignore[arg-type]

    return runner


async def _transports() -> tuple[Transports, Sink]:
    sink = Sink()
    t = Transports(sink)
    await t.listen_udp("127.0.0.1", 0)
    return t, sink


def _peer(s: socket.socket) -> Peer:
    host, port = s.getsockname()
    return Peer("UDP", host, port)


def test_a_burst_leaves_in_order_after_the_current_callbacks(
    path: str, run: Callable[[Callable[[], Awaitable[None]]], None]
) -> None:
    a, b = _receiver(), _receiver()

    async def scenario() -> None:
        t, sink = await _transports()
        try:
            for i in range(200):
                t.send(b"m%03d" % i, _peer(a if i % 2 else b))
            # Queued, not sent, until the loop runs its next callbacks.
            assert t.stats["udp_datagrams_out"] == 0 and _nothing_more(a)
            await asyncio.sleep(0)
            assert t.stats["udp_datagrams_out"] == 200
        finally:
            await t.close()
        assert sink.failed == []

    with _sockets(a, b):
        run(scenario)
        assert _drain(a, 100) == [b"m%03d" % i for i in range(1, 200, 2)]
        assert _drain(b, 100) == [b"m%03d" % i for i in range(0, 200, 2)]


def test_unsendable_datagrams_fail_alone_and_the_rest_still_leave(
    path: str, run: Callable[[Callable[[], Awaitable[None]]], None]
) -> None:
    r = _receiver()
    told: list[str] = []

    async def scenario() -> None:
        t, sink = await _transports()
        ok = _peer(r)
        wrong_family = Peer("UDP", "::1", ok.port)  # an IPv6 address for our IPv4 socket
        try:
            t.send(b"1", ok)
            t.send(b"2", wrong_family)
            t.send(b"3", ok)
            t.send(b"4", wrong_family, on_failure=lambda: told.append("4"))
            t.send(b"5", ok)
            await asyncio.sleep(0)
            if isinstance(asyncio.get_running_loop(), uvloop.Loop):
                # The server's loop refuses the address: the sender hears of it.
                assert sink.failed == [wrong_family]  # "4" told its sender instead
                assert told == ["4"]
                assert t.stats["udp_datagrams_out"] == 3
            else:
                # asyncio's reports the socket error to the protocol, without the peer.
                assert sink.failed == [] and told == []
                assert t.stats["udp_errors"] == 2
        finally:
            await t.close()

    with _sockets(r):
        run(scenario)
        assert _drain(r, 3) == [b"1", b"3", b"5"]
        assert _nothing_more(r)


def test_accelerator_and_transport_take_turns_in_order(
    monkeypatch: pytest.MonkeyPatch, run: Callable[[Callable[[], Awaitable[None]]], None]
) -> None:
    """Where the accelerator stops (the kernel refused one: a full send buffer, an error),
    that datagram goes through the transport and the accelerator carries on after it."""
    real = transport._sendmany
    require_accelerator("_udpsend", real is not None)
    assert real is not None
    calls: list[int] = []

    def three_at_most(fd: int, family: int, queue: list[Any], start: int) -> int:
        calls.append(start)
        return real(fd, family, queue[: start + 3], start)

    monkeypatch.setattr(transport, "_sendmany", three_at_most)
    r = _receiver()

    async def scenario() -> None:
        t, _ = await _transports()
        try:
            for i in range(10):
                t.send(b"%d" % i, _peer(r))
            await asyncio.sleep(0)
            assert t.stats["udp_datagrams_out"] == 10
        finally:
            await t.close()

    with _sockets(r):
        run(scenario)
        assert _drain(r, 10) == [b"%d" % i for i in range(10)]
    # 0-2 by the accelerator, 3 by the transport, 4-6, 7, 8-9.
    assert calls == [0, 4, 8]


def test_nothing_overtakes_what_the_transport_holds_back(
    monkeypatch: pytest.MonkeyPatch, run: Callable[[Callable[[], Awaitable[None]]], None]
) -> None:
    """While the transport buffers datagrams (EAGAIN), later ones queue behind them: the
    accelerator is not used past them."""
    real_sendmany = transport._sendmany
    require_accelerator("_udpsend", real_sendmany is not None)
    assert real_sendmany is not None
    used: list[int] = []

    def counting(fd: int, family: int, queue: list[Any], start: int) -> int:
        used.append(start)
        return real_sendmany(fd, family, queue, start)

    monkeypatch.setattr(transport, "_sendmany", counting)

    class Buffering:
        """The real transport, reporting bytes buffered as a full send buffer would."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def get_write_buffer_size(self) -> int:
            return 1

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    r = _receiver()

    async def scenario() -> None:
        t, _ = await _transports()
        proto = t._udp[0]
        real = proto.transport
        proto.transport = Buffering(real)
        try:
            for i in range(5):
                t.send(b"%d" % i, _peer(r))
            await asyncio.sleep(0)
        finally:
            proto.transport = real
            await t.close()

    with _sockets(r):
        run(scenario)
        assert _drain(r, 5) == [b"%d" % i for i in range(5)]
    assert used == []


def test_close_sends_what_was_queued_before_it(
    path: str, run: Callable[[Callable[[], Awaitable[None]]], None]
) -> None:
    r = _receiver()

    async def scenario() -> None:
        t, _ = await _transports()
        t.send(b"goodbye", _peer(r))
        await t.close()  # before the loop ran the flush

    with _sockets(r):
        run(scenario)
        assert _drain(r, 1) == [b"goodbye"]


def test_never_written_to_once_the_transport_closes(
    monkeypatch: pytest.MonkeyPatch, run: Callable[[Callable[[], Awaitable[None]]], None]
) -> None:
    """A closed transport's descriptor number may already belong to another socket (a
    database connection): the accelerator must not write to it."""
    used: list[int] = []

    def recording(fd: int, family: int, queue: list[Any], start: int) -> int:
        used.append(fd)
        return start  # sends nothing: the transport gets each one

    monkeypatch.setattr(transport, "_sendmany", recording)
    r = _receiver()

    async def scenario() -> None:
        t, _ = await _transports()
        proto = t._udp[0]
        assert proto.transport is not None and proto.fileno >= 0
        try:
            t.send(b"open", _peer(r))
            await asyncio.sleep(0)
            assert used == [proto.fileno]
            t.send(b"closing", _peer(r))  # its flush is due before connection_lost
            proto.transport.close()
            await asyncio.sleep(0)
            assert len(used) == 1
            await asyncio.sleep(0.01)  # connection_lost
            assert proto.fileno == -1
        finally:
            await t.close()

    with _sockets(r):
        run(scenario)
        assert _drain(r, 1) == [b"open"]
