"""ProxyCore over a real SipStack on loopback UDP: what an answered request leaves behind.

A finished server transaction lingers up to 64*T1 (Timer J) to repeat its response to a
retransmitted request; it must do that from the response bytes alone, without the parsed
request or the pipeline context kept alive for as long (they filled the garbage collector's
older generations and made 100-200 ms pauses under load).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from sipcore.message import Response, build_request, parse_message
from sipcore.pipeline import EventBus, Pipeline
from sipcore.proxy import LocalIdentity, ProxyCore
from sipcore.stack import SipStack
from sipcore.transaction import ServerTxKey, TimerSettings, TransactionLayer, TxState
from sipcore.transport import Transports


@dataclass
class Server:
    stack: SipStack
    proxy: ProxyCore
    port: int


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    layer = TransactionLayer(TimerSettings(T1=0.5, T2=4.0, T4=5.0))
    stack = SipStack(lambda st: Transports(st), layer)
    host, port = await stack.transports.listen_udp("127.0.0.1", 0)
    identity = LocalIdentity(["localhost"], [("UDP", host, port)])
    proxy = ProxyCore(stack, Pipeline(), EventBus(), identity)
    try:
        yield Server(stack, proxy, port)
    finally:
        await proxy.close()
        await stack.close()


def _options(port: int, branch: str) -> bytes:
    return build_request("OPTIONS", f"sip:localhost:{port}", [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:5999;branch={branch};rport"),
        ("From", "<sip:probe@localhost>;tag=p1"),
        ("To", "<sip:localhost>"),
        ("Call-ID", f"{branch}@probe"),
        ("CSeq", "1 OPTIONS"),
        ("Max-Forwards", "70"),
    ])


async def _exchange(sock: socket.socket, data: bytes, port: int) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, data, ("127.0.0.1", port))
    return await asyncio.wait_for(loop.sock_recv(sock, 65535), 2.0)


async def test_answered_request_leaves_only_the_response_behind(server: Server) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    try:
        request = _options(server.port, "z9hG4bK-linger-1")
        first = await _exchange(sock, request, server.port)
        response = parse_message(first)
        assert isinstance(response, Response) and response.status == 200

        key = ServerTxKey("z9hG4bK-linger-1", "127.0.0.1", 5999, "OPTIONS")
        # The transaction lingers (Timer J) to absorb retransmissions ...
        assert server.stack.layer.state_of(key) is TxState.COMPLETED
        # ... but the pipeline context of the answered request is gone,
        assert server.proxy.contexts == {}
        # and the retransmission is answered with the very same bytes, not re-processed.
        requests_before = server.proxy.stats["requests"]
        assert await _exchange(sock, request, server.port) == first
        assert server.proxy.stats["requests"] == requests_before
        assert server.stack.layer.stats.requests_absorbed == 1
    finally:
        sock.close()
