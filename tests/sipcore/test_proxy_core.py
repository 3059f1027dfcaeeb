"""ProxyCore over a real SipStack on loopback UDP: what an answered request leaves behind.

A finished server transaction lingers up to 64*T1 (Timer J) to repeat its response to a
retransmitted request; it must do that from the response bytes alone, without the parsed
request or the pipeline context kept alive for as long (they filled the garbage collector's
older generations and made 100-200 ms pauses under load).  The same holds for a forwarded
INVITE, whose client transaction lingers for Timer M (64*T1) after its 2xx to pass on
retransmissions of that 2xx.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from sipcore.message import Response, build_request, parse_message
from sipcore.pipeline import EventBus, Pipeline, RequestContext, Stage, Target
from sipcore.proxy import LocalIdentity, ProxyCore, ResponseContext
from sipcore.stack import SipStack
from sipcore.transaction import ServerTxKey, TimerSettings, TransactionLayer, TxState
from sipcore.transport import Transports
from sipcore.transport_types import Peer


@dataclass
class Server:
    stack: SipStack
    proxy: ProxyCore
    port: int
    callee: socket.socket


def _udp_socket() -> socket.socket:
    """A non-blocking UDP socket on a free loopback port (a phone, a callee)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    layer = TransactionLayer(TimerSettings(T1=0.5, T2=4.0, T4=5.0))
    stack = SipStack(lambda st: Transports(st), layer)
    host, port = await stack.transports.listen_udp("127.0.0.1", 0)
    identity = LocalIdentity(["localhost"], [("UDP", host, port)])
    callee = _udp_socket()
    callee_port = callee.getsockname()[1]
    pipeline = Pipeline()

    def locate(ctx: RequestContext) -> bool:
        # Every request for bob goes to the callee socket (a registrar's lookup in short).
        if ctx.request.request_uri.user == "bob":  # type: ignore[union-attr]
            ctx.targets.append(Target(f"sip:bob@127.0.0.1:{callee_port}",
                                      Peer("UDP", "127.0.0.1", callee_port)))
        return False

    pipeline.add(Stage.LOCATION, locate)

    def challenge(ctx: RequestContext) -> bool:
        # What DigestAuth does with a REGISTER that carries no credentials.
        if ctx.request.method != "REGISTER":
            return False
        ctx.stateless = True
        return ctx.reply(401, "Unauthorized", [("WWW-Authenticate", 'Digest realm="x"')])

    pipeline.add(Stage.AUTH, challenge)
    proxy = ProxyCore(stack, pipeline, EventBus(), identity)
    try:
        yield Server(stack, proxy, port, callee)
    finally:
        callee.close()
        await proxy.close()
        await stack.close()


def _request(method: str, uri: str, branch: str) -> bytes:
    return build_request(method, uri, [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:5999;branch={branch};rport"),
        ("From", "<sip:probe@localhost>;tag=p1"),
        ("To", "<sip:localhost>"),
        ("Call-ID", f"{branch}@probe"),
        ("CSeq", f"1 {method}"),
        ("Max-Forwards", "70"),
    ])


async def _exchange(sock: socket.socket, data: bytes, port: int) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, data, ("127.0.0.1", port))
    return await asyncio.wait_for(loop.sock_recv(sock, 65535), 2.0)


async def test_answered_request_leaves_only_the_response_behind(server: Server) -> None:
    sock = _udp_socket()
    try:
        # A MESSAGE for a user nobody can reach: the server answers it itself.
        request = _request("MESSAGE", f"sip:carol@localhost:{server.port}", "z9hG4bK-linger-1")
        first = await _exchange(sock, request, server.port)
        response = parse_message(first)
        assert isinstance(response, Response) and response.status >= 400

        key = ServerTxKey("z9hG4bK-linger-1", "127.0.0.1", 5999, "MESSAGE")
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


async def test_options_to_the_server_is_answered_statelessly(server: Server) -> None:
    # Keep-alive OPTIONS from every phone and trunk would otherwise each keep a transaction
    # for Timer J (32 s): at 8,000/s a quarter of a million, and the collector's pauses with
    # them.  The answer depends on the request alone, so a retransmission is answered again.
    sock = _udp_socket()
    try:
        request = _request("OPTIONS", f"sip:localhost:{server.port}", "z9hG4bK-options-1")
        first = await _exchange(sock, request, server.port)
        response = parse_message(first)
        assert isinstance(response, Response) and response.status == 200
        assert response.to_addr.tag  # stable per request: the same in every answer
        key = ServerTxKey("z9hG4bK-options-1", "127.0.0.1", 5999, "OPTIONS")
        assert server.stack.layer.state_of(key) is None
        assert server.stack.layer.server_transaction_count == 0
        requests_before = server.proxy.stats["requests"]
        again = parse_message(await _exchange(sock, request, server.port))
        assert isinstance(again, Response) and again.status == 200
        assert again.to_addr.tag == response.to_addr.tag
        assert server.proxy.stats["requests"] == requests_before + 1
        assert server.stack.layer.stats.requests_absorbed == 0
    finally:
        sock.close()


def _invite(port: int, caller_port: int) -> bytes:
    return build_request("INVITE", f"sip:bob@localhost:{port}", [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:{caller_port};branch=z9hG4bK-linger-inv;rport"),
        ("From", "<sip:alice@localhost>;tag=a1"),
        ("To", "<sip:bob@localhost>"),
        ("Call-ID", "linger-invite@probe"),
        ("CSeq", "1 INVITE"),
        ("Contact", f"<sip:alice@127.0.0.1:{caller_port}>"),
        ("Max-Forwards", "70"),
    ])


def _answer(request: bytes, status: int, reason: str) -> bytes:
    """The callee's response to a forwarded request: its Vias, From, To (with a tag),
    Call-ID and CSeq echoed."""
    lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    echoed = [line for line in lines
              if line.split(b":", 1)[0].lower() in (b"via", b"from", b"call-id", b"cseq")]
    to = next(line for line in lines if line.lower().startswith(b"to:"))
    head = [f"SIP/2.0 {status} {reason}".encode(), *echoed, to + b";tag=b1",
            b"Contact: <sip:bob@127.0.0.1>", b"Content-Length: 0"]
    return b"\r\n".join(head) + b"\r\n\r\n"


async def _recv_status(sock: socket.socket, status: int) -> bytes:
    loop = asyncio.get_running_loop()
    while True:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65535), 2.0)
        msg = parse_message(data)
        if isinstance(msg, Response) and msg.status == status:
            return data


async def test_answered_invite_leaves_no_context_but_still_relays_2xx_again(
        server: Server) -> None:
    loop = asyncio.get_running_loop()
    caller = _udp_socket()
    try:
        await loop.sock_sendto(caller, _invite(server.port, caller.getsockname()[1]),
                               ("127.0.0.1", server.port))
        forwarded, proxy_addr = await asyncio.wait_for(
            loop.sock_recvfrom(server.callee, 65535), 2.0)
        assert forwarded.startswith(b"INVITE sip:bob@127.0.0.1")
        assert server.proxy.responses, "an INVITE in progress can be CANCELled"

        ok = _answer(forwarded, 200, "OK")
        await loop.sock_sendto(server.callee, ok, proxy_addr)
        first = parse_message(await _recv_status(caller, 200))
        assert isinstance(first, Response) and first.to_addr.tag == "b1"

        # Answered: nothing of the call's pipeline walk is kept for the 32 s of Timer M ...
        assert server.proxy.contexts == {}
        assert server.proxy.responses == {}
        gc.collect()
        assert not [o for o in gc.get_objects()
                    if type(o) in (ResponseContext, RequestContext)]
        # ... yet a retransmission of the 2xx (§16.7 step 5, RFC 6026) still goes upstream.
        await loop.sock_sendto(server.callee, ok, proxy_addr)
        again = parse_message(await _recv_status(caller, 200))
        assert isinstance(again, Response)
        assert again.call_id == "linger-invite@probe" and again.to_addr.tag == "b1"
        assert len(again.vias) == 1  # our own Via taken off, as for the first
    finally:
        caller.close()


async def test_a_stateless_challenge_leaves_no_transaction(server: Server) -> None:
    sock = _udp_socket()
    port = sock.getsockname()[1]
    register = build_request("REGISTER", "sip:localhost", [
        ("Via", f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-stateless-1;rport"),
        ("From", "<sip:carol@localhost>;tag=c1"),
        ("To", "<sip:carol@localhost>"),
        ("Call-ID", "stateless-1@probe"),
        ("CSeq", "1 REGISTER"),
        ("Contact", f"<sip:carol@127.0.0.1:{port}>"),
        ("Max-Forwards", "70"),
    ])
    try:
        first = parse_message(await _exchange(sock, register, server.port))
        assert isinstance(first, Response) and first.status == 401
        # No transaction lingers for Timer J ...
        assert server.stack.layer.server_transaction_count == 0
        # ... so a retransmission is answered afresh by the pipeline.
        requests = server.proxy.stats["requests"]
        again = parse_message(await _exchange(sock, register, server.port))
        assert isinstance(again, Response) and again.status == 401
        assert server.proxy.stats["requests"] == requests + 1
        assert server.stack.layer.stats.requests_absorbed == 0
    finally:
        sock.close()
